"""Structured logging, log context and performance monitoring for workers.

One pipeline: structlog over the standard library. ``WorkerLogger.configure()`` puts one
handler on the root logger whose formatter renders every record the same way, whether it
comes from :meth:`WorkerLogger.get_logger`, from a plain ``logging.getLogger(...)`` call with
``extra=`` fields, or from Celery, kombu and httpx2. (structlog's events reach the formatter
unrendered, as with its ``ProcessorFormatter``, minus that class's per-line record copy,
which measured at twice the cost of a line.) Formats:

- ``structured``: one JSON object per line with ``timestamp`` (UTC ISO-8601), ``level``,
  ``logger``, ``message``, ``worker_name``, ``pid``, the bound context fields, the call's own
  fields and, for an exception, ``exception`` = ``{type, message, traceback}``;
- ``simple``: the same fields on one readable line (a traceback follows on its own lines).

Fields named like ``authorization``, ``api_key``, ``token``, ``secret`` or ``password`` print
as ``**********``, and the configured secret values are scrubbed from the whole line.

``log_context(**fields)`` binds fields for a block on a context variable, so threads and
asyncio tasks never see each other's fields. ``monitor_performance`` measures calls.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import IO, Any, TypeVar, cast, overload

import structlog

from . import _metrics, _redact, _runtime, _stats
from ._resilience import check_number
from ._timefmt import utc_iso

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("structured", "simple")
DEFAULT_WORKER_NAME = "unstract-worker"
DEFAULT_SLOW_THRESHOLD_MS = 1000.0
# The leading fields of every line, in this order; a call's own field of the same name
# is written with a trailing underscore instead of replacing one.
CORE_FIELDS = ("timestamp", "level", "logger", "message", "worker_name", "pid")
_CORE = frozenset(CORE_FIELDS)
_STRUCTLOG_MARK = "_worker_structlog_event"
_MARK_EXTRA = {_STRUCTLOG_MARK: True}
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", _STRUCTLOG_MARK,
}
_SENSITIVE_CACHE = _redact.KEY_CACHE

_EMPTY: Mapping[str, Any] = {}
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("worker_log_context", default=_EMPTY)
_perf_log = logging.getLogger(f"{__name__}.performance")


# --- context ---------------------------------------------------------------------------


def current_context() -> dict[str, Any]:
    """The fields bound by the enclosing ``log_context`` blocks (and the running task)."""
    return dict(_CONTEXT.get())


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind ``fields`` to every log line written inside the block, in this thread or task.

    Nested blocks add to the outer fields and restore them on exit, also on an exception.
    """
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind_context(fields: Mapping[str, Any]) -> tuple[Token[Mapping[str, Any]], Mapping[str, Any]]:
    """Bind ``fields`` until :func:`restore_context` (for begin/end signal pairs).

    Returns the token and the fields bound before, both needed to restore.
    """
    previous = _CONTEXT.get()
    return _CONTEXT.set({**previous, **fields}), previous


def restore_context(token: Token[Mapping[str, Any]], previous: Mapping[str, Any]) -> None:
    """Undo :func:`bind_context`; ``previous`` is used when the token belongs elsewhere."""
    try:
        _CONTEXT.reset(token)
    except ValueError:  # the token was made in another context: fall back to the value
        _CONTEXT.set(previous)


# --- rendering -------------------------------------------------------------------------


class _State:
    """What ``configure`` decided, read by the formatter on every line."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.configured = False
        self.worker_name = os.environ.get("WORKER_NAME") or DEFAULT_WORKER_NAME
        self.log_level = "INFO"
        self.log_format = "structured"
        self.handler: logging.Handler | None = None


_state = _State()


def _exception_fields(exc_info: Any) -> dict[str, str] | None:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return None
    exc_type, exc, tb = exc_info
    return {
        "type": exc_type.__qualname__
        if exc_type.__module__ == "builtins"
        else f"{exc_type.__module__}.{exc_type.__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc_type, exc, tb)).rstrip(),
    }


def _format_message(message: Any, args: Any) -> str:
    text = message if isinstance(message, str) else str(message)
    if args:
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]
        try:
            return text % args
        except (TypeError, ValueError, KeyError):
            return f"{text} {args!r}"
    return text


def _redact_items(items: Mapping[str, Any]) -> dict[str, Any]:
    """The fields ready for a line: core names suffixed, sensitive values masked."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        if key in _CORE:
            key = f"{key}_"
        sensitive = _SENSITIVE_CACHE.get(key)
        if sensitive is None:
            sensitive = _redact.is_sensitive_key(key)
        if sensitive:
            out[key] = _redact.MASK if value is not None else None
        elif type(value) is dict:
            out[key] = _redact.redact_fields(value, 1)
        else:
            out[key] = value
    return out


