# mailpool: the two set-up commands of README.md are `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup setup-dev lint typecheck pytest bench chaos

run: setup
	$(VENV)/bin/mailpool run

# The container image is built in the background meanwhile: the image test
# (tests/test_image_podman.py) waits for that build (build-image.sh takes a lock) and finds
# its layers cached, which takes the build's ~40 s off the suite's time.
test: setup-dev
	@mkdir -p build/image
	@./scripts/build-image.sh --tag localhost/mailpool:test >build/image/early.log 2>&1 &
	$(MAKE) lint typecheck pytest

setup:
	./scripts/setup.sh

setup-dev:
	MAILPOOL_SETUP_DEV=1 ./scripts/setup.sh

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

# A skipped test fails this run (tests/no_skips.py): `make test` installs every peer, so a
# skip would only hide a part of the suite that did not run.  Two processes (pytest-xdist),
# as the CI machine has two cores: most tests wait on servers and timeouts, so the suite
# took 4 min 52 s instead of 8 min 54 s there.  Each file's tests run in one process, in
# their order (--dist loadfile), as they do in a serial run.
PYTEST_PROCESSES ?= 2
export PYTEST_PROCESSES  # test-lowest (scripts/lowest-deps.sh) reads it too
pytest:
	MAILPOOL_NO_SKIPS=1 $(PY) -m pytest -q -n $(PYTEST_PROCESSES) --dist loadfile

# The container image from deploy/Dockerfile, built without Docker: podman, runc and a
# Debian base made with mmdebstrap (scripts/build-image.sh; deploy/README.md has the recipe).
IMAGE ?= localhost/mailpool:dev
.PHONY: image
image:
	./scripts/build-image.sh --tag $(IMAGE)

bench:
	MAILPOOL_SETUP_DEV=1 MAILPOOL_SETUP_BENCH=1 ./scripts/setup.sh
	$(PY) bench/report.py --full

chaos: setup-dev
	MAILPOOL_CHAOS=full $(PY) -m pytest tests/chaos -s

# CI's second run: the end-to-end tests on the lowest dependency versions pyproject allows
# (a venv of its own, .venv-lowest); see scripts/lowest-deps.sh.
.PHONY: test-lowest
test-lowest: setup-dev
	./scripts/lowest-deps.sh
