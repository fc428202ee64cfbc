"""The outcomes of the last tasks of a process, a health input (not statistics: those come from
the Prometheus metrics, see ``_metric_stats``).

The Celery wiring records the outcome of each of the last :data:`RECENT_SIZE` tasks (when,
which task, which exception type if it failed) in :func:`recent` for the ``worker_process``
check and ``/readyz``. A prefork child publishes them through its heartbeat file; the main
process merges those of every child with its own. A forked child starts from no outcomes, so
nothing is counted twice.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from . import _runtime

RECENT_SIZE = 50  # task outcomes kept per process (and after merging) for the health check

#: One finished task: (unix time, task name, the exception's type name or None when it
#: succeeded, whether that exception is transient, i.e. trying again later may succeed).
Outcome = tuple[float, str, str | None, bool]


class RecentOutcomes:
    """Thread-safe record of the last :data:`RECENT_SIZE` task outcomes of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[Outcome] = deque(maxlen=RECENT_SIZE)

    def record(self, name: str, error: str | None, transient: bool = False) -> None:
        """Add one finished task: ``error`` is the exception's type name, None on success."""
        with self._lock:
            self._items.append((time.time(), name, error, transient))

    def snapshot(self) -> list[Outcome]:
        """The outcomes, oldest first (JSON-serialisable as lists)."""
        with self._lock:
            return list(self._items)


def merge_recent(snapshots: Iterable[Iterable[Any]]) -> list[Outcome]:
    """The last :data:`RECENT_SIZE` outcomes of several processes, oldest first."""
    merged = [
        (float(item[0]), str(item[1]), None if item[2] is None else str(item[2]), bool(item[3]))
        for snap in snapshots
        for item in snap
    ]
    merged.sort(key=lambda item: item[0])
    return merged[-RECENT_SIZE:]


# A forked child starts from no outcomes, so nothing is counted twice.
RECENT = _runtime.part("recent task outcomes", RecentOutcomes, lambda _inherited: RecentOutcomes())


def recent() -> RecentOutcomes:
    """The outcomes of the last :data:`RECENT_SIZE` tasks run in this process."""
    return RECENT.get()
