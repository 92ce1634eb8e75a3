#!/usr/bin/env bash
# CI, second run: the tests that cover delivery, ingest and listen end to end, against the
# LOWEST version of every runtime dependency pyproject.toml allows (the floors are read from
# pyproject by scripts/lowest_constraints.py, so they cannot drift), in a virtual environment
# of its own (.venv-lowest); the development tools keep their usual versions.  The main
# suite (`make test`) runs against the newest versions.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LOWEST_VENV:-.venv-lowest}
PYTHON=${PYTHON:-python3}
# What the floors must carry: every end-to-end path (relay, ingest, listen, producer, the
# settlement connection's idle check, Redis Sentinel, Redis Cluster: SlotConnection overrides
# redis-py's Connection._connect and read_response), the wire format (msgpack), the
# metrics endpoint, DKIM signing (dkimpy, cryptography, PyNaCl), verification on receive
# (dnspython, pyspf, publicsuffixlist, authres) and the library internals check.
TESTS=(
  tests/test_internals_*.py
  tests/test_delivery_settler_idle.py
  tests/test_delivery_happy.py
  tests/test_delivery_retries.py
  tests/test_delivery_refusals.py
  tests/test_delivery_redis_outage.py
  tests/test_delivery_idempotency.py
  tests/test_delivery_process.py
  tests/test_delivery_tls_auth.py
  tests/test_delivery_unreadable_reply.py
  tests/test_delivery_dkim.py
  tests/test_dkim_signer.py
  tests/test_verify_*.py
  tests/test_ingest_*.py
  tests/test_listen_*.py
  tests/test_sentinel_roles.py
  tests/test_cluster.py
  tests/test_cluster_setup.py
  tests/test_producer_delivery.py
  tests/test_producer_helper.py
  tests/test_streams_consumer.py
  tests/test_codec_wire.py
  tests/test_schema_vectors.py
  tests/test_health.py
)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.mailpool-lowest-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  constraints="$VENV/lowest-constraints.txt"
  "$VENV/bin/python" scripts/lowest_constraints.py >"$constraints"
  "$VENV/bin/pip" install -q --upgrade pip
  # Wheels only: a floor without a wheel for this Python must fail here, not be compiled
  # on this machine (with whatever compiler it has) and fail on the next.
  # dkimpy, authres and pyspf are published only as pure-Python sdists: they alone are
  # built (no compiler).
  "$VENV/bin/pip" install -q --only-binary=:all: --no-binary=dkimpy,authres,pyspf \
    -r "$constraints"
  # The package and its test tools; the constraints keep the floors where they are (pip
  # fails rather than upgrade one for a tool that wants more).
  "$VENV/bin/pip" install -q -c "$constraints" -e '.[dev]'
  touch "$stamp"
fi
"$VENV/bin/python" scripts/lowest_constraints.py --check
# No test may be skipped here either: a skipped test proves nothing about the floors.
MAILPOOL_NO_SKIPS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_PROCESSES:-2}" --dist loadfile "${TESTS[@]}"
