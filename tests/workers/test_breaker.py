"""CircuitBreaker with local state: what it adds to the state machine (which exceptions count,
the success path, one probe under threads, listeners, registry, forks). The transitions
themselves are the contract in test_breaker_state_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from backend.workers.shared import retry_utils
from backend.workers.shared.retry_utils import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    add_state_listener,
    all_breakers,
    circuit_breaker,
    get_breaker,
    remove_state_listener,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@pytest.fixture
def name() -> str:
    return f"test-breaker-{uuid.uuid4().hex[:12]}"


def fail() -> None:
    raise ConnectionError("down")


def ok() -> str:
    return "ok"


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(fail)


class FakeClock:
    """A breaker's ``clock``: it moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_until_probe_allowed(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Move the breaker's clock past the open period (the breaker tells how long)."""
    try:
        breaker.call(ok)
    except CircuitBreakerOpenError as exc:
        clock.now += exc.retry_after + 0.01
    else:
        raise AssertionError("the breaker was expected to be open")


def test_opens_after_threshold_consecutive_failures(name: str) -> None:
    breaker = CircuitBreaker(name, failure_threshold=3, recovery_timeout=30.0)
    trip(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.call(ok) == "ok"  # a success resets the count
    trip(breaker, 2)
    assert breaker.state is CLOSED
    trip(breaker, 1)
    assert breaker.state is OPEN


def test_open_rejects_at_once_with_name_and_retry_after(name: str) -> None:
    breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=30.0)
    trip(breaker, 1)
    called = []
    with pytest.raises(CircuitBreakerOpenError) as caught:
        breaker.call(lambda: called.append(1))
    assert called == []
    assert caught.value.breaker_name == name
    assert 29.0 < caught.value.retry_after <= 30.0
    assert name in str(caught.value)


def test_probe_success_closes_and_probe_failure_reopens(name: str) -> None:
    seen: list[tuple[CircuitState, CircuitState]] = []
    clock = FakeClock()
    breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=30.0, clock=clock)
    breaker.add_listener(lambda b, old, new: seen.append((old, new)))
    trip(breaker, 1)
    wait_until_probe_allowed(breaker, clock)
    assert breaker.state is HALF_OPEN
    trip(breaker, 1)  # the probe fails
    assert breaker.state is OPEN
    wait_until_probe_allowed(breaker, clock)
    assert breaker.call(ok) == "ok"  # the probe succeeds
    assert breaker.state is CLOSED
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_half_open_lets_exactly_one_probe_through_under_threads(name: str) -> None:
    breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=0.05)
    trip(breaker, 1)
    time.sleep(0.06)
    threads_n = 16
    barrier = threading.Barrier(threads_n)
    release = threading.Event()
    ran: list[int] = []
    rejected: list[int] = []

    def probe(i: int) -> None:
        ran.append(i)
        assert release.wait(10)

    def caller(i: int) -> None:
        barrier.wait()
        try:
            breaker.call(probe, i)
        except CircuitBreakerOpenError:
            rejected.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(ran) + len(rejected) < threads_n and time.monotonic() < deadline:
        time.sleep(0.005)  # the 15 others are rejected while the probe still runs
    assert len(ran) == 1
    assert len(rejected) == threads_n - 1
    assert breaker.state is HALF_OPEN
    release.set()
    for thread in threads:
        thread.join()
    assert breaker.state is CLOSED


def test_no_lock_is_held_during_the_call(name: str) -> None:
    breaker = CircuitBreaker(name, failure_threshold=2, recovery_timeout=30.0)
    inside = threading.Event()
    release = threading.Event()

    def blocking() -> str:
        inside.set()
        assert release.wait(10)
        return "slow"

    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(breaker.call(blocking)))
    worker.start()
    assert inside.wait(10)
    # While one call runs, others pass, fail, are counted, and the state can be read.
    assert breaker.call(ok) == "ok"
    trip(breaker, 2)
    assert breaker.state is OPEN
    release.set()
    worker.join()
    assert results == ["slow"]
    assert breaker.state is OPEN  # a success of a call admitted earlier does not close it


def test_state_machine_stays_consistent_under_concurrent_load(name: str) -> None:
    transitions: list[tuple[CircuitState, CircuitState]] = []
    lock = threading.Lock()

    def record(_: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        with lock:
            transitions.append((old, new))

    breaker = CircuitBreaker(name, failure_threshold=3, recovery_timeout=0.05)
    breaker.add_listener(record)
    def maybe_fail(rng: random.Random) -> None:
        time.sleep(rng.random() / 1000)
        if rng.random() < 0.5:
            raise ConnectionError("flaky")

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            with contextlib.suppress(ConnectionError, CircuitBreakerOpenError):
                breaker.call(maybe_fail, rng)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    allowed = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}
    assert transitions, "the load should have opened the breaker at least once"
    assert set(transitions) <= allowed
    for (_, new), (old, _) in itertools.pairwise(transitions):
        assert new == old  # each transition starts where the previous one ended


@contextlib.contextmanager
def holding_the_probe(breaker: CircuitBreaker) -> Iterator[None]:
    """A thread's call holds the half-open probe lease, hanging, until the block ends."""
    started = threading.Event()
    release = threading.Event()

    def hang() -> None:
        started.set()
        release.wait(10)

    holder = threading.Thread(target=breaker.call, args=(hang,))
    holder.start()
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


