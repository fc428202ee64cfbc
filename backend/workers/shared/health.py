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

This module is the checker and its runner; the built-in checks live in ``_health_checks``,
the result types in ``_health_result``; the result types, the thresholds and the findings
are importable from here. The HTTP server that serves these answers, :class:`HealthServer` (with
:class:`HealthServerError` and the request bounds ``MAX_*``), lives in ``_health_server``,
which imports this module; those names are still importable from here (see ``__getattr__``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import _health_checks, _heartbeat, _redact
from ._health_checks import (
    TASK_DEGRADED_SHARE as TASK_DEGRADED_SHARE,
    TASK_MIN_SAMPLE as TASK_MIN_SAMPLE,
    TASK_WINDOW_SECONDS as TASK_WINDOW_SECONDS,
    breaker_findings as breaker_findings,
    recent_task_findings as recent_task_findings,
)
from ._health_result import (
    HealthCheckResult as HealthCheckResult,
    HealthReport as HealthReport,
    HealthStatus as HealthStatus,
    worst as worst,
)
from ._timefmt import utc_now_iso
from .config import ConfigurationError

if TYPE_CHECKING:
    from .config import WorkerConfig

for _public in (HealthCheckResult, HealthReport, HealthStatus, worst, breaker_findings,
                recent_task_findings):
    _public.__module__ = __name__  # their public home, in reprs, tracebacks and pickles
del _public

log = logging.getLogger(__name__)

HISTORY_SIZE = 100
READY_MAX_AGE = 2.0  # seconds a backend check result is reused by /readyz
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

    # --- built-in checks (in _health_checks) -------------------------------------------
    def check_api_connectivity(self) -> HealthCheckResult:
        """One authenticated ``GET health/`` to the backend, no retry, short timeout."""
        return _health_checks.api_connectivity(self.config, self.check_timeout)

    def check_system_resources(self) -> HealthCheckResult:
        """Memory, disk (of ``WORKER_DATA_DIR``) and CPU use against the thresholds."""
        return _health_checks.system_resources(self.config)

    def check_worker_process(self) -> HealthCheckResult:
        """The main process, the consumer's broker connection, the pool's heartbeats, the
        recent tasks (degraded when half of them failed, unhealthy when all did), and the
        circuit breakers (degraded while a Redis-shared one runs on local state)."""
        return _health_checks.worker_process(self.config)

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
            attached = _heartbeat.consumer_ready() and _heartbeat.consumer_connected()
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
        return _health_checks.metrics(self.config, self.uptime_seconds())


def _age(timestamp: str) -> float:
    return time.time() - datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _process_start() -> float:
    import psutil

    return float(psutil.Process().create_time())
