"""Prometheus metrics of a worker: one set of metric objects, recorded by every module.

``prometheus_client`` is imported on first use. Under Celery's prefork pool the main process
calls :func:`enable_multiprocess` before the pool forks: every child then writes its values
to memory-mapped files in one directory and :func:`render` (in the main process, where the
health server lives) aggregates them, so ``/metrics`` counts what all children did, also
children that have since exited. Without it, values live in this process's registry.
:func:`samples` reads them back (``_metric_stats`` makes the statistics of
``/health/metrics`` from them).

Metric names and labels (base units, ``_total`` counters):

- ``worker_api_requests_total{method,endpoint,status}``
- ``worker_api_request_duration_seconds{method,endpoint}``
- ``worker_api_retries_total{method,endpoint,reason}``
- ``worker_circuit_breaker_state{breaker}`` (0 closed, 1 half_open, 2 open; the worst
  state among live processes; URLs in a breaker's name are left out of the label)
- ``worker_circuit_breaker_shared_state{breaker}`` (Redis-shared breakers: 1 shared state
  reachable, 0 running on local state; the lowest among live processes; set at
  subscription and on every loss or recovery)
- ``worker_tasks_total{task,outcome}`` and ``worker_task_duration_seconds{task}``
- ``worker_task_max_duration_seconds{task}`` (the longest run; the maximum over every
  process, exited ones included)
- ``worker_function_duration_seconds{function,outcome}`` (``monitor_performance``)
- ``worker_function_max_duration_seconds{function}`` (the longest call, as for tasks)
- ``worker_retries_total{function}`` (every retry made by ``retry_utils``)
"""

from __future__ import annotations

import glob
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _runtime

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
# Seconds: from a fast loopback call (1 ms) to a long task (10 min).
_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    float("inf"),
)


