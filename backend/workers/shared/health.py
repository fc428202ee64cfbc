"""Health checks of a worker and the HTTP server that answers probes about them.

:class:`HealthChecker` runs named checks, each bounded in time (``HEALTH_CHECK_TIMEOUT``,
5 s by default): a check that hangs or raises becomes an ``unhealthy`` result, never a crash
or a blocked probe. Built in: ``api_connectivity`` (an authenticated call to the backend's
health endpoint, one attempt, short timeout), ``system_resources`` (memory, disk, CPU against
the ``HEALTH_*_PERCENT`` thresholds) and ``worker_process`` (the Celery consumer's broker
connection, the prefork children's heartbeats, the recent tasks' failures, and the circuit
breakers: degraded while a Redis-shared breaker has lost Redis and runs on local state). The
overall status is the worst check.

:class:`HealthServer` serves, from the main process (standard library threading server):

=================  ==========================================================================
``/health``        runs the checks: 200 healthy or degraded, 503 unhealthy
``/health/quick``  the last report (never runs a check inline)
``/health/metrics`` system figures, task and monitored-function statistics (all children)
``/health/history`` the last 100 reports
``/livez``         the process and its server answer (never depends on backend or broker)
``/readyz``        backend reachable, its circuit breaker not open, consumer attached, not
                   every recent task failing with a permanent error (details: a
                   Redis-shared breaker running on local state)
``/metrics``       Prometheus text format, aggregated over prefork children
=================  ==========================================================================

Responses carry no secret and no configuration beyond the worker's name and version.
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import functools
import http.client
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from . import _heartbeat, _metrics, _redact, _stats
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


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    timestamp: str = dataclasses.field(default_factory=_now_iso)

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
            timestamp=_now_iso(),
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

        from . import api_client, logging_utils  # noqa: F401

        httpx2.Client(trust_env=False).close()

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
        from .api_client import _backend_breaker  # the one breaker guarding backend calls

        breaker = _backend_breaker(self.config)
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
        """System figures and task/function statistics merged over every process."""
        import psutil

        functions, tasks = _heartbeat.merged_stats()
        me = psutil.Process()
        with me.oneshot():
            process = {
                "pid": me.pid,
                "rss_bytes": me.memory_info().rss,
                "threads": me.num_threads(),
                "pool_processes": len(_heartbeat.pool_pids()),
            }
        return {
            "timestamp": _now_iso(),
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
            "tasks": _stats.summarize(tasks),
            "functions": _stats.summarize(functions),
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


# --- HTTP server -----------------------------------------------------------------------


class HealthServerError(OSError):
    """The health server could not listen (the message names the address and port)."""


_PHRASES = {code: HTTPStatus(code).phrase for code in (200, 400, 404, 405, 500, 503)}
_DEBUG_ON = functools.partial(log.isEnabledFor, logging.DEBUG)
_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The ``Date`` header's value, formatted once per second."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = email.utils.formatdate(now, usegmt=True)
        _date = (now, text)
    return text


def _json_body(payload: Any) -> bytes:
    return _redact.scrub(json.dumps(payload, default=str)).encode()


#: Bounds of one request: longer lines, more headers or a bigger body are refused.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024
_LINGER_BYTES = 1024 * 1024  # read and dropped after a refusal, so the answer is not reset
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (methods, header names)
_VERSION = re.compile(r"HTTP/([0-9])\.[0-9]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ALLOWED = "GET, HEAD"


class _LastReportBody:
    """The JSON body of a checker's last report, encoded once per report: ``/health/quick``,
    the orchestrator's frequent probe, then only writes bytes."""

    def __init__(self, checker: HealthChecker) -> None:
        self._checker = checker
        self._pair: tuple[HealthReport, bytes] | None = None

    def get(self) -> tuple[HealthReport, bytes] | None:
        """The last report and its body, or None before the first report."""
        report = self._checker.last_report
        if report is None:
            return None
        pair = self._pair
        if pair is None or pair[0] is not report:
            pair = self._pair = (report, _json_body(report.to_dict()))
        return pair


