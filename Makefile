# imgcls: two commands on a fresh machine.
#   make serve   set up the virtualenv (when needed) and run the service on $(HOST):$(PORT)
#   make test    set up the virtualenv (when needed) and run format, lint, type checks and tests

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: venv serve check format test loadtest bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

serve: venv
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/imgcls serve

format: venv
	$(VENV)/bin/ruff format app tests
	$(VENV)/bin/ruff check --fix app tests

check: venv
	$(VENV)/bin/ruff format --check app tests
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/mypy app

test: check
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
