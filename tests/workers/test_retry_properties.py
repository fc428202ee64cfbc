"""Hypothesis properties of the backoff schedules and of attempt counting."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from backend.workers.shared.retry_utils import (
    BackoffStrategy,
    RetryEvent,
    RetryPolicy,
    add_retry_listener,
    remove_retry_listener,
)

delays = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
strategies = st.sampled_from(list(BackoffStrategy))
retry_numbers = st.integers(min_value=1, max_value=5000)


@st.composite
def policies(draw: st.DrawFn, jitter: bool | None = None) -> RetryPolicy:
    base = draw(delays)
    cap = draw(st.floats(min_value=base, max_value=2e6, allow_nan=False, allow_infinity=False))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=8)),
        base_delay=base,
        max_delay=cap,
        backoff=draw(strategies),
        jitter=draw(st.booleans()) if jitter is None else jitter,
    )


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


def expected(policy: RetryPolicy, n: int) -> float:
    """The schedule computed exactly (fractions never overflow), then capped."""
    base = Fraction(policy.base_delay)
    if policy.backoff is BackoffStrategy.EXPONENTIAL:
        uncapped = base * 2 ** (n - 1)
    elif policy.backoff is BackoffStrategy.LINEAR:
        uncapped = base * n
    else:
        uncapped = base
    return float(min(uncapped, Fraction(policy.max_delay)))


@given(policies(), retry_numbers)
def test_delay_is_the_formula_capped_at_max_delay(policy: RetryPolicy, n: int) -> None:
    delay = policy.backoff_delay(n)
    assert 0.0 <= delay <= policy.max_delay
    assert delay == pytest.approx(expected(policy, n))


@given(policies(), retry_numbers)
def test_schedule_never_decreases(policy: RetryPolicy, n: int) -> None:
    assert policy.backoff_delay(n) <= policy.backoff_delay(n + 1)


@given(policies(jitter=True), retry_numbers)
def test_full_jitter_stays_between_zero_and_the_delay(policy: RetryPolicy, n: int) -> None:
    for _ in range(5):
        assert 0.0 <= policy.next_delay(n) <= policy.backoff_delay(n)


@given(policies(jitter=False), retry_numbers)
def test_without_jitter_the_delay_is_exact(policy: RetryPolicy, n: int) -> None:
    assert policy.next_delay(n) == policy.backoff_delay(n)


class Hinted(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("hinted")
        self.retry_after = retry_after


@given(policies(), retry_numbers, st.floats(min_value=0, allow_nan=False))
def test_retry_after_wins_and_is_capped(policy: RetryPolicy, n: int, hint: float) -> None:
    assert policy.next_delay(n, Hinted(hint)) == min(hint, policy.max_delay)


@settings(max_examples=60)
@given(policies(), st.integers(min_value=0, max_value=12))
def test_attempts_and_reported_delays(policy: RetryPolicy, failures: int) -> None:
    """A function failing ``failures`` times is called min(failures + 1, max_attempts) times,
    and every reported delay respects the schedule's bounds."""
    events: list[RetryEvent] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise ValueError(calls)
        return "ok"

    add_retry_listener(events.append)
    try:
        if failures < policy.max_attempts:
            assert policy.call(flaky) == "ok"
        else:
            with pytest.raises(ValueError) as caught:
                policy.call(flaky)
            assert caught.value.args == (policy.max_attempts,)  # the last attempt's error
    finally:
        remove_retry_listener(events.append)
    assert calls == min(failures + 1, policy.max_attempts)
    assert [e.attempt for e in events] == list(range(1, calls))
    for event in events:
        assert 0.0 <= event.delay <= policy.backoff_delay(event.attempt) <= policy.max_delay
