"""ResilientExecutor: retry + breaker on every attempt + fallback, sync and async."""

from __future__ import annotations

import asyncio
import inspect
import uuid

import pytest

from backend.workers.shared.retry_utils import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    ResilientExecutor,
    RetryEvent,
    RetryPolicy,
    add_retry_listener,
    remove_retry_listener,
)

pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


@pytest.fixture
def breaker() -> CircuitBreaker:
    return CircuitBreaker(f"test-exec-{uuid.uuid4().hex[:12]}", failure_threshold=2,
                          recovery_timeout=30.0)


class Dependency:
    """Fails ``failures`` times with ConnectionError, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, value: int = 1) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"down ({self.calls})")
        return value * 10


def test_defaults_retry_three_times_without_breaker() -> None:
    executor = ResilientExecutor()
    dep = Dependency(2)
    assert executor.execute(dep, 4) == 40
    assert dep.calls == 3
    assert executor.breaker is None
    assert executor.policy.max_attempts == 3


def test_retry_config_as_dict_or_policy() -> None:
    assert ResilientExecutor({"max_attempts": 7}).policy.max_attempts == 7
    policy = RetryPolicy(max_attempts=2)
    assert ResilientExecutor(policy).policy is policy
    with pytest.raises(ValueError, match="max_attempts"):
        ResilientExecutor({"max_attempts": 0})
    with pytest.raises(ValueError, match="retry_config"):
        ResilientExecutor(retry_config=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="circuit_breaker"):
        ResilientExecutor(circuit_breaker="api")  # type: ignore[arg-type]


def test_every_attempt_passes_through_the_breaker(breaker: CircuitBreaker) -> None:
    executor = ResilientExecutor({"max_attempts": 6}, circuit_breaker=breaker)
    dep = Dependency(100)
    with pytest.raises(CircuitBreakerOpenError) as caught:
        executor.execute(dep)
    assert dep.calls == 2  # two failures opened the breaker; the third attempt ended it all
    assert caught.value.breaker_name == breaker.name
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        executor.execute(dep)
    assert dep.calls == 2  # an open breaker is not retried


def test_successful_retries_close_the_count(breaker: CircuitBreaker) -> None:
    executor = ResilientExecutor({"max_attempts": 3}, circuit_breaker=breaker)
    for _ in range(3):
        assert executor.execute(Dependency(1)) == 10  # one failure, then success: never opens
    assert breaker.state is CircuitState.CLOSED


def test_fallback_value_and_callable(breaker: CircuitBreaker) -> None:
    value_executor = ResilientExecutor({"max_attempts": 2}, fallback={"cached": True})
    assert value_executor.execute(Dependency(5)) == {"cached": True}

    received: list[BaseException] = []

    def fallback(exc: BaseException) -> str:
        received.append(exc)
        return f"fallback after {type(exc).__name__}"

    executor = ResilientExecutor({"max_attempts": 5}, circuit_breaker=breaker, fallback=fallback)
    assert executor.execute(Dependency(100)) == "fallback after CircuitBreakerOpenError"
    assert executor.execute(Dependency(0)) == "fallback after CircuitBreakerOpenError"
    assert [type(e) for e in received] == [CircuitBreakerOpenError, CircuitBreakerOpenError]


def test_fallback_also_answers_permanent_errors() -> None:
    class Denied(Exception):
        pass

    def denied() -> None:
        raise Denied("401")

    executor = ResilientExecutor({"max_attempts": 5, "permanent": Denied}, fallback=str)
    assert executor.execute(denied) == "401"


def test_without_fallback_the_last_error_propagates() -> None:
    dep = Dependency(10)
    with pytest.raises(ConnectionError, match=r"down \(3\)"):
        ResilientExecutor().execute(dep)


def test_decorator_keeps_metadata_and_reports_the_function(breaker: CircuitBreaker) -> None:
    events: list[RetryEvent] = []
    add_retry_listener(events.append)
    executor = ResilientExecutor({"max_attempts": 3, "jitter": False}, circuit_breaker=breaker)
    dep = Dependency(1)

    @executor
    def robust_function(value: int) -> int:
        """Robust doc."""
        return dep(value)

    try:
        assert robust_function(3) == 30
    finally:
        remove_retry_listener(events.append)
    assert robust_function.__name__ == "robust_function"
    assert robust_function.__doc__ == "Robust doc."
    assert list(inspect.signature(robust_function).parameters) == ["value"]
    assert [e.function.rsplit(".", 1)[-1] for e in events] == ["robust_function"]


def test_async_execution_with_breaker_and_async_fallback(breaker: CircuitBreaker) -> None:
    async def fallback(exc: BaseException) -> str:
        await asyncio.sleep(0)
        return f"async fallback: {type(exc).__name__}"

    executor = ResilientExecutor({"max_attempts": 4}, circuit_breaker=breaker, fallback=fallback)
    calls = 0

    @executor
    async def fetch(fail_times: int) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls <= fail_times:
            raise ConnectionError("down")
        return "fresh"

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(1)) == "fresh"
    calls = 0
    assert asyncio.run(fetch(100)) == "async fallback: CircuitBreakerOpenError"
    assert calls == 2
    assert breaker.state is CircuitState.OPEN


def test_async_without_breaker_reraises() -> None:
    async def broken() -> None:
        raise ValueError("always")

    with pytest.raises(ValueError, match="always"):
        asyncio.run(ResilientExecutor({"max_attempts": 2}).aexecute(broken))