class _Metrics:
    """The metric objects, built lazily and rebuilt when the value storage changes.

    prometheus_client's objects are used only under ``recording``: their own locks (the
    multiprocess values share one) are free whenever it is, so a fork taken with it held (see
    ``_runtime.hold_across_fork``) never leaves the child one of them locked by another thread
    of the parent (the main process's health checks record API calls while the pool forks).
    """

    def __init__(self) -> None:
        # Reentrant: the first record builds, and building publishes the breakers' states.
        self.recording = threading.RLock()
        self.lock = threading.Lock()
        self.built = False
        self.multiprocess_dir: str | None = None
        self.registry: CollectorRegistry | None = None
        self.children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.families: dict[str, Any] = {}
        # The largest value each max gauge was set to by this process (or the process it was
        # forked from, whose values count as well).
        self.maxima: dict[tuple[str, tuple[str, ...]], float] = {}

    def build(self) -> CollectorRegistry:
        with self.lock:
            if self.registry is not None:
                return self.registry
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

            # Multiprocess values are read from files, so the objects need no registry there.
            registry = CollectorRegistry(auto_describe=True)
            self.registry = registry
            f = self.families
            f["api_requests"] = Counter(
                "worker_api_requests",
                "Internal API requests by method, endpoint and status",
                ["method", "endpoint", "status"],
                registry=registry,
            )
            f["api_duration"] = Histogram(
                "worker_api_request_duration_seconds",
                "Internal API request duration",
                ["method", "endpoint"],
                registry=registry,
                buckets=_BUCKETS,
            )
            f["api_retries"] = Counter(
                "worker_api_retries",
                "Internal API requests retried, by reason",
                ["method", "endpoint", "reason"],
                registry=registry,
            )
            f["breaker"] = Gauge(
                "worker_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 half_open, 2 open",
                ["breaker"],
                registry=registry,
                multiprocess_mode="livemax",
            )
            f["breaker_shared"] = Gauge(
                "worker_circuit_breaker_shared_state",
                "Redis-shared circuit breaker: 1 shared state reachable, 0 on local state",
                ["breaker"],
                registry=registry,
                multiprocess_mode="livemin",
            )
            f["tasks"] = Counter(
                "worker_tasks",
                "Celery tasks finished, by outcome",
                ["task", "outcome"],
                registry=registry,
            )
            f["task_duration"] = Histogram(
                "worker_task_duration_seconds",
                "Celery task run time",
                ["task"],
                registry=registry,
                buckets=_BUCKETS,
            )
            f["task_max"] = Gauge(
                "worker_task_max_duration_seconds",
                "Longest Celery task run time",
                ["task"],
                registry=registry,
                multiprocess_mode="max",
            )
            f["function"] = Histogram(
                "worker_function_duration_seconds",
                "Run time of monitored functions",
                ["function", "outcome"],
                registry=registry,
                buckets=_BUCKETS,
            )
            f["function_max"] = Gauge(
                "worker_function_max_duration_seconds",
                "Longest run time of monitored functions",
                ["function"],
                registry=registry,
                multiprocess_mode="max",
            )
            f["retries"] = Counter(
                "worker_retries",
                "Retries made by the retry engine, by function",
                ["function"],
                registry=registry,
            )
            self.built = True
        if "backend.workers.shared.retry_utils" in sys.modules:
            subscribe_resilience()
        return registry

    def record(self, family: str, labels: tuple[str, ...], how: str, value: float) -> None:
        """``inc``, ``observe`` or ``set`` (``how``) ``value`` on one labelled metric."""
        with self.recording:
            getattr(self.child(family, labels), how)(value)

    def record_max(self, family: str, labels: tuple[str, ...], value: float) -> None:
        """Raise the max gauge ``family`` to ``value`` when that is a new maximum."""
        with self.recording:
            key = (family, labels)
            child = self.child(family, labels)
            known = self.maxima.get(key)
            if known is None:
                # What the value file holds already: a process whose pid a dead child had
                # writes into that child's file, and must not lower its maximum.
                known = self.maxima[key] = child._value.get()
            if value > known:
                child.set(value)
                self.maxima[key] = value

    def child(self, family: str, labels: tuple[str, ...]) -> Any:
        key = (family, labels)
        found = self.children.get(key)
        if found is None:
            if not self.built:
                self.build()
            found = self.families[family].labels(*labels)
            self.children[key] = found
        return found

    def reset(self) -> None:
        with self.lock:
            self.built = False
            self.children = {}
            self.families = {}
            self.maxima = {}
            self.registry = None


_state = _Metrics()


def api_request(method: str, endpoint: str, status: int | str, seconds: float) -> None:
    """Count one internal API request (``status`` is the HTTP code or an error kind)."""
    _state.record("api_requests", (method, endpoint, str(status)), "inc", 1)
    _state.record("api_duration", (method, endpoint), "observe", seconds)


def api_retry(method: str, endpoint: str, reason: str) -> None:
    """Count one retry of an internal API request and why it was retried."""
    _state.record("api_retries", (method, endpoint, reason), "inc", 1)


