"""What the retry engine (:mod:`_retry_policy`) and the circuit breaker (:mod:`_breaker`) share:
argument checks that raise ValueError naming the parameter, the name of a callable in logs,
the sync/async decorator, listener calls, and the one logger of both.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

#: Retries and breaker transitions are logged here (stdlib logging, ``extra=`` fields).
logger = logging.getLogger("backend.workers.shared.retry_utils")

P = ParamSpec("P")
R = TypeVar("R")
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


def check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    """``value`` as a finite float not below ``minimum`` (above it when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if number < minimum or (strict and number == minimum):
        relation = "greater than" if strict else "at least"
        raise ValueError(f"{name} must be {relation} {minimum:g}, got {value!r}")
    return number


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def check_exceptions(
    name: str, value: object, *, allow_empty: bool
) -> tuple[type[BaseException], ...]:
    """``value`` (an exception class or a collection of them) as a tuple of classes."""
    items: Iterable[object]
    if isinstance(value, type):
        items = (value,)
    elif isinstance(value, tuple | list | set | frozenset):
        items = value
    else:
        raise ValueError(f"{name} must be an exception class or a tuple of them, got {value!r}")
    classes = tuple(items)
    for item in classes:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ValueError(f"{name} must hold exception classes only, got {item!r}")
    if not classes and not allow_empty:
        raise ValueError(f"{name} must name at least one exception class")
    return cast(tuple[type[BaseException], ...], classes)


def check_callable(name: str, value: object) -> None:
    """ValueError unless ``value`` is callable or None."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable or None, got {value!r}")


def qualname(fn: object) -> str:
    """The name used for ``fn`` in log lines and events."""
    if isinstance(fn, functools.partial):
        return qualname(fn.func)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):  # a callable object: name it by its class
        fn = type(fn)
        name = fn.__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def decorate(
    fn: Callable[P, R],
    run: Callable[..., R],
    arun: Callable[..., Awaitable[Any]],
    **attributes: object,
) -> Callable[P, R]:
    """``fn`` wrapped so each call is ``run(fn, *args, **kwargs)`` (``await arun(...)`` for
    an async ``fn``); name, docstring and signature are kept, ``attributes`` are set."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await arun(fn, *args, **kwargs)

        wrapper = cast(Callable[P, R], async_wrapper)
    else:

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return run(fn, *args, **kwargs)

        wrapper = sync_wrapper
    for name, value in attributes.items():
        setattr(wrapper, name, value)
    return wrapper


def notify(listeners: Iterable[Callable[..., object]], *args: Any) -> None:
    """Call each listener; a failing listener is logged and does not stop the others."""
    for listener in tuple(listeners):
        try:
            listener(*args)
        except Exception:
            logger.exception("listener %s failed", qualname(listener))
