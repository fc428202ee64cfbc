"""One contract for every BreakerState: the same transitions, checked on each implementation.

* ``local``: LocalBreakerState, timed by a clock the test moves;
* ``redis``: RedisBreakerStore against the local Redis (its own key; Redis' clock, so the open
  periods are short and waited out by polling the state);
* ``fallback``: FallbackBreakerState whose Redis went away (a real proxy, stopped), running on
  its local state, timed by a clock the test moves.

The breaker itself (which exceptions count, listeners, threads, processes) is tested in
test_breaker.py and test_breaker_redis.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pytest
import redis

from backend.workers.shared._breaker_state import (
    CALL,
    FAILURE,
    PROBE,
    REJECT,
    RELEASE,
    SUCCESS,
    BreakerState,
    CircuitState,
    FallbackBreakerState,
    LocalBreakerState,
    Verdict,
)
from backend.workers.shared._breaker_store import RedisBreakerStore
from tests.conftest import REDIS_URL
from tests.fault_server import TcpProxy

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
T = TypeVar("T")
POLL_LIMIT = 10.0  # seconds a real-time wait may take before the test fails
EPSILON = 1e-6  # past a period, not at its float-rounded end
REAL_MARGIN = 0.02  # and a little more in real time (Redis counts whole milliseconds)


class FakeClock:
    """A state's ``clock``: it moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Subject:
    """One implementation under the contract, with the means to let time pass for it."""

    state: BreakerState
    clock: FakeClock | None  # None: the state keeps real time (Redis' clock)

    def let_pass(self, seconds: float) -> None:
        """Move the fake clock past ``seconds``, or sleep them out."""
        if self.clock is not None:
            self.clock.now += seconds + EPSILON
        else:
            time.sleep(seconds + REAL_MARGIN)

    def poll(self, read: Callable[[], T], done: Callable[[T], bool]) -> T:
        """``read()`` until ``done`` says so (real time only; a fake clock's answer is final)."""
        deadline = time.monotonic() + POLL_LIMIT
        value = read()
        while self.clock is None and not done(value) and time.monotonic() < deadline:
            time.sleep(0.005)
            value = read()
        return value

    def admit_after(self, seconds: float) -> Verdict:
        """Let ``seconds`` pass, then the first admission that is not refused (or the
        refusal, once the wait is over)."""
        self.let_pass(seconds)
        return self.poll(self.state.admit, lambda verdict: verdict.decision != REJECT)


class Make(Protocol):
    def __call__(
        self,
        *,
        failure_threshold: int = 1,
        recovery_timeout: float = 30.0,
        initial_recovery_timeout: float | None = None,
        probe_timeout: float = 30.0,
    ) -> Subject: ...


@pytest.fixture
def key() -> Iterator[str]:
    """A Redis key of this test's own; its keys are deleted afterwards."""
    value = f"test:breaker-contract:{uuid.uuid4().hex}"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(value, value + ":probe")
    client.close()


@pytest.fixture(
    params=["local", pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("fallback", marks=pytest.mark.redis)]
)  # fmt: skip
def make(request: pytest.FixtureRequest, key: str) -> Iterator[Make]:
    """Builds the implementation under test with the settings a test gives."""
    proxies: list[TcpProxy] = []
    fallbacks: list[FallbackBreakerState] = []

    def build(
        *,
        failure_threshold: int = 1,
        recovery_timeout: float = 30.0,
        initial_recovery_timeout: float | None = None,
        probe_timeout: float = 30.0,
    ) -> Subject:
        settings = {
            "failure_threshold": failure_threshold,
            "recovery_timeout": recovery_timeout,
            "initial_recovery_timeout": (
                recovery_timeout if initial_recovery_timeout is None else initial_recovery_timeout
            ),
            "probe_timeout": probe_timeout,
        }
        if request.param == "redis":
            return Subject(RedisBreakerStore(REDIS_URL, key, **settings), clock=None)
        clock = FakeClock()
        local = LocalBreakerState(**settings, clock=clock)
        if request.param == "local":
            return Subject(local, clock)
        proxy = TcpProxy("127.0.0.1", 6379, scheme="redis")
        proxies.append(proxy)
        lost: list[bool] = []
        fallback = FallbackBreakerState(
            RedisBreakerStore(proxy.url + "/0", key, **settings),
            local,
            reconnect_interval=0.5,
            clock=clock,
            on_reachable=lambda ok, reason: lost.append(ok),
        )
        assert fallback.snapshot() is CLOSED and not fallback.degraded  # Redis answered
        proxy.stop()  # Redis goes away
        assert fallback.snapshot() is CLOSED
        assert fallback.degraded and lost == [False]
        fallbacks.append(fallback)
        return Subject(fallback, clock)

    yield build
    for proxy in proxies:
        proxy.stop()
    for fallback in fallbacks:
        assert fallback.degraded  # the whole test ran on the local state


