"""The built-in health checks of a worker and the figures of its probes, as plain data.

``api_connectivity`` (an authenticated call to the backend's health endpoint, one attempt,
short timeout), ``system_resources`` (memory, disk, CPU against the ``HEALTH_*_PERCENT``
thresholds) and ``worker_process`` (the Celery consumer's broker connection, the prefork
children's heartbeats, the recent tasks' failures, and the circuit breakers); the findings
``/readyz`` shares with them, and the figures of ``/health/metrics``. ``health.HealthChecker``
runs them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _heartbeat, _metric_stats, _metrics, _stats
from ._health_result import HealthCheckResult, HealthStatus, worst
from ._timefmt import utc_now_iso

if TYPE_CHECKING:
    from .config import WorkerConfig

#: The recent tasks judged by ``worker_process``: the last ``_stats.RECENT_SIZE`` (50) tasks
#: of the worker (all pool children merged) that finished within this many seconds.
TASK_WINDOW_SECONDS = 600.0
#: Fewer recent tasks than this say nothing (one failed task is not a failing worker).
TASK_MIN_SAMPLE = 3
#: Share of failed recent tasks from which the worker is degraded; all failed is unhealthy.
TASK_DEGRADED_SHARE = 0.5


def api_connectivity(config: WorkerConfig, check_timeout: float) -> HealthCheckResult:
    """One authenticated ``GET health/`` to the backend, no retry, short timeout."""
    from .api_client import InternalAPIClient, InternalAPIError

    timeout = max(0.1, min(config.api_timeout, check_timeout * 0.8))
    started = time.perf_counter()
    try:
        with InternalAPIClient(config) as client:
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


def system_resources(config: WorkerConfig) -> HealthCheckResult:
    """Memory, disk (of ``WORKER_DATA_DIR``) and CPU use against the thresholds."""
    import psutil

    figures = {
        "memory": psutil.virtual_memory().percent,
        "disk": psutil.disk_usage(str(_existing(config.worker_data_dir))).percent,
        "cpu": psutil.cpu_percent(interval=None),
    }
    statuses, problems = [], []
    for kind, value in figures.items():
        degraded = getattr(config, f"health_{kind}_degraded_percent")
        unhealthy = getattr(config, f"health_{kind}_unhealthy_percent")
        if value > unhealthy:
            statuses.append(HealthStatus.UNHEALTHY)
            problems.append(f"{kind} {value:.1f}% > {unhealthy:g}%")
        elif value > degraded:
            statuses.append(HealthStatus.DEGRADED)
            problems.append(f"{kind} {value:.1f}% > {degraded:g}%")
    details = {f"{kind}_percent": value for kind, value in figures.items()}
    message = "System resources OK" if not problems else "; ".join(problems)
    return HealthCheckResult("system_resources", worst(statuses), message, details)


def worker_process(config: WorkerConfig) -> HealthCheckResult:
    """The main process, the consumer's broker connection, the pool's heartbeats, the
    recent tasks (degraded when half of them failed, unhealthy when all did), and the
    circuit breakers (degraded while a Redis-shared one runs on local state)."""
    details: dict[str, Any] = {"pid": os.getpid()}
    status, message = _process_status(config, details)
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


def _process_status(config: WorkerConfig, details: dict[str, Any]) -> tuple[HealthStatus, str]:
    if not _heartbeat.worker_attached():
        details["celery_worker"] = False
        return HealthStatus.HEALTHY, "Worker process healthy"
    if not _heartbeat.worker_started():
        details.update(celery_worker=True, consumer_connected=False, consumer_ready=False)
        return HealthStatus.DEGRADED, "celery worker starting"
    children = _heartbeat.child_heartbeats(config.health_heartbeat_timeout)
    connected = _heartbeat.consumer_connected()
    details.update(
        celery_worker=True,
        consumer_connected=connected,
        consumer_ready=_heartbeat.consumer_ready(),
        pool_processes=children,
    )
    stale = [c["pid"] for c in children if not c["fresh"]]
    if not connected:
        return HealthStatus.UNHEALTHY, "consumer not connected to the broker"
    if stale:
        return (
            HealthStatus.UNHEALTHY,
            f"{len(stale)} of {len(children)} pool processes without a heartbeat for "
            f"{config.health_heartbeat_timeout:g} s: {stale}",
        )
    if not _heartbeat.consumer_ready():
        return HealthStatus.DEGRADED, "consumer starting"
    return HealthStatus.HEALTHY, "Worker process healthy"


def metrics(config: WorkerConfig, uptime_seconds: float) -> dict[str, Any]:
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
        "worker_name": config.worker_name,
        "worker_version": config.worker_version,
        "uptime_seconds": uptime_seconds,
        "system": {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "disk_percent": psutil.disk_usage(str(_existing(config.worker_data_dir))).percent,
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
    from . import _breaker  # loaded with the client; a checker without one imports it here

    found = []
    for breaker in _breaker.all_breakers():
        entry: dict[str, Any] = {
            "breaker": _metrics.breaker_label(breaker.name),
            "state": breaker.state.value,  # read first: a shared read may notice Redis' loss
        }
        if breaker.shared:
            entry["shared_state_ok"] = breaker.shared_state_ok
        found.append(entry)
    return found


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the disk a directory yet to be made is on)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
