"""Fixtures for the worker suite (runs in the worker-only venv, without Django)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.workers.shared import _breaker, _stats, retry_utils


@pytest.fixture(autouse=True)
def isolated_breaker_registry() -> Iterator[None]:
    """Each test sees only the circuit breakers it made (health lists every registered one)."""
    with _breaker._registry_lock:
        saved = dict(_breaker._registry)
    yield
    with _breaker._registry_lock:
        _breaker._registry.clear()
        _breaker._registry.update(saved)


@pytest.fixture(autouse=True)
def isolated_task_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the task outcomes of its own tasks (worker_process judges them)."""
    monkeypatch.setattr(_stats, "RECENT", _stats.RecentOutcomes())


@pytest.fixture
def no_sleep() -> Iterator[None]:
    """Retries run without sleeping, through the documented ``set_testing`` switch."""
    retry_utils.set_testing(True)
    yield
    retry_utils.set_testing(False)
