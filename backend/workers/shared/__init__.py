"""Shared infrastructure for lightweight Celery workers that reach the backend over HTTP.

Public names load lazily: ``from backend.workers.shared import retry`` imports the retry
module only, so a worker pays at start-up for what it uses. Nothing here imports Django.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _runtime

# Public name -> the module (in this package) that defines it. One section per module.
_EXPORTS: dict[str, str] = {
    # config.py
    "WorkerConfig": "config",
    "ConfigurationError": "config",
    # retry_utils.py
    "retry": "retry_utils",
    "circuit_breaker": "retry_utils",
    "CircuitBreaker": "retry_utils",
    "CircuitBreakerOpenError": "retry_utils",
    "CircuitState": "retry_utils",
    "ResilientExecutor": "retry_utils",
    "RetryBudget": "retry_utils",
    "BackoffStrategy": "retry_utils",
    "RetryPolicy": "retry_utils",
    "RetryEvent": "retry_utils",
    "get_breaker": "retry_utils",
    "all_breakers": "retry_utils",
    "add_state_listener": "retry_utils",
    "add_retry_listener": "retry_utils",
    "add_shared_state_listener": "retry_utils",
    "set_testing": "retry_utils",
    # api_client.py
    "InternalAPIClient": "api_client",
    # errors.py
    "InternalAPIError": "errors",
    "OrganizationRequiredError": "errors",
    "AuthenticationError": "errors",
    "NotFoundError": "errors",
    "ConflictError": "errors",
    "APIValidationError": "errors",
    "RateLimitedError": "errors",
    "ServerError": "errors",
    "APIResponseError": "errors",
    "APITimeoutError": "errors",
    "APIConnectionError": "errors",
    "APICircuitOpenError": "errors",
    "WebhookError": "errors",
    "WebhookNotRecordedError": "errors",
    "WebhookURLRefusedError": "errors",
    "LeaseLostError": "errors",
    "LeaseHeldError": "errors",
    "PreconditionFailedError": "errors",
    # models.py
    "WorkflowExecution": "models",
    "ExecutionStatus": "models",
    "WebhookDelivery": "models",
    "WebhookResult": "models",
    "BackendHealth": "models",
    "Claim": "models",
    "Lease": "models",
    "ExecutionEvent": "models",
    "ExecutionWebhook": "models",
    "FileExecution": "models",
    "FileStatus": "models",
    "Record": "models",
    # logging_utils.py
    "WorkerLogger": "logging_utils",
    "log_context": "logging_utils",
    "current_context": "logging_utils",
    "monitor_performance": "logging_utils",
    # health.py
    "HealthChecker": "health",
    "HealthCheckResult": "health",
    "HealthStatus": "health",
    # _health_server.py
    "HealthServer": "_health_server",
    "HealthServerError": "_health_server",
    # tasks.py
    "ExecutionTask": "tasks",
    "is_transient": "errors",
}

__all__ = sorted(_EXPORTS)


def _install_celery_wiring() -> None:
    """Install the Celery wiring, imported only then: the modules that install it reach it
    through the runtime (``_runtime.install_celery``), and nothing else needs it."""
    from . import _celery

    _celery.install()


_runtime.provide_celery_wiring(_install_celery_wiring)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names, eagerly, for type checkers
    from ._health_server import (
        HealthServer as HealthServer,
        HealthServerError as HealthServerError,
    )
    from .api_client import InternalAPIClient as InternalAPIClient
    from .config import (
        ConfigurationError as ConfigurationError,
        WorkerConfig as WorkerConfig,
    )
    from .errors import (
        APICircuitOpenError as APICircuitOpenError,
        APIConnectionError as APIConnectionError,
        APIResponseError as APIResponseError,
        APITimeoutError as APITimeoutError,
        APIValidationError as APIValidationError,
        AuthenticationError as AuthenticationError,
        ConflictError as ConflictError,
        InternalAPIError as InternalAPIError,
        LeaseHeldError as LeaseHeldError,
        LeaseLostError as LeaseLostError,
        NotFoundError as NotFoundError,
        OrganizationRequiredError as OrganizationRequiredError,
        PreconditionFailedError as PreconditionFailedError,
        RateLimitedError as RateLimitedError,
        ServerError as ServerError,
        WebhookError as WebhookError,
        WebhookNotRecordedError as WebhookNotRecordedError,
        WebhookURLRefusedError as WebhookURLRefusedError,
        is_transient as is_transient,
    )
    from .health import (
        HealthChecker as HealthChecker,
        HealthCheckResult as HealthCheckResult,
        HealthStatus as HealthStatus,
    )
    from .logging_utils import (
        WorkerLogger as WorkerLogger,
        current_context as current_context,
        log_context as log_context,
        monitor_performance as monitor_performance,
    )
    from .models import (
        BackendHealth as BackendHealth,
        Claim as Claim,
        ExecutionEvent as ExecutionEvent,
        ExecutionStatus as ExecutionStatus,
        ExecutionWebhook as ExecutionWebhook,
        FileExecution as FileExecution,
        FileStatus as FileStatus,
        Lease as Lease,
        Record as Record,
        WebhookDelivery as WebhookDelivery,
        WebhookResult as WebhookResult,
        WorkflowExecution as WorkflowExecution,
    )
    from .retry_utils import (
        BackoffStrategy as BackoffStrategy,
        CircuitBreaker as CircuitBreaker,
        CircuitBreakerOpenError as CircuitBreakerOpenError,
        CircuitState as CircuitState,
        ResilientExecutor as ResilientExecutor,
        RetryBudget as RetryBudget,
        RetryEvent as RetryEvent,
        RetryPolicy as RetryPolicy,
        add_retry_listener as add_retry_listener,
        add_shared_state_listener as add_shared_state_listener,
        add_state_listener as add_state_listener,
        all_breakers as all_breakers,
        circuit_breaker as circuit_breaker,
        get_breaker as get_breaker,
        retry as retry,
        set_testing as set_testing,
    )
    from .tasks import ExecutionTask as ExecutionTask
