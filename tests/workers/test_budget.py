"""RetryBudget: ratio of recent calls plus a floor, sliding window, exhaustion, threads."""

from __future__ import annotations

import threading
import time

import pytest

from backend.workers.shared.retry_utils import RetryBudget, RetryPolicy

pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


def spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
    return spent


def test_floor_alone_allows_min_per_second_times_window() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.5, window=2.0)
    assert spend_all(budget) == 3
    assert budget.try_spend() is False
    assert budget.available() == 0.0


def test_ratio_of_recent_calls() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=60.0)
    assert budget.try_spend() is False  # no calls yet, no floor
    for _ in range(100):
        budget.record_call()
    assert budget.available() == pytest.approx(20.0)
    assert spend_all(budget) == 20
    for _ in range(5):
        budget.record_call()
    assert spend_all(budget) == 1  # 105 calls allow 21 retries in all


def test_calls_and_retries_leave_the_window() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=0.2)
    for _ in range(3):
        budget.record_call()
    assert spend_all(budget) == 3
    time.sleep(0.25)  # both the deposits and the withdrawals have expired
    assert budget.try_spend() is False
    budget.record_call()
    assert spend_all(budget) == 1


def test_concurrent_spending_never_exceeds_the_budget() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=60.0)
    for _ in range(200):
        budget.record_call()
    granted: list[int] = []
    barrier = threading.Barrier(8)

    def spender() -> None:
        barrier.wait()
        granted.append(spend_all(budget))

    threads = [threading.Thread(target=spender) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 100


def test_a_shared_budget_caps_the_extra_load_of_an_outage() -> None:
    """100 calls to a dead dependency with 5 attempts each: without a budget 500 calls hit it;
    with a 20% budget (no floor) at most 120."""
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=60.0)
    fast = RetryPolicy(max_attempts=5, budget=budget)
    slow = RetryPolicy(max_attempts=5, base_delay=2.0, budget=budget)  # one budget, two policies
    hits = 0

    def dead() -> None:
        nonlocal hits
        hits += 1
        raise ConnectionError("down")

    for i in range(100):
        with pytest.raises(ConnectionError):
            (fast if i % 2 else slow).call(dead)
    assert hits == 120


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": "0.2"}, "ratio"),
        ({"min_per_second": -1}, "min_per_second"),
        ({"window": 0}, "window"),
        ({"window": float("inf")}, "window"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        RetryBudget(**kwargs)  # type: ignore[arg-type]
