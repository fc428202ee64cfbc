"""Structured logging and log context for workers (``monitor_performance`` lives in
``_performance`` and is importable from here).

One pipeline: structlog over the standard library. ``WorkerLogger.configure()`` puts one
handler on the root logger whose formatter renders every record the same way, whether it
comes from :meth:`WorkerLogger.get_logger`, from a plain ``logging.getLogger(...)`` call with
``extra=`` fields, or from Celery, kombu and httpx2. structlog's events reach the formatter
unrendered through ``ProcessorFormatter.wrap_for_formatter``; the formatter builds the fields
of the line and runs structlog processors on them (``ExceptionRenderer``, then
``JSONRenderer`` or the simple renderer, then the secret scrub). It is not structlog's
``ProcessorFormatter``, which copies every record: the backend's chain on it (``logconfig``)
cost 1.4 to 1.6 times a line of this one, before any redaction. Formats:

- ``structured``: one JSON object per line with ``timestamp`` (UTC ISO-8601), ``level``,
  ``logger``, ``message``, ``worker_name``, ``pid``, the bound context fields, the call's own
  fields and, for an exception, ``exception`` = ``{type, message, traceback}``;
- ``simple``: the same fields on one readable line (a traceback follows on its own lines).

Fields named like ``authorization``, ``api_key``, ``token``, ``secret`` or ``password`` print
as ``**********``, and the configured secret values are scrubbed from the whole line. Any
value makes a line: what JSON cannot hold (a cycle, NaN, an object without ``str``) is written
as text, and a lone surrogate as a ``\\u`` escape.

``log_context(**fields)`` binds fields for a block on a context variable, so threads and
asyncio tasks never see each other's fields.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import IO, Any, cast

import structlog

from . import _redact, _runtime
from ._config_checks import LOG_FORMATS as LOG_FORMATS, LOG_LEVELS as LOG_LEVELS
from ._performance import (
    DEFAULT_SLOW_THRESHOLD_MS as DEFAULT_SLOW_THRESHOLD_MS,
    monitor_performance as monitor_performance,
    performance_stats as performance_stats,
)
from ._timefmt import utc_iso

for _public in (monitor_performance, performance_stats):
    _public.__module__ = __name__  # their public home, in reprs and tracebacks
del _public

DEFAULT_WORKER_NAME = "unstract-worker"
# The leading fields of every line, in this order; a call's own field of the same name
# is written with a trailing underscore instead of replacing one.
CORE_FIELDS = ("timestamp", "level", "logger", "message", "worker_name", "pid")
_CORE = frozenset(CORE_FIELDS)
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}
_SENSITIVE_CACHE = _redact.KEY_CACHE
_MAX_DEPTH = 32  # nesting written as JSON when a value needs making writable; deeper is text

# The log context is one context variable holding an immutable mapping, not structlog's
# contextvars (one variable per field): bind_context hands out one Token (the Celery wiring
# keeps it), the fields keep the order they were bound in (structlog's come in the order of
# their hashes, different in each process), and a line reads it at once where structlog's
# merge scans the whole context (1.5 to 1.7 us a line, five fields among nine variables).
_EMPTY: Mapping[str, Any] = {}
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("worker_log_context", default=_EMPTY)


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


# --- the line -----------------------------------------------------------------------------


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


def _text(value: Any) -> str:
    """``str(value)``, or a placeholder naming its type when that raises."""
    try:
        return value if type(value) is str else str(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


def _repr(value: Any) -> str:
    """``repr(value)``, or a placeholder naming its type when that raises."""
    try:
        return repr(value)
    except Exception:
        if type(value) is tuple:  # format arguments: the ones that print, printed
            return f"({', '.join(_repr(item) for item in value)})"
        return f"<unprintable {type(value).__qualname__}>"


def _exception_fields(exc_info: Any) -> dict[str, str]:
    """structlog's ``ExceptionRenderer`` formatter: an ``exc_info`` tuple as the ``exception``
    field (``type``, ``message``, ``traceback``)."""
    exc_type, exc, tb = exc_info
    return {
        "type": exc_type.__qualname__
        if exc_type.__module__ == "builtins"
        else f"{exc_type.__module__}.{exc_type.__qualname__}",
        "message": _text(exc),
        "traceback": "".join(traceback.format_exception(exc_type, exc, tb)).rstrip(),
    }


def _format_message(message: Any, args: Any) -> str:
    text = _text(message)
    if args:
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]
        try:
            return text % args
        except Exception:  # arguments that do not fit the format, or fail to print
            return f"{text} {_repr(args)}"
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
    """The ordered, redacted fields of one line, from a structlog event or a stdlib record;
    ``exc_info`` last, for the ``ExceptionRenderer``."""
    event = record.msg
    if type(event) is dict and "_name" in record.__dict__:  # from wrap_for_formatter
        fields = dict(event)
        message = _format_message(fields.pop("event", ""), fields.pop("positional_args", None))
        exc_info = fields.pop("exc_info", None)
        fields.pop("stack_info", None)
        args: Any = None
    else:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format, or fail to print
            message = f"{_text(record.msg)} {_repr(record.args)}"
        exc_info = record.exc_info
        args = record.args
        fields = {
            (key if type(key) is str else _repr(key)): value
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRS
        }
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
    exc_info = _exception_of(exc_info)
    if exc_info is not None:
        out["exc_info"] = exc_info
    return out


def _exception_of(exc_info: Any) -> Any:
    """``exc_info`` when it names an exception (``True``: the one being handled; an exception;
    a tuple holding one), else None: structlog's renderer would take any other true value, or
    a ``(None, None, None)``, for the exception being handled."""
    if exc_info is True or isinstance(exc_info, BaseException):
        return exc_info
    if type(exc_info) is tuple and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return _text(value)


def _jsonable(value: Any, depth: int, seen: frozenset[int]) -> Any:
    """``value`` as the encoder can write it: string keys, finite floats, ints it can print,
    no cycle, at most :data:`_MAX_DEPTH` levels; anything else as text."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        try:
            int.__repr__(value)  # past sys.get_int_max_str_digits() digits, int has no text
        except ValueError:
            return f"<int of {value.bit_length()} bits>"
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict | list | tuple | set | frozenset):
        if id(value) in seen:
            return "<cycle>"
        if depth >= _MAX_DEPTH:
            return f"<{type(value).__name__} nested deeper than {_MAX_DEPTH}>"
        seen = seen | {id(value)}
        if isinstance(value, dict):
            return {_json_key(key): _jsonable(item, depth + 1, seen) for key, item in value.items()}
        return [_jsonable(item, depth + 1, seen) for item in value]
    return _json_default(value)


