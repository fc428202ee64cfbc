"""``monitor_performance``: wall and CPU time, RSS change and outcome of every monitored call.

Each call adds to the metrics ``worker_function_duration_seconds`` and
``worker_function_max_duration_seconds``, from which ``performance_stats`` and
``/health/metrics`` compute their statistics, and writes one
line on the logger ``backend.workers.shared.logging_utils.performance`` (DEBUG, WARNING when
slow). The public names are importable from ``logging_utils``, as the module README says.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from . import _metric_stats, _metrics, _runtime
from ._resilience import check_number, decorate

DEFAULT_SLOW_THRESHOLD_MS = 1000.0
# The name it had in logging_utils, where this code lived: lines are filtered on it.
_perf_log = logging.getLogger(f"{__package__}.logging_utils.performance")


class _Rss:
    """This process's resident set size from ``/proc/self/statm`` through one open fd."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")

    def forget(self) -> None:
        """In a forked child: the inherited fd names the parent's entry; open ours on use."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def pages(self) -> int:
        if not self.available:
            return 0
        fd = self.fd
        if fd is None:
            fd = self.fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(fd, 64, 0).split()[1])


_RSS = _runtime.part("rss reader", _Rss, _Rss.forget)


def _record(
    name: str, started: float, cpu_started: float, pages: int, ok: bool, slow_s: float
) -> None:
    wall = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    _metrics.function_call(name, wall, ok)
    slow = wall >= slow_s
    if slow or _perf_log.isEnabledFor(logging.DEBUG):
        reader = _RSS.get()
        rss_delta = (reader.pages() - pages) * reader.page
        _perf_log.log(
            logging.WARNING if slow else logging.DEBUG,
            "%s %s in %.3f ms%s",
            name,
            "succeeded" if ok else "failed",
            wall * 1000,
            " (slow)" if slow else "",
            extra={
                "function": name,
                "outcome": "success" if ok else "failure",
                "duration_ms": round(wall * 1000, 3),
                "cpu_ms": round(cpu * 1000, 3),
                "rss_delta_bytes": rss_delta,
                "slow": slow,
            },
        )


F = TypeVar("F", bound=Callable[..., Any])


@overload
def monitor_performance(func: F, /) -> F: ...
@overload
def monitor_performance(
    func: None = None,
    /,
    *,
    name: str | None = None,
    slow_threshold_ms: float = DEFAULT_SLOW_THRESHOLD_MS,
) -> Callable[[F], F]: ...


def monitor_performance(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    slow_threshold_ms: float = DEFAULT_SLOW_THRESHOLD_MS,
) -> Any:
    """Measure every call of a function (sync or async): wall and CPU time, RSS change, outcome.

    Use bare (``@monitor_performance``) or with ``name=`` (default: module.qualname) and
    ``slow_threshold_ms=``. Each call writes one DEBUG line (WARNING when slow), and adds to the
    histogram ``worker_function_duration_seconds`` (the statistics of ``/health/metrics``
    are computed from it). Exceptions pass through untouched.
    """
    check_number("slow_threshold_ms", slow_threshold_ms, minimum=0)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if func is None:
        return functools.partial(_decorate, name=name, slow_threshold_ms=slow_threshold_ms)
    return _decorate(func, name=name, slow_threshold_ms=slow_threshold_ms)


def _decorate(
    func: Callable[..., Any], *, name: str | None, slow_threshold_ms: float
) -> Callable[..., Any]:
    if not callable(func):
        raise TypeError(f"monitor_performance decorates a callable, got {func!r}")
    label = name or f"{func.__module__}.{func.__qualname__}"
    slow_s = slow_threshold_ms / 1000.0
    perf, cpu_time, rss = time.perf_counter, time.thread_time, _RSS.get().pages

    def run(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        pages = rss()
        cpu_started = cpu_time()
        started = perf()
        ok = False
        try:
            result = fn(*args, **kwargs)
            ok = True
            return result
        finally:
            _record(label, started, cpu_started, pages, ok, slow_s)

    async def arun(fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        pages = rss()
        cpu_started = cpu_time()
        started = perf()
        ok = False
        try:
            result = await fn(*args, **kwargs)
            ok = True
            return result
        finally:
            _record(label, started, cpu_started, pages, ok, slow_s)

    wrapper = decorate(func, run, arun)
    # Celery reads the signature without following __wrapped__: state it explicitly.
    # (Builtins without a signature keep the wrapper's.)
    with contextlib.suppress(TypeError, ValueError):
        wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return wrapper


def performance_stats() -> dict[str, dict[str, Any]]:
    """The statistics of monitored functions (count, errors, times in ms), from the
    Prometheus metrics: under a prefork pool, those of every process of the worker."""
    return _metric_stats.statistics()["functions"]
