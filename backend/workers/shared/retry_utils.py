"""Retries, circuit breakers and their combination: the one resilience engine of the workers.

Public names::

    retry(...)                  decorator factory; returns a RetryPolicy (a decorator itself)
    RetryPolicy(...)            the retry engine: .call(fn, *a, **kw), .acall(...), @policy
    BackoffStrategy             EXPONENTIAL (base*2^(n-1)), LINEAR (base*n), FIXED (base)
    RetryBudget(...)            token bucket that caps retries at a ratio of recent calls
    RetryEvent                  what retry listeners receive
    add_retry_listener(fn)      fn(RetryEvent) for every retry of every policy
    set_testing(True)           retries happen at once, without sleeping (for users' tests)
    CircuitBreaker(name, ...)   closed -> open -> half-open (one probe) -> closed; optional
                                state shared by a fleet through Redis (``redis_url=``)
    circuit_breaker(...)        decorator over a registered breaker
    CircuitBreakerOpenError     raised at once by an open breaker; never retried
    CircuitState                CLOSED / OPEN / HALF_OPEN ("closed", "open", "half_open")
    get_breaker(name, **kw)     get-or-create from the registry; all_breakers() lists them
    add_state_listener(fn)      fn(breaker, old, new) for every transition of every breaker
    add_shared_state_listener   fn(breaker, ok) when a shared breaker loses or regains Redis
    ResilientExecutor(...)      retry + breaker (checked on every attempt) + fallback

Retries are built on tenacity (its stop/wait/retry strategies and state machine), but a call
that succeeds at once never enters tenacity: the function is called directly and tenacity is
imported and used only after a first failure, so the success path costs about as much as a
plain function call. After the last attempt the original exception is raised, never
``tenacity.RetryError``.

Never retried, whatever ``exceptions`` says: :class:`CircuitBreakerOpenError`, the classes in
``permanent``, and Celery's control-flow exceptions (``Retry``, ``Ignore``, ``Reject``, time
limits, ``Terminated``, ``WorkerLostError``) when Celery is loaded.

Every retry is logged on this module's stdlib logger at WARNING with the ``extra`` fields
``function``, ``attempt``, ``max_attempts``, ``delay``, ``exception_type`` and
``exception_message``, and reported to the retry listeners.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import logging
import math
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

if TYPE_CHECKING:
    import asyncio

    import tenacity

    from ._breaker_store import RedisBreakerStore

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]

__all__ = [
    "BackoffStrategy",
    "CircuitBreaker",
    "CircuitBreakerOpenError",
    "CircuitState",
    "ResilientExecutor",
    "RetryBudget",
    "RetryEvent",
    "RetryPolicy",
    "add_retry_listener",
    "add_shared_state_listener",
    "add_state_listener",
    "all_breakers",
    "circuit_breaker",
    "get_breaker",
    "is_testing",
    "remove_retry_listener",
    "remove_shared_state_listener",
    "remove_state_listener",
    "retry",
    "set_testing",
]


# --------------------------------------------------------------------------- testing switch

_testing = False


def set_testing(enabled: bool = True) -> None:
    """Make every retry happen at once, without sleeping: for users' own test suites.

    Delays are still computed, logged and reported to listeners; only the sleep is skipped.
    Call ``set_testing(False)`` to restore real sleeps.
    """
    global _testing
    _testing = bool(enabled)


def is_testing() -> bool:
    """True while :func:`set_testing` has switched sleeping off."""
    return _testing


# --------------------------------------------------------------------------- validation


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
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


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def _check_exceptions(
    name: str, value: object, *, allow_empty: bool
) -> tuple[type[BaseException], ...]:
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


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable or None, got {value!r}")


def _qualname(fn: object) -> str:
    """The name used for ``fn`` in log lines and events."""
    if isinstance(fn, functools.partial):
        return _qualname(fn.func)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):  # a callable object: name it by its class
        fn = type(fn)
        name = fn.__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def _decorate(
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


# --------------------------------------------------------------------------- backoff


class BackoffStrategy(enum.StrEnum):
    """How the delay grows with the retry number n (1 for the first retry)."""

    EXPONENTIAL = "exponential"  # base * 2^(n-1)
    LINEAR = "linear"  # base * n
    FIXED = "fixed"  # base

    @classmethod
    def parse(cls, value: BackoffStrategy | str) -> BackoffStrategy:
        """The strategy named by ``value``; ValueError naming ``backoff`` otherwise."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(item.value) for item in cls)
            raise ValueError(f"backoff must be one of {allowed}, got {value!r}") from None


# --------------------------------------------------------------------------- retry budget


_budgets: weakref.WeakSet[RetryBudget] = weakref.WeakSet()  # for the fork handler