def _json_key(key: Any) -> str:
    """A key as ``json`` writes it (``true``, ``null``, ``1.5``), any other as its ``repr``."""
    if type(key) is str:
        return key
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, int | float):
        return str(_jsonable(key, 0, frozenset()))  # nan, a huge int's placeholder
    return _repr(key)


_ENCODER = json.JSONEncoder(default=_json_default, ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(default=_json_default, allow_nan=False)


def _serialize(event: dict[str, Any], **_dumps_kw: Any) -> str:
    """``JSONRenderer``'s serializer: one prebuilt encoder (its ``default`` is built in, so
    the renderer's keyword is not used). A value it cannot write is made writable first; a
    line UTF-8 cannot carry (a lone surrogate) is written with ``\\u`` escapes instead."""
    try:
        line = _ENCODER.encode(event)
    except (TypeError, ValueError, RecursionError):  # a cycle, NaN, a non-string key, ...
        event = _jsonable(event, 0, frozenset())
        line = _ENCODER.encode(event)
    if not line.isascii():
        try:
            line.encode()
        except UnicodeEncodeError:
            line = _ASCII_ENCODER.encode(event)
    return line


def _render_simple(_logger: Any, _method: str, event: dict[str, Any]) -> str:
    """The ``simple`` renderer: the fields on one readable line, a traceback after it."""
    exception = event.pop("exception", None)
    head = (
        f"{event.pop('timestamp')} {event.pop('level'):<8} {event.pop('logger')} "
        f"[{event.pop('worker_name')} pid={event.pop('pid')}] {event.pop('message')}"
    )
    fields = " ".join(f"{key}={_text(value)}" for key, value in event.items())
    line = f"{head} {fields}" if fields else head
    if exception is not None:
        line = f"{line}\n{exception['traceback']}"
    return line.encode(errors="backslashreplace").decode()


def _scrub(_logger: Any, _method: str, line: str) -> str:
    """The last processor: the configured secret values out of the rendered line."""
    return _redact.scrub(line)


_RENDER_EXCEPTION = structlog.processors.ExceptionRenderer(_exception_fields)
_CHAINS: dict[str, tuple[Callable[..., Any], ...]] = {
    "structured": (_RENDER_EXCEPTION, structlog.processors.JSONRenderer(_serialize), _scrub),
    "simple": (_RENDER_EXCEPTION, _render_simple, _scrub),
}


class _Formatter(logging.Formatter):
    """The one formatter: every record, whatever logger made it, through one processor chain."""

    def __init__(self, processors: tuple[Callable[..., Any], ...]) -> None:
        super().__init__()
        self._processors = processors

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line (JSON or simple), redacted and scrubbed."""
        event: Any = _assemble(record)
        method = record.levelname.lower()
        for processor in self._processors:
            event = processor(None, method, event)
        return cast(str, event)


def _to_stdlib(logger: Any, method: str, ed: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
    """Until ``configure`` runs: hand events to whatever stdlib handlers exist, as text.
    (structlog's ``render_to_log_args_and_kwargs`` would pass a field named like a record
    attribute, ``name=``, on as ``extra``, which logging refuses.)"""
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
        formatter = _Formatter(_CHAINS[fmt])
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
            _PROCESSORS[:] = [structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
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