# Bound contexts are never mutated (each bind makes a new mapping): the last one's redacted
# form is reused by every line written inside the same block.
_context_cache: tuple[Mapping[str, Any], dict[str, Any]] = (_EMPTY, {})


def _redacted_context(context: Mapping[str, Any]) -> dict[str, Any]:
    global _context_cache
    cached_for, redacted = _context_cache
    if cached_for is not context:
        redacted = _redact_items(context)
        _context_cache = (context, redacted)
    return redacted


def _assemble(record: logging.LogRecord) -> dict[str, Any]:
    """The ordered, redacted fields of one line, from a structlog event or a stdlib record."""
    event = record.msg
    if getattr(record, _STRUCTLOG_MARK, False) and type(event) is dict:
        fields = dict(event)
        message = _format_message(fields.pop("event", ""), fields.pop("positional_args", None))
        exc_info = fields.pop("exc_info", None)
        fields.pop("stack_info", None)
        args: Any = None
    else:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # arguments that do not fit the format
            message = f"{record.msg} {record.args!r}"
        exc_info = record.exc_info
        args = record.args
        fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    out: dict[str, Any] = {
        "timestamp": utc_iso(record.created),
        "level": record.levelname,
        "logger": record.name,
        "message": message,
        "worker_name": _state.worker_name,
        "pid": record.process,
    }
    context = _CONTEXT.get()
    if context:
        out.update(_redacted_context(context))
    if isinstance(args, Mapping) and record.name.startswith("celery"):
        # Celery's task lines carry the task in their format arguments.
        if "id" in args:
            out.setdefault("task_id", args["id"])
        if "name" in args:
            out.setdefault("task_name", args["name"])
    if fields:
        out.update(_redact_items(fields))
    if exc_info:
        exception = _exception_fields(exc_info)
        if exception is not None:
            out["exception"] = exception
    return out


class _Formatter(logging.Formatter):
    """The one formatter: every record, whatever logger made it, in the configured format."""

    def __init__(self, render: Callable[[dict[str, Any]], str]) -> None:
        super().__init__()
        self._render = render

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line (JSON or simple), redacted and scrubbed."""
        return self._render(_assemble(record))


def _to_formatter(_logger: Any, _method: str, ed: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """After ``configure``: pass the event dict on untouched, marked for :class:`_Formatter`."""
    return (ed,), {"extra": _MARK_EXTRA}


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


_ENCODER = json.JSONEncoder(default=_json_default, ensure_ascii=False)


def _render_json(out: dict[str, Any]) -> str:
    try:
        line = _ENCODER.encode(out)
    except (TypeError, ValueError) as exc:  # e.g. a circular structure in a field
        out = {key: out[key] for key in CORE_FIELDS}
        out["render_error"] = f"{type(exc).__name__}: {exc}"
        line = json.dumps(out, default=str, ensure_ascii=False)
    return _redact.scrub(line)


def _render_simple(out: dict[str, Any]) -> str:
    exception = out.pop("exception", None)
    head = (
        f"{out.pop('timestamp')} {out.pop('level'):<8} {out.pop('logger')} "
        f"[{out.pop('worker_name')} pid={out.pop('pid')}] {out.pop('message')}"
    )
    fields = " ".join(f"{key}={value}" for key, value in out.items())
    line = f"{head} {fields}" if fields else head
    if exception is not None:
        line = f"{line}\n{exception['traceback']}"
    return _redact.scrub(line)


def _to_stdlib(logger: Any, method: str, ed: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
    """Until ``configure`` runs: hand events to whatever stdlib handlers exist, as text."""
    message = ed.pop("event", "")
    args = tuple(ed.pop("positional_args", ()))
    exc_info = ed.pop("exc_info", None)
    extra = {(f"{k}_" if k in _RECORD_ATTRS else k): v for k, v in ed.items()}
    kwargs: dict[str, Any] = {"extra": extra}
    if exc_info:
        kwargs["exc_info"] = exc_info
    return (str(message), *args), kwargs


def _stdlib_logger(*args: Any) -> logging.Logger:
    """structlog's logger factory: the standard library logger of that name."""
    return logging.getLogger(args[0] if args else None)


_METHOD_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
    "critical": logging.CRITICAL, "fatal": logging.CRITICAL,
}