class _Refused(Exception):
    """The request cannot be served: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class _Gone(Exception):
    """The client closed its side in the middle of a request: nothing to answer."""


def _first_bad(text: str, allowed: re.Pattern[str]) -> str:
    """Where ``text`` leaves ``allowed``: "character 0x.. at position n" (never the text)."""
    for index, char in enumerate(text):
        if not allowed.fullmatch(char):
            return f"character {ord(char):#04x} at position {index}"
    return "it is empty"


_PRINTABLE = re.compile(r"[\x21-\x7e]")
_TARGET = re.compile(r"[\x21-\x7e]+")


class _Handler(BaseHTTPRequestHandler):
    """Routes probe requests; one thread per connection, sockets time out.

    Requests are read here, strictly and within bounds (:data:`MAX_REQUEST_LINE`,
    :data:`MAX_HEADER_BYTES`, :data:`MAX_HEADERS`, :data:`MAX_BODY`): a body announced by
    ``Content-Length`` is read and dropped, so it is never taken for the next request on a
    kept-alive connection; a request whose end cannot be known for sure (``Transfer-Encoding``,
    a duplicated or malformed ``Content-Length``, a malformed line) is answered with a JSON
    error and the connection is closed. Every answer is JSON, except ``/metrics``.
    """

    protocol_version = "HTTP/1.1"
    timeout = 5.0  # a silent client holds only its own thread, and not for long
    # Headers and body leave in one send (flushed after each request), without Nagle's
    # delay: two small writes would otherwise wait for the client's delayed ACK (~40 ms).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "worker-health"
    sys_version = ""
    checker: HealthChecker  # set on the per-server subclass
    last_body: _LastReportBody  # likewise

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health request: " + format, *args)

    # --- reading a request ----------------------------------------------------------
    def handle_one_request(self) -> None:
        """Read one request within bounds and answer it exactly once."""
        self.close_connection = True
        self.command, self.path, self.requestline = "", "", ""
        self.request_version = "HTTP/1.1"
        started = False
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: one empty line before a request
                line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                return  # the client closed an idle connection
            started = True
            self._read_request(line)
        except _Refused as refusal:
            self.close_connection = True
            self._error(refusal.status, refusal.code, refusal.detail)
            self._linger()
            return
        except _Gone:
            self.close_connection = True
            return
        except TimeoutError:
            self.close_connection = True
            if started:
                self._error(408, "request_timeout", "the request did not arrive in time")
                self._linger()
            return
        if self.command in ("GET", "HEAD"):
            self.do_GET()
        else:
            self._not_allowed()
        self.wfile.flush()

    def _read_request(self, line: bytes) -> None:
        if len(line) > MAX_REQUEST_LINE:
            raise _Refused(414, "uri_too_long", f"request line over {MAX_REQUEST_LINE} bytes")
        if not line.endswith(b"\n"):
            raise _Gone
        text = line.decode("latin-1").removesuffix("\n").removesuffix("\r")
        self.requestline = text
        parts = text.split(" ")
        if len(parts) != 3:
            raise _Refused(
                400, "bad_request_line", "the request line must be 'METHOD TARGET HTTP/1.x'"
            )
        method, target, version = parts
        match = _VERSION.fullmatch(version)
        if match is None:
            raise _Refused(
                400, "bad_request_line", "the request line must end with HTTP/1.0 or HTTP/1.1"
            )
        if match.group(1) != "1":
            raise _Refused(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1")
        if not _TOKEN.fullmatch(method):
            raise _Refused(
                400, "bad_method", f"the method is not a token: {_first_bad(method, _TOKEN)}"
            )
        if not _TARGET.fullmatch(target):
            raise _Refused(
                400,
                "bad_request_target",
                "the request target must be printable ASCII (percent-encode the rest): "
                + _first_bad(target, _PRINTABLE),
            )
        self.command, self.request_version = method, version
        self.path = "/" + target.lstrip("/") if target.startswith("//") else target
        headers = self._read_headers()
        self.headers = headers
        connection = {
            t.strip().lower() for t in ",".join(headers.get_all("Connection", [])).split(",")
        }
        if version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        self._read_body(headers)

    def _read_headers(self) -> http.client.HTTPMessage:
        headers = http.client.HTTPMessage()
        total = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise _Refused(
                    431, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes"
                )
            if not line.endswith(b"\n"):
                raise _Gone
            if line in (b"\r\n", b"\n"):
                return headers
            if len(headers) >= MAX_HEADERS:
                raise _Refused(431, "too_many_headers", f"more than {MAX_HEADERS} headers")
            text = line.decode("latin-1").removesuffix("\n").removesuffix("\r")
            name, colon, value = text.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _Refused(
                    400,
                    "bad_header",
                    f"header line {len(headers) + 1} is not 'Name: value' (a token name, "
                    "no space before the colon, no folded line)",
                )
            value = value.strip(" \t")
            if _CONTROL.search(value):
                raise _Refused(400, "bad_header", f"header {name!r} holds a control character")
            headers[name] = value

    def _read_body(self, headers: http.client.HTTPMessage) -> None:
        """Read and drop the body, so that it is never taken for the next request."""
        lengths = headers.get_all("Content-Length", [])
        if headers.get_all("Transfer-Encoding"):
            if lengths:
                raise _Refused(400, "bad_framing", "Transfer-Encoding and Content-Length together")
            raise _Refused(
                411,
                "length_required",
                "Transfer-Encoding is not accepted: send no body, or a Content-Length",
            )
        if not lengths:
            return
        if len(lengths) > 1:
            raise _Refused(400, "bad_content_length", "more than one Content-Length header")
        text = lengths[0]
        if not text or not text.isascii() or not text.isdigit():
            raise _Refused(
                400, "bad_content_length", "Content-Length must be a non-negative integer"
            )
        stripped = text.lstrip("0")
        if len(stripped) > len(str(MAX_BODY)) or int(stripped or "0") > MAX_BODY:
            raise _Refused(
                413, "payload_too_large", f"Content-Length over {MAX_BODY} bytes (probes send none)"
            )
        size = int(stripped or "0")
        if size and headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        if len(self.rfile.read(size)) < size:
            raise _Gone

    def _linger(self) -> None:
        """After a refusal: send the answer, stop writing, and drop what the client still
        sends for a moment (closing with unread input would reset the answer away)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = _LINGER_BYTES
            while left > 0:
                chunk = self.connection.recv(64 * 1024)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client is gone: nothing left to protect

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's error page, as the documented JSON error instead."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase
        self._error(code, phrase.lower().replace(" ", "_"), message or phrase)

    # --- answering ------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        # The status line and headers are built as one string (send_response/send_header
        # cost a method call, a format and a buffer append per line) and leave with the
        # body in one write; the request line is logged only when DEBUG is on.
        head = (
            f"HTTP/1.1 {status} {_PHRASES.get(status) or HTTPStatus(status).phrase}\r\n"
            f"Server: worker-health\r\nDate: {_http_date()}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
        )
        if self.close_connection:
            head += "Connection: close\r\n"
        elif self.request_version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
        if extra:
            head += "".join(f"{key}: {value}\r\n" for key, value in extra.items())
        data = (head + "\r\n").encode("latin-1")
        self.wfile.write(data if self.command == "HEAD" else data + body)
        if _DEBUG_ON():
            self.log_request(status, len(body))

    def _error(
        self, status: int, code: str, detail: str, extra: dict[str, str] | None = None
    ) -> None:
        self._send(status, _json_body({"error": code, "detail": detail}), extra=extra)

    def do_GET(self) -> None:
        """Answer a probe (``HEAD`` too: the same answer without its body)."""
        if self.path == "/health/quick":  # the hot path: the orchestrator's frequent probe
            self.quick({})
            return
        try:
            parts = urlsplit(self.path)
        except ValueError:  # e.g. an absolute-form target with a broken [IPv6] host
            self._error(400, "bad_request_target", "the request target is not a URL")
            return
        found = _ROUTES.get(parts.path.rstrip("/") or "/")
        if found is None:
            self._error(404, "not_found", f"no endpoint {_shown(parts.path)}")
            return
        route, accepted = found
        try:
            query = parse_qs(
                parts.query, keep_blank_values=True, errors="strict", max_num_fields=10
            )
        except (UnicodeDecodeError, ValueError):
            self._error(
                400,
                "bad_query",
                "the query string is not valid percent-encoded UTF-8 with at most 10 parameters",
            )
            return
        for name, values in query.items():
            if name not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                self._error(
                    400,
                    "unknown_parameter",
                    f"{parts.path} takes no parameter {_shown(name)} (accepted: {known})",
                )
                return
            if len(values) > 1:
                self._error(400, "repeated_parameter", f"parameter {name!r} given twice")
                return
        try:
            route(self, query)
        except Exception:
            log.exception("health endpoint %s failed", parts.path)
            self._error(500, "internal_error", "the health endpoint failed; see the worker log")

    def _not_allowed(self) -> None:
        self._error(
            405,
            "method_not_allowed",
            f"{_shown(self.command)} is not allowed; use GET",
            extra={"Allow": _ALLOWED},
        )

    # --- endpoints ---------------------------------------------------------------
    def health(self, _query: dict[str, list[str]]) -> None:
        """``/health``: run the checks now."""
        report = self.checker.run_checks()
        self._send(report.http_status, _json_body(report.to_dict()))

    def quick(self, _query: dict[str, list[str]]) -> None:
        """``/health/quick``: the last report as it was."""
        last = self.last_body.get()
        if last is None:
            self._send(
                503,
                _json_body(
                    {
                        "status": HealthStatus.UNHEALTHY.value,
                        "timestamp": _now_iso(),
                        "uptime_seconds": self.checker.uptime_seconds(),
                        "worker_name": self.checker.config.worker_name,
                        "checks": {},
                        "message": "no health report yet",
                    }
                ),
            )
            return
        self._send(last[0].http_status, last[1])

    def metrics_json(self, _query: dict[str, list[str]]) -> None:
        """``/health/metrics``: system figures and statistics."""
        self._send(200, _json_body(self.checker.metrics()))

    def history(self, query: dict[str, list[str]]) -> None:
        """``/health/history``: past reports, oldest first (``?limit=N`` for the last N)."""
        reports = self.checker.history()
        if "limit" in query:
            text = query["limit"][0]
            digits = text.lstrip("0")
            if not (text.isascii() and text.isdigit() and digits):
                self._error(
                    400, "bad_limit", f"limit must be a positive integer, got {_shown(text)}"
                )
                return
            # More than the history holds means all of it (no int() of a 5000-digit text).
            limit = HISTORY_SIZE if len(digits) > len(str(HISTORY_SIZE)) else int(digits)
            reports = reports[-limit:]
        self._send(
            200,
            _json_body(
                {
                    "worker_name": self.checker.config.worker_name,
                    "count": len(reports),
                    "history": [r.to_dict() for r in reports],
                }
            ),
        )

    def livez(self, _query: dict[str, list[str]]) -> None:
        """``/livez``: this process and its server answer."""
        self._send(
            200,
            _json_body(
                {
                    "status": "alive",
                    "pid": os.getpid(),
                    "uptime_seconds": self.checker.uptime_seconds(),
                }
            ),
        )

    def readyz(self, _query: dict[str, list[str]]) -> None:
        """``/readyz``: 200 when ready to take work, else 503 with the failed parts."""
        ready, checks = self.checker.readiness()
        self._send(
            200 if ready else 503,
            _json_body({"status": "ready" if ready else "not_ready", "checks": checks}),
        )

    def prometheus(self, _query: dict[str, list[str]]) -> None:
        """``/metrics``: Prometheus text exposition."""
        body, content_type = _metrics.render()
        self._send(200, body, content_type)


