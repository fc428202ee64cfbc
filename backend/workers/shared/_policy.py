"""How the client's calls are retried and guarded: for each configuration, its :class:`Guards`
(the backend's circuit breaker, the retry budget and the retry policies), built once per
process and distinct settings.

Which failures are retried: connection errors, timeouts, 429, 502, 503, 504, and 500 for GET
only, plus a 409 ``idempotency_in_flight``. The breaker counts only connection failures,
timeouts, 5xx, 408 and 429 as the backend's failures. Everything built here is forgotten in a
forked child, which builds its own (a part of the process's runtime, which follows the
breakers' registry).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from . import _metrics, _redact, _runtime
from ._breaker import REGISTRY
from .config import WorkerConfig
from .errors import (
    APIConnectionError,
    APITimeoutError,
    ConflictError,
    InternalAPIError,
    RateLimitedError,
    ServerError,
)
from .retry_utils import CircuitBreaker, RetryBudget, RetryPolicy, get_breaker

#: The ``error_code`` of a 409 saying the backend is still applying the same keyed POST.
IN_FLIGHT_CODE: Final = "idempotency_in_flight"
RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})


class Guards:
    """What guards the calls of one configuration in this process: the circuit breaker of its
    backend URL, the retry budget of its settings, and the retry policies built on them."""

    def __init__(self, config: WorkerConfig, budget: RetryBudget) -> None:
        self._config = config  # the first of the configurations with these settings
        self.budget = budget
        self._policies: dict[tuple[Any, ...], RetryPolicy] = {}

    @functools.cached_property
    def breaker(self) -> CircuitBreaker:
        """The one circuit breaker guarding calls to the backend URL in this process."""
        config = self._config
        _metrics.subscribe_resilience()  # breaker states and retries in /metrics (idempotent)
        return get_breaker(
            f"internal-api {_redact.redact_url(config.internal_api_base_url)}",
            failure_threshold=config.circuit_breaker_failure_threshold,
            recovery_timeout=config.circuit_breaker_recovery_timeout,
            initial_recovery_timeout=config.circuit_breaker_initial_recovery_timeout,
            is_failure=is_breaker_failure,
            redis_url=config.circuit_breaker_redis_url,
        )

    def policy(
        self,
        retry_if: Callable[[BaseException], bool],
        exceptions: tuple[type[BaseException], ...],
        deadline: float,
        budgeted: bool,
    ) -> RetryPolicy:
        """The policy of ``API_RETRY_*`` for these arguments (one per distinct arguments)."""
        key = (retry_if, exceptions, deadline, budgeted)
        policy = self._policies.get(key)
        if policy is None:
            config = self._config
            policy = RetryPolicy(
                max_attempts=config.api_retry_attempts + 1,
                base_delay=config.api_retry_base_delay,
                max_delay=config.api_retry_max_delay,
                backoff="exponential",
                jitter=True,
                exceptions=exceptions,
                retry_if=retry_if,
                budget=self.budget if budgeted else None,
                deadline=deadline,
            )
            policy = self._policies.setdefault(key, policy)
        return policy


class _Built:
    """The guards of each distinct configuration, and one retry budget per distinct budget
    setting (a worker has one configuration, so one of each per process)."""

    def __init__(self) -> None:
        self.guards: dict[tuple[Any, ...], Guards] = {}
        self.budgets: dict[tuple[float, float], RetryBudget] = {}


# A forked child builds its own (a fresh budget: the parent's calls are not the child's); so
# does a scoped runtime with breakers of its own.
_BUILT = _runtime.part("client guards", _Built, lambda _inherited: _Built(), follows=(REGISTRY,))


def guards(config: WorkerConfig) -> Guards:
    """The guards of ``config``'s calls in this process (shared by equal settings)."""
    key = (
        config.django_app_backend_url,
        config.circuit_breaker_failure_threshold,
        config.circuit_breaker_recovery_timeout,
        config.circuit_breaker_initial_recovery_timeout,
        config.circuit_breaker_redis_url,
        config.api_retry_attempts,
        config.api_retry_base_delay,
        config.api_retry_max_delay,
        config.api_retry_budget_ratio,
        config.api_retry_budget_min_per_second,
    )
    built = _BUILT.get()
    found = built.guards.get(key)
    if found is None:
        budget_key = (config.api_retry_budget_ratio, config.api_retry_budget_min_per_second)
        budget = built.budgets.get(budget_key)
        if budget is None:
            budget = built.budgets.setdefault(
                budget_key, RetryBudget(ratio=budget_key[0], min_per_second=budget_key[1])
            )
        found = built.guards.setdefault(key, Guards(config, budget))
    return found


# The policy hands these only the exceptions it was given, and never an open breaker
# (retry_utils does not retry CircuitBreakerOpenError).
def should_retry_write(exc: BaseException) -> bool:
    """Whether a failed attempt of a call other than a GET is worth another attempt."""
    if isinstance(exc, APIConnectionError | APITimeoutError | RateLimitedError):
        return True
    if isinstance(exc, ServerError):
        return exc.status in RETRYABLE_STATUSES
    return isinstance(exc, ConflictError) and exc.error_code == IN_FLIGHT_CODE


def should_retry_read(exc: BaseException) -> bool:
    """Whether a failed attempt of a GET is worth another attempt (a 500 too)."""
    return should_retry_write(exc) or (isinstance(exc, ServerError) and exc.status == 500)


def should_retry_transient(exc: BaseException) -> bool:
    """Whether a failed attempt says it is transient (a webhook attempt's failure)."""
    return bool(getattr(exc, "transient", False))


def is_breaker_failure(exc: BaseException) -> bool:
    """Whether a failed call counts against the backend in its circuit breaker."""
    # Only a sign that the backend (or the way to it) is unwell counts: no answer, or a 5xx,
    # 408 or 429. Another 4xx, an unusable body or a bug on our side is not its failure.
    if isinstance(exc, APIConnectionError | APITimeoutError):  # 408 included
        return True
    status = exc.status if isinstance(exc, InternalAPIError) else None
    return status is not None and (status >= 500 or status == 429)


def backend_breaker(config: WorkerConfig) -> CircuitBreaker:
    """The one circuit breaker guarding calls to ``config``'s backend URL in this process."""
    return guards(config).breaker


def retry_policy(
    config: WorkerConfig,
    *,
    retry_if: Callable[[BaseException], bool],
    exceptions: tuple[type[BaseException], ...] = (InternalAPIError,),
    deadline: float | None = None,
    budgeted: bool = True,
) -> RetryPolicy:
    """The policy of ``API_RETRY_*`` retrying ``exceptions`` that ``retry_if`` accepts, within
    ``deadline`` seconds (default ``API_DEADLINE``), under the process's retry budget when
    ``budgeted``; one shared policy per distinct arguments and settings."""
    if deadline is None:
        deadline = config.api_deadline
    return guards(config).policy(retry_if, exceptions, deadline, budgeted)
