# imgcls: two commands on a fresh machine.
#   make serve   set up the virtualenv with the runtime dependencies (when needed) and run the
#                service on $(HOST):$(PORT)
#   make test    set up the virtualenv with the dev extra too (when needed) and run format, lint,
#                type checks and tests

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# what is installed: the runtime dependencies (make serve) or those plus the dev extra (the rest)
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
URL ?= http://127.0.0.1:8000
USERS ?= 20
SPAWN_RATE ?= 5
RUN_TIME ?= 60s
LOADTEST_OUT ?= loadtest-results

.PHONY: venv venv-runtime serve check format test loadtest bench clean

# Serving needs the runtime dependencies only (no Ray, schemathesis, Playwright, locust).
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(RUNTIME_STAMP)

# Tests, lint and type checks need the dev extra; it includes the runtime dependencies.
$(DEV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(DEV_STAMP) $(RUNTIME_STAMP)

venv-runtime: $(RUNTIME_STAMP)

venv: $(DEV_STAMP)

serve: venv-runtime
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/imgcls serve

format: venv
	$(VENV)/bin/ruff format app tests loadtest
	$(VENV)/bin/ruff check --fix app tests loadtest

check: venv
	$(VENV)/bin/ruff format --check app tests loadtest
	$(VENV)/bin/ruff check app tests loadtest
	$(VENV)/bin/mypy app

test: check
	$(PY) -m pytest $(PYTEST_ARGS)

# Headless locust against $(URL) (the local service by default), bounded in users and time.
loadtest: venv
	@mkdir -p $(LOADTEST_OUT)
	@echo "locust reports: $(abspath $(LOADTEST_OUT))/report.html and $(abspath $(LOADTEST_OUT))/stats_*.csv"
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(URL) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(RUN_TIME) --stop-timeout 10 \
		--csv $(LOADTEST_OUT)/stats --html $(LOADTEST_OUT)/report.html --only-summary

# imgcls bench for one model (MODEL, DEVICE); results under bench-results/
MODEL ?= resnet50
DEVICE ?= cpu
bench: venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(VENV)/bin/imgcls bench --model $(MODEL) --device $(DEVICE) --out bench-results

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