def fail_once(state: BreakerState) -> Verdict:
    """One admitted call that fails; its verdict."""
    verdict = state.admit()
    assert verdict.decision != REJECT
    state.record(verdict, FAILURE)
    return verdict


def probe_after_opening(subject: Subject, *, failures: int = 1) -> Verdict:
    """Fail ``failures`` times (reaching the threshold), wait out the open period; the
    probe's verdict."""
    for _ in range(failures):
        fail_once(subject.state)
    refused = subject.state.admit()
    assert (refused.decision, refused.state) == (REJECT, OPEN)
    probe = subject.admit_after(refused.retry_after)
    assert (probe.decision, probe.state) == (PROBE, HALF_OPEN)
    return probe


# --------------------------------------------------------------------------- the contract


def test_closed_admits_every_call(make: Make) -> None:
    state = make(failure_threshold=2).state
    assert state.snapshot() is CLOSED
    for outcome in (SUCCESS, RELEASE, SUCCESS):
        verdict = state.admit()
        assert (verdict.decision, verdict.state, verdict.probe) == (CALL, CLOSED, False)
        state.record(verdict, outcome)
    assert state.snapshot() is CLOSED


def test_consecutive_failures_up_to_the_threshold_open_it(make: Make) -> None:
    state = make(failure_threshold=3).state
    for _ in range(2):
        fail_once(state)
    assert state.snapshot() is CLOSED
    state.record(state.admit(), SUCCESS)  # an answer of the dependency resets the count
    state.record(state.admit(), RELEASE)  # an interrupted call counts as nothing
    for _ in range(2):
        fail_once(state)
    assert state.snapshot() is CLOSED
    fail_once(state)
    assert state.snapshot() is OPEN


def test_open_refuses_with_the_time_until_a_probe(make: Make) -> None:
    state = make(failure_threshold=1, recovery_timeout=30.0).state
    fail_once(state)
    for _ in range(3):
        refused = state.admit()
        assert (refused.decision, refused.state) == (REJECT, OPEN)
        assert 29.0 < refused.retry_after <= 30.0 + EPSILON
    assert state.snapshot() is OPEN


def test_after_the_open_period_exactly_one_probe_is_admitted(make: Make) -> None:
    subject = make(failure_threshold=1, recovery_timeout=0.2, probe_timeout=30.0)
    state = subject.state
    fail_once(state)
    refused = state.admit()
    assert (refused.decision, refused.state) == (REJECT, OPEN)
    subject.let_pass(refused.retry_after)
    assert subject.poll(state.snapshot, lambda s: s is HALF_OPEN) is HALF_OPEN
    probe = state.admit()
    assert (probe.decision, probe.state, probe.probe) == (PROBE, HALF_OPEN, True)
    for _ in range(3):
        refused = state.admit()
        assert (refused.decision, refused.state) == (REJECT, HALF_OPEN)
        assert 0 < refused.retry_after <= 30.0 + EPSILON  # until the probe's lease ends
    assert state.snapshot() is HALF_OPEN


def test_the_probes_success_closes(make: Make) -> None:
    subject = make(failure_threshold=2, recovery_timeout=0.2)
    state = subject.state
    probe = probe_after_opening(subject, failures=2)
    state.record(probe, SUCCESS)
    assert state.snapshot() is CLOSED
    assert state.admit().decision == CALL
    fail_once(state)
    assert state.snapshot() is CLOSED  # the count starts again from zero


