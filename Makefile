# The two commands a user needs: `make demo` and `make test`.
# Each creates or reuses the virtual environments and installs what it needs.

PYTHON ?= python3
VENV := .venv
WORKER_VENV := .venv-worker
PY := $(VENV)/bin/python
WPY := $(WORKER_VENV)/bin/python
STAMP := $(VENV)/.installed
WSTAMP := $(WORKER_VENV)/.installed

.PHONY: demo test lint bench backend install clean

# Full environment: worker, backend and test tools.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[backend,test,backend-test]"
	touch $@

# Worker-only environment: proves the worker package and its tests need no Django.
$(WSTAMP): pyproject.toml
	test -x $(WPY) || $(PYTHON) -m venv $(WORKER_VENV)
	$(WPY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(WPY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(STAMP) $(WSTAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(WSTAMP)
	$(WPY) -c "import django" 2>/dev/null && { echo "Django leaked into $(WORKER_VENV)"; exit 1; } || true
	BACKEND_PYTHON=$(abspath $(PY)) $(WPY) -m pytest tests/workers
	$(PY) -m pytest tests/backend
	$(PY) -m pytest tests/e2e

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

backend: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(VENV)/bin/gunicorn -c python:backend.internal_api.gunicorn_conf --bind $${BIND:-127.0.0.1:8000}

clean:
	rm -rf $(VENV) $(WORKER_VENV) .data
