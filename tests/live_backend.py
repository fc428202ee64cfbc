"""The real backend as a subprocess, for tests and scripts (imports no Django).

``LiveBackend`` migrates a database, creates an organization and serves the backend with
gunicorn (``gthread`` workers) on a loopback port, using the interpreter named by
``$BACKEND_PYTHON`` (default: this one). The worker test suite runs without Django and still
gets a real backend this way.

    with LiveBackend() as backend:                      # SQLite file in a temp dir
        ...backend.url, backend.api_key, backend.org_id...
    with LiveBackend.postgres() as backend:             # fresh PostgreSQL database, dropped
        ...
    backend = LiveBackend(database_url=..., port=8000)  # a given database and port
    backend.start(); backend.stop(); backend.start()    # same port, same database
    backend.close()                                     # stop and remove what it created
    lifecycle = backend.run_lifecycle("--interval", "0.2")  # manage.py run_lifecycle
    lifecycle.stop()                                    # SIGTERM, wait

Its log (gunicorn's and Django's JSON lines) is in ``backend.log_path``. The backend publishes
executions' dispatches to the embedded filesystem broker under its own ``data_dir``
(``WORKER_DATA_DIR``; messages in ``backend.broker_queue_dir``), never to the repository's
``.data`` nor to a ``CELERY_BROKER_URL`` inherited from the caller's environment: pass
``extra_env={"CELERY_BROKER_URL": ...}`` to choose a broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import POSTGRES_ADMIN_URL, die_with_parent, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_KEY_PREFIX = "swi-test-key-7Q2xK9"

_PG_ADMIN_SCRIPT = """
import sys, psycopg
action, admin_url, name = sys.argv[1:4]
with psycopg.connect(admin_url, autocommit=True) as conn:
    if action == "create":
        conn.execute(f'CREATE DATABASE "{name}"')
    else:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
"""


def make_test_key() -> str:
    """A recognisable test API key: the fixed prefix and a random suffix."""
    return f"{TEST_KEY_PREFIX}-{secrets.token_hex(8)}"


def backend_python() -> str:
    """The interpreter that has the backend's packages (``$BACKEND_PYTHON``)."""
    return os.environ.get("BACKEND_PYTHON") or sys.executable


class BackendStartError(RuntimeError):
    """The backend process failed to come up; the message has the tail of its log."""