@pytest.mark.parametrize(
    ("initial", "maximum", "periods"),
    [
        (0.2, 0.6, [0.2, 0.3, 0.45, 0.6, 0.6]),  # 1.5 times longer per failed probe, capped
        (0.3, 0.3, [0.3, 0.3, 0.3]),  # no initial period: always the recovery timeout
    ],
)
def test_each_failed_probe_reopens_for_longer_up_to_the_maximum(
    make: Make, initial: float, maximum: float, periods: list[float]
) -> None:
    subject = make(failure_threshold=1, recovery_timeout=maximum, initial_recovery_timeout=initial)
    state = subject.state
    fail_once(state)
    for period in periods:
        refused = state.admit()
        assert (refused.decision, refused.state) == (REJECT, OPEN)
        assert period - 0.1 < refused.retry_after <= period + EPSILON
        probe = subject.admit_after(refused.retry_after)
        assert probe.decision == PROBE
        state.record(probe, FAILURE)
        assert state.snapshot() is OPEN
    probe = subject.admit_after(maximum)
    state.record(probe, SUCCESS)  # closed: the next opening starts from the first period
    fail_once(state)
    refused = state.admit()
    assert initial - 0.1 < refused.retry_after <= initial + EPSILON


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE, RELEASE])
def test_calls_admitted_before_it_opened_say_nothing(make: Make, outcome: str) -> None:
    subject = make(failure_threshold=1, recovery_timeout=0.2)
    state = subject.state
    earlier = state.admit()
    fail_once(state)
    state.record(earlier, outcome)
    assert state.snapshot() is OPEN
    refused = state.admit()
    probe = subject.admit_after(refused.retry_after)
    state.record(earlier, outcome)  # nor while half-open: only the probe decides
    assert state.snapshot() is HALF_OPEN
    assert state.admit().decision == REJECT  # the probe still holds the lease
    state.record(probe, SUCCESS)
    assert state.snapshot() is CLOSED


@pytest.mark.parametrize("late", [FAILURE, RELEASE])
@pytest.mark.parametrize("taken_over", [True, False], ids=["then-late-end", "late-end-first"])
def test_a_probe_whose_lease_ran_out_decides_nothing(
    make: Make, late: str, taken_over: bool
) -> None:
    """Probe A outlives its lease and B becomes the probe; A's late end (before or after B
    took the lease) must neither re-open the breaker nor free B's lease."""
    subject = make(failure_threshold=1, recovery_timeout=0.2, probe_timeout=0.1)
    state = subject.state
    first = probe_after_opening(subject)
    refused = state.admit()
    assert (refused.decision, refused.state) == (REJECT, HALF_OPEN)
    if taken_over:
        second = subject.admit_after(refused.retry_after)  # A's lease has run out
        state.record(first, late)
    else:
        subject.let_pass(refused.retry_after)  # A's lease has run out
        state.record(first, late)
        second = state.admit()
    assert second.decision == PROBE
    assert state.snapshot() is HALF_OPEN
    assert state.admit().decision == REJECT  # B still holds the lease
    state.record(second, SUCCESS)
    assert state.snapshot() is CLOSED


def test_a_released_probe_gives_the_lease_back(make: Make) -> None:
    subject = make(failure_threshold=1, recovery_timeout=0.2, probe_timeout=30.0)
    state = subject.state
    probe = probe_after_opening(subject)
    state.record(probe, RELEASE)  # interrupted: neither success nor failure
    assert state.snapshot() is HALF_OPEN
    again = state.admit()
    assert again.decision == PROBE  # at once, not after the 30 s lease
    state.record(again, FAILURE)
    assert state.snapshot() is OPEN


@pytest.mark.parametrize("where", [OPEN, HALF_OPEN])
def test_reset_closes_and_forgets(make: Make, where: CircuitState) -> None:
    subject = make(failure_threshold=2, recovery_timeout=0.6, initial_recovery_timeout=0.2)
    state = subject.state
    probe = probe_after_opening(subject, failures=2)
    state.record(probe, FAILURE)  # open for longer now
    if where is HALF_OPEN:
        refused = state.admit()
        subject.admit_after(refused.retry_after)  # a probe holds the lease
    state.reset()
    assert state.snapshot() is CLOSED
    assert state.admit().decision == CALL
    fail_once(state)
    assert state.snapshot() is CLOSED  # failures forgotten: one is below the threshold
    fail_once(state)
    refused = state.admit()
    assert 0.1 < refused.retry_after <= 0.2 + EPSILON  # the first open period again
