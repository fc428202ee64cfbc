"""InternalAPIClient: the worker's only way to reach the backend's internal API.

::

    from backend.workers.shared import InternalAPIClient, WorkerConfig

    with InternalAPIClient(WorkerConfig()) as client:
        execution = client.get_workflow_execution(execution_id)
        client.update_workflow_execution_status(execution_id, "COMPLETED")

Every ``InternalAPIClient`` of a process shares one pooled ``httpx2`` client per backend URL
(``_http.py``): leaving a ``with`` block keeps the connections warm for the next task, and a
forked child builds its own pool. Each call is one logical operation made of one or more
attempts under ``retry_utils.RetryPolicy`` (the only retry loop) and the backend's circuit
breaker; a ``POST`` carries one ``Idempotency-Key`` for all its attempts, so the backend
applies it once.

Operations: ``get_workflow_execution``, ``list_workflow_executions`` (lazy, every page),
``create_workflow_execution``, ``update_workflow_execution``,
``update_workflow_execution_status``, ``delete_workflow_execution``, the execution lifecycle
(``claim_execution``, ``heartbeat_execution``, ``release_execution``, ``finish_execution``,
``list_execution_events``), ``send_webhook``, ``get_webhook_delivery``,
``list_webhook_deliveries``, ``health_check``, ``resource(name, model)`` for any declared
resource (``file-executions``, ...: get, list, create, update, delete, forget, batch, with
ETags and a conditional-GET cache; the execution and delivery reads and writes above are its
calls on ``workflow-executions`` and ``webhook-deliveries``), and ``get`` / ``post`` /
``patch`` / ``put`` / ``delete`` for endpoints not modelled here. Results are
``WorkflowExecution``, ``Claim``, ``Lease``, ``ExecutionEvent``, ``WebhookDelivery``,
``BackendHealth`` (pydantic models that keep unknown fields in ``model_extra``) and
``WebhookResult``, defined in ``models.py``.

Fencing: inside :func:`holding_lease` (``ExecutionTask`` enters it for the execution it
claimed) the writes about that execution carry ``X-Lease-Epoch`` (status, ``PATCH``, webhook
record, file creates naming it, and the file updates, deletes and batches a resource call
says are its files with ``for_execution=``), so the backend refuses them with ``lease_lost``
once another worker holds the execution. The lease lives in a context variable: never on the
client, never shared.

Exceptions (defined in ``errors.py``; every class is importable from this module)::

    InternalAPIError                 any failed call; status, error_code, detail, request_id,
    |                                method, path, retry_after; .transient
    +-- OrganizationRequiredError    org-scoped call with no organization (nothing sent)
    |                                (also a ValueError)
    +-- AuthenticationError          401, 403
    +-- NotFoundError                404 (also another organization's object)
    +-- PreconditionFailedError      412 precondition_failed: the If-Match version is stale,
    |                                nothing applied; read the object again
    +-- ConflictError                409 (illegal status transition, ...)
    |   +-- LeaseLostError           409 lease_lost: the lease is gone, nothing applied;
    |   |                            stop writing (the new holder owns the execution)
    |   +-- LeaseHeldError           409 lease_held: another worker holds a live lease;
    |                                retry_after = seconds until it runs out
    +-- APIValidationError           400, 422
    +-- RateLimitedError             429                                      [transient]
    +-- ServerError                  5xx                                      [transient]
    +-- APIResponseError             unexpected status, body not the JSON promised
    +-- APITimeoutError              connect/read/write/pool timeout, 408     [transient]
    +-- APIConnectionError           refused, reset, dropped before answer    [transient]
    +-- APICircuitOpenError          breaker open, not sent; also a
    |                                retry_utils.CircuitBreakerOpenError      [transient]
    +-- WebhookNotRecordedError      webhook sent, recording it failed (also a WebhookError)
    WebhookError                     a webhook could not be sent as asked
    +-- WebhookURLRefusedError       the SSRF guard refused the URL or a redirect target
    |                                (also a ValueError)
    +-- WebhookNotRecordedError      (see above)

The circuit breaker (one per backend URL, shared by the process, or through Redis) counts
only connection failures, timeouts, 5xx, 408 and 429 as the backend's failures.

Which failures are retried: connection errors, timeouts, 429, 502, 503, 504, and 500 for GET
only, plus a 409 ``idempotency_in_flight`` (the backend is still applying the same POST).
``Retry-After`` (seconds or HTTP date) sets the delay, capped at ``API_RETRY_MAX_DELAY``; no
retry starts past ``API_DEADLINE``. ``str()`` of any error is one line and never holds a secret.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from ._client_base import (
    DEFAULT_ORG,
    DEFAULT_PAGE_SIZE as DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE as MAX_PAGE_SIZE,
    OrgArg,
)
from ._fencing import MAX_EPOCH as MAX_EPOCH, HeldLease, holding_lease
from ._pipeline import BODY_EXCERPT as BODY_EXCERPT, MAX_REQUEST_ID as MAX_REQUEST_ID
from ._resource import (
    CACHE_CHARS as CACHE_CHARS,
    CACHE_ENTRIES as CACHE_ENTRIES,
    MAX_BATCH as MAX_BATCH,
    Resource,
)
from ._webhook_calls import WebhookCalls
from .errors import (
    APICircuitOpenError,
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    APIValidationError,
    AuthenticationError,
    ConflictError,
    InternalAPIError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    OrganizationRequiredError,
    PreconditionFailedError,
    RateLimitedError,
    ServerError,
    WebhookError,
    WebhookNotRecordedError,
    WebhookURLRefusedError,
)
from .models import (
    BackendHealth,
    Claim,
    ExecutionEvent,
    ExecutionStatus,
    ExecutionWebhook,
    FileExecution,
    FileStatus,
    Lease,
    Record,
    ResultModel,
    WebhookDelivery,
    WebhookResult,
    WorkflowExecution,
)

__all__ = [
    "APICircuitOpenError",
    "APIConnectionError",
    "APIResponseError",
    "APITimeoutError",
    "APIValidationError",
    "AuthenticationError",
    "BackendHealth",
    "Claim",
    "ConflictError",
    "ExecutionEvent",
    "ExecutionStatus",
    "ExecutionWebhook",
    "FileExecution",
    "FileStatus",
    "HeldLease",
    "InternalAPIClient",
    "InternalAPIError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "NotFoundError",
    "OrganizationRequiredError",
    "PreconditionFailedError",
    "RateLimitedError",
    "Record",
    "Resource",
    "ServerError",
    "WebhookDelivery",
    "WebhookError",
    "WebhookNotRecordedError",
    "WebhookResult",
    "WebhookURLRefusedError",
    "WorkflowExecution",
    "holding_lease",
]


M = TypeVar("M", bound=ResultModel)


class InternalAPIClient(WebhookCalls):
    """Client of the backend's internal API (``/internal/v1/``) for one task or block.

    Cheap to create: connections live in the process-wide pool, not in the instance. The
    organization for org-scoped calls is ``ORGANIZATION_ID`` unless changed with
    :meth:`set_organization_context` or overridden per call with ``organization_id=``.
    The operations on executions are defined in ``_execution_calls.py``, those on webhooks
    in ``_webhook_calls.py``, those of every declared resource (which both build on) in
    ``_resource.py``; the way a call reaches the backend in ``_pipeline.py``.
    """

    # --- declared resources ---------------------------------------------------------------
    @overload
    def resource(self, name: str, model: None = None) -> Resource[Record]: ...
    @overload
    def resource(self, name: str, model: type[M]) -> Resource[M]: ...
    def resource(self, name: str, model: type[ResultModel] | None = None) -> Resource[Any]:
        """The declared resource ``/internal/v1/<name>/`` (``get``, ``list``, ``create``,
        ``update``, ``delete``, ``forget``, ``batch``): ``model`` instances, or ``Record``
        dicts."""
        return Resource(self, name, model)

    # --- health and generic calls -----------------------------------------------------
    def health_check(self, *, timeout: float | None = None, retry: bool = True) -> BackendHealth:
        """``GET health/`` with the configured key (and organization, when one is set).

        ``retry=False`` makes exactly one attempt (for probes that must answer quickly);
        ``timeout`` bounds each attempt instead of ``API_TIMEOUT``.
        """
        data = self._call("GET", "health/", self._organization_id, timeout=timeout, retry=retry)
        return self._parse(BackendHealth, data, "GET", "health/")

    def get(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
        timeout: float | None = None,
    ) -> Any:
        """``GET`` an endpoint the client does not model; returns the decoded JSON body."""
        return self._call(
            "GET", _relative(path), self._org(organization_id), params=params, timeout=timeout
        )

    def post(
        self,
        path: str,
        json_body: Any = None,
        *,
        idempotency_key: str | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
        timeout: float | None = None,
    ) -> Any:
        """``POST`` JSON to an endpoint (one ``Idempotency-Key`` across its retries)."""
        return self._call(
            "POST",
            _relative(path),
            self._org(organization_id),
            json_body=json_body,
            idempotency_key=idempotency_key,
            timeout=timeout,
        )

    def patch(
        self,
        path: str,
        json_body: Any = None,
        *,
        organization_id: OrgArg = DEFAULT_ORG,
        timeout: float | None = None,
    ) -> Any:
        """``PATCH`` JSON to an endpoint; returns the decoded JSON body."""
        return self._call(
            "PATCH",
            _relative(path),
            self._org(organization_id),
            json_body=json_body,
            timeout=timeout,
        )

    def put(
        self,
        path: str,
        json_body: Any = None,
        *,
        organization_id: OrgArg = DEFAULT_ORG,
        timeout: float | None = None,
    ) -> Any:
        """``PUT`` JSON to an endpoint; returns the decoded JSON body."""
        return self._call(
            "PUT", _relative(path), self._org(organization_id), json_body=json_body, timeout=timeout
        )

    def delete(
        self, path: str, *, organization_id: OrgArg = DEFAULT_ORG, timeout: float | None = None
    ) -> Any:
        """``DELETE`` an endpoint; returns the decoded JSON body (``None`` for 204, and for a
        404 after an attempt whose answer was lost)."""
        return self._call("DELETE", _relative(path), self._org(organization_id), timeout=timeout)


def _relative(path: str) -> str:
    # Never let a caller point the bearer key at another host.
    text = str(path)
    if "://" in text or text.startswith("//"):
        raise ValueError(f"path must be relative to the internal API, got {text!r}")
    return text.lstrip("/")
