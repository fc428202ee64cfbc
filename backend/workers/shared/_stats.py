"""Per-process call statistics (count, errors, total, mean, max, p95) and their merging.

``monitor_performance`` records function calls in :func:`functions`, the Celery wiring records
tasks in :func:`tasks`, and the outcome of each of the last :data:`RECENT_SIZE` tasks (when,
which task, which exception type if it failed) in :func:`recent` for the ``worker_process``
check. A prefork child publishes its snapshots through its heartbeat file; the main process
merges the snapshots of every child with its own. A forked child starts from empty
statistics, so nothing is counted twice.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from . import _runtime

SAMPLES = 256  # recent durations kept per name for the p95
RECENT_SIZE = 50  # task outcomes kept per process (and after merging) for the health check


class _Entry:
    __slots__ = ("count", "errors", "max", "samples", "total")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total = 0.0
        self.max = 0.0
        self.samples: deque[float] = deque(maxlen=SAMPLES)


class CallStats:
    """Thread-safe statistics of named calls in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def record(self, name: str, seconds: float, ok: bool) -> None:
        """Add one call of ``name`` that took ``seconds`` and succeeded or not."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry()
            entry.count += 1
            entry.total += seconds
            if seconds > entry.max:
                entry.max = seconds
            if not ok:
                entry.errors += 1
            entry.samples.append(seconds)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Raw figures per name, JSON-serialisable, for merging across processes."""
        with self._lock:
            return {
                name: {
                    "count": e.count,
                    "errors": e.errors,
                    "total": e.total,
                    "max": e.max,
                    "samples": list(e.samples),
                }
                for name, e in self._entries.items()
            }


def merge(snapshots: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum raw snapshots of several processes into one raw snapshot."""
    out: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for name, fig in snap.items():
            acc = out.setdefault(
                name, {"count": 0, "errors": 0, "total": 0.0, "max": 0.0, "samples": []}
            )
            acc["count"] += int(fig["count"])
            acc["errors"] += int(fig["errors"])
            acc["total"] += float(fig["total"])
            acc["max"] = max(acc["max"], float(fig["max"]))
            acc["samples"] = (acc["samples"] + list(fig["samples"]))[-4 * SAMPLES :]
    return out


def summarize(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Readable figures per name: count, errors, and times in milliseconds."""
    out: dict[str, dict[str, Any]] = {}
    for name, fig in sorted(raw.items()):
        count = int(fig["count"])
        samples = sorted(fig["samples"])
        p95 = samples[max(0, math.ceil(0.95 * len(samples)) - 1)] if samples else 0.0
        out[name] = {
            "count": count,
            "errors": int(fig["errors"]),
            "total_ms": round(float(fig["total"]) * 1000, 3),
            "mean_ms": round(float(fig["total"]) / count * 1000, 3) if count else 0.0,
            "max_ms": round(float(fig["max"]) * 1000, 3),
            "p95_ms": round(p95 * 1000, 3),
        }
    return out


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


class _Stats:
    """This process's statistics: function calls, tasks, and the recent task outcomes."""

    def __init__(self) -> None:
        self.functions = CallStats()
        self.tasks = CallStats()
        self.recent = RecentOutcomes()


# A forked child starts from empty statistics, so nothing is counted twice.
STATS = _runtime.part("statistics", _Stats, lambda _inherited: _Stats())


def functions() -> CallStats:
    """The statistics of calls measured by ``monitor_performance`` in this process."""
    return STATS.get().functions


def tasks() -> CallStats:
    """The statistics of the Celery tasks run in this process."""
    return STATS.get().tasks


def recent() -> RecentOutcomes:
    """The outcomes of the last :data:`RECENT_SIZE` tasks run in this process."""
    return STATS.get().recent