class LiveBackend:
    """A gunicorn-served backend on ``127.0.0.1:<port>`` with its own database.

    Attributes: ``url`` (``http://127.0.0.1:PORT``), ``api_key`` (the first accepted key),
    ``api_keys`` (all of them), ``org_id`` (created at first start), ``database_url``,
    ``port``, ``log_path``, ``data_dir``.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        port: int | None = None,
        api_keys: Sequence[str] | None = None,
        org_id: str = "org-test",
        workers: int = 1,
        threads: int = 8,
        log_level: str = "INFO",
        data_dir: str | Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="live-backend-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or f"sqlite:///{self.data_dir / 'backend.sqlite3'}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_keys = list(api_keys or [make_test_key()])
        if not self.api_keys or not all(self.api_keys):
            raise ValueError("api_keys must be non-empty strings")
        self.api_key = self.api_keys[0]
        self.org_id = org_id
        self.workers = workers
        self.threads = threads
        self.log_level = log_level
        self.log_path = self.data_dir / "backend.log"
        self.start_timeout = start_timeout
        self._extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._drop_database: tuple[str, str] | None = None
        self._lifecycle_count = 0

    @classmethod
    def postgres(cls, admin_url: str = POSTGRES_ADMIN_URL, **kwargs: Any) -> LiveBackend:
        """A backend on a fresh PostgreSQL database (unique name), dropped by ``close()``."""
        name = f"live_backend_{os.getpid()}_{secrets.token_hex(4)}"
        _run([backend_python(), "-c", _PG_ADMIN_SCRIPT, "create", admin_url, name])
        base = admin_url.rsplit("/", 1)[0]
        backend = cls(database_url=f"{base}/{name}", **kwargs)
        backend._drop_database = (admin_url, name)
        return backend

    # --- life cycle ----------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment the backend's processes run with."""
        env = dict(os.environ)
        env.update(
            {
                "INTERNAL_SERVICE_API_KEY": ",".join(self.api_keys),
                "DATABASE_URL": self.database_url,
                "BACKEND_DATA_DIR": str(self.data_dir),
                "LOG_LEVEL": self.log_level,
                "DJANGO_SETTINGS_MODULE": "backend.settings",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("DEBUG", None)
        # Its own embedded broker: dispatches never leak into the repository's .data/broker.
        env.pop("CELERY_BROKER_URL", None)
        env["WORKER_DATA_DIR"] = str(self.data_dir)
        env.update(self._extra_env)
        return env

    @property
    def broker_queue_dir(self) -> Path:
        """The folder of the embedded broker's messages (with the default broker)."""
        return Path(self.env["WORKER_DATA_DIR"]) / "broker" / "queue"

    def manage(self, *args: str) -> str:
        """Run ``manage.py <args>`` against this backend's database; returns its stdout."""
        return _run([backend_python(), str(REPO_ROOT / "manage.py"), *args], env=self.env)

    def create_organization(self, org_id: str, name: str | None = None) -> str:
        """Create an organization (idempotent); returns its id."""
        args = ["create_organization", org_id] + (["--name", name] if name else [])
        return self.manage(*args).strip()

    def run_lifecycle(
        self, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> LifecycleProcess:
        """Start ``manage.py run_lifecycle <args>`` on this backend's database and broker."""
        self._lifecycle_count += 1
        log_path = self.data_dir / f"lifecycle-{self._lifecycle_count}.log"
        env = {**self.env, **(extra_env or {})}
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [backend_python(), str(REPO_ROOT / "manage.py"), "run_lifecycle", *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        return LifecycleProcess(process, log_path)

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on this backend's database (``%s`` placeholders); its rows.

        For a test's set-up and checks (an expired lease, counting outbox rows). Aware
        datetimes and UUIDs are stored as the backend stores them (SQLite: naive UTC text, hex).
        """
        if self.database_url.startswith("sqlite:"):
            import sqlite3

            values = [_sqlite_value(value) for value in params]
            with contextlib.closing(sqlite3.connect(self.database_url[len("sqlite:///") :])) as db:
                db.execute("PRAGMA busy_timeout = 30000")
                with db:
                    return list(db.execute(query.replace("%s", "?"), values).fetchall())
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cursor = conn.execute(query, list(params))
            return list(cursor.fetchall()) if cursor.description else []

    def start(self) -> LiveBackend:
        """Start gunicorn (migrating and creating ``org_id`` the first time); wait until up."""
        if self.running:
            return self
        if not self._prepared:
            self.manage("migrate", "--noinput", "-v", "0")
            self.create_organization(self.org_id)
            self._prepared = True
        log = self.log_path.open("ab")
        log_start = log.tell()
        try:
            self._process = subprocess.Popen(
                [
                    backend_python(),
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:backend.internal_api.gunicorn_conf",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--workers",
                    str(self.workers),
                    "--threads",
                    str(self.threads),
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        self._wait_ready(log_start)
        return self

    def stop(self) -> None:
        """Stop gunicorn gracefully (SIGTERM, then SIGKILL after 15 s). Keeps the database."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def close(self) -> None:
        """Stop, drop the PostgreSQL database it created, remove its temporary directory."""
        self.stop()
        if self._drop_database is not None:
            admin_url, name = self._drop_database
            _run([backend_python(), "-c", _PG_ADMIN_SCRIPT, "drop", admin_url, name])
            self._drop_database = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LiveBackend:
        """Start (first start: migrate and create ``org_id``)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and clean up (see ``close``)."""
        self.close()

    @property
    def running(self) -> bool:
        """True while the gunicorn process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The gunicorn master's process id while running."""
        return self._process.pid if self.running and self._process else None

    def logs(self) -> str:
        """Everything the backend has written to its log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def headers(self, org_id: str | None = None) -> dict[str, str]:
        """Authorization (and organization) headers for a request to this backend."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        headers["X-Organization-ID"] = org_id or self.org_id
        return headers

    def _wait_ready(self, log_start: int) -> None:
        # Ready once this master has bound the port (its own "Listening at" line, logged at
        # INFO: a restart's probe could be answered by the orphaned workers of a killed master)
        # and answers healthy.
        deadline = time.monotonic() + self.start_timeout
        request = urllib.request.Request(f"{self.url}/internal/v1/health/", headers=self.headers())
        assert self._process is not None
        listening = f"Listening at: {self.url} ({self._process.pid})"
        if self.log_level.upper() not in ("DEBUG", "INFO"):
            listening = ""
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise BackendStartError(f"backend exited during start-up:\n{self._tail()}")
            if listening in self._log_since(log_start):
                try:
                    with urllib.request.urlopen(request, timeout=2) as response:
                        if json.load(response).get("status") == "healthy":
                            return
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)
        self.stop()
        raise BackendStartError(f"backend not ready after {self.start_timeout} s:\n{self._tail()}")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])


class LifecycleProcess:
    """A running ``manage.py run_lifecycle``: ``process`` (Popen), ``log_path``, ``pid``."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.pid = process.pid

    def logs(self) -> str:
        """What it wrote so far (JSON log lines, and stdout's)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (it ends after the current pass), wait; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, wait."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def _sqlite_value(value: Any) -> Any:
    """A parameter as Django's SQLite backend stores it (naive UTC text, UUIDs as hex)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, uuid.UUID):
        return value.hex
    return value


def _run(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """Run a helper process; its stderr goes in the error when it fails."""
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise BackendStartError(
            f"{Path(argv[1]).name if len(argv) > 1 else argv[0]} failed "
            f"(exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done.stdout