class _BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger that checks the level before building the event.

    (structlog's ``filter_by_level`` processor drops a disabled event by raising an
    exception, which costs more than writing many a line.)
    """

    def _proxy_to_logger(self, method_name: str, event: str | None = None,
                         *event_args: Any, **event_kw: Any) -> Any:
        level = _METHOD_LEVELS.get(method_name)
        if level is not None and not self._logger.isEnabledFor(level):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


# One list object: configure() replaces its content, so loggers cached before see the change.
_PROCESSORS: list[Any] = [_to_stdlib]
structlog.configure(
    processors=_PROCESSORS,
    logger_factory=_stdlib_logger,
    wrapper_class=_BoundLogger,
    cache_logger_on_first_use=True,
)


def _default_stream() -> IO[str]:
    stream = sys.stderr
    # Celery may have replaced sys.stderr with a proxy that logs: never write into it.
    if stream is None or type(stream).__name__ == "LoggingProxy":
        stream = sys.__stderr__
    return cast(IO[str], stream)


class WorkerLogger:
    """Configures the process's logging once and hands out structured loggers."""

    @classmethod
    def configure(
        cls,
        log_level: str = "INFO",
        log_format: str = "structured",
        worker_name: str | None = None,
        *,
        stream: IO[str] | None = None,
    ) -> None:
        """Install the one log handler on the root logger; calling again replaces it.

        ``log_level`` is a level name, ``log_format`` ``structured`` (JSON lines) or
        ``simple``; ``worker_name`` defaults to ``$WORKER_NAME``; ``stream`` to stderr.
        """
        level = str(log_level).strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        fmt = str(log_format).strip().lower()
        if fmt not in LOG_FORMATS:
            raise ValueError(
                f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}"
            )
        if worker_name is not None and not str(worker_name).strip():
            raise ValueError("worker_name must not be empty")
        renderer = _render_json if fmt == "structured" else _render_simple
        formatter = _Formatter(renderer)
        handler = logging.StreamHandler(stream or _default_stream())
        handler.setFormatter(formatter)
        with _state.lock:
            root = logging.getLogger()
            if _state.handler is not None:
                root.removeHandler(_state.handler)
            root.addHandler(handler)
            root.setLevel(level)
            _state.handler = handler
            _state.log_level = level
            _state.log_format = fmt
            _state.worker_name = (
                str(worker_name).strip()
                if worker_name
                else os.environ.get("WORKER_NAME") or DEFAULT_WORKER_NAME
            )
            _PROCESSORS[:] = [_to_formatter]
            _state.configured = True
        logging.captureWarnings(True)  # warnings become log lines in the same format
        _redact.register_from_environment()
        _runtime.install_celery(if_imported=True)

    @classmethod
    def reset(cls) -> None:
        """Remove the handler ``configure`` installed (for test suites); loggers then hand
        their events to whatever other handlers exist, as plain text with fields."""
        with _state.lock:
            if _state.handler is not None:
                logging.getLogger().removeHandler(_state.handler)
            _state.handler = None
            _state.configured = False
            _PROCESSORS[:] = [_to_stdlib]

    @classmethod
    def get_logger(cls, name: str | None = None) -> structlog.stdlib.BoundLogger:
        """A logger taking f-strings, ``%s`` arguments, keyword fields and ``exc_info``."""
        return structlog.stdlib.get_logger(name)

    @classmethod
    def is_configured(cls) -> bool:
        """True once :meth:`configure` has installed the handler."""
        return _state.configured

    @classmethod
    def settings(cls) -> dict[str, str]:
        """The level, format and worker name in effect."""
        return {
            "log_level": _state.log_level,
            "log_format": _state.log_format,
            "worker_name": _state.worker_name,
        }


# --- performance monitoring --------------------------------------------------------------


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
    _stats.functions().record(name, wall, ok)
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
    ``slow_threshold_ms=``. Each call writes one DEBUG line (WARNING when slow), adds to the
    per-process statistics shown by ``/health/metrics`` and to the histogram
    ``worker_function_duration_seconds``. Exceptions pass through untouched.
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

    if inspect.iscoroutinefunction(func):
        async_func = cast(Callable[..., Awaitable[Any]], func)

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            pages = rss()
            cpu_started = cpu_time()
            started = perf()
            ok = False
            try:
                result = await async_func(*args, **kwargs)
                ok = True
                return result
            finally:
                _record(label, started, cpu_started, pages, ok, slow_s)

        wrapper: Callable[..., Any] = async_wrapper
    else:

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            pages = rss()
            cpu_started = cpu_time()
            started = perf()
            ok = False
            try:
                result = func(*args, **kwargs)
                ok = True
                return result
            finally:
                _record(label, started, cpu_started, pages, ok, slow_s)

        wrapper = sync_wrapper
    # Celery reads the signature without following __wrapped__: state it explicitly.
    # (Builtins without a signature keep the wrapper's.)
    with contextlib.suppress(TypeError, ValueError):
        wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return wrapper


def performance_stats() -> dict[str, dict[str, Any]]:
    """This process's statistics of monitored functions (count, errors, times in ms)."""
    return _stats.summarize(_stats.functions().snapshot())