class RetryBudget:
    """Caps retries at ``ratio`` of the calls of the last ``window`` seconds, plus a floor.

    Every logical call deposits (``record_call``); every retry withdraws (``try_spend``).
    Within any window a budget allows ``ratio * calls + min_per_second * window`` retries, so
    during an outage retries add at most ``ratio`` to the load instead of multiplying it.
    Thread-safe; one process-wide budget is meant to be shared by many policies.
    """

    _SLOTS = 10

    def __init__(self, ratio: float = 0.2, min_per_second: float = 1.0, window: float = 10.0):
        self.ratio = _check_number("ratio", ratio, minimum=0.0)
        self.min_per_second = _check_number("min_per_second", min_per_second, minimum=0.0)
        self.window = _check_number("window", window, minimum=0.0, strict=True)
        self._slot_seconds = self.window / self._SLOTS
        self._calls = [0] * self._SLOTS
        self._retries = [0] * self._SLOTS
        self._epoch = -1  # index of the newest slot, in slot units since the monotonic origin
        self._lock = threading.Lock()
        _budgets.add(self)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )

    def _advance(self, now: float) -> int:
        """Clear the slots that fell out of the window; the current slot's index."""
        epoch = int(now / self._slot_seconds)
        stale = epoch - self._epoch
        if stale > 0:
            for offset in range(1, min(stale, self._SLOTS) + 1):
                index = (self._epoch + offset) % self._SLOTS
                self._calls[index] = 0
                self._retries[index] = 0
            self._epoch = epoch
        return epoch % self._SLOTS

    def record_call(self) -> None:
        """Count one logical call (not a retry)."""
        now = time.monotonic()
        with self._lock:
            self._calls[self._advance(now)] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is empty."""
        now = time.monotonic()
        with self._lock:
            index = self._advance(now)
            allowed = self.ratio * sum(self._calls) + self.min_per_second * self.window
            if sum(self._retries) + 1 > allowed:
                return False
            self._retries[index] += 1
            return True

    def available(self) -> float:
        """Retries the budget would allow right now (may be fractional)."""
        now = time.monotonic()
        with self._lock:
            self._advance(now)
            allowed = self.ratio * sum(self._calls) + self.min_per_second * self.window
            return max(0.0, allowed - sum(self._retries))


# --------------------------------------------------------------------------- retry listeners


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry about to happen: ``attempt`` failed and the next one runs after ``delay``."""

    function: str
    attempt: int
    max_attempts: int
    delay: float
    exception: BaseException


RetryListener = Callable[[RetryEvent], object]
_retry_listeners: list[RetryListener] = []


def add_retry_listener(listener: RetryListener) -> None:
    """Call ``listener(event)`` for every retry of every policy (metrics hook here)."""
    _check_callable("listener", listener)
    _retry_listeners.append(listener)


def remove_retry_listener(listener: RetryListener) -> None:
    """Stop calling a listener added with :func:`add_retry_listener`."""
    _retry_listeners.remove(listener)


def _notify(listeners: Iterable[Callable[..., object]], *args: Any) -> None:
    """Call each listener; a failing listener is logged and does not stop the others."""
    for listener in tuple(listeners):
        try:
            listener(*args)
        except Exception:
            logger.exception("listener %s failed", _qualname(listener))


# --------------------------------------------------------------------------- retry engine


def _never_retried() -> tuple[type[BaseException], ...]:
    """Exception classes no policy retries: an open breaker and Celery's control flow."""
    classes: list[type[BaseException]] = [CircuitBreakerOpenError]
    for module_name, names in (
        ("celery.exceptions", ("Retry", "Ignore", "Reject")),
        (
            "billiard.exceptions",
            ("SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated", "WorkerLostError"),
        ),
    ):
        module = sys.modules.get(module_name)  # only when the worker already loaded Celery
        if module is not None:
            for name in names:
                found = getattr(module, name, None)
                if isinstance(found, type) and issubclass(found, BaseException):
                    classes.append(found)
    return tuple(classes)


