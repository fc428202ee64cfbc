"""Retries, circuit breakers and their combination: the one resilience engine of the workers.

The whole public surface (one logger, ``backend.workers.shared.retry_utils``)::

    retry(max_attempts=3, base_delay=1.0, max_delay=60.0, backoff="exponential",
          jitter=True, exceptions=None, permanent=(), retry_if=None,
          budget=None, deadline=None)          -> RetryPolicy (a decorator, sync or async)
    RetryPolicy(same parameters)               the retry engine: @policy, .call(fn, *a, **kw),
                                               await .acall(...), .replace(**changes),
                                               .backoff_delay(n), .next_delay(n, exc)
    BackoffStrategy                            EXPONENTIAL base*2^(n-1) | LINEAR base*n | FIXED
    RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
                                               retries capped at a ratio of recent calls:
                                               .record_call(), .try_spend(), .available()
    RetryEvent(function, attempt, max_attempts, delay, exception)
    add_retry_listener(fn) / remove_...        fn(RetryEvent) on every retry of every policy
    set_testing(True) / is_testing()           retries without sleeping, for users' tests

    CircuitBreaker(name, failure_threshold=5, recovery_timeout=60.0,
                   expected_exception=Exception, is_failure=None, redis_url=None, *,
                   initial_recovery_timeout=None, probe_timeout=None,
                   key_prefix="worker:breaker:", reconnect_interval=1.0,
                   clock=time.monotonic)
                                               open initial_recovery_timeout first, x1.5
                                               per failed probe, up to recovery_timeout;
                                               @breaker, .call(), await .acall(), .state,
                                               .reset(), .add_listener(fn(breaker, old, new)),
                                               .shared, .degraded / .shared_state_ok,
                                               .add_shared_state_listener(fn(breaker, ok))
    circuit_breaker(failure_threshold=5, recovery_timeout=60.0,
                    expected_exception=Exception, name=None, *, is_failure=None,
                    redis_url=None)            decorator over the registered breaker ``name``
    CircuitState                               CLOSED "closed" | OPEN "open" | HALF_OPEN
    CircuitBreakerOpenError(name, retry_after) .breaker_name, .retry_after; never retried
    get_breaker(name, **kw) / all_breakers()   the registry (get-or-create / list)
    add_state_listener(fn) / remove_...        fn(breaker, old, new) for every breaker
    add_shared_state_listener(fn) / remove_... fn(breaker, ok): Redis lost (False) / back

    ResilientExecutor(retry_config=None, circuit_breaker=None, fallback=None)
                                               @executor, .execute(fn, *a, **kw),
                                               await .aexecute(...): retries, the breaker on
                                               every attempt, then the fallback

Retries are built on tenacity (its stop/wait/retry strategies and state machine), but a call
that succeeds at once never enters tenacity: the function is called directly and tenacity is
imported and used only after a first failure, so the success path costs about as much as a
plain function call. After the last attempt the original exception is raised (its traceback
kept), never ``tenacity.RetryError``.

By default (``exceptions=None``) every ``Exception`` is retried except one that says it cannot
succeed: ``exc.transient is False`` (the API client's permanent errors, such as
``OrganizationRequiredError`` or a 404). An explicit ``exceptions=`` retries exactly those
classes, transient or not. Never retried, whatever ``exceptions`` says:
:class:`CircuitBreakerOpenError`, the classes in ``permanent``, and Celery's control-flow
exceptions (``Retry``, ``Ignore``, ``Reject``, time limits, ``Terminated``,
``WorkerLostError``) when Celery is loaded.

Every retry is logged at WARNING with the ``extra`` fields ``function``, ``attempt``,
``max_attempts``, ``delay``, ``exception_type`` and ``exception_message``, and reported to the
retry listeners; a retry not made (deadline, budget) is logged at INFO with
``give_up_reason``. Breaker transitions are logged too (WARNING when one opens).

Layout: the breaker lives in ``_breaker.py``, its state machine (local, or shared with a local
fallback) in ``_breaker_state.py``, its Redis state in ``_breaker_store.py``, what breaker and
retry engine share in ``_resilience.py``; this module is the retry engine, the executor and the
public home of every name above.
"""

from __future__ import annotations

import enum
import inspect
import math
import random
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import _runtime
from ._breaker import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    add_shared_state_listener,
    add_state_listener,
    all_breakers,
    circuit_breaker,
    get_breaker,
    remove_shared_state_listener,
    remove_state_listener,
)
from ._breaker_state import CircuitState
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

if TYPE_CHECKING:
    import tenacity

for _public in (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    add_shared_state_listener,
    add_state_listener,
    all_breakers,
    circuit_breaker,
    get_breaker,
    remove_shared_state_listener,
    remove_state_listener,
):
    _public.__module__ = __name__  # their public home, in reprs, tracebacks and pickles
del _public

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


def _fresh_locks(budgets: weakref.WeakSet[RetryBudget]) -> None:
    """Fresh budget locks in a forked child (Celery's prefork pool): a lock another thread
    of the parent held at the moment of the fork would otherwise stay locked there."""
    for budget in list(budgets):
        budget._lock = threading.Lock()


#: Every budget of this process, for the fork step (the budgets themselves are kept).
_BUDGETS: _runtime.Part[weakref.WeakSet[RetryBudget]] = _runtime.part(
    "retry budgets", weakref.WeakSet, _fresh_locks
)


class RetryBudget:
    """Caps retries at ``ratio`` of the calls of the last ``window`` seconds, plus a floor.

    Every logical call deposits (``record_call``); every retry withdraws (``try_spend``).
    Within any window a budget allows ``ratio * calls + min_per_second * window`` retries, so
    during an outage retries add at most ``ratio`` to the load instead of multiplying it.
    Thread-safe; one process-wide budget is meant to be shared by many policies.
    """

    _SLOTS = 10

    def __init__(self, ratio: float = 0.2, min_per_second: float = 1.0, window: float = 10.0):
        self.ratio = check_number("ratio", ratio, minimum=0.0)
        self.min_per_second = check_number("min_per_second", min_per_second, minimum=0.0)
        self.window = check_number("window", window, minimum=0.0, strict=True)
        self._slot_seconds = self.window / self._SLOTS
        self._calls = [0] * self._SLOTS
        self._retries = [0] * self._SLOTS
        self._epoch = -1  # index of the newest slot, in slot units since the monotonic origin
        self._lock = threading.Lock()
        _BUDGETS.get().add(self)

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
            qualname(fn),
            type(exc).__qualname__,
            exc,
            extra={
                "function": qualname(fn),
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
        return decorate(fn, self.execute, self.aexecute)
