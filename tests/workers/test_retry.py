"""retry / RetryPolicy: attempts, schedules, pass-through rules, logging, listeners, async."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from backend.workers.shared import retry_utils
from backend.workers.shared.api_client import (
    NotFoundError,
    OrganizationRequiredError,
    ServerError,
)
from backend.workers.shared.retry_utils import (
    BackoffStrategy,
    CircuitBreakerOpenError,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    add_retry_listener,
    remove_retry_listener,
    retry,
    set_testing,
)

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


@pytest.fixture
def events() -> Iterator[list[RetryEvent]]:
    """Every retry event reported while the test runs."""
    seen: list[RetryEvent] = []
    add_retry_listener(seen.append)
    yield seen
    remove_retry_listener(seen.append)


class Flaky:
    """Fails with the given exceptions in order, then returns ``value``."""

    def __init__(self, *failures: BaseException, value: object = "ok") -> None:
        self.failures = list(failures)
        self.value = value
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.value


def test_success_calls_once_and_returns() -> None:
    flaky = Flaky()
    assert retry()(flaky)() == "ok"
    assert flaky.calls == 1


def test_retries_until_success_and_reports_each_retry(events: list[RetryEvent]) -> None:
    flaky = Flaky(ValueError("one"), ValueError("two"), value=42)
    assert retry(max_attempts=3, base_delay=0.5, jitter=False)(flaky)() == 42
    assert flaky.calls == 3
    assert [(e.attempt, e.max_attempts, e.delay) for e in events] == [(1, 3, 0.5), (2, 3, 1.0)]
    assert [str(e.exception) for e in events] == ["one", "two"]


def test_max_attempts_counts_every_attempt_and_reraises_the_original() -> None:
    last = ValueError("third")
    flaky = Flaky(ValueError("first"), ValueError("second"), last)
    with pytest.raises(ValueError) as caught:
        retry(max_attempts=3)(flaky)()
    assert caught.value is last  # the original object, never tenacity.RetryError
    assert flaky.calls == 3


def test_the_reraised_error_keeps_its_traceback_and_no_chained_context() -> None:
    def broken() -> None:
        raise ValueError("deep down")

    for run in (lambda: retry(max_attempts=2)(broken)(),
                lambda: asyncio.run(RetryPolicy(max_attempts=2).acall(_async(broken)))):
        with pytest.raises(ValueError) as caught:
            run()
        frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert frames[-1] == "broken"  # where it was raised, not where it was re-raised
        assert caught.value.__context__ is None and caught.value.__cause__ is None


def _async(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return fn()

    return run


def test_single_attempt_means_no_retry(events: list[RetryEvent]) -> None:
    flaky = Flaky(ValueError("once"))
    with pytest.raises(ValueError):
        retry(max_attempts=1)(flaky)()
    assert flaky.calls == 1
    assert events == []


def test_only_listed_exceptions_are_retried() -> None:
    flaky = Flaky(KeyError("not listed"))
    with pytest.raises(KeyError):
        retry(max_attempts=5, exceptions=(ValueError,))(flaky)()
    assert flaky.calls == 1
    flaky = Flaky(ValueError("listed"))
    assert retry(max_attempts=5, exceptions=ValueError)(flaky)() == "ok"
    assert flaky.calls == 2


def test_a_later_unlisted_exception_ends_the_retries() -> None:
    flaky = Flaky(ValueError("retry me"), KeyError("stop"))
    with pytest.raises(KeyError):
        retry(max_attempts=5, exceptions=(ValueError,))(flaky)()
    assert flaky.calls == 2


class AuthError(Exception):
    pass


def test_permanent_exceptions_pass_straight_through() -> None:
    flaky = Flaky(AuthError("bad key"))
    with pytest.raises(AuthError):
        retry(max_attempts=5, permanent=(AuthError,))(flaky)()
    assert flaky.calls == 1


def test_an_open_breaker_is_never_retried() -> None:
    flaky = Flaky(CircuitBreakerOpenError("api", 12.5))
    with pytest.raises(CircuitBreakerOpenError) as caught:
        retry(max_attempts=5, exceptions=(Exception,))(flaky)()
    assert flaky.calls == 1
    assert caught.value.breaker_name == "api"
    assert caught.value.retry_after == 12.5


class SaysPermanent(Exception):
    transient = False


class SaysTransient(Exception):
    transient = True


@pytest.mark.parametrize(("failure", "calls"), [
    (OrganizationRequiredError("no organization for get_workflow_execution"), 1),
    (NotFoundError("gone", status=404), 1),
    (SaysPermanent("config error"), 1),
    (SaysTransient("try again"), 3),
    (ServerError("boom", status=503), 3),
    (ValueError("no transient attribute: retried as before"), 3),
])
def test_by_default_an_exception_saying_it_is_not_transient_is_not_retried(
        failure: Exception, calls: int, events: list[RetryEvent]) -> None:
    flaky = Flaky(*([failure] * 5))
    with pytest.raises(type(failure)):
        retry(max_attempts=3)(flaky)()
    assert flaky.calls == calls
    assert len(events) == calls - 1


def test_the_not_transient_rule_survives_replace_and_async() -> None:
    policy = retry(max_attempts=3).replace(max_attempts=4)
    flaky = Flaky(*[SaysPermanent("x")] * 5)
    with pytest.raises(SaysPermanent):
        policy.call(flaky)
    assert flaky.calls == 1

    async def fails() -> None:
        flaky()

    with pytest.raises(SaysPermanent):
        asyncio.run(policy.acall(fails))
    assert flaky.calls == 2


def test_explicit_exceptions_retry_exactly_those_classes_transient_or_not() -> None:
    flaky = Flaky(OrganizationRequiredError("no org"), OrganizationRequiredError("no org"))
    assert retry(max_attempts=3, exceptions=(OrganizationRequiredError,))(flaky)() == "ok"
    assert flaky.calls == 3
    flaky = Flaky(SaysPermanent("a"), SaysPermanent("b"))
    assert retry(max_attempts=3, exceptions=(Exception,))(flaky)() == "ok"
    assert flaky.calls == 3
    assert retry(max_attempts=2, exceptions=(Exception,)).replace(max_attempts=3).exceptions_given


def test_retry_if_predicate_decides() -> None:
    flaky = Flaky(ValueError("transient"), ValueError("fatal"))
    with pytest.raises(ValueError, match="fatal"):
        retry(max_attempts=5, retry_if=lambda exc: str(exc) == "transient")(flaky)()
    assert flaky.calls == 2


def test_base_exceptions_outside_exceptions_are_not_caught() -> None:
    flaky = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        retry(max_attempts=5)(flaky)()
    assert flaky.calls == 1


class Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled for {retry_after}s")
        self.retry_after = retry_after


def test_retry_after_sets_the_delay_capped_at_max_delay(events: list[RetryEvent]) -> None:
    flaky = Flaky(Throttled(7.0), Throttled(500.0))
    assert retry(max_attempts=3, base_delay=0.1, max_delay=30.0)(flaky)() == "ok"
    assert [e.delay for e in events] == [7.0, 30.0]


def test_deadline_stops_a_retry_whose_delay_would_pass_it(
    events: list[RetryEvent], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(Throttled(2.0), Throttled(20.0), Throttled(1.0))
    policy = retry(max_attempts=10, max_delay=60.0, deadline=10.0)
    with (
        caplog.at_level(logging.INFO, logger=retry_utils.__name__),
        pytest.raises(Throttled) as caught,
    ):
        policy(flaky)()
    assert flaky.calls == 2  # 2 s fits in 10 s; 2 + 20 does not
    assert caught.value.retry_after == 20.0
    assert [e.delay for e in events] == [2.0]
    assert any(getattr(r, "give_up_reason", None) == "deadline" for r in caplog.records)


def test_deadline_counts_skipped_sleeps_under_the_testing_switch(
    events: list[RetryEvent],
) -> None:
    """The testing switch skips the sleeps, not the schedule: a deadline ends the retries
    where it would in production (attempts at 0 s, 4 s and 8 s; 8 + 4 passes 10)."""
    flaky = Flaky(*(ValueError(str(n)) for n in range(10)))
    policy = retry(max_attempts=10, base_delay=4.0, backoff="fixed", jitter=False, deadline=10.0)
    with pytest.raises(ValueError, match=r"^2$"):
        policy(flaky)()
    assert flaky.calls == 3
    assert [e.delay for e in events] == [4.0, 4.0]


def test_a_huge_integer_retry_after_is_capped_not_an_overflow() -> None:
    assert RetryPolicy(max_delay=30.0).next_delay(1, Throttled(10**400)) == 30.0


def test_deadline_counts_the_time_of_the_first_attempt() -> None:
    set_testing(False)
    calls = 0

    @retry(max_attempts=5, base_delay=0.0, jitter=False, deadline=0.2)
    def slow_failure() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.25)
        raise ValueError("slow")

    with pytest.raises(ValueError):
        slow_failure()
    assert calls == 1  # the first attempt alone used the whole deadline


def test_real_sleeps_happen_without_the_testing_switch(events: list[RetryEvent]) -> None:
    set_testing(False)
    flaky = Flaky(ValueError("a"), ValueError("b"))
    started = time.monotonic()
    assert retry(max_attempts=3, base_delay=0.05, jitter=False)(flaky)() == "ok"
    assert time.monotonic() - started >= 0.15  # slept 0.05 then 0.1: the sleeps are real
    assert [e.delay for e in events] == [0.05, 0.1]


def test_testing_switch_skips_sleeps_but_keeps_the_schedule(events: list[RetryEvent]) -> None:
    assert retry_utils.is_testing()
    flaky = Flaky(*(ValueError(str(n)) for n in range(4)))
    assert retry(max_attempts=5, base_delay=100.0, max_delay=3600.0, jitter=False)(flaky)() == "ok"
    assert [e.delay for e in events] == [100.0, 200.0, 400.0, 800.0]


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("exponential", [1.0, 2.0, 4.0, 8.0, 10.0]),
        (BackoffStrategy.LINEAR, [1.0, 2.0, 3.0, 4.0, 5.0]),
        ("fixed", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedules(backoff: str, expected: list[float], events: list[RetryEvent]) -> None:
    flaky = Flaky(*(ValueError() for _ in range(5)))
    retry(max_attempts=6, base_delay=1.0, max_delay=10.0, backoff=backoff, jitter=False)(flaky)()
    assert [e.delay for e in events] == expected


def test_budget_exhaustion_raises_the_original_error_at_once(events: list[RetryEvent]) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)  # two retries in all
    policy = retry(max_attempts=4, budget=budget)
    failing = Flaky(*(ValueError(str(n)) for n in range(100)))
    with pytest.raises(ValueError, match=r"^2$"):
        policy(failing)()
    assert failing.calls == 3  # attempt 1, then the budget's two retries
    with pytest.raises(ValueError, match=r"^3$"):
        policy(failing)()
    assert failing.calls == 4  # budget empty: no retry at all
    assert len(events) == 2


def test_every_retry_is_logged_with_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    def fetch() -> None:
        raise ConnectionError("refused by peer")

    policy = retry(max_attempts=2, base_delay=0.25, jitter=False)
    with caplog.at_level(logging.WARNING, logger=retry_utils.__name__), pytest.raises(
        ConnectionError
    ):
        policy(fetch)()
    records = [r for r in caplog.records if hasattr(r, "attempt")]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.function.endswith("fetch")  # type: ignore[attr-defined]
    assert record.attempt == 1
    assert record.max_attempts == 2  # type: ignore[attr-defined]
    assert record.delay == 0.25  # type: ignore[attr-defined]
    assert record.exception_type == "ConnectionError"  # type: ignore[attr-defined]
    assert record.exception_message == "refused by peer"  # type: ignore[attr-defined]
    assert "refused by peer" in record.getMessage()


def test_a_failing_listener_does_not_break_retries(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: RetryEvent) -> None:
        raise RuntimeError("listener bug")

    add_retry_listener(broken)
    try:
        flaky = Flaky(ValueError("x"))
        assert retry(max_attempts=2)(flaky)() == "ok"
    finally:
        remove_retry_listener(broken)
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)


def documented(a: int, b: str = "x", *, c: float = 1.0) -> str:
    """Docstring kept."""
    return f"{a}{b}{c}"


def test_wraps_keeps_name_doc_and_signature() -> None:
    wrapped = retry()(documented)
    assert wrapped.__name__ == "documented"
    assert wrapped.__doc__ == "Docstring kept."
    assert wrapped.__module__ == __name__
    assert inspect.signature(wrapped) == inspect.signature(documented)
    assert wrapped(1, "y", c=2.0) == "1y2.0"
    assert wrapped.retry_policy.max_attempts == 3  # type: ignore[attr-defined]


def test_methods_can_be_decorated() -> None:
    class Service:
        def __init__(self) -> None:
            self.flaky = Flaky(ValueError("x"), value="done")

        @retry(max_attempts=2)
        def run(self, suffix: str) -> str:
            return f"{self.flaky()}{suffix}"

    assert Service().run("!") == "done!"


def test_policy_call_and_replace(events: list[RetryEvent]) -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, jitter=False)
    flaky = Flaky(ValueError("x"), value=5)
    assert policy.call(flaky, 1, key="v") == 5
    longer = policy.replace(max_attempts=4)
    assert (longer.max_attempts, longer.base_delay, policy.max_attempts) == (4, 0.1, 2)
    with pytest.raises(ValueError, match="unknown RetryPolicy parameter"):
        policy.replace(attempts=3)
    assert events[0].function.endswith("Flaky")


def test_async_functions_are_retried(events: list[RetryEvent]) -> None:
    calls = 0

    @retry(max_attempts=3, base_delay=0.01, jitter=False)
    async def fetch(x: int) -> int:
        """Async doc."""
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls < 3:
            raise TimeoutError("slow")
        return x + 1

    assert inspect.iscoroutinefunction(fetch)
    assert fetch.__doc__ == "Async doc."
    assert asyncio.run(fetch(1)) == 2
    assert calls == 3
    assert [e.delay for e in events] == [0.01, 0.02]


def test_async_policy_reraises_original_and_passes_permanent() -> None:
    policy = RetryPolicy(max_attempts=3, permanent=(AuthError,))

    async def denied() -> None:
        raise AuthError("no")

    async def broken() -> None:
        raise ValueError("always")

    with pytest.raises(AuthError):
        asyncio.run(policy.acall(denied))
    with pytest.raises(ValueError, match="always"):
        asyncio.run(policy.acall(broken))


def test_async_sleeps_are_real_without_the_switch() -> None:
    set_testing(False)
    flaky = Flaky(ValueError("x"))

    async def call() -> object:
        return flaky()

    started = time.monotonic()
    assert asyncio.run(RetryPolicy(base_delay=0.05, jitter=False).acall(call)) == "ok"
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"base_delay": -1}, "base_delay"),
        ({"max_delay": -0.5}, "max_delay"),
        ({"base_delay": 5, "max_delay": 1}, "max_delay"),
        ({"base_delay": float("nan")}, "base_delay"),
        ({"backoff": "quadratic"}, "backoff"),
        ({"jitter": "yes"}, "jitter"),
        ({"exceptions": ()}, "exceptions"),
        ({"exceptions": (ValueError, "x")}, "exceptions"),
        ({"permanent": int}, "permanent"),
        ({"retry_if": 3}, "retry_if"),
        ({"budget": 0.2}, "budget"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": -3}, "deadline"),
    ],
)
def test_invalid_parameters_fail_at_decoration_time(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        retry(**kwargs)  # type: ignore[arg-type]


def test_success_path_never_loads_tenacity() -> None:
    """A call that succeeds at once does not even import tenacity (measured in a new process)."""
    code = (
        "import json, sys\n"
        "from backend.workers.shared import retry, circuit_breaker, ResilientExecutor\n"
        "@retry(max_attempts=3)\n"
        "def f(x):\n    return x\n"
        "@circuit_breaker()\n"
        "def g(x):\n    return x\n"
        "ex = ResilientExecutor()\n"
        "assert [f(1), g(2), ex.execute(f, 3)] == [1, 2, 3]\n"
        "print(json.dumps({m: m in sys.modules for m in "
        "('tenacity', 'redis', 'celery', 'prometheus_client', 'django')}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == {
        "tenacity": False,
        "redis": False,
        "celery": False,
        "prometheus_client": False,
        "django": False,
    }