class RetryPolicy:
    """The retry engine: when to retry, how long to wait, and when to give up.

    Parameters (all validated here; a bad one raises ValueError naming it):

    - ``max_attempts``: attempts in all, the first included (>= 1).
    - ``base_delay`` / ``max_delay``: seconds; each delay is capped at ``max_delay``.
    - ``backoff``: a :class:`BackoffStrategy` or its name.
    - ``jitter``: full jitter, i.e. a delay drawn uniformly between 0 and the computed delay.
    - ``exceptions``: the classes that are retried; ``permanent``: classes never retried.
    - ``retry_if``: optional ``predicate(exc) -> bool``; False means not retried.
    - ``budget``: an optional shared :class:`RetryBudget`; empty means the error is raised.
    - ``deadline``: seconds from the first attempt; a retry that would start after it is
      not made and the last error is raised.

    An exception carrying a numeric ``retry_after`` attribute (seconds) sets the next delay
    (capped at ``max_delay``, no jitter). Use the policy as a decorator (sync or async
    functions), or call ``policy.call(fn, *args, **kwargs)`` / ``await policy.acall(...)``.
    """

    __slots__ = (
        "_retrying",
        "backoff",
        "base_delay",
        "budget",
        "deadline",
        "exceptions",
        "jitter",
        "max_attempts",
        "max_delay",
        "permanent",
        "retry_if",
    )

    def __init__(
        self,
        max_attempts: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        backoff: BackoffStrategy | str = BackoffStrategy.EXPONENTIAL,
        jitter: bool = True,
        exceptions: ExceptionTypes = (Exception,),
        permanent: ExceptionTypes = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        budget: RetryBudget | None = None,
        deadline: float | None = None,
    ) -> None:
        self.max_attempts = _check_int("max_attempts", max_attempts, minimum=1)
        self.base_delay = _check_number("base_delay", base_delay, minimum=0.0)
        self.max_delay = _check_number("max_delay", max_delay, minimum=0.0)
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay must be at least base_delay ({base_delay!r}), got {max_delay!r}"
            )
        self.backoff = BackoffStrategy.parse(backoff)
        if not isinstance(jitter, bool):
            raise ValueError(f"jitter must be True or False, got {jitter!r}")
        self.jitter = jitter
        self.exceptions = _check_exceptions("exceptions", exceptions, allow_empty=False)
        self.permanent = _check_exceptions("permanent", permanent, allow_empty=True)
        _check_callable("retry_if", retry_if)
        self.retry_if = retry_if
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget or None, got {budget!r}")
        self.budget = budget
        self.deadline = (
            None
            if deadline is None
            else _check_number("deadline", deadline, minimum=0.0, strict=True)
        )
        self._retrying: Any = None

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, base_delay={self.base_delay}, "
            f"max_delay={self.max_delay}, backoff={self.backoff.value!r}, jitter={self.jitter}, "
            f"deadline={self.deadline}, budget={self.budget!r})"
        )

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy of this policy with some parameters changed (validated again)."""
        params: dict[str, Any] = {
            "max_attempts": self.max_attempts,
            "base_delay": self.base_delay,
            "max_delay": self.max_delay,
            "backoff": self.backoff,
            "jitter": self.jitter,
            "exceptions": self.exceptions,
            "permanent": self.permanent,
            "retry_if": self.retry_if,
            "budget": self.budget,
            "deadline": self.deadline,
        }
        unknown = set(changes) - set(params)
        if unknown:
            raise ValueError(f"unknown RetryPolicy parameter(s): {', '.join(sorted(unknown))}")
        params.update(changes)
        return RetryPolicy(**params)

    # -- the schedule

    def backoff_delay(self, retry_number: int) -> float:
        """The capped delay before retry ``retry_number`` (1 = first retry), before jitter."""
        if retry_number < 1:
            raise ValueError(f"retry_number must be at least 1, got {retry_number!r}")
        if self.backoff is BackoffStrategy.EXPONENTIAL:
            try:
                delay = math.ldexp(self.base_delay, retry_number - 1)  # base * 2^(n-1)
            except OverflowError:
                delay = math.inf
        elif self.backoff is BackoffStrategy.LINEAR:
            delay = self.base_delay * retry_number
        else:
            delay = self.base_delay
        return min(delay, self.max_delay)

    def next_delay(self, retry_number: int, exc: BaseException | None = None) -> float:
        """The delay actually used: ``exc.retry_after`` when present, else jittered backoff."""
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, int | float) and not isinstance(hint, bool) and hint >= 0:
            return float(min(hint, self.max_delay))  # NaN fails `>= 0`; inf, 10**400 capped
        delay = self.backoff_delay(retry_number)
        return random.uniform(0.0, delay) if self.jitter else delay

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried at all (attempts, deadline and budget aside)."""
        if not isinstance(exc, self.exceptions):
            return False
        if isinstance(exc, (*self.permanent, *_never_retried())):
            return False
        return self.retry_if is None or bool(self.retry_if(exc))

    # -- decorator and calls

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async); name, docstring and signature are kept, and the
        policy is the wrapper's ``retry_policy``."""
        return _decorate(fn, self.call, self.acall, retry_policy=self)

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` under this policy."""
        return self._run(fn, fn, args, kwargs)

    async def acall(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` under this policy."""
        return await self._arun(fn, fn, args, kwargs)

    # ``invoke(*args, **kwargs)`` is one attempt; ``fn`` names the call in logs and events.
    # The first attempt runs directly; tenacity decides about the rest (see _next_sleep).

    def _run(
        self,
        invoke: Callable[..., Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.budget is not None:
            self.budget.record_call()
        start = time.monotonic() if self.deadline is not None else 0.0
        try:
            return invoke(*args, **kwargs)
        except self.exceptions as exc:
            if not self.is_retryable(exc):
                raise
            state = self._begin(fn, args, kwargs, exc, start)
        while True:
            delay = self._next_sleep(state)
            if not _testing:
                time.sleep(delay)
            try:
                return invoke(*args, **kwargs)
            except BaseException as exc:
                state.set_exception((type(exc), exc, exc.__traceback__))

    async def _arun(
        self,
        invoke: Callable[..., Awaitable[Any]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.budget is not None:
            self.budget.record_call()
        start = time.monotonic() if self.deadline is not None else 0.0
        try:
            return await invoke(*args, **kwargs)
        except self.exceptions as exc:
            if not self.is_retryable(exc):
                raise
            state = self._begin(fn, args, kwargs, exc, start)
        import asyncio

        while True:
            delay = self._next_sleep(state)
            if not _testing:
                await asyncio.sleep(delay)
            try:
                return await invoke(*args, **kwargs)
            except BaseException as exc:
                state.set_exception((type(exc), exc, exc.__traceback__))

    def _begin(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        first: BaseException,
        start: float,
    ) -> tenacity.RetryCallState:
        """tenacity's state for one call, with the first attempt's failure recorded."""
        import tenacity

        retrying = self._retrying
        if retrying is None:  # built once per policy (tenacity keeps per-thread state)
            retrying = self._retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(self.is_retryable),
                wait=self._wait,
                stop=self._stop,
                before_sleep=self._announce,
                reraise=True,
            )
        retrying.begin()  # tenacity's per-thread statistics, which its actions update
        state = tenacity.RetryCallState(retry_object=retrying, fn=fn, args=args, kwargs=kwargs)
        if self.deadline is not None:
            state.start_time = start  # the deadline counts from the first attempt
        state.set_exception((type(first), first, first.__traceback__))
        return state

    @staticmethod
    def _next_sleep(state: tenacity.RetryCallState) -> float:
        """After a failed attempt: the seconds to sleep before the next one, or the failure
        re-raised (the original exception and traceback) when tenacity says to stop."""
        import tenacity

        action = cast(tenacity.DoSleep, state.retry_object.iter(state))  # or it raised
        state.prepare_for_next_attempt()
        return float(action)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        outcome = state.outcome
        return self.next_delay(state.attempt_number, outcome.exception() if outcome else None)

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        if self.deadline is not None:
            elapsed = time.monotonic() - state.start_time
            if _testing:  # the sleeps were skipped, not the schedule
                elapsed += state.idle_for
            if elapsed + state.upcoming_sleep > self.deadline:
                delay = state.upcoming_sleep
                why = f"a {delay:.3f}s delay would pass the {self.deadline:g}s deadline"
                return _give_up(state, "deadline", why)
        if self.budget is not None and not self.budget.try_spend():
            return _give_up(state, "budget", "retry budget exhausted")
        return False

    def _announce(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if exc is None:  # tenacity only sleeps after an exception with our retry predicate
            return
        name = _qualname(state.fn)
        delay = state.upcoming_sleep
        logger.warning(
            "retrying %s in %.3fs after attempt %d/%d failed: %s: %s",
            name,
            delay,
            state.attempt_number,
            self.max_attempts,
            type(exc).__qualname__,
            exc,
            extra={
                "function": name,
                "attempt": state.attempt_number,
                "max_attempts": self.max_attempts,
                "delay": delay,
                "exception_type": type(exc).__qualname__,
                "exception_message": str(exc),
            },
        )
        if _retry_listeners:
            _notify(
                _retry_listeners,
                RetryEvent(name, state.attempt_number, self.max_attempts, delay, exc),
            )


def _give_up(state: tenacity.RetryCallState, reason: str, why: str) -> bool:
    """Log why no retry is made (``give_up_reason`` is ``reason``); True, to stop."""
    name = _qualname(state.fn)
    logger.info(
        "not retrying %s: %s",
        name,
        why,
        extra={"function": name, "attempt": state.attempt_number, "give_up_reason": reason},
    )
    return True


def retry(
    max_attempts: int = 3,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    backoff: BackoffStrategy | str = BackoffStrategy.EXPONENTIAL,
    jitter: bool = True,
    exceptions: ExceptionTypes = (Exception,),
    permanent: ExceptionTypes = (),
    retry_if: Callable[[BaseException], bool] | None = None,
    budget: RetryBudget | None = None,
    deadline: float | None = None,
) -> RetryPolicy:
    """Decorator factory: ``@retry(max_attempts=3)``. See :class:`RetryPolicy` for parameters.

    Parameters are validated here, at decoration time.
    """
    return RetryPolicy(
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        backoff=backoff,
        jitter=jitter,
        exceptions=exceptions,
        permanent=permanent,
        retry_if=retry_if,
        budget=budget,
        deadline=deadline,
    )


# --------------------------------------------------------------------------- circuit breaker


class CircuitState(enum.StrEnum):
    """A breaker's state; the values are what metrics and health report."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreakerOpenError(Exception):
    """A breaker refused the call; ``retry_after`` is the seconds until a probe may run."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(name, retry_after)
        self.breaker_name = name
        self.retry_after = float(retry_after)

    def __str__(self) -> str:
        return f"circuit breaker {self.breaker_name!r} is open; retry after {self.retry_after:.3f}s"


StateListener = Callable[["CircuitBreaker", CircuitState, CircuitState], object]
SharedStateListener = Callable[["CircuitBreaker", bool], object]
_state_listeners: list[StateListener] = []
_shared_state_listeners: list[SharedStateListener] = []


def add_state_listener(listener: StateListener) -> None:
    """Call ``listener(breaker, old, new)`` on every state change of every breaker."""
    _check_callable("listener", listener)
    _state_listeners.append(listener)


def remove_state_listener(listener: StateListener) -> None:
    """Stop calling a listener added with :func:`add_state_listener`."""
    _state_listeners.remove(listener)


def add_shared_state_listener(listener: SharedStateListener) -> None:
    """Call ``listener(breaker, ok)`` when a Redis-shared breaker loses (False) or regains
    (True) its shared state."""
    _check_callable("listener", listener)
    _shared_state_listeners.append(listener)


def remove_shared_state_listener(listener: SharedStateListener) -> None:
    """Stop calling a listener added with :func:`add_shared_state_listener`."""
    _shared_state_listeners.remove(listener)


class _Ticket:
    """What admission granted one call: a plain call or the probe, local or from Redis."""

    __slots__ = ("failures", "probe", "shared", "token")

    def __init__(
        self, *, probe: bool, shared: bool = False, token: str = "", failures: int = 0
    ) -> None:
        self.probe = probe
        self.shared = shared
        self.token = token  # a shared probe's lease token
        self.failures = failures  # the shared failure count when the call was admitted

    def tells_redis_nothing(self, outcome: str) -> bool:
        """Whether reporting ``outcome`` of this shared call would change nothing in Redis
        (the common case then costs no second round trip)."""
        return not self.probe and (
            outcome == _RELEASE or (outcome == _SUCCESS and self.failures == 0)
        )


_LOCAL_CALL = _Ticket(probe=False)
_SUCCESS, _FAILURE, _RELEASE = "success", "failure", "release"

_registry: dict[str, CircuitBreaker] = {}
_registry_lock = threading.Lock()


class CircuitBreaker:
    """Stops calling a failing dependency, then lets one probe test it again.

    CLOSED: calls pass; ``failure_threshold`` consecutive failures open the breaker.
    OPEN: calls are refused at once with :class:`CircuitBreakerOpenError`; after
    ``recovery_timeout`` seconds the next call becomes the probe (HALF_OPEN).
    HALF_OPEN: exactly one probe runs (others are refused); its success closes the breaker,
    its failure opens it again. The probe holds a lease of ``probe_timeout`` seconds
    (default: ``recovery_timeout``); a probe still running when its lease ends decides
    nothing, and another call may probe.

    An exception counts as a failure when it is an ``expected_exception`` and ``is_failure``
    (if given) returns True; any other exception passes through and counts as an answer of
    the dependency (a success). ``KeyboardInterrupt``-like exceptions count as neither.

    With ``redis_url`` the state lives in Redis under ``key_prefix + name``, shared by every
    process using the same name: transitions are atomic Lua scripts using Redis' clock, and
    the probe is an expiring lease. If Redis cannot be reached the breaker keeps working on
    local state, sets ``degraded`` (``shared_state_ok`` False), tells the shared-state
    listeners, and tries Redis again every ``reconnect_interval`` seconds.

    Thread-safe; no lock is held while the wrapped function runs. Breakers register by name
    (see :func:`get_breaker`, :func:`all_breakers`); a second breaker with the same name is
    a ValueError.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        expected_exception: ExceptionTypes = Exception,
        is_failure: Callable[[BaseException], bool] | None = None,
        redis_url: str | None = None,
        *,
        probe_timeout: float | None = None,
        key_prefix: str = "worker:breaker:",
        reconnect_interval: float = 1.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.failure_threshold = _check_int("failure_threshold", failure_threshold, minimum=1)
        self.recovery_timeout = _check_number(
            "recovery_timeout", recovery_timeout, minimum=0.0, strict=True
        )
        self.expected_exception = _check_exceptions(
            "expected_exception", expected_exception, allow_empty=False
        )
        _check_callable("is_failure", is_failure)
        self.is_failure = is_failure
        self.probe_timeout = (
            self.recovery_timeout
            if probe_timeout is None
            else _check_number("probe_timeout", probe_timeout, minimum=0.0, strict=True)
        )
        self.reconnect_interval = _check_number(
            "reconnect_interval", reconnect_interval, minimum=0.0, strict=True
        )
        if redis_url is not None and (not isinstance(redis_url, str) or not redis_url):
            raise ValueError(f"redis_url must be a non-empty string or None, got {redis_url!r}")
        self.redis_url = redis_url
        if not isinstance(key_prefix, str):
            raise ValueError(f"key_prefix must be a string, got {key_prefix!r}")
        self.key_prefix = key_prefix
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe: _Ticket | None = None  # the local probe holding the lease
        self._probe_until = 0.0
        self._listeners: list[StateListener] = []
        self._shared_listeners: list[SharedStateListener] = []
        self._store: RedisBreakerStore | None = None
        self._degraded = False
        self._next_reconnect = 0.0
        if redis_url is not None:
            from ._breaker_store import RedisBreakerStore

            self._store = RedisBreakerStore(
                redis_url,
                key_prefix + name,
                failure_threshold=self.failure_threshold,
                recovery_timeout=self.recovery_timeout,
                probe_timeout=self.probe_timeout,
            )
        with _registry_lock:
            if name in _registry:
                raise ValueError(
                    f"name {name!r} is already a registered breaker; use get_breaker({name!r})"
                )
            _registry[name] = self

    def __repr__(self) -> str:
        where = "shared" if self._store is not None else "local"
        return (
            f"CircuitBreaker({self.name!r}, state={self._state.value}, {where}, "
            f"failure_threshold={self.failure_threshold}, "
            f"recovery_timeout={self.recovery_timeout})"
        )

    # -- state and listeners

    @property
    def state(self) -> CircuitState:
        """The current state (read from Redis for a shared breaker that reaches it)."""
        if self._store is not None:
            observed = self._ask_redis(self._store.snapshot)
            if observed is not None:
                return self._observe(CircuitState(observed))
        with self._lock:
            if (
                self._state is CircuitState.OPEN
                and time.monotonic() - self._opened_at >= self.recovery_timeout
            ):
                return CircuitState.HALF_OPEN  # the next call will be the probe
            return self._state

    @property
    def shared(self) -> bool:
        """True when the state is meant to live in Redis (``redis_url`` given)."""
        return self._store is not None

    @property
    def degraded(self) -> bool:
        """True while a shared breaker cannot reach Redis and runs on local state."""
        return self._degraded

    @property
    def shared_state_ok(self) -> bool:
        """False only while a shared breaker runs on local state; health reads this."""
        return not self._degraded

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(breaker, old, new)`` on every state change of this breaker."""
        _check_callable("listener", listener)
        self._listeners.append(listener)

    def add_shared_state_listener(self, listener: SharedStateListener) -> None:
        """Call ``listener(breaker, ok)`` when this breaker loses or regains Redis."""
        _check_callable("listener", listener)
        self._shared_listeners.append(listener)

    def reset(self) -> None:
        """Close the breaker and forget its failures (in Redis too, when shared)."""
        if self._store is not None:
            self._ask_redis(self._store.reset)
        with self._lock:
            change = self._set_state(CircuitState.CLOSED)
            self._failures = 0
            self._probe = None
        self._emit(change)

    def _emit(self, change: tuple[CircuitState, CircuitState] | None) -> None:
        if change is None:
            return
        old, new = change
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        logger.log(
            level,
            "circuit breaker %s: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={"breaker": self.name, "old_state": old.value, "new_state": new.value},
        )
        _notify(self._listeners, self, old, new)
        _notify(_state_listeners, self, old, new)

    def _set_state(self, new: CircuitState) -> tuple[CircuitState, CircuitState] | None:
        """Change state (lock held); the transition to report, if any."""
        old = self._state
        if old is new:
            return None
        self._state = new
        if new is CircuitState.OPEN:
            self._opened_at = time.monotonic()
        return old, new

    def _observe(self, observed: CircuitState) -> CircuitState:
        """Adopt the state Redis reported, announcing it if it differs from the last one."""
        with self._lock:
            change = self._set_state(observed)
            if observed is CircuitState.CLOSED:
                self._failures = 0
        self._emit(change)
        return observed

    # -- shared state: Redis, or local state while Redis is unreachable

    def _ask_redis(self, operation: Callable[..., R], *args: Any) -> R | None:
        """``operation(*args)`` on the store; None when Redis is unreachable (the breaker is
        then degraded, and asks again only once per ``reconnect_interval``)."""
        if self._degraded:
            now = time.monotonic()
            with self._lock:
                if now < self._next_reconnect:
                    return None
                self._next_reconnect = now + self.reconnect_interval
        from ._breaker_store import StoreUnavailable

        try:
            answer = operation(*args)
        except StoreUnavailable as exc:
            self._set_degraded(True, exc)
            return None
        if self._degraded:
            self._set_degraded(False)
        return answer

    def _set_degraded(self, degraded: bool, reason: BaseException | None = None) -> None:
        with self._lock:
            changed = self._degraded is not degraded
            self._degraded = degraded
            if degraded:
                self._next_reconnect = time.monotonic() + self.reconnect_interval
                if changed:  # local state starts afresh
                    self._failures = 0
                    self._probe = None
        if not changed:
            return
        if degraded:
            logger.warning(
                "circuit breaker %s: shared state unreachable, using local state: %s",
                self.name,
                reason,
                extra={"breaker": self.name, "shared_state_ok": False},
            )
        else:
            logger.info(
                "circuit breaker %s: shared state reachable again",
                self.name,
                extra={"breaker": self.name, "shared_state_ok": True},
            )
        _notify(self._shared_listeners, self, not degraded)
        _notify(_shared_state_listeners, self, not degraded)

    # -- admission and outcome

    def _admit(self) -> _Ticket:
        """Let a call through (returning its ticket) or raise CircuitBreakerOpenError."""
        if self._store is not None:
            verdict = self._ask_redis(self._store.acquire)
            if verdict is not None:
                self._observe(CircuitState(verdict.state))
                if verdict.decision == "reject":
                    raise CircuitBreakerOpenError(self.name, verdict.retry_after)
                return _Ticket(
                    probe=verdict.decision == "probe",
                    shared=True,
                    token=verdict.token,
                    failures=verdict.failures,
                )
        return self._admit_local()

    def _admit_local(self) -> _Ticket:
        change = None
        try:
            with self._lock:
                if self._state is CircuitState.CLOSED:
                    return _LOCAL_CALL
                now = time.monotonic()
                if self._state is CircuitState.OPEN:
                    wait = self._opened_at + self.recovery_timeout - now
                    if wait > 0:
                        raise CircuitBreakerOpenError(self.name, wait)
                    change = self._set_state(CircuitState.HALF_OPEN)
                if self._probe is not None and now < self._probe_until:
                    raise CircuitBreakerOpenError(self.name, self._probe_until - now)
                self._probe = _Ticket(probe=True)
                self._probe_until = now + self.probe_timeout
                return self._probe
        finally:
            self._emit(change)

    def _record(self, ticket: _Ticket, outcome: str) -> None:
        if ticket.shared and self._store is not None:
            if ticket.tells_redis_nothing(outcome):
                return
            new = self._ask_redis(self._store.record, outcome, ticket.token)
            if new is not None:
                self._observe(CircuitState(new))
                return
        self._record_local(ticket, outcome)

    def _record_local(self, ticket: _Ticket, outcome: str) -> None:
        change = None
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                # Only the probe holding the lease decides; calls admitted earlier and a
                # probe whose lease ran out say nothing.
                if ticket is self._probe and time.monotonic() < self._probe_until:
                    self._probe = None
                    if outcome == _SUCCESS:
                        change = self._set_state(CircuitState.CLOSED)
                        self._failures = 0
                    elif outcome == _FAILURE:
                        change = self._set_state(CircuitState.OPEN)
            elif self._state is CircuitState.CLOSED:
                if outcome == _SUCCESS:
                    self._failures = 0
                elif outcome == _FAILURE:
                    self._failures += 1
                    if self._failures >= self.failure_threshold:
                        change = self._set_state(CircuitState.OPEN)
                        self._failures = 0
            # OPEN: a call admitted before the breaker opened says nothing new
        self._emit(change)

    def _outcome_of(self, exc: BaseException) -> str:
        if not isinstance(exc, Exception):
            return _RELEASE
        if isinstance(exc, self.expected_exception) and (
            self.is_failure is None or self.is_failure(exc)
        ):
            return _FAILURE
        return _SUCCESS

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker."""
        if self._store is None and self._state is CircuitState.CLOSED:
            ticket = _LOCAL_CALL  # the success path: no lock, no allocation
        else:
            ticket = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record(ticket, self._outcome_of(exc))
            raise
        if ticket is not _LOCAL_CALL or self._failures:
            self._record(ticket, _SUCCESS)
        return result

    async def acall(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (Redis is asked off the loop)."""
        import asyncio

        if self._store is None:
            ticket = self._admit()
        else:
            # Redis is asked in a thread (with this context, for log lines). A plain future,
            # not a task, so that nothing cancels it: if the caller is cancelled meanwhile,
            # the thread runs on and a probe lease it is granted is given back.
            admission = asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, self._admit
            )
            try:
                ticket = await asyncio.shield(admission)
            except asyncio.CancelledError:
                admission.add_done_callback(self._release_abandoned)
                raise
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._arecord(ticket, self._outcome_of(exc))
            raise
        await self._arecord(ticket, _SUCCESS)
        return result

    def _release_abandoned(self, admission: asyncio.Future[_Ticket]) -> None:
        """Give back the probe lease granted to a caller that was cancelled meanwhile (in a
        thread: this runs on the event loop, and Redis may be slow)."""
        if not admission.cancelled() and admission.exception() is None:
            ticket = admission.result()
            if ticket.probe:
                threading.Thread(
                    target=self._record, args=(ticket, _RELEASE), daemon=True
                ).start()

    async def _arecord(self, ticket: _Ticket, outcome: str) -> None:
        """:meth:`_record`, in a thread when it has to ask Redis."""
        if ticket.shared and not ticket.tells_redis_nothing(outcome):
            import asyncio

            await asyncio.to_thread(self._record, ticket, outcome)
        else:
            self._record(ticket, outcome)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async) so every call passes through this breaker (the
        wrapper's ``breaker``)."""
        return _decorate(fn, self.call, self.acall, breaker=self)


_BREAKER_PARAMETERS = frozenset(inspect.signature(CircuitBreaker).parameters) - {"name"}


def get_breaker(name: str, **kwargs: Any) -> CircuitBreaker:
    """The registered breaker ``name``, created with ``kwargs`` if it does not exist yet.

    An existing breaker whose settings differ from a given keyword is a ValueError, so two
    parts of a program cannot silently disagree about one breaker.
    """
    with _registry_lock:
        existing = _registry.get(name)
    if existing is None:
        try:
            return CircuitBreaker(name, **kwargs)
        except ValueError:
            with _registry_lock:
                existing = _registry.get(name)
            if existing is None:
                raise
    for key, value in kwargs.items():
        if key not in _BREAKER_PARAMETERS:
            raise ValueError(f"unknown CircuitBreaker parameter: {key}")
        current = getattr(existing, key)
        if key == "expected_exception":
            value = _check_exceptions(key, value, allow_empty=False)
        elif key in ("recovery_timeout", "probe_timeout", "reconnect_interval"):
            value = _check_number(key, value, minimum=0.0, strict=True)
        if current != value:
            raise ValueError(
                f"breaker {name!r} exists with {key}={current!r}; cannot get it with "
                f"{key}={value!r}"
            )
    return existing


def all_breakers() -> list[CircuitBreaker]:
    """Every registered breaker, in registration order (health and metrics read this)."""
    with _registry_lock:
        return list(_registry.values())


def circuit_breaker(
    failure_threshold: int = 5,
    recovery_timeout: float = 60.0,
    expected_exception: ExceptionTypes = Exception,
    name: str | None = None,
    *,
    is_failure: Callable[[BaseException], bool] | None = None,
    redis_url: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: calls pass through the registered breaker ``name`` (default: the function's
    module and qualified name). Functions decorated with the same name share one breaker."""
    _check_int("failure_threshold", failure_threshold, minimum=1)
    _check_number("recovery_timeout", recovery_timeout, minimum=0.0, strict=True)
    _check_exceptions("expected_exception", expected_exception, allow_empty=False)
    _check_callable("is_failure", is_failure)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string or None, got {name!r}")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        breaker = get_breaker(
            name or _qualname(fn),
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            expected_exception=expected_exception,
            is_failure=is_failure,
            redis_url=redis_url,
        )
        return breaker(fn)

    return decorate


# --------------------------------------------------------------------------- executor


class ResilientExecutor:
    """Retries, a circuit breaker checked on every attempt, and a fallback, combined.

    ``retry_config``: a :class:`RetryPolicy`, a dict of :func:`retry` keywords, or None for
    the defaults. ``circuit_breaker``: a :class:`CircuitBreaker` or None. An open breaker ends
    the retries at once. ``fallback``: None (errors propagate), a callable receiving the
    final exception (sync, or async for async functions), or any other value returned as is.
    Use as a decorator (``@executor``) or ``executor.execute(fn, *args, **kwargs)``.
    """

    def __init__(
        self,
        retry_config: RetryPolicy | Mapping[str, Any] | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        fallback: Any = None,
    ) -> None:
        if retry_config is None:
            self.policy = RetryPolicy()
        elif isinstance(retry_config, RetryPolicy):
            self.policy = retry_config
        elif isinstance(retry_config, Mapping):
            self.policy = RetryPolicy(**dict(retry_config))
        else:
            raise ValueError(
                f"retry_config must be a RetryPolicy, a dict or None, got {retry_config!r}"
            )
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise ValueError(
                f"circuit_breaker must be a CircuitBreaker or None, got {circuit_breaker!r}"
            )
        self.breaker = circuit_breaker
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"ResilientExecutor({self.policy!r}, breaker={self.breaker!r})"

    def _fallback_for(self, fn: Callable[..., Any], exc: Exception) -> Any:
        logger.warning(
            "fallback used for %s after %s: %s",
            _qualname(fn),
            type(exc).__qualname__,
            exc,
            extra={
                "function": _qualname(fn),
                "exception_type": type(exc).__qualname__,
                "exception_message": str(exc),
            },
        )
        return self.fallback(exc) if callable(self.fallback) else self.fallback

    def execute(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` with retries through the breaker, then the fallback."""
        try:
            if self.breaker is None:
                return self.policy._run(fn, fn, args, kwargs)
            return self.policy._run(self.breaker.call, fn, (fn, *args), kwargs)
        except Exception as exc:
            if self.fallback is None:
                raise
            return self._fallback_for(fn, exc)

    async def aexecute(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` with retries through the breaker, then the fallback."""
        try:
            if self.breaker is None:
                return await self.policy._arun(fn, fn, args, kwargs)
            return await self.policy._arun(self.breaker.acall, fn, (fn, *args), kwargs)
        except Exception as exc:
            if self.fallback is None:
                raise
            answer = self._fallback_for(fn, exc)
            if inspect.isawaitable(answer):
                answer = await answer
            return answer

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async); name, docstring and signature are kept."""
        return _decorate(fn, self.execute, self.aexecute)


def _after_fork_in_child() -> None:
    """Give a forked child (Celery's prefork pool) fresh locks and no probe in flight: a lock
    that another thread of the parent held at the moment of the fork would otherwise stay
    locked in the child, and that thread's probe would hold the lease there until it ran out."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for breaker in _registry.values():
        breaker._lock = threading.Lock()
        breaker._probe = None  # a parent thread's probe never ends in the child
    for budget in list(_budgets):
        budget._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