def test_interrupted_probe_frees_the_probe_slot(name: str) -> None:
    breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=0.02)
    trip(breaker, 1)
    time.sleep(0.03)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call(interrupted)
    assert breaker.state is HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert breaker.state is CLOSED


class NotFound(Exception):
    pass


def test_expected_exception_and_is_failure_decide_what_counts(name: str) -> None:
    breaker = CircuitBreaker(
        name,
        failure_threshold=2,
        expected_exception=(ConnectionError, ValueError),
        is_failure=lambda exc: str(exc) != "client error",
    )
    for _ in range(5):
        with pytest.raises(NotFound):
            breaker.call(lambda: (_ for _ in ()).throw(NotFound("404")))
        with pytest.raises(ValueError):
            breaker.call(lambda: (_ for _ in ()).throw(ValueError("client error")))
    assert breaker.state is CLOSED
    trip(breaker, 1)
    with pytest.raises(NotFound):  # an answer from the dependency resets the count
        breaker.call(lambda: (_ for _ in ()).throw(NotFound("404")))
    trip(breaker, 1)
    assert breaker.state is CLOSED
    trip(breaker, 1)
    assert breaker.state is OPEN


def test_global_state_listeners_and_failing_listeners(name: str) -> None:
    seen: list[tuple[str, str, str]] = []

    def listener(b: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        seen.append((b.name, old.value, new.value))

    def broken(b: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        raise RuntimeError("listener bug")

    add_state_listener(listener)
    breaker = CircuitBreaker(name, failure_threshold=1)
    breaker.add_listener(broken)
    try:
        trip(breaker, 1)
    finally:
        remove_state_listener(listener)
    assert seen == [(name, "closed", "open")]
    assert breaker.state is OPEN


def test_reset_closes_and_says_so(name: str) -> None:
    seen: list[tuple[CircuitState, CircuitState]] = []
    breaker = CircuitBreaker(name, failure_threshold=1)
    breaker.add_listener(lambda b, old, new: seen.append((old, new)))
    trip(breaker, 1)
    breaker.reset()
    assert breaker.state is CLOSED
    assert breaker.call(ok) == "ok"
    assert seen == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_registry(name: str) -> None:
    breaker = get_breaker(name, failure_threshold=2)
    assert get_breaker(name) is breaker
    assert get_breaker(name, failure_threshold=2, recovery_timeout=60) is breaker
    assert breaker in all_breakers()
    with pytest.raises(ValueError, match="failure_threshold"):
        get_breaker(name, failure_threshold=3)
    with pytest.raises(ValueError, match="already a registered breaker"):
        CircuitBreaker(name)


def test_decorator_wraps_and_shares_by_name(name: str) -> None:
    @circuit_breaker(failure_threshold=2, recovery_timeout=30.0, name=name)
    def first(x: int, *, y: int = 0) -> int:
        """First doc."""
        if x < 0:
            raise ConnectionError("down")
        return x + y

    @circuit_breaker(failure_threshold=2, recovery_timeout=30.0, name=name)
    def second() -> str:
        return "second"

    assert first.__name__ == "first" and first.__doc__ == "First doc."
    assert inspect.signature(first) == inspect.signature(first.__wrapped__)  # type: ignore[attr-defined]
    assert first(1, y=2) == 3
    for _ in range(2):
        with pytest.raises(ConnectionError):
            first(-1)
    with pytest.raises(CircuitBreakerOpenError):
        second()
    assert first.breaker is get_breaker(name)  # type: ignore[attr-defined]


def test_decorator_default_name_is_the_function() -> None:
    @circuit_breaker()
    def uniquely_named_dependency_call() -> int:
        return 1

    assert uniquely_named_dependency_call() == 1
    assert uniquely_named_dependency_call.breaker.name == (  # type: ignore[attr-defined]
        f"{__name__}.test_decorator_default_name_is_the_function.<locals>."
        "uniquely_named_dependency_call"
    )


def test_async_calls(name: str) -> None:
    @circuit_breaker(failure_threshold=2, recovery_timeout=0.05, name=name)
    async def fetch(fail_it: bool) -> str:
        await asyncio.sleep(0)
        if fail_it:
            raise ConnectionError("down")
        return "fetched"

    async def scenario() -> list[str]:
        out = [await fetch(False)]
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await fetch(True)
        with pytest.raises(CircuitBreakerOpenError) as caught:
            await fetch(False)
        await asyncio.sleep(caught.value.retry_after + 0.01)
        out.append(await fetch(False))
        return out

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(scenario()) == ["fetched", "fetched"]
    assert get_breaker(name).state is CLOSED


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 1.5}, "failure_threshold"),
        ({"recovery_timeout": 0}, "recovery_timeout"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"expected_exception": "ValueError"}, "expected_exception"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_decorator_parameters(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        circuit_breaker(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"is_failure": "yes"}, "is_failure"),
        ({"probe_timeout": 0}, "probe_timeout"),
        ({"redis_url": ""}, "redis_url"),
    ],
)
def test_invalid_breaker_parameters(kwargs: dict[str, object], param: str, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        CircuitBreaker(name, **kwargs)  # type: ignore[arg-type]
    assert name not in [b.name for b in all_breakers()]


def test_open_error_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(CircuitBreakerOpenError("api", 3.5)))
    assert (error.breaker_name, error.retry_after) == ("api", 3.5)


