"""Health checks of a worker: how healthy it is, independent of any transport.

:class:`HealthChecker` runs named checks, each bounded in time (``HEALTH_CHECK_TIMEOUT``,
5 s by default): a check that hangs or raises becomes an ``unhealthy`` result, never a crash
or a blocked probe. Built in: ``api_connectivity`` (an authenticated call to the backend's
health endpoint, one attempt, short timeout), ``system_resources`` (memory, disk, CPU against
the ``HEALTH_*_PERCENT`` thresholds) and ``worker_process`` (the Celery consumer's broker
connection, the prefork children's heartbeats, the recent tasks' failures, and the circuit
breakers: degraded while a Redis-shared breaker has lost Redis and runs on local state). The
overall status is the worst check. It also answers the probes' questions as plain data:
readiness, metrics, the last report and the history.

The HTTP server that serves these answers, :class:`HealthServer` (with
:class:`HealthServerError` and the request bounds ``MAX_*``), lives in ``_health_server``,
which imports this module; those names are still importable from here (see ``__getattr__``).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _heartbeat, _metric_stats, _metrics, _redact, _stats
from ._timefmt import utc_now_iso
from .config import ConfigurationError

if TYPE_CHECKING:
    from .config import WorkerConfig

log = logging.getLogger(__name__)

HISTORY_SIZE = 100
READY_MAX_AGE = 2.0  # seconds a backend check result is reused by /readyz
#: The recent tasks judged by ``worker_process``: the last ``_stats.RECENT_SIZE`` (50) tasks
#: of the worker (all pool children merged) that finished within this many seconds.
TASK_WINDOW_SECONDS = 600.0
#: Fewer recent tasks than this say nothing (one failed task is not a failing worker).
TASK_MIN_SAMPLE = 3
#: Share of failed recent tasks from which the worker is degraded; all failed is unhealthy.
TASK_DEGRADED_SHARE = 0.5
CheckFunction = Callable[[], "HealthCheckResult | bool"]
#: Names defined by the HTTP server module and still importable from here.
_SERVER_NAMES = frozenset(
    {
        "HealthServer",
        "HealthServerError",
        "MAX_REQUEST_LINE",
        "MAX_HEADER_BYTES",
        "MAX_HEADERS",
        "MAX_BODY",
    }
)


def __getattr__(name: str) -> Any:
    """``HealthServer`` and the other server names, from ``_health_server`` on first use.

    The server imports this module, so the dependency goes one way: the checks never load
    the server, and looking the module up by name here is no import cycle (lint-imports does
    not see this lookup; the contract ``health-without-server`` covers every import)."""
    if name not in _SERVER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__package__}._health_server"), name)
    globals()[name] = value
    return value


class HealthStatus(enum.StrEnum):
    """Outcome of a check or of a whole report, from best to worst."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        """0 healthy, 1 degraded, 2 unhealthy: the overall status is the highest rank."""
        return _RANK[self]


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


def worst(statuses: list[HealthStatus]) -> HealthStatus:
    """The worst of ``statuses`` (healthy when there are none)."""
    return max(statuses, key=lambda s: s.rank, default=HealthStatus.HEALTHY)


@dataclasses.dataclass
class HealthCheckResult:
    """The outcome of one check; ``duration_ms`` and ``timestamp`` are filled in by the checker."""

    name: str
    status: HealthStatus
    message: str
    details: dict[str, Any] | None = None
    duration_ms: float = 0.0
    timestamp: str = dataclasses.field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        try:
            self.status = HealthStatus(self.status)
        except ValueError:
            raise ValueError(
                f"status must be one of {', '.join(s.value for s in HealthStatus)}, "
                f"got {self.status!r}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in responses."""
        out: dict[str, Any] = {"status": self.status.value, "message": self.message}
        if self.details:
            out["details"] = self.details
        out["duration_ms"] = self.duration_ms
        out["timestamp"] = self.timestamp
        return out


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """All checks of one run and the overall status."""

    status: HealthStatus
    timestamp: str
    uptime_seconds: float
    worker_name: str
    checks: dict[str, HealthCheckResult]

    def to_dict(self) -> dict[str, Any]:
        """The module README's JSON shape: status, timestamp, uptime_seconds, worker_name and
        checks."""
        return {
            "status": self.status.value,
            "timestamp": self.timestamp,
            "uptime_seconds": self.uptime_seconds,
            "worker_name": self.worker_name,
            "checks": {name: result.to_dict() for name, result in self.checks.items()},
        }

    @property
    def http_status(self) -> int:
        """200 when healthy or degraded, 503 when unhealthy."""
        return 503 if self.status is HealthStatus.UNHEALTHY else 200