_Route = Callable[[_Handler, dict[str, list[str]]], None]
#: Each endpoint and the query parameters it accepts (any other is a 400).
_ROUTES: dict[str, tuple[_Route, frozenset[str]]] = {
    "/health": (_Handler.health, frozenset()),
    "/health/quick": (_Handler.quick, frozenset()),
    "/health/metrics": (_Handler.metrics_json, frozenset()),
    "/health/history": (_Handler.history, frozenset({"limit"})),
    "/livez": (_Handler.livez, frozenset()),
    "/readyz": (_Handler.readyz, frozenset()),
    "/metrics": (_Handler.prometheus, frozenset()),
}


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message: escaped, and cut to ``limit`` characters."""
    return ascii(text if len(text) <= limit else text[:limit] + "...")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection (socketserver would print a raw traceback to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("health client %s went away: %s", client_address[0], exc)
        else:
            log.error("health request from %s failed", client_address[0], exc_info=True)


class HealthServer:
    """HTTP server of the health endpoints, in a daemon thread of the main process."""

    def __init__(
        self, health_checker: HealthChecker, port: int = 8080, host: str = "0.0.0.0"
    ) -> None:
        if not isinstance(health_checker, HealthChecker):
            raise TypeError(f"health_checker must be a HealthChecker, got {health_checker!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        self.health_checker = health_checker
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.error: HealthServerError | None = None
        _SERVERS.add(self)

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before, 0 meaning any free one)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:8080``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server thread serves requests."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Listen and serve in a daemon thread, and start the background checks; returns at
        once, after logging the port actually bound. When the port cannot be bound, logs a
        warning naming it and what to do, keeps ``error`` and returns: the process runs on."""
        if self.running:
            return
        handler = type(
            "HealthHandler",
            (_Handler,),
            {"checker": self.health_checker, "last_body": _LastReportBody(self.health_checker)},
        )
        try:
            server = _Server((self.host, self._requested_port), handler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self.error = HealthServerError(
                exc.errno,
                f"health server cannot listen on {self.host}:{self._requested_port}: {reason}",
            )
            # A warning: the process runs on. The usual cause is a second HealthServer, e.g.
            # a sender script importing the worker module that starts one at import.
            log.warning(
                "%s; this process runs on without health endpoints. If another process (or "
                "another HealthServer in this one) holds port %s, give this one another port "
                "(METRICS_PORT=0 or HealthServer(port=0) for an ephemeral one)",
                self.error.strerror,
                self._requested_port,
                extra={"port": self._requested_port, "host": self.host},
            )
            return
        self.error = None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="health-server",
            daemon=True,
        )
        self._thread.start()
        self.health_checker.start_background()
        from . import _celery

        _celery.install_if_celery_loaded()
        log.info(
            "health server listening on %s:%s",
            self.host,
            self.port,
            extra={"port": self.port, "host": self.host},
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and stop the background checks."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        self.health_checker.stop_background(timeout)
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout)

    def _close_in_child(self) -> None:
        # A forked child must not hold the listening socket (the port would outlive us).
        server, self._server, self._thread = self._server, None, None
        if server is not None:
            server.socket.close()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_SERVERS: weakref.WeakSet[HealthServer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for server in list(_SERVERS):
        server._close_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