def test_local_breaker_reports_shared_state_ok(name: str) -> None:
    breaker = CircuitBreaker(name)
    assert breaker.shared is False
    assert breaker.degraded is False
    assert breaker.shared_state_ok is True
    assert retry_utils.CircuitState("half_open") is HALF_OPEN




def test_forked_child_is_not_wedged_by_a_lock_held_in_the_parent(name: str) -> None:
    """Celery's prefork pool forks while other threads (the health server) may hold a
    breaker's or a budget's lock; the child must still be able to call."""
    from backend.workers.shared.retry_utils import RetryBudget, RetryPolicy

    breaker = CircuitBreaker(name, failure_threshold=1)
    trip(breaker, 1)  # open: the child must take the lock to answer
    budget = RetryBudget()
    holding = threading.Event()
    release = threading.Event()

    def hold_locks() -> None:
        with breaker._local._lock, budget._lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_locks)
    holder.start()
    assert holding.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if every call returned
        code = 1
        try:
            with contextlib.suppress(CircuitBreakerOpenError):
                breaker.call(ok)
            RetryPolicy(budget=budget).call(ok)
            get_breaker(f"{name}-child")
            code = 0
        finally:
            os._exit(code)
    release.set()
    holder.join()
    assert wait_for_child(pid) == 0


def wait_for_child(pid: int) -> int:
    """The exit code of a forked child; it is killed (and the test fails) if it hangs."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


def test_forked_child_does_not_wait_for_a_probe_of_the_parent(name: str) -> None:
    """A parent thread (the health server's backend check) may be the probe when the prefork
    pool forks; that probe never ends in the child, which must be free to probe itself."""
    breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=0.01, probe_timeout=60.0)
    trip(breaker, 1)
    time.sleep(0.02)
    with holding_the_probe(breaker):  # the parent's thread holds the probe lease
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if breaker.call(ok) == "ok" and breaker.state is CLOSED:
                    code = 0
            finally:
                os._exit(code)
    assert wait_for_child(pid) == 0


def test_get_breaker_rejects_unknown_and_conflicting_settings(name: str) -> None:
    breaker = get_breaker(name, key_prefix="custom:", probe_timeout=5)
    assert get_breaker(name, probe_timeout=5.0, key_prefix="custom:") is breaker
    with pytest.raises(ValueError, match="key_prefix"):
        get_breaker(name, key_prefix="other:")
    with pytest.raises(ValueError, match="unknown CircuitBreaker parameter: threshold"):
        get_breaker(name, threshold=3)


@pytest.mark.parametrize("clock", [None, 1000.0, "monotonic"])
def test_a_clock_that_cannot_be_called_is_refused(name: str, clock: object) -> None:
    with pytest.raises(ValueError, match="clock must be a callable"):
        CircuitBreaker(name, clock=clock)  # type: ignore[arg-type]


@pytest.mark.parametrize("initial", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_initial_recovery_timeout_is_refused(name: str, initial: object) -> None:
    with pytest.raises(ValueError, match="initial_recovery_timeout"):
        CircuitBreaker(name, initial_recovery_timeout=initial)  # type: ignore[arg-type]


def test_initial_recovery_timeout_is_capped_and_checked_by_get_breaker(name: str) -> None:
    assert CircuitBreaker(f"{name}-default", recovery_timeout=3.0).initial_recovery_timeout == 3.0
    breaker = get_breaker(name, recovery_timeout=2.0, initial_recovery_timeout=5.0)
    assert breaker.initial_recovery_timeout == 2.0
    assert get_breaker(name, recovery_timeout=2.0, initial_recovery_timeout=9.0) is breaker
    with pytest.raises(ValueError, match="initial_recovery_timeout"):
        get_breaker(name, initial_recovery_timeout=1.0)
