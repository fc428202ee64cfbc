"""Fixtures shared by every test directory. Must import in the worker-only venv (no Django)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.live_backend import LiveBackend

SERVICES = {
    "postgres": ("127.0.0.1", 5432),
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def service_up(name: str) -> bool:
    """True when the named local service accepts TCP connections."""
    try:
        with socket.create_connection(SERVICES[name], timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str) -> None:
    """Skip when the service is down, except with CI=true, where it is a failure."""
    if service_up(name):
        return
    if IN_CI:
        pytest.fail(f"{name} is required with CI=true but {SERVICES[name]} refuses connections")
    pytest.skip(f"{name} not running on {SERVICES[name]}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in SERVICES:
        if item.get_closest_marker(name) is not None:
            require_service(name)


def die_with_parent() -> None:
    """``preexec_fn`` for test subprocesses: SIGTERM when the test process dies (Linux).

    A test run killed mid-way (a timeout, Ctrl-C twice) then leaves no server behind.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- live backend (tests/live_backend.py runs it as a subprocess; no Django imported here) ---


@pytest.fixture(scope="session")
def live_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBackend]:
    """The real backend (gunicorn, SQLite) for the whole session, with ``org_id`` created."""
    from tests.live_backend import LiveBackend

    backend = LiveBackend(data_dir=tmp_path_factory.mktemp("live_backend"))
    try:
        yield backend.start()
    finally:
        backend.close()


@pytest.fixture(scope="session")
def live_backend_pg() -> Iterator[LiveBackend]:
    """The real backend on its own fresh PostgreSQL database, dropped at the end."""
    require_service("postgres")
    from tests.live_backend import LiveBackend

    backend = LiveBackend.postgres()
    try:
        yield backend.start()
    finally:
        backend.close()