class _Run:
    """One execution of one check in its own daemon thread (a hung one is left behind)."""

    def __init__(self, name: str, fn: CheckFunction) -> None:
        self.name = name
        self.fn = fn
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result: HealthCheckResult | None = None
        threading.Thread(target=self._run, name=f"health-check-{name}", daemon=True).start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            result = _as_result(self.name, self.fn())
        except Exception as exc:  # a failing check is a finding, not a crash
            result = HealthCheckResult(
                self.name,
                HealthStatus.UNHEALTHY,
                _redact.scrub(f"check raised {type(exc).__name__}: {exc}"),
            )
        result.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.result = result
        self.done.set()


def _as_result(name: str, value: Any) -> HealthCheckResult:
    if isinstance(value, HealthCheckResult):
        if value.name != name:
            value = dataclasses.replace(value, name=name)
        return value
    if isinstance(value, bool):
        if value:
            return HealthCheckResult(name, HealthStatus.HEALTHY, "OK")
        return HealthCheckResult(name, HealthStatus.UNHEALTHY, "check returned False")
    return HealthCheckResult(
        name,
        HealthStatus.UNHEALTHY,
        f"check returned {type(value).__name__}, expected HealthCheckResult or bool",
    )


class HealthChecker:
    """Runs the built-in and custom checks, keeps the last report and a history of 100."""

    def __init__(self, config: WorkerConfig, *, check_timeout: float | None = None) -> None:
        timeout = config.health_check_timeout if check_timeout is None else check_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"check_timeout must be a number > 0, got {check_timeout!r}")
        problems = {}
        for kind in ("memory", "disk", "cpu"):
            low = getattr(config, f"health_{kind}_degraded_percent")
            high = getattr(config, f"health_{kind}_unhealthy_percent")
            if low > high:
                problems[f"HEALTH_{kind.upper()}_DEGRADED_PERCENT"] = (
                    f"must not exceed HEALTH_{kind.upper()}_UNHEALTHY_PERCENT ({low} > {high})"
                )
        if problems:
            raise ConfigurationError(problems)
        self.config = config
        self.check_timeout = float(timeout)
        _redact.register_secrets(config.secret_values())
        self._lock = threading.Lock()
        self._checks: dict[str, tuple[CheckFunction, float]] = {}
        self._runs: dict[str, _Run] = {}
        self._latest: dict[str, HealthCheckResult] = {}
        self._history: deque[HealthReport] = deque(maxlen=HISTORY_SIZE)
        self._last: HealthReport | None = None
        self._report_lock = threading.Lock()
        self._report_done: threading.Event | None = None
        self._stop = threading.Event()
        self._background: threading.Thread | None = None
        self._listeners: list[Callable[[HealthReport], object]] = []
        self.started_at = _process_start()
        import psutil

        psutil.cpu_percent(interval=None)  # start the non-blocking CPU measurement
        self.add_custom_check("api_connectivity", self.check_api_connectivity)
        self.add_custom_check("system_resources", self.check_system_resources)
        self.add_custom_check("worker_process", self.check_worker_process)

    # --- registration ---------------------------------------------------------------
    def add_custom_check(
        self, name: str, check: CheckFunction, *, timeout: float | None = None
    ) -> None:
        """Add (or replace) a check: ``check()`` returns a HealthCheckResult or a bool."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"check name must be a non-empty string, got {name!r}")
        if not callable(check):
            raise TypeError(f"check {name!r} must be callable, got {check!r}")
        bound = self.check_timeout if timeout is None else timeout
        if isinstance(bound, bool) or not isinstance(bound, int | float) or bound <= 0:
            raise ValueError(f"timeout of check {name!r} must be a number > 0, got {timeout!r}")
        with self._lock:
            self._checks[name] = (check, float(bound))

    def remove_check(self, name: str) -> None:
        """Remove a check by name (KeyError naming it when there is none)."""
        with self._lock:
            if name not in self._checks:
                raise KeyError(f"no health check named {name!r}")
            del self._checks[name]
            self._latest.pop(name, None)

    @property
    def check_names(self) -> list[str]:
        """The registered checks, in registration order."""
        with self._lock:
            return list(self._checks)

    def add_listener(self, listener: Callable[[HealthReport], object]) -> None:
        """Call ``listener(report)`` after every completed run (in the running thread)."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        self._listeners.append(listener)

    # --- running ------------------------------------------------------------------------
    def _start_or_join(self, name: str) -> tuple[_Run, float] | None:
        with self._lock:
            entry = self._checks.get(name)
            if entry is None:
                return None
            fn, bound = entry
            run = self._runs.get(name)
            if run is None or run.done.is_set():
                run = self._runs[name] = _Run(name, fn)
        return run, bound

    def _collect(self, name: str, run: _Run, bound: float) -> HealthCheckResult:
        remaining = run.started + bound - time.monotonic()
        if run.done.wait(max(0.0, remaining)) and run.result is not None:
            result = run.result
        else:
            elapsed = time.monotonic() - run.started
            result = HealthCheckResult(
                name,
                HealthStatus.UNHEALTHY,
                f"check did not finish within {bound:g} s (running for {elapsed:.1f} s)",
                duration_ms=round(elapsed * 1000, 3),
            )
        with self._lock:
            self._latest[name] = result
        return result

    def run_check(self, name: str, *, max_age: float | None = None) -> HealthCheckResult:
        """Run one check (bounded); a result younger than ``max_age`` seconds is reused."""
        if max_age is not None:
            with self._lock:
                cached = self._latest.get(name)
            if cached is not None and _age(cached.timestamp) <= max_age:
                return cached
        started = self._start_or_join(name)
        if started is None:
            raise KeyError(f"no health check named {name!r}")
        return self._collect(name, *started)

    def run_checks(self) -> HealthReport:
        """Run every check concurrently, each within its bound; callers arriving during a
        run share its report instead of starting another."""
        with self._report_lock:
            waiting = self._report_done
            if waiting is None:
                done = self._report_done = threading.Event()
        if waiting is not None:
            waiting.wait()
            if self._last is not None:
                return self._last
            return self.run_checks()  # the run we waited for failed: make our own
        try:
            report = self._run_all()
        finally:
            with self._report_lock:
                self._report_done = None
            done.set()
        return report

    def _run_all(self) -> HealthReport:
        started = [
            (name, s) for name in self.check_names if (s := self._start_or_join(name)) is not None
        ]
        checks = {name: self._collect(name, run, bound) for name, (run, bound) in started}
        report = HealthReport(
            status=worst([r.status for r in checks.values()]),
            timestamp=utc_now_iso(),
            uptime_seconds=self.uptime_seconds(),
            worker_name=self.config.worker_name,
            checks=checks,
        )
        self._last = report
        self._history.append(report)
        for listener in list(self._listeners):
            try:
                listener(report)
            except Exception:
                log.exception("health report listener %r failed", listener)
        return report

    @property
    def last_report(self) -> HealthReport | None:
        """The most recent report, or None before the first run."""
        return self._last

    def history(self) -> list[HealthReport]:
        """Up to the last 100 reports, oldest first."""
        return list(self._history)

    def uptime_seconds(self) -> float:
        """Seconds since this process started."""
        return round(time.time() - self.started_at, 3)

    # --- background -----------------------------------------------------------------
    def start_background(self, interval: float | None = None) -> None:
        """Re-run the checks every ``interval`` seconds (``HEALTH_CHECK_INTERVAL``) in a
        daemon thread; the first run starts at once."""
        every = self.config.health_check_interval if interval is None else interval
        if isinstance(every, bool) or not isinstance(every, int | float) or every <= 0:
            raise ValueError(f"interval must be a number > 0, got {interval!r}")
        if self._background is not None and self._background.is_alive():
            return
        # Import what the checks import lazily now, in the caller's thread: a prefork pool
        # forked while the checker thread is inside an import gives its children a module
        # lock that nobody will release (their first API call then hangs for ever). That
        # includes what httpx2 imports when a client is built (httpcore2, h11, anyio) and
        # what the first request and its metrics need.
        import encodings.idna  # noqa: F401  (host names of the first request)

        import httpx2
        import prometheus_client  # noqa: F401
        import psutil  # noqa: F401

        from . import _http, api_client, logging_utils  # noqa: F401

        # With the pools' own TLS context: a default client would load the CA certificates
        # into a context of its own, only to drop it (megabytes, in a forked worker's main
        # process written after the fork).
        httpx2.Client(trust_env=False, verify=_http.shared_ssl_context()).close()

        self._stop.clear()
        self._background = threading.Thread(
            target=self._loop, args=(float(every),), name="health-checker", daemon=True
        )
        self._background.start()

    def _loop(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                self.run_checks()
            except Exception:
                log.exception("health check run failed")
            self._stop.wait(every)

    def stop_background(self, timeout: float | None = None) -> None:
        """Stop the background thread (waits for a run in progress, up to ``timeout``)."""
        self._stop.set()
        thread = self._background
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._background = None

    # --- built-in checks -------------------------------------------------------------
    def check_api_connectivity(self) -> HealthCheckResult:
        """One authenticated ``GET health/`` to the backend, no retry, short timeout."""
        from .api_client import InternalAPIClient, InternalAPIError

        timeout = max(0.1, min(self.config.api_timeout, self.check_timeout * 0.8))
        started = time.perf_counter()
        try:
            with InternalAPIClient(self.config) as client:
                answer = client.health_check(timeout=timeout, retry=False)
        except InternalAPIError as exc:
            status = getattr(exc, "status", None)
            why = type(exc).__name__ + (f", HTTP {status}" if status else "")
            return HealthCheckResult(
                "api_connectivity", HealthStatus.UNHEALTHY, f"backend unreachable ({why})"
            )
        latency = round((time.perf_counter() - started) * 1000, 3)
        details = {"latency_ms": latency, "backend_status": answer.status}
        if answer.status != "healthy":
            return HealthCheckResult(
                "api_connectivity",
                HealthStatus.DEGRADED,
                f"backend reports {answer.status!r}",
                details,
            )
        return HealthCheckResult(
            "api_connectivity", HealthStatus.HEALTHY, "API connectivity OK", details
        )

    def check_system_resources(self) -> HealthCheckResult:
        """Memory, disk (of ``WORKER_DATA_DIR``) and CPU use against the thresholds."""
        import psutil

        figures = {
            "memory": psutil.virtual_memory().percent,
            "disk": psutil.disk_usage(str(_existing(self.config.worker_data_dir))).percent,
            "cpu": psutil.cpu_percent(interval=None),
        }
        statuses, problems = [], []
        for kind, value in figures.items():
            degraded = getattr(self.config, f"health_{kind}_degraded_percent")
            unhealthy = getattr(self.config, f"health_{kind}_unhealthy_percent")
            if value > unhealthy:
                statuses.append(HealthStatus.UNHEALTHY)
                problems.append(f"{kind} {value:.1f}% > {unhealthy:g}%")
            elif value > degraded:
                statuses.append(HealthStatus.DEGRADED)
                problems.append(f"{kind} {value:.1f}% > {degraded:g}%")
        details = {f"{kind}_percent": value for kind, value in figures.items()}
        message = "System resources OK" if not problems else "; ".join(problems)
        return HealthCheckResult("system_resources", worst(statuses), message, details)

    def check_worker_process(self) -> HealthCheckResult:
        """The main process, the consumer's broker connection, the pool's heartbeats, the
        recent tasks (degraded when half of them failed, unhealthy when all did), and the
        circuit breakers (degraded while a Redis-shared one runs on local state)."""
        details: dict[str, Any] = {"pid": os.getpid()}
        status, message = self._process_status(details)
        tasks = recent_task_findings()
        if tasks["count"]:
            details["recent_tasks"] = tasks
        verdict = _task_verdict(tasks)
        if verdict is not None and verdict[0].rank > status.rank:
            status, message = verdict
        elif verdict is not None:
            message = f"{message}; {verdict[1]}"
        breakers = breaker_findings()
        if breakers:
            details["circuit_breakers"] = breakers
        lost = [b["breaker"] for b in breakers if b.get("shared_state_ok") is False]
        if lost:
            local = (
                f"circuit breaker {', '.join(lost)}: shared state (Redis) unreachable, "
                "running on this process's local state"
            )
            if status is HealthStatus.HEALTHY:
                status, message = HealthStatus.DEGRADED, local
            else:
                message = f"{message}; {local}"
        return HealthCheckResult("worker_process", status, message, details)

    def _process_status(self, details: dict[str, Any]) -> tuple[HealthStatus, str]:
        if not _heartbeat.worker_attached():
            details["celery_worker"] = False
            return HealthStatus.HEALTHY, "Worker process healthy"
        if not _heartbeat.worker_started():
            details.update(celery_worker=True, consumer_connected=False, consumer_ready=False)
            return HealthStatus.DEGRADED, "celery worker starting"
        children = _heartbeat.child_heartbeats(self.config.health_heartbeat_timeout)
        connected = _heartbeat.consumer_connected()
        details.update(
            celery_worker=True,
            consumer_connected=connected,
            consumer_ready=_heartbeat.STATE.ready,
            pool_processes=children,
        )
        stale = [c["pid"] for c in children if not c["fresh"]]
        if not connected:
            return HealthStatus.UNHEALTHY, "consumer not connected to the broker"
        if stale:
            return (
                HealthStatus.UNHEALTHY,
                f"{len(stale)} of {len(children)} pool processes without a heartbeat for "
                f"{self.config.health_heartbeat_timeout:g} s: {stale}",
            )
        if not _heartbeat.STATE.ready:
            return HealthStatus.DEGRADED, "consumer starting"
        return HealthStatus.HEALTHY, "Worker process healthy"

    # --- probes ---------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this worker should take work: backend reachable, the backend's circuit
        breaker not open, consumer attached (when a Celery worker runs here), and not every
        recent task failed with a permanent error.

        Returns (ready, the parts and their findings)."""
        checks: dict[str, Any] = {}
        api = self.run_check("api_connectivity", max_age=READY_MAX_AGE)
        checks["backend"] = {"ok": api.status is not HealthStatus.UNHEALTHY, "message": api.message}
        # The one breaker guarding backend calls; imported here, so that importing health
        # loads no breaker (see breaker_findings).
        from ._policy import backend_breaker

        breaker = backend_breaker(self.config)
        state = breaker.state.value
        checks["circuit_breaker"] = {"ok": state != "open", "state": state}
        if breaker.shared:
            checks["circuit_breaker"]["shared_state_ok"] = breaker.shared_state_ok
        lost = [b["breaker"] for b in breaker_findings() if b.get("shared_state_ok") is False]
        if lost:  # still ready: each breaker goes on protecting on local state
            checks["breaker_shared_state"] = {"ok": True, "running_on_local_state": lost}
        if _heartbeat.worker_attached():
            attached = _heartbeat.STATE.ready and _heartbeat.consumer_connected()
            checks["consumer"] = {"ok": attached}
        tasks = recent_task_findings()
        if tasks["count"]:
            # Every recent task failed with an error that waiting will not fix (a missing
            # ORGANIZATION_ID, a refused key): not ready, so a rollout stops here. Transient
            # failures are left to the backend check, which recovers on its own.
            hopeless = tasks["count"] >= TASK_MIN_SAMPLE and (
                tasks["failed_permanently"] == tasks["count"]
            )
            checks["recent_tasks"] = {
                "ok": not hopeless,
                "count": tasks["count"],
                "failed": tasks["failed"],
                "failed_permanently": tasks["failed_permanently"],
                "failures": tasks["failures"],
            }
        return all(c["ok"] for c in checks.values()), checks

    def metrics(self) -> dict[str, Any]:
        """System figures and the task/function statistics of every process (from the
        Prometheus metrics, see ``_metric_stats.statistics``)."""
        import psutil

        statistics = _metric_stats.statistics()
        me = psutil.Process()
        with me.oneshot():
            process = {
                "pid": me.pid,
                "rss_bytes": me.memory_info().rss,
                "threads": me.num_threads(),
                "pool_processes": len(_heartbeat.pool_pids()),
            }
        return {
            "timestamp": utc_now_iso(),
            "worker_name": self.config.worker_name,
            "worker_version": self.config.worker_version,
            "uptime_seconds": self.uptime_seconds(),
            "system": {
                "cpu_percent": psutil.cpu_percent(interval=None),
                "memory_percent": psutil.virtual_memory().percent,
                "disk_percent": psutil.disk_usage(
                    str(_existing(self.config.worker_data_dir))
                ).percent,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
            "process": process,
            "tasks": statistics["tasks"],
            "functions": statistics["functions"],
        }


def recent_task_findings() -> dict[str, Any]:
    """The worker's recent tasks (see :data:`TASK_WINDOW_SECONDS`): how many, how many
    failed (and of those, how many with an exception that is not transient), and how often
    each exception type (and each task) failed."""
    since = time.time() - TASK_WINDOW_SECONDS
    recent = [item for item in _heartbeat.recent_tasks() if item[0] >= since]
    failures: dict[str, int] = {}
    failing_tasks: dict[str, int] = {}
    permanent = 0
    for _when, name, error, transient in recent:
        if error is not None:
            failures[error] = failures.get(error, 0) + 1
            failing_tasks[name] = failing_tasks.get(name, 0) + 1
            permanent += not transient
    return {
        "count": len(recent),
        "failed": sum(failures.values()),
        "failed_permanently": permanent,
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failing_tasks": dict(sorted(failing_tasks.items(), key=lambda kv: (-kv[1], kv[0]))),
        "window": f"the last {_stats.RECENT_SIZE} tasks within {TASK_WINDOW_SECONDS:g} s",
    }


def _task_verdict(tasks: dict[str, Any]) -> tuple[HealthStatus, str] | None:
    """Unhealthy when every recent task failed, degraded from TASK_DEGRADED_SHARE; None
    below TASK_MIN_SAMPLE tasks or under the share."""
    count, failed = tasks["count"], tasks["failed"]
    if count < TASK_MIN_SAMPLE or failed < count * TASK_DEGRADED_SHARE:
        return None
    kinds = ", ".join(f"{name} x{n}" for name, n in tasks["failures"].items())
    if failed == count:
        return HealthStatus.UNHEALTHY, f"all {count} recent tasks failed ({kinds})"
    return HealthStatus.DEGRADED, f"{failed} of {count} recent tasks failed ({kinds})"


def breaker_findings() -> list[dict[str, Any]]:
    """Every circuit breaker of this process: name (URLs left out), state, and for a
    Redis-shared one whether its shared state is reachable (False: running on local state)."""
    module = sys.modules.get("backend.workers.shared._breaker")
    if module is None:  # no breaker can exist yet
        return []
    found = []
    for breaker in module.all_breakers():
        entry: dict[str, Any] = {
            "breaker": _metrics.breaker_label(breaker.name),
            "state": breaker.state.value,  # read first: a shared read may notice Redis' loss
        }
        if breaker.shared:
            entry["shared_state_ok"] = breaker.shared_state_ok
        found.append(entry)
    return found


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _age(timestamp: str) -> float:
    return time.time() - datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _process_start() -> float:
    import psutil

    return float(psutil.Process().create_time())
