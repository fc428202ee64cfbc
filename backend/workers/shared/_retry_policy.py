"""The retry engine: RetryPolicy, its backoff, its listeners and the testing switch."""

from __future__ import annotations

import enum
import inspect
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ._breaker import CircuitBreakerOpenError
from ._resilience import (
    ExceptionTypes,
    P,
    R,
    check_callable,
    check_exceptions,
    check_int,
    check_number,
    decorate,
    logger,
    notify,
    qualname,
)
from ._retry_budget import RetryBudget

if TYPE_CHECKING:
    import tenacity


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


def retry_after_of(exc: BaseException | None) -> int | float | None:
    """The server's ``Retry-After`` carried by ``exc`` (seconds, at least 0), or None."""
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, int | float) and not isinstance(hint, bool) and hint >= 0:
        return hint  # NaN fails `>= 0`
    return None


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
    check_callable("listener", listener)
    _retry_listeners.append(listener)


def remove_retry_listener(listener: RetryListener) -> None:
    """Stop calling a listener added with :func:`add_retry_listener`."""
    _retry_listeners.remove(listener)


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
    - ``exceptions``: the classes that are retried; ``None`` (the default) means every
      ``Exception`` except one whose ``transient`` attribute is ``False``.
      ``permanent``: classes never retried.
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
        "exceptions_given",
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
        exceptions: ExceptionTypes | None = None,
        permanent: ExceptionTypes = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        budget: RetryBudget | None = None,
        deadline: float | None = None,
    ) -> None:
        self.max_attempts = check_int("max_attempts", max_attempts, minimum=1)
        self.base_delay = check_number("base_delay", base_delay, minimum=0.0)
        self.max_delay = check_number("max_delay", max_delay, minimum=0.0)
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay must be at least base_delay ({base_delay!r}), got {max_delay!r}"
            )
        self.backoff = BackoffStrategy.parse(backoff)
        if not isinstance(jitter, bool):
            raise ValueError(f"jitter must be True or False, got {jitter!r}")
        self.jitter = jitter
        #: True when the caller chose ``exceptions``; else an exception saying it is not
        #: transient (``exc.transient is False``) is not retried.
        self.exceptions_given = exceptions is not None
        self.exceptions = (
            check_exceptions("exceptions", exceptions, allow_empty=False)
            if exceptions is not None
            else (Exception,)
        )
        self.permanent = check_exceptions("permanent", permanent, allow_empty=True)
        check_callable("retry_if", retry_if)
        self.retry_if = retry_if
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ValueError(f"budget must be a RetryBudget or None, got {budget!r}")
        self.budget = budget
        self.deadline = (
            None
            if deadline is None
            else check_number("deadline", deadline, minimum=0.0, strict=True)
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
        params = {name: getattr(self, name) for name in _POLICY_PARAMETERS}
        if not self.exceptions_given:
            params["exceptions"] = None
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
        hint = retry_after_of(exc)
        if hint is not None:
            return float(min(hint, self.max_delay))  # inf, 10**400 capped
        delay = self.backoff_delay(retry_number)
        return random.uniform(0.0, delay) if self.jitter else delay

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried at all (attempts, deadline and budget aside)."""
        if not isinstance(exc, self.exceptions):
            return False
        if isinstance(exc, (*self.permanent, *_never_retried())):
            return False
        if not self.exceptions_given and getattr(exc, "transient", None) is False:
            return False
        return self.retry_if is None or bool(self.retry_if(exc))

    # -- decorator and calls

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async); name, docstring and signature are kept, and the
        policy is the wrapper's ``retry_policy``."""
        return decorate(fn, self.call, self.acall, retry_policy=self)

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` under this policy."""
        return self.call_as(fn, fn, args, kwargs)

    async def acall(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` under this policy."""
        return await self.acall_as(fn, fn, args, kwargs)

    # The first attempt runs directly; tenacity decides about the rest (see _next_sleep).

    def call_as(
        self,
        invoke: Callable[..., Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call ``invoke(*args, **kwargs)`` under this policy, each attempt named ``fn`` in
        logs and events (``ResilientExecutor``: ``invoke`` is the breaker's call of ``fn``)."""
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

    async def acall_as(
        self,
        invoke: Callable[..., Awaitable[Any]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Await ``invoke(*args, **kwargs)`` under this policy, named ``fn`` (see ``call_as``)."""
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
        name = qualname(state.fn)
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
            notify(
                _retry_listeners,
                RetryEvent(name, state.attempt_number, self.max_attempts, delay, exc),
            )


_POLICY_PARAMETERS = tuple(inspect.signature(RetryPolicy).parameters)


def _give_up(state: tenacity.RetryCallState, reason: str, why: str) -> bool:
    """Log why no retry is made (``give_up_reason`` is ``reason``); True, to stop."""
    name = qualname(state.fn)
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
    exceptions: ExceptionTypes | None = None,
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