_URL = re.compile(r"\s*[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)


def breaker_label(name: str) -> str:
    """A breaker's name as a label: URLs removed (configuration, maybe credentials)."""
    return _URL.sub("", name).strip() or "breaker"


def breaker_state(name: str, state_value: str) -> None:
    """Publish a circuit breaker's state (``closed``, ``half_open`` or ``open``).

    The label is :func:`breaker_label` of the name: ``/metrics`` never shows a URL.
    """
    try:
        value = BREAKER_STATES[state_value]
    except KeyError:
        raise ValueError(
            f"unknown circuit breaker state {state_value!r}; "
            f"expected one of {', '.join(BREAKER_STATES)}"
        ) from None
    _state.record("breaker", (breaker_label(name),), "set", value)


def breaker_shared_state(name: str, ok: bool) -> None:
    """Publish whether a Redis-shared breaker reaches Redis (False: it runs on local state)."""
    _state.record("breaker_shared", (breaker_label(name),), "set", 1.0 if ok else 0.0)


def task_finished(task_name: str, outcome: str, seconds: float) -> None:
    """Count a finished Celery task (``outcome`` e.g. ``success``/``failure``) and its time."""
    _state.record("tasks", (task_name, outcome), "inc", 1)
    _state.record("task_duration", (task_name,), "observe", seconds)
    _state.record_max("task_max", (task_name,), seconds)


def function_call(name: str, seconds: float, ok: bool) -> None:
    """Record one call of a monitored function."""
    _state.record("function", (name, "success" if ok else "failure"), "observe", seconds)
    _state.record_max("function_max", (name,), seconds)


def retry_made(function: str) -> None:
    """Count one retry made by the retry engine for ``function``."""
    _state.record("retries", (function,), "inc", 1)


_subscribed = False


def subscribe_resilience() -> None:
    """Record every breaker state change, every loss or recovery of a breaker's shared
    state and every retry of ``retry_utils`` (idempotent)."""
    global _subscribed
    if _subscribed:
        return
    from . import retry_utils

    with _state.lock:
        if _subscribed:
            return
        retry_utils.add_state_listener(_on_breaker_change)
        retry_utils.add_shared_state_listener(_on_shared_state)
        retry_utils.add_retry_listener(_on_retry)
        _subscribed = True
    for breaker in retry_utils.all_breakers():
        breaker_state(breaker.name, breaker.state.value)
        if breaker.shared:
            breaker_shared_state(breaker.name, breaker.shared_state_ok)


def _on_breaker_change(breaker: Any, _old: Any, new: Any) -> None:
    breaker_state(breaker.name, str(getattr(new, "value", new)))


def _on_shared_state(breaker: Any, ok: bool) -> None:
    breaker_shared_state(breaker.name, ok)


def _on_retry(event: Any) -> None:
    retry_made(event.function)


def enable_multiprocess(directory: str | os.PathLike[str]) -> None:
    """Switch to multiprocess values in ``directory`` (emptied first); call before forking.

    Must run in the process that will fork the pool, before any child exists.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{ENV_DIR}={str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[ENV_DIR] = str(path)
    import prometheus_client.values as values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client chose its value class at import, before the variable was set.
        values.ValueClass = values.MultiProcessValue()
    _state.reset()
    _state.multiprocess_dir = str(path)


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a process that has exited (its counters are kept)."""
    directory = _state.multiprocess_dir
    if directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)


def _reap_dead_gauges(directory: str) -> None:
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid_text = path.rsplit("_", 1)[-1].removesuffix(".db")
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            mark_process_dead(int(pid_text))


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _FilesCollector:
    """prometheus_client's multiprocess collection over the value files of ``directory``,
    minus a file a process is creating at this moment: it exists empty until it is sized, and
    reading it would fail (prometheus/client_python#1199), answering ``/metrics`` with 500."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Any:
        """The merged metrics of every value file that holds its header."""
        from prometheus_client import multiprocess

        files = []
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:  # a dead process's live gauges, just removed
                continue
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    directory = _state.multiprocess_dir
    if directory is not None:
        if not os.path.isdir(directory):  # removed at worker shutdown: nothing left to show
            return b"", CONTENT_TYPE_LATEST

        _reap_dead_gauges(directory)
        registry = CollectorRegistry()
        registry.register(_FilesCollector(directory))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    with _state.recording:
        return generate_latest(_state.build()), CONTENT_TYPE_LATEST


def samples() -> list[Any]:
    """Every sample (``prometheus_client`` ``Sample``): aggregated over all processes in
    multiprocess mode, else this process's."""
    directory = _state.multiprocess_dir
    if directory is not None:
        if not os.path.isdir(directory):
            return []
        return [s for family in _FilesCollector(directory).collect() for s in family.samples]
    with _state.recording:
        return [s for family in _state.build().collect() for s in family.samples]


# No other thread uses prometheus_client (or builds) while the process forks.
_runtime.hold_across_fork(_state.recording, _state.lock)
