#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for mailpool: system packages (when missing) and a
# virtual environment with the package and its development tools.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ "${MAILPOOL_SETUP_DEV:-0}" = 1 ]; then
  # Test-only peers: swaks (SMTP client), Postfix's smtp-source/smtp-sink (never the daemon),
  # openssl (test certificates), nodejs/npm and ruby (the cross-language tests).
  command -v swaks >/dev/null || need_apt+=(swaks)
  command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need_apt+=(postfix)
  command -v openssl >/dev/null || need_apt+=(openssl)
  command -v node >/dev/null || need_apt+=(nodejs)
  command -v npm >/dev/null || need_apt+=(npm)
  # The Ruby producer example is tested with Debian's gems.
  ruby -e 'require "redis"; require "msgpack"' 2>/dev/null || need_apt+=(ruby ruby-redis ruby-msgpack)
fi
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
stamp="$VENV/.mailpool-installed-${MAILPOOL_SETUP_DEV:-0}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  if [ "${MAILPOOL_SETUP_DEV:-0}" = 1 ]; then
    "$VENV/bin/pip" install -q -e '.[dev]'
  else
    "$VENV/bin/pip" install -q -e .
  fi
  touch "$stamp"
fi
