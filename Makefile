# apipool — developer entry points. Every target creates the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv test test-fast lint format demo bench image e2e e2e-local crds crds-check compare clean

help:
	@echo "make demo   - local demo: pool of slots vs a connection-limited stand-in API"
	@echo "make test   - the whole test suite (starts its own redis-server)"
	@echo "make lint   - ruff + mypy --strict"
	@echo "make bench  - benchmarks, figures printed"
	@echo "make compare - apipool vs dramatiq's ConcurrentRateLimiter vs a sorted-set semaphore, same chaos"
	@echo "make image  - build the container image (needs a container engine)"
	@echo "make crds   - copy crds/ (and the example worker) into charts/apipool"
	@echo "make e2e-local - the Kubernetes path on this machine: API emulator, operator, local node (root)"
	@echo "make e2e    - end-to-end tests on a kind cluster (needs Docker, kind and kubectl)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "apipool needs Python >= 3.11; set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow and not e2e' $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench scripts examples compare
	$(BIN)/ruff format --check operator tests bench scripts examples compare
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format operator tests bench scripts examples compare
	$(BIN)/ruff check --fix operator tests bench scripts examples compare

demo: $(STAMP)
	$(BIN)/apipool demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

compare: $(STAMP)
	$(BIN)/python -m compare $(COMPARE_ARGS)

crds:
	$(PYTHON) scripts/sync_crds.py

crds-check:
	$(PYTHON) scripts/sync_crds.py --check

IMAGE ?= apipool:dev

image:
	docker build -t $(IMAGE) .

e2e-local: $(STAMP)
	$(BIN)/python -m pytest -m e2e_local tests/e2e_local -s $(PYTEST_ARGS)

e2e: $(STAMP)
	APIPOOL_E2E_IMAGE=$(IMAGE) $(BIN)/python -m pytest -m e2e tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
