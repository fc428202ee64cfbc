"""The retry budget: retries capped at a ratio of recent calls (public in ``retry_utils``)."""

from __future__ import annotations

import threading
import time
import weakref

from . import _runtime
from ._resilience import check_number


def _fresh_locks(budgets: weakref.WeakSet[RetryBudget]) -> None:
    """Fresh budget locks in a forked child (Celery's prefork pool): a lock another thread
    of the parent held at the moment of the fork would otherwise stay locked there."""
    for budget in list(budgets):
        budget._lock = threading.Lock()


#: Every budget of this process, for the fork step (the budgets themselves are kept).
_BUDGETS: _runtime.Part[weakref.WeakSet[RetryBudget]] = _runtime.part(
    "retry budgets", weakref.WeakSet, _fresh_locks
)


class RetryBudget:
    """Caps retries at ``ratio`` of the calls of the last ``window`` seconds, plus a floor.

    Every logical call deposits (``record_call``); every retry withdraws (``try_spend``).
    Within any window a budget allows ``ratio * calls + min_per_second * window`` retries, so
    during an outage retries add at most ``ratio`` to the load instead of multiplying it.
    Thread-safe; one process-wide budget is meant to be shared by many policies.
    """

    _SLOTS = 10

    def __init__(self, ratio: float = 0.2, min_per_second: float = 1.0, window: float = 10.0):
        self.ratio = check_number("ratio", ratio, minimum=0.0)
        self.min_per_second = check_number("min_per_second", min_per_second, minimum=0.0)
        self.window = check_number("window", window, minimum=0.0, strict=True)
        self._slot_seconds = self.window / self._SLOTS
        self._calls = [0] * self._SLOTS
        self._retries = [0] * self._SLOTS
        self._epoch = -1  # index of the newest slot, in slot units since the monotonic origin
        self._lock = threading.Lock()
        _BUDGETS.get().add(self)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )

    def _advance(self, now: float) -> int:
        """Clear the slots that fell out of the window; the current slot's index."""
        epoch = int(now / self._slot_seconds)
        stale = epoch - self._epoch
        if stale > 0:
            for offset in range(1, min(stale, self._SLOTS) + 1):
                index = (self._epoch + offset) % self._SLOTS
                self._calls[index] = 0
                self._retries[index] = 0
            self._epoch = epoch
        return epoch % self._SLOTS

    def record_call(self) -> None:
        """Count one logical call (not a retry)."""
        now = time.monotonic()
        with self._lock:
            self._calls[self._advance(now)] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is empty."""
        now = time.monotonic()
        with self._lock:
            index = self._advance(now)
            allowed = self.ratio * sum(self._calls) + self.min_per_second * self.window
            if sum(self._retries) + 1 > allowed:
                return False
            self._retries[index] += 1
            return True

    def available(self) -> float:
        """Retries the budget would allow right now (may be fractional)."""
        now = time.monotonic()
        with self._lock:
            self._advance(now)
            allowed = self.ratio * sum(self._calls) + self.min_per_second * self.window
            return max(0.0, allowed - sum(self._retries))
