"""The Makefile's long-running target: ``make backend`` stops with ``make``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from tests.e2e.harness import REPO_ROOT, wait_until
from tests.live_backend import make_test_key

pytestmark = pytest.mark.timeout(180)


def listening(port: int) -> bool:
    """True while something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def gunicorns_on(bind: str) -> list[psutil.Process]:
    """Every process running gunicorn with ``bind`` on its command line."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if bind in cmdline and any("gunicorn" in part for part in cmdline):
            found.append(process)
    return found


def test_sigterm_to_make_backend_stops_gunicorn(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("this test runs `make backend`: GNU make is needed")
    bind = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "BIND": bind,
        "INTERNAL_SERVICE_API_KEY": make_test_key(),
        "BACKEND_DATA_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'backend.sqlite3'}",
        "GUNICORN_WORKERS": "1",
    }
    # -o: the installed environment counts as up to date (no reinstall inside the test).
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "backend"],
        cwd=REPO_ROOT, env=env, stdout=(tmp_path / "make.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    port = int(bind.rsplit(":", 1)[1])
    try:
        wait_until(lambda: listening(port), 60, f"`make backend` to listen on {bind}", 0.2)
        make.send_signal(signal.SIGTERM)
        make.wait(30)
        wait_until(lambda: not listening(port), 30, f"{bind} to be free after SIGTERM to make")
        wait_until(lambda: not gunicorns_on(bind), 30, "every gunicorn process to exit")
    finally:
        for process in gunicorns_on(bind):
            process.kill()
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)


def test_sigterm_to_make_lifecycle_stops_run_lifecycle(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("this test runs `make lifecycle`: GNU make is needed")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CELERY_")},
        "INTERNAL_SERVICE_API_KEY": make_test_key(),
        "BACKEND_DATA_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'backend.sqlite3'}",
        "WORKER_DATA_DIR": str(tmp_path / "data"),
        "LIFECYCLE_INTERVAL": "0.2",
    }
    subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "manage.py", "migrate",
                    "--noinput", "-v", "0"], cwd=REPO_ROOT, env=env, check=True, timeout=120)
    log = tmp_path / "make.log"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "lifecycle"],
        cwd=REPO_ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    def lifecycles() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline", "environ"])
                if "run_lifecycle" in (p.info["cmdline"] or [])
                and (p.info["environ"] or {}).get("BACKEND_DATA_DIR") == str(tmp_path)]

    try:
        # exec: make's recipe shell became run_lifecycle, so make's child is run_lifecycle.
        wait_until(lambda: bool(lifecycles()), 60, "`make lifecycle` to run run_lifecycle", 0.2)
        (process,) = lifecycles()
        assert process.parent() is not None and process.parent().pid == make.pid
        make.send_signal(signal.SIGTERM)
        assert make.wait(30) is not None
        wait_until(lambda: not lifecycles(), 30, "run_lifecycle to exit after SIGTERM to make")
    finally:
        for process in lifecycles():
            process.kill()
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)
