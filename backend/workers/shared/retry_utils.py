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

Layout: the retry engine (the policy, its backoff, its listeners, the testing switch) lives in
``_retry_policy.py``, the retry budget in ``_retry_budget.py``, the breaker in ``_breaker.py``,
its state machine (local, or shared with a local fallback) in ``_breaker_state.py``, its Redis
state in ``_breaker_store.py``, what breaker and retry engine share in ``_resilience.py``; this
module is the executor and the public home of every name above.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

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
from ._resilience import P, R, decorate, logger, qualname
from ._retry_budget import RetryBudget
from ._retry_policy import (
    BackoffStrategy,
    RetryEvent,
    RetryListener as RetryListener,
    RetryPolicy,
    add_retry_listener,
    is_testing,
    remove_retry_listener,
    retry,
    set_testing,
)

for _public in (
    BackoffStrategy,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    add_retry_listener,
    add_shared_state_listener,
    add_state_listener,
    all_breakers,
    circuit_breaker,
    get_breaker,
    is_testing,
    remove_retry_listener,
    remove_shared_state_listener,
    remove_state_listener,
    retry,
    set_testing,
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
                return self.policy.call(fn, *args, **kwargs)
            return self.policy.call_as(self.breaker.call, fn, (fn, *args), kwargs)
        except Exception as exc:
            if self.fallback is None:
                raise
            return self._fallback_for(fn, exc)

    async def aexecute(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` with retries through the breaker, then the fallback."""
        try:
            if self.breaker is None:
                return await self.policy.acall(fn, *args, **kwargs)
            return await self.policy.acall_as(self.breaker.acall, fn, (fn, *args), kwargs)
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
