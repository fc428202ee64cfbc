# The two commands a user needs: `make demo` and `make test`.
# Each creates or reuses the virtual environments and installs what it needs.

PYTHON ?= python3
VENV := .venv
WORKER_VENV := .venv-worker
PY := $(VENV)/bin/python
WPY := $(WORKER_VENV)/bin/python
STAMP := $(VENV)/.installed
WSTAMP := $(WORKER_VENV)/.installed
# pip shows errors only (-qq): a failed install still prints pip's error and the build's output
# and stops make, but not pip's progress nor the build backend's notes (setuptools prints an
# "Editable installation" banner at every editable install of a flat layout).
PIP_INSTALL := -m pip install -qq --disable-pip-version-check

.PHONY: demo test test-workers test-backend test-backend-postgres lint bench backend lifecycle install clean

# Full environment: worker, backend, test and lint tools.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip
	$(PY) $(PIP_INSTALL) -e ".[backend,test,lint,backend-test]"
	touch $@

# Worker-only environment: proves the worker package and its tests need no Django.
$(WSTAMP): pyproject.toml
	test -x $(WPY) || $(PYTHON) -m venv $(WORKER_VENV)
	$(WPY) $(PIP_INSTALL) --upgrade pip
	$(WPY) $(PIP_INSTALL) -e ".[test]"
	touch $@

install: $(STAMP) $(WSTAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/deptry .
	$(VENV)/bin/lint-imports

# The worker and backend suites run two at a time (each prints its output when it ends): the
# backend's PostgreSQL run of its API suites starts once the worker suite is done. The
# end-to-end suite, whose faults are timed, runs alone after them.
PG_SUITE := tests/backend/test_api_postgres.py
test: lint $(WSTAMP)
	$(WPY) -c "import django" 2>/dev/null && { echo "Django leaked into $(WORKER_VENV)"; exit 1; } || true
	$(MAKE) --no-print-directory -j2 --output-sync=target test-workers test-backend test-backend-postgres
	$(PY) -m pytest tests/e2e

test-workers: $(WSTAMP)
	BACKEND_PYTHON=$(abspath $(PY)) $(WPY) -m pytest tests/workers

test-backend: $(STAMP)
	$(PY) -m pytest tests/backend --ignore=$(PG_SUITE)

test-backend-postgres: $(STAMP)
	$(PY) -m pytest $(PG_SUITE)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# exec: gunicorn replaces the recipe's shell, so the SIGTERM that make passes to its child
# reaches gunicorn (a shell in between would die and leave gunicorn listening).
backend: $(STAMP)
	$(PY) manage.py migrate --noinput
	exec $(VENV)/bin/gunicorn -c python:backend.internal_api.gunicorn_conf --bind $${BIND:-127.0.0.1:8000}

# The backend's lifecycle process (publishes dispatches, repairs lost executions and webhooks)
# beside `make backend`, on the same DATABASE_URL, CELERY_BROKER_URL and WORKER_DATA_DIR.
# exec, as above: the SIGTERM reaches run_lifecycle, which stops after its current pass.
lifecycle: $(STAMP)
	exec $(PY) manage.py run_lifecycle

clean:
	rm -rf $(VENV) $(WORKER_VENV) .data
