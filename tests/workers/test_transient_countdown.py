"""ExecutionTask's re-queue countdown: the retry schedule, with hostile hints and counts."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from backend.workers.shared import ExecutionTask


class Hinted(Exception):
    """A transient failure that carries a server's ``Retry-After`` (any value)."""

    transient = True

    def __init__(self, retry_after: Any) -> None:
        super().__init__("hinted")
        self.retry_after = retry_after


_made = itertools.count()  # Celery warns when one task name is registered twice


@pytest.fixture
def task() -> Iterator[Any]:
    app = Celery("countdown", set_as_current=False)

    @app.task(base=ExecutionTask, bind=True, name=f"countdown.{next(_made)}.work",
              retry_backoff=2.0, retry_backoff_max=60.0)
    def work(self: ExecutionTask, execution_id: str) -> None:
        """Never run: only its countdown is asked for."""

    yield work
    app.close()


def countdown(task: Any, exc: BaseException, retries: int, jitter: bool) -> float:
    task.retry_jitter = jitter
    task.push_request(retries=retries)
    try:
        return float(task.transient_countdown(exc))
    finally:
        task.pop_request()


# (retries, the exception, the countdown without jitter, its range with jitter)
CASES = [
    (0, Exception("no hint"), 2.0, (0.0, 2.0)),
    (1, Exception("no hint"), 4.0, (0.0, 4.0)),
    (4, Exception("no hint"), 32.0, (0.0, 32.0)),
    (5, Exception("no hint"), 60.0, (0.0, 60.0)),  # capped by retry_backoff_max
    (5000, Exception("no hint"), 60.0, (0.0, 60.0)),  # 2**5000 does not overflow
    (0, Hinted(3), 3.0, (3.0, 3.75)),  # "not before": jitter only adds
    (0, Hinted(0), 0.0, (0.0, 0.0)),  # "retry now" is the server's to say
    (3, Hinted(2.5), 2.5, (2.5, 3.125)),  # the hint wins over the backoff
    (0, Hinted(10**400), 60.0, (60.0, 75.0)),  # a huge hint is capped
    (0, Hinted(math.inf), 60.0, (60.0, 75.0)),
    (0, Hinted(-1), 2.0, (0.0, 2.0)),  # not a hint: the backoff
    (0, Hinted(math.nan), 2.0, (0.0, 2.0)),
    (0, Hinted(True), 2.0, (0.0, 2.0)),  # a bool is no number of seconds
    (0, Hinted("3"), 2.0, (0.0, 2.0)),  # nor is text
    (0, Hinted(None), 2.0, (0.0, 2.0)),
]


@pytest.mark.parametrize(("retries", "exc", "exact", "spread"), CASES)
def test_the_countdown_follows_the_retry_schedule(
    task: Any, retries: int, exc: BaseException, exact: float, spread: tuple[float, float]
) -> None:
    assert countdown(task, exc, retries, jitter=False) == exact
    low, high = spread
    for _ in range(50):
        assert low <= countdown(task, exc, retries, jitter=True) <= high


def make_task(**options: Any) -> Any:
    app = Celery("options", set_as_current=False)

    @app.task(base=ExecutionTask, bind=True, name=f"options.{next(_made)}.work", **options)
    def work(self: ExecutionTask, execution_id: str) -> None:
        """Never run: only its options are looked at."""

    return app.tasks[work.name]  # the name makes Celery build the task class


def test_a_backoff_above_its_cap_is_capped_and_celerys_true_is_one_second() -> None:
    assert countdown(make_task(retry_backoff=200, retry_backoff_max=60), Exception(), 0,
                     jitter=False) == 60.0
    assert countdown(make_task(retry_backoff=True), Exception(), 2, jitter=False) == 4.0


# Options that would make the failure handling itself fail: refused when the task is made.
BAD_OPTIONS = [
    ("retry_backoff", "1"),
    ("retry_backoff", -1),
    ("retry_backoff", math.nan),
    ("retry_backoff", math.inf),
    ("retry_backoff", None),
    ("retry_backoff_max", "60"),
    ("retry_backoff_max", -0.5),
    ("retry_backoff_max", math.inf),
    ("retry_backoff_max", False),
    ("retry_jitter", 1),
    ("retry_jitter", "yes"),
    ("retry_jitter", None),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_a_bad_backoff_option_is_refused_when_the_task_is_made(option: str, value: Any) -> None:
    # What Celery's task decorator does: a subclass of the base with the options set on it.
    with pytest.raises(ValueError, match=f"^options.work: {option} must be"):
        type("work", (ExecutionTask,), {"name": "options.work", option: value})
