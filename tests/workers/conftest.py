"""Fixtures for the worker suite (runs in the worker-only venv, without Django)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.workers.shared import _breaker, _runtime, _stats, retry_utils


@pytest.fixture(autouse=True)
def isolated_breakers_and_outcomes() -> Iterator[None]:
    """Each test sees only the circuit breakers it made (health lists every registered one)
    and the task outcomes of its own tasks (worker_process judges them): a runtime with those
    two parts of its own."""
    with _runtime.scoped(_breaker.REGISTRY, _stats.RECENT):
        yield


@pytest.fixture
def no_sleep() -> Iterator[None]:
    """Retries run without sleeping, through the documented ``set_testing`` switch."""
    retry_utils.set_testing(True)
    yield
    retry_utils.set_testing(False)
