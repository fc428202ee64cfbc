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
``list_webhook_deliveries``, ``health_check``, and ``get`` / ``post`` / ``patch`` / ``put`` /
``delete`` for endpoints not modelled here. Results are ``WorkflowExecution``, ``Claim``,
``Lease``, ``ExecutionEvent``, ``WebhookDelivery``, ``BackendHealth`` (pydantic models that
keep unknown fields in ``model_extra``) and ``WebhookResult``, defined in ``models.py``.

Fencing: inside :func:`holding_lease` (``ExecutionTask`` enters it for the execution it
claimed) the writes about that execution (status, ``PATCH``, webhook record) carry
``X-Lease-Epoch``, so the backend refuses them with ``lease_lost`` once another worker holds
the execution. The lease lives in a context variable: never on the client, never shared.

Exceptions (defined in ``errors.py``; every class is importable from this module)::

    InternalAPIError                 any failed call; status, error_code, detail, request_id,
    |                                method, path, retry_after; .transient
    +-- OrganizationRequiredError    org-scoped call with no organization (nothing sent)
    |                                (also a ValueError)
    +-- AuthenticationError          401, 403
    +-- NotFoundError                404 (also another organization's object)
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

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from pydantic import ValidationError

from . import _http, _metrics, _redact
from ._resilience import check_number
from ._retry_after import parse_retry_after
from .config import WorkerConfig
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
    RateLimitedError,
    ServerError,
    WebhookError,
    WebhookNotRecordedError,
    WebhookURLRefusedError,
    one_line,
)
from .models import (
    FINAL_STATUSES,
    BackendHealth,
    Claim,
    ExecutionEvent,
    ExecutionStatus,
    ExecutionWebhook,
    Lease,
    WebhookDelivery,
    WebhookResult,
    WorkflowExecution,
    _Result,
)
from .retry_utils import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    RetryBudget,
    RetryPolicy,
    get_breaker,
)

if TYPE_CHECKING:
    import httpx2

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
    "HeldLease",
    "InternalAPIClient",
    "InternalAPIError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "NotFoundError",
    "OrganizationRequiredError",
    "RateLimitedError",
    "ServerError",
    "WebhookDelivery",
    "WebhookError",
    "WebhookNotRecordedError",
    "WebhookResult",
    "WebhookURLRefusedError",
    "WorkflowExecution",
    "holding_lease",
]

logger = logging.getLogger(__name__)

#: Page size used when iterating a list endpoint (the backend allows up to 500).
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
#: Characters of an unusable response body quoted in an ``APIResponseError``.
BODY_EXCERPT = 200
_RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
_IN_FLIGHT_CODE = "idempotency_in_flight"
_NO_ANSWER: Final = frozenset({"timeout", "connection_error"})  # _reason() of a lost answer
#: Longest ``X-Request-ID`` taken from the bound context.
MAX_REQUEST_ID = 200
_UNSAFE_ID_CHARS = re.compile(r"[^\x21-\x7e]")
_ID_SEGMENT = re.compile(r"^(?:[0-9a-fA-F-]{32,36}|\d+)$")
_WEBHOOK_ID = re.compile(r"msg_[0-9a-f]{32}")
#: Largest lease epoch the backend accepts in ``X-Lease-Epoch``.
MAX_EPOCH = 2**31


@dataclass
class HeldLease:
    """The lease a task holds, in a context variable (see :func:`holding_lease`).

    ``finished`` is the execution as a write under this lease left it in a final status
    (``None`` while the task has not finished it). ``lost`` is set once the backend said the
    lease is gone (a heartbeat refused with ``lease_lost``): from then on a write under it
    raises :class:`LeaseLostError` without being sent.
    """

    execution_id: str
    epoch: int
    finished: WorkflowExecution | None = None
    lost: bool = False


_held_lease: ContextVar[HeldLease | None] = ContextVar("held_lease", default=None)


@contextlib.contextmanager
def holding_lease(execution_id: str, epoch: int) -> Iterator[HeldLease]:
    """While inside, this context's writes about ``execution_id`` carry ``X-Lease-Epoch``.

    Context-local (threads and asyncio tasks do not see each other's lease); nested blocks
    restore the outer lease on exit. A thread started inside sees it only when it runs in a
    copy of this context (``contextvars.copy_context().run``, one copy per thread).
    """
    held = HeldLease(str(execution_id), _check_epoch(epoch))
    token = _held_lease.set(held)
    try:
        yield held
    finally:
        _held_lease.reset(token)


def _lease_of(execution_id: str | None) -> HeldLease | None:
    held = _held_lease.get()
    if held is None or execution_id is None or held.execution_id != str(execution_id):
        return None
    return held


def _note_final(execution: WorkflowExecution) -> None:
    held = _lease_of(execution.id)
    if held is not None and execution.is_final:
        held.finished = execution


class _Unset:
    def __repr__(self) -> str:
        return "<default organization>"


_DEFAULT_ORG: Final = _Unset()
OrgArg = str | None | _Unset

# Per-process state: the retry budget of backend calls (one per process: a worker has one
# configuration; distinct budget settings get distinct budgets) and the retry policies built
# from configurations. Both are forgotten in a forked child, which builds its own.
_budgets: dict[tuple[float, float], RetryBudget] = {}
_policies: dict[tuple[Any, ...], RetryPolicy] = {}


def _retry_budget(config: WorkerConfig) -> RetryBudget:
    key = (config.api_retry_budget_ratio, config.api_retry_budget_min_per_second)
    budget = _budgets.get(key)
    if budget is None:
        budget = _budgets.setdefault(key, RetryBudget(ratio=key[0], min_per_second=key[1]))
    return budget


def _forget_after_fork() -> None:
    _budgets.clear()
    _policies.clear()


# The policy hands these only InternalAPIErrors (its ``exceptions``), and never an open
# breaker (retry_utils does not retry CircuitBreakerOpenError).
def _should_retry_write(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError | APITimeoutError | RateLimitedError):
        return True
    if isinstance(exc, ServerError):
        return exc.status in _RETRYABLE_STATUSES
    return isinstance(exc, ConflictError) and exc.error_code == _IN_FLIGHT_CODE


def _should_retry_read(exc: BaseException) -> bool:
    return _should_retry_write(exc) or (isinstance(exc, ServerError) and exc.status == 500)


def _is_breaker_failure(exc: BaseException) -> bool:
    # Only a sign that the backend (or the way to it) is unwell counts: no answer, or a 5xx,
    # 408 or 429. Another 4xx, an unusable body or a bug on our side is not its failure.
    if isinstance(exc, APIConnectionError | APITimeoutError):  # 408 included
        return True
    status = exc.status if isinstance(exc, InternalAPIError) else None
    return status is not None and (status >= 500 or status == 429)


def _backend_breaker(config: WorkerConfig) -> CircuitBreaker:
    _metrics.subscribe_resilience()  # breaker states and retries in /metrics (idempotent)
    return get_breaker(
        f"internal-api {_redact.redact_url(config.internal_api_base_url)}",
        failure_threshold=config.circuit_breaker_failure_threshold,
        recovery_timeout=config.circuit_breaker_recovery_timeout,
        initial_recovery_timeout=config.circuit_breaker_initial_recovery_timeout,
        is_failure=_is_breaker_failure,
        redis_url=config.circuit_breaker_redis_url,
    )


def _header_value(name: str, value: str) -> str:
    # httpx2 sends header values as ASCII; say which setting is wrong instead of failing each
    # call with a UnicodeEncodeError (or a protocol error for a line break).
    text = str(value)
    if not text.strip() or not text.isascii() or not text.isprintable():
        raise ValueError(f"{name} must be non-empty printable ASCII, got {text!r}")
    return text


def _endpoint_template(path: str) -> str:
    # Bounded metric labels: ids in a path become {id}.
    return "/".join("{id}" if _ID_SEGMENT.match(p) else p for p in path.split("/"))


@dataclass
class _Call:
    """One logical call: what every attempt sends, and what attempts have happened."""

    method: str
    path: str
    endpoint: str
    headers: dict[str, str]
    params: dict[str, Any] | None
    body: bytes | None
    timeout: float
    deadline: float
    attempts: int = 0
    last_failure: str | None = None


class InternalAPIClient:
    """Client of the backend's internal API (``/internal/v1/``) for one task or block.

    Cheap to create: connections live in the process-wide pool, not in the instance. The
    organization for org-scoped calls is ``ORGANIZATION_ID`` unless changed with
    :meth:`set_organization_context` or overridden per call with ``organization_id=``.
    """

    def __init__(self, config: WorkerConfig, *, organization_id: str | None = None) -> None:
        self.config = config
        self.base_url = config.internal_api_base_url + "/"
        self._organization_id = organization_id or config.organization_id
        self._user_agent = _header_value(
            "WORKER_NAME/WORKER_VERSION", f"{config.worker_name}/{config.worker_version}"
        )
        if self._organization_id is not None:
            _header_value("organization_id", self._organization_id)
        self._closed = False
        # Resolved once: a second client of the same backend URL with other breaker settings
        # fails here, not in the middle of a call.
        self._breaker = _backend_breaker(config)

    # --- lifecycle and context --------------------------------------------------------
    def __enter__(self) -> InternalAPIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End this client's use; the process-wide connection pool stays open for others."""
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"InternalAPIClient(base_url={self.base_url!r}, "
            f"organization_id={self._organization_id!r})"
        )

    @property
    def organization_id(self) -> str | None:
        """The organization org-scoped calls use when no ``organization_id=`` is given."""
        return self._organization_id

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of this client's backend URL (shared by the whole process)."""
        return self._breaker

    def set_organization_context(self, organization_id: str | None) -> None:
        """Use ``organization_id`` for this client's org-scoped calls (``None`` clears it)."""
        if organization_id is not None:
            _header_value("organization_id", organization_id)
        self._organization_id = organization_id

    # --- workflow executions ----------------------------------------------------------
    def get_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = _DEFAULT_ORG
    ) -> WorkflowExecution:
        """Read one execution; :class:`NotFoundError` when unknown or another org's."""
        data = self._org_call(
            "GET",
            f"workflow-executions/{_seg(execution_id)}/",
            organization_id,
            "get_workflow_execution",
            endpoint="workflow-executions/{id}/",
        )
        return self._parse(WorkflowExecution, data, "GET", "workflow-executions/{id}/")

    def list_workflow_executions(
        self,
        status: str | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> Iterator[WorkflowExecution]:
        """Executions newest first, fetched page by page as the iterator is consumed.

        ``limit`` caps how many are yielded in total (``None``: all of them); ``page_size``
        (1-500) is how many each request asks for. Arguments and the organization are checked
        now, before anything is sent.
        """
        org = self._require_org(organization_id, "list_workflow_executions")
        params = {k: v for k, v in (("status", status), ("workflow_id", workflow_id)) if v}
        return self._paginate(
            "workflow-executions/", params, WorkflowExecution, limit, page_size, org
        )

    def create_workflow_execution(
        self,
        workflow_id: str,
        *,
        webhook_url: str | None = None,
        dispatch: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        organization_id: OrgArg = _DEFAULT_ORG,
        **fields: Any,
    ) -> WorkflowExecution:
        """Create an execution (``pipeline_id``, ``total_files``, ``task_id`` optional).

        ``webhook_url`` makes a completion webhook due when it ends. ``dispatch``
        (``{"task": name, "queue": queue}``, queue optional) has the backend send that Celery
        task for it (args ``[id]``, kwargs ``{"organization_id": ...}``) and move it to
        ``QUEUED``; the backend sends it again if no worker claims it in time. Retries reuse
        one ``Idempotency-Key`` (``idempotency_key``, or a fresh one), so a retried create
        makes one execution.
        """
        body: dict[str, Any] = {"workflow_id": workflow_id, **fields}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        if dispatch is not None:
            if not isinstance(dispatch, dict) or not isinstance(dispatch.get("task"), str):
                raise ValueError('dispatch must be {"task": "<celery task name>", "queue": ...}')
            body["dispatch"] = dispatch
        data = self._org_call(
            "POST",
            "workflow-executions/",
            organization_id,
            "create_workflow_execution",
            json_body=body,
            idempotency_key=idempotency_key,
        )
        return self._parse(WorkflowExecution, data, "POST", "workflow-executions/")

    def update_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = _DEFAULT_ORG, **fields: Any
    ) -> WorkflowExecution:
        """Update non-status fields (``result``, file counts, ``task_id``) of an execution."""
        if not fields:
            raise ValueError("update_workflow_execution needs at least one field to update")
        data = self._org_call(
            "PATCH",
            f"workflow-executions/{_seg(execution_id)}/",
            organization_id,
            "update_workflow_execution",
            json_body=fields,
            endpoint="workflow-executions/{id}/",
            lease=_lease_of(execution_id),
        )
        return self._parse(WorkflowExecution, data, "PATCH", "workflow-executions/{id}/")

    def update_workflow_execution_status(
        self,
        execution_id: str,
        status: str,
        error_message: str | None = None,
        *,
        organization_id: OrgArg = _DEFAULT_ORG,
        **fields: Any,
    ) -> WorkflowExecution:
        """Move an execution to ``status`` (``attempts``, ``execution_time`` optional).

        Setting the status it already has is a no-op; leaving a final status is a
        :class:`ConflictError` (``illegal_transition``).
        """
        body: dict[str, Any] = {"status": str(status), **fields}
        if error_message is not None:
            body["error_message"] = error_message
        return self._post_status(
            execution_id, body, organization_id, "update_workflow_execution_status"
        )

    def _post_status(
        self, execution_id: str, body: dict[str, Any], organization_id: OrgArg, operation: str
    ) -> WorkflowExecution:
        lease = _lease_of(execution_id)
        data = self._org_call(
            "POST",
            f"workflow-executions/{_seg(execution_id)}/status/",
            organization_id,
            operation,
            json_body=body,
            endpoint="workflow-executions/{id}/status/",
            lease=lease,
            keyed=lease is None,  # under a lease a write is idempotent by itself
        )
        execution: WorkflowExecution = self._parse(
            WorkflowExecution, data, "POST", "workflow-executions/{id}/status/"
        )
        _note_final(execution)
        return execution

    # --- the execution lifecycle: claim, heartbeat, release, finish, events -----------
    def claim_execution(
        self,
        execution_id: str,
        *,
        worker: str,
        lease_seconds: int,
        task: str | None = None,
        queue: str | None = None,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> Claim:
        """Claim the execution for ``worker`` with a lease of ``lease_seconds``.

        ``PENDING``/``QUEUED`` (or ``IN_PROGRESS`` whose lease ran out) becomes
        ``IN_PROGRESS`` under a new epoch; a final execution whose webhook is due is handed
        out for the webhook only (its status unchanged). ``task`` and ``queue`` let the
        backend send the task again should this worker lose it. A live lease of another is
        :class:`LeaseHeldError`; a final execution with nothing due a :class:`ConflictError`
        (``illegal_transition``).
        """
        _check_lease_seconds(lease_seconds)
        body: dict[str, Any] = {
            "worker": _check_name("worker", worker),
            "lease_seconds": lease_seconds,
        }
        if task is not None:
            body["dispatch"] = {"task": _check_name("task", task)}
            if queue is not None:
                body["dispatch"]["queue"] = _check_name("queue", queue)
        data = self._org_call(
            "POST",
            f"workflow-executions/{_seg(execution_id)}/claim/",
            organization_id,
            "claim_execution",
            json_body=body,
            endpoint="workflow-executions/{id}/claim/",
            keyed=False,  # a claim retried by its worker gets its own lease back
        )
        claim: Claim = self._parse(Claim, data, "POST", "workflow-executions/{id}/claim/")
        return claim

    def heartbeat_execution(
        self,
        execution_id: str,
        epoch: int,
        *,
        lease_seconds: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> Lease:
        """Extend the lease of ``epoch`` (by ``lease_seconds``, default the claimed length);
        :class:`LeaseLostError` when that lease is no longer the execution's live one.

        ``timeout`` bounds each attempt and ``deadline`` the whole call with its retries
        (default ``API_TIMEOUT`` and ``API_DEADLINE``): a heartbeat must not outlast the
        lease it extends (``ExecutionTask`` gives it a sixth and a third of the lease).
        """
        body: dict[str, Any] = {"epoch": _check_epoch(epoch)}
        if lease_seconds is not None:
            body["lease_seconds"] = _check_lease_seconds(lease_seconds)
        data = self._org_call(
            "POST",
            f"workflow-executions/{_seg(execution_id)}/heartbeat/",
            organization_id,
            "heartbeat_execution",
            json_body=body,
            endpoint="workflow-executions/{id}/heartbeat/",
            timeout=timeout,
            deadline=deadline,
        )
        lease = data.get("lease") if isinstance(data, dict) else None
        parsed: Lease = self._parse(Lease, lease, "POST", "workflow-executions/{id}/heartbeat/")
        return parsed

    def release_execution(
        self,
        execution_id: str,
        epoch: int,
        retry_in: float | None = None,
        *,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> WorkflowExecution:
        """Give the lease of ``epoch`` back: the execution returns to ``QUEUED``, and the
        backend's dispatch timeout counts from ``retry_in`` seconds from now (the task's
        own re-queue countdown). :class:`LeaseLostError` when the lease is already gone."""
        body: dict[str, Any] = {"epoch": _check_epoch(epoch)}
        if retry_in is not None:
            if (
                isinstance(retry_in, bool)
                or not isinstance(retry_in, int | float)
                or not 0 <= retry_in <= 86400
            ):
                raise ValueError(f"retry_in must be from 0 to 86400 seconds, got {retry_in!r}")
            body["retry_in"] = round(float(retry_in), 3)
        data = self._org_call(
            "POST",
            f"workflow-executions/{_seg(execution_id)}/release/",
            organization_id,
            "release_execution",
            json_body=body,
            endpoint="workflow-executions/{id}/release/",
        )
        return self._parse(WorkflowExecution, data, "POST", "workflow-executions/{id}/release/")

    def finish_execution(
        self,
        execution_id: str,
        status: str,
        *,
        result: Any = None,
        error_message: str | None = None,
        total_files: int | None = None,
        successful_files: int | None = None,
        failed_files: int | None = None,
        execution_time: float | None = None,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> WorkflowExecution:
        """End the execution in one call: the final ``status`` (``COMPLETED``, ``ERROR`` or
        ``STOPPED``) with its result and counts, applied atomically; the lease ends with it.

        The answer carries the webhook now due (``execution.webhook_due``), if any.
        """
        if str(status) not in FINAL_STATUSES:
            raise ValueError(
                f"finish_execution needs a final status (COMPLETED, ERROR, STOPPED), "
                f"got {status!r}"
            )
        body: dict[str, Any] = {"status": str(status)}
        optional = {
            "result": result,
            "error_message": error_message,
            "total_files": total_files,
            "successful_files": successful_files,
            "failed_files": failed_files,
            "execution_time": execution_time,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return self._post_status(execution_id, body, organization_id, "finish_execution")

    def list_execution_events(
        self, execution_id: str, *, organization_id: OrgArg = _DEFAULT_ORG
    ) -> list[ExecutionEvent]:
        """The execution's status changes, oldest first."""
        path = "workflow-executions/{id}/events/"
        data = self._org_call(
            "GET",
            f"workflow-executions/{_seg(execution_id)}/events/",
            organization_id,
            "list_execution_events",
            endpoint=path,
        )
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise APIResponseError("events answer has no 'results' list", method="GET", path=path)
        return [self._parse(ExecutionEvent, item, "GET", path) for item in data["results"]]

    def delete_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = _DEFAULT_ORG
    ) -> None:
        """Delete an execution. A 404 after an attempt whose answer was lost counts as
        deleted (that attempt did it); otherwise :class:`NotFoundError`."""
        self._org_call(
            "DELETE",
            f"workflow-executions/{_seg(execution_id)}/",
            organization_id,
            "delete_workflow_execution",
            endpoint="workflow-executions/{id}/",
        )

    # --- webhooks ---------------------------------------------------------------------
    def send_webhook(
        self,
        url: str,
        payload: Any,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        execution_id: str | None = None,
        *,
        webhook_id: str | None = None,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> WebhookResult:
        """POST ``payload`` as JSON to ``url`` from this worker, and record the delivery.

        The URL must pass the SSRF guard (:class:`WebhookURLRefusedError` otherwise, with
        nothing sent or recorded). A redirect the guard refuses (or one too many) is recorded
        as ``blocked`` and then raised as :class:`WebhookURLRefusedError`, its ``result``
        the recorded delivery. With ``execution_id``, the execution is read first (unless this
        context holds its lease: it exists), so an unknown one is a :class:`NotFoundError`
        with nothing sent. The body is signed per
        Standard Webhooks when ``WEBHOOK_SIGNING_SECRET`` is set; 5xx, 429, timeouts and
        connection failures are retried, a 410 (or another 4xx) stops. A receiver that keeps
        failing is reported in the result (``outcome="failed"``), not raised. When the
        webhook went out but the backend would not record it, :class:`WebhookNotRecordedError`
        says so (not transient: sending again would deliver twice).

        ``webhook_id`` (``msg_`` and 32 hex digits) is the id of a webhook the backend made
        due (``execution.webhook_due.id``): it is the ``webhook-id`` the receiver sees on
        every attempt, the record carries it (the backend keeps one ``delivered`` record per
        id), and the execution is not read first (the backend knows it).
        """
        from ._webhooks import check_headers, deliver, new_message_id

        if webhook_id is not None and not (
            isinstance(webhook_id, str) and _WEBHOOK_ID.fullmatch(webhook_id)
        ):
            raise ValueError(f"webhook_id must be msg_ and 32 hex digits, got {webhook_id!r}")

        org = self._require_org(organization_id, "send_webhook")
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise WebhookError(f"webhook payload is not JSON-serialisable: {exc}") from None
        if timeout is not None:
            check_number("timeout", timeout, minimum=0, strict=True)
        check_headers(headers or {})
        if execution_id is not None and webhook_id is None and _lease_of(execution_id) is None:
            # The backend refuses to record a delivery of an unknown execution: find out
            # before the webhook goes out, not after (a claimed one is known to exist).
            self.get_workflow_execution(execution_id, organization_id=org)
        message_id = webhook_id or new_message_id()
        secret = self.config.webhook_signing_secret
        extra_headers = {k.lower(): v for k, v in (headers or {}).items()}
        extra_headers.setdefault("user-agent", self._user_agent)
        if webhook_id is not None:  # signed or not, the receiver can deduplicate on it
            extra_headers["webhook-id"] = webhook_id
        report = deliver(
            url=url,
            body=body,
            headers=extra_headers,
            message_id=message_id,
            secret=secret.get_secret_value() if secret is not None else None,
            timeout=timeout or self.config.webhook_timeout,
            allowed_hosts=self.config.webhook_allowed_hosts,
            policy=self._webhook_policy(),
        )
        shown_url = _redact.redact_url(url)  # a password in the URL is neither recorded nor shown
        record = {
            "url": shown_url,
            "execution_id": execution_id,
            "status_code": report.status_code,
            "attempts": report.attempts,
            "duration": round(report.duration, 6),
            "outcome": report.outcome,
            "error_message": report.error or "",
        }
        if webhook_id is not None:
            record["webhook_id"] = webhook_id
        result = WebhookResult(
            delivery_id="",
            message_id=message_id,
            url=shown_url,
            outcome=report.outcome,
            status_code=report.status_code,
            attempts=report.attempts,
            duration=report.duration,
            error=report.error,
            response_body=report.response_body,
        )
        try:
            data = self._call(
                "POST",
                "webhook-deliveries/",
                org,
                json_body=record,
                # A due webhook may be delivered again (handed to another worker): the
                # backend keeps one delivered record per webhook_id, each record its own key.
                idempotency_key=uuid.uuid4().hex if webhook_id else message_id,
                lease=_lease_of(execution_id),
            )
            delivery = self._parse(WebhookDelivery, data, "POST", "webhook-deliveries/")
        except InternalAPIError as exc:
            raise WebhookNotRecordedError(result, record, exc) from exc
        recorded = replace(result, delivery_id=delivery.id)
        if report.refused is not None:  # a redirect refused: recorded as blocked, then raised
            report.refused.result = recorded
            raise report.refused
        return recorded

    def get_webhook_delivery(
        self, delivery_id: str, *, organization_id: OrgArg = _DEFAULT_ORG
    ) -> WebhookDelivery:
        """Read one recorded webhook delivery."""
        data = self._org_call(
            "GET",
            f"webhook-deliveries/{_seg(delivery_id)}/",
            organization_id,
            "get_webhook_delivery",
            endpoint="webhook-deliveries/{id}/",
        )
        return self._parse(WebhookDelivery, data, "GET", "webhook-deliveries/{id}/")

    def list_webhook_deliveries(
        self,
        execution_id: str | None = None,
        *,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        organization_id: OrgArg = _DEFAULT_ORG,
    ) -> Iterator[WebhookDelivery]:
        """Recorded deliveries newest first (of one execution when given), page by page."""
        org = self._require_org(organization_id, "list_webhook_deliveries")
        params = {"execution_id": execution_id} if execution_id else {}
        return self._paginate("webhook-deliveries/", params, WebhookDelivery, limit, page_size, org)

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
        organization_id: OrgArg = _DEFAULT_ORG,
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
        organization_id: OrgArg = _DEFAULT_ORG,
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
        organization_id: OrgArg = _DEFAULT_ORG,
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
        organization_id: OrgArg = _DEFAULT_ORG,
        timeout: float | None = None,
    ) -> Any:
        """``PUT`` JSON to an endpoint; returns the decoded JSON body."""
        return self._call(
            "PUT", _relative(path), self._org(organization_id), json_body=json_body, timeout=timeout
        )

    def delete(
        self, path: str, *, organization_id: OrgArg = _DEFAULT_ORG, timeout: float | None = None
    ) -> Any:
        """``DELETE`` an endpoint; returns the decoded JSON body (``None`` for 204, and for a
        404 after an attempt whose answer was lost)."""
        return self._call("DELETE", _relative(path), self._org(organization_id), timeout=timeout)

    # --- internals ----------------------------------------------------------------------
    def _org(self, organization_id: OrgArg) -> str | None:
        return self._organization_id if isinstance(organization_id, _Unset) else organization_id

    def _require_org(self, organization_id: OrgArg, operation: str) -> str:
        org = self._org(organization_id)
        if not org:
            raise OrganizationRequiredError(
                f"{operation} is organization-scoped but no organization is set: set "
                "ORGANIZATION_ID, call set_organization_context(), or pass organization_id="
            )
        return org

    def _org_call(
        self, method: str, path: str, organization_id: OrgArg, operation: str, **kwargs: Any
    ) -> Any:
        return self._call(method, path, self._require_org(organization_id, operation), **kwargs)

    def _paginate(
        self,
        path: str,
        params: dict[str, Any],
        model: type[_Result],
        limit: int | None,
        page_size: int,
        org: str,
    ) -> Iterator[Any]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0 or None")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")

        def pages() -> Iterator[Any]:
            remaining = limit
            cursor: str | None = None
            while remaining is None or remaining > 0:
                query = dict(params)
                query["limit"] = page_size if remaining is None else min(page_size, remaining)
                if cursor:
                    query["cursor"] = cursor
                data = self._call("GET", path, org, params=query)
                if not isinstance(data, dict) or not isinstance(data.get("results"), list):
                    raise APIResponseError(
                        "list answer has no 'results' list", method="GET", path=path
                    )
                for item in data["results"]:
                    yield self._parse(model, item, "GET", path)
                    if remaining is not None:
                        remaining -= 1
                        if remaining == 0:
                            return
                following = data.get("next_cursor")
                if not following:
                    return
                if not isinstance(following, str) or following == cursor:
                    # A cursor that does not move would make this iterator endless.
                    raise APIResponseError(
                        f"list answer has an unusable next_cursor {str(following)[:80]!r}",
                        method="GET",
                        path=path,
                    )
                cursor = following

        return pages()

    def _parse(self, model: type[Any], data: Any, method: str, path: str) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors()[:3]
            )
            raise APIResponseError(
                f"response is not a valid {model.__name__} ({problems})",
                method=method,
                path=path,
            ) from None

    def _call(
        self,
        method: str,
        path: str,
        organization_id: str | None,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        retry: bool = True,
        endpoint: str | None = None,
        lease: HeldLease | None = None,
        keyed: bool = True,
    ) -> Any:
        if self._closed:
            raise RuntimeError("this InternalAPIClient is closed; open a new one")
        if timeout is not None:
            check_number("timeout", timeout, minimum=0, strict=True)
        if deadline is not None:
            check_number("deadline", deadline, minimum=0, strict=True)
        if lease is not None and lease.lost:
            raise LeaseLostError(
                f"the lease of epoch {lease.epoch} is lost (a heartbeat was refused); not sent",
                error_code="lease_lost",
                method=method,
                path=path,
            )
        config = self.config
        deadline = deadline or config.api_deadline
        headers = {
            "authorization": f"Bearer {config.api_key()}",
            "user-agent": self._user_agent,
            "accept": "application/json",
            "x-request-id": _request_id(),
        }
        if organization_id:
            headers["x-organization-id"] = _header_value("organization_id", organization_id)
        if lease is not None:
            headers["x-lease-epoch"] = str(lease.epoch)
        body: bytes | None = None
        if json_body is not None or method in ("POST", "PUT", "PATCH"):
            # NaN and infinities are not JSON: refused here, not by the backend.
            body = json.dumps(json_body, separators=(",", ":"), allow_nan=False).encode()
            headers["content-type"] = "application/json"
        if method == "POST" and (keyed or idempotency_key is not None):
            key = idempotency_key or uuid.uuid4().hex
            if len(key) > 255:
                raise ValueError("idempotency_key must be at most 255 characters")
            headers["idempotency-key"] = _header_value("idempotency_key", key)
        call = _Call(
            method=method,
            path=path,
            endpoint=endpoint or _endpoint_template(path),
            headers=headers,
            params=params,
            body=body,
            timeout=timeout or config.api_timeout,
            deadline=time.monotonic() + deadline,
        )
        breaker = self._breaker

        def attempt() -> Any:
            # Everything up to the bytes on the wire happens outside the breaker: only what
            # the backend (or the network to it) does may count as its failure.
            remaining = call.deadline - time.monotonic()
            if remaining <= 0:
                raise APITimeoutError(
                    f"deadline of {deadline:g}s passed",
                    method=method,
                    path=path,
                    request_id=call.headers["x-request-id"],
                )
            pool = _http.get_pool(
                self.base_url,
                max_connections=config.api_max_connections,
                max_keepalive=config.api_max_keepalive_connections,
            )
            limit = min(call.timeout, remaining)
            request = pool.build_request(
                method, path, params=params, content=body, headers=headers, timeout=limit
            )
            try:
                return breaker.call(self._send, pool, request, call, limit)
            except CircuitBreakerOpenError as exc:
                raise APICircuitOpenError(
                    exc.breaker_name,
                    exc.retry_after,
                    method=method,
                    path=path,
                    request_id=headers["x-request-id"],
                ) from None

        attempt.__qualname__ = f"InternalAPIClient {method} {call.endpoint}"
        if not retry:
            return attempt()
        return self._policy(method, deadline).call(attempt)

    def _send(self, pool: httpx2.Client, request: httpx2.Request, call: _Call, limit: float) -> Any:
        import httpx2

        call.attempts += 1
        if call.attempts > 1 and call.last_failure:
            _metrics.api_retry(call.method, call.endpoint, call.last_failure)
        request_id = call.headers["x-request-id"]
        started = time.perf_counter()
        status: int | str
        try:
            response = pool.send(request)
        except httpx2.TimeoutException as exc:
            status = "timeout"
            error: InternalAPIError = APITimeoutError(
                f"no answer within {limit:.3g}s ({type(exc).__name__})",
                method=call.method,
                path=call.path,
                request_id=request_id,
            )
        except httpx2.TransportError as exc:
            status = "connection_error"
            error = APIConnectionError(
                f"cannot reach {pool.base_url.host}:{pool.base_url.port} "
                f"({type(exc).__name__}: {one_line(str(exc), 120)})",
                method=call.method,
                path=call.path,
                request_id=request_id,
            )
        except httpx2.DecodingError as exc:
            status = "bad_response"
            error = APIResponseError(
                f"body cannot be decoded ({one_line(str(exc), 120)})",
                method=call.method,
                path=call.path,
                request_id=request_id,
            )
        else:
            status = response.status_code
            seconds = time.perf_counter() - started
            result = self._result_of(response, call)
            self._record(call, status, seconds, None if isinstance(result, _Ok) else result)
            if isinstance(result, _Ok):
                return result.value
            call.last_failure = _reason(result)
            raise result
        self._record(call, status, time.perf_counter() - started, error)
        call.last_failure = _reason(error)
        raise error

    def _result_of(self, response: httpx2.Response, call: _Call) -> _Ok | InternalAPIError:
        status = response.status_code
        request_id = call.headers["x-request-id"]
        raw = response.content
        if status == 404 and call.method == "DELETE" and call.last_failure in _NO_ANSWER:
            # The attempt whose answer was lost deleted it: gone is what was asked.
            return _Ok(None)
        if 200 <= status < 300:
            if status == 204 or not raw:
                return _Ok(None)
            try:
                return _Ok(json.loads(raw))
            except (ValueError, RecursionError):
                return APIResponseError(
                    f"body is not JSON: {self._excerpt(raw)}",
                    status=status,
                    method=call.method,
                    path=call.path,
                    request_id=request_id,
                )
        code, detail = _error_body(raw)
        if detail is None:
            detail = f"HTTP {status} {response.reason_phrase}; body {self._excerpt(raw)}"
        kind = _ERROR_BY_CODE.get(code) if status == 409 else None
        kind = kind or _ERROR_BY_STATUS.get(status)
        if kind is None:
            kind = ServerError if status >= 500 else APIResponseError
        return kind(
            detail,
            status=status,
            error_code=code,
            request_id=request_id,
            method=call.method,
            path=call.path,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    def _excerpt(self, body: bytes) -> str:
        # one_line() scrubs secrets before it cuts: no part of one is left at the cut.
        return repr(one_line(body.decode("utf-8", errors="replace"), BODY_EXCERPT))

    def _record(
        self, call: _Call, status: int | str, seconds: float, error: InternalAPIError | None
    ) -> None:
        _metrics.api_request(call.method, call.endpoint, status, seconds)
        fields = {
            "method": call.method,
            "path": call.path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "attempt": call.attempts,
            "request_id": call.headers["x-request-id"],
        }
        # The failure of a call is raised to its caller, whose concern it is to report it
        # (or the retry engine's, which announces each retry): INFO here, never louder.
        if error is None:
            logger.debug("internal API call", extra=fields)
        else:
            logger.info("internal API call failed: %s", error, extra=fields)

    def _policy(self, method: str, deadline: float) -> RetryPolicy:
        config = self.config
        key = (
            "api",
            method == "GET",
            config.api_retry_attempts,
            config.api_retry_base_delay,
            config.api_retry_max_delay,
            deadline,
            config.api_retry_budget_ratio,
            config.api_retry_budget_min_per_second,
        )
        policy = _policies.get(key)
        if policy is None:
            policy = RetryPolicy(
                max_attempts=config.api_retry_attempts + 1,
                base_delay=config.api_retry_base_delay,
                max_delay=config.api_retry_max_delay,
                backoff="exponential",
                jitter=True,
                exceptions=(InternalAPIError,),
                retry_if=_should_retry_read if method == "GET" else _should_retry_write,
                budget=_retry_budget(config),
                deadline=deadline,
            )
            _policies[key] = policy
        return policy

    def _webhook_policy(self) -> RetryPolicy:
        from ._webhooks import AttemptFailed

        config = self.config
        key = (
            "webhook",
            config.api_retry_attempts,
            config.api_retry_base_delay,
            config.api_retry_max_delay,
            config.api_deadline,
        )
        policy = _policies.get(key)
        if policy is None:
            policy = RetryPolicy(
                max_attempts=config.api_retry_attempts + 1,
                base_delay=config.api_retry_base_delay,
                max_delay=config.api_retry_max_delay,
                backoff="exponential",
                jitter=True,
                exceptions=(AttemptFailed,),
                retry_if=lambda exc: bool(getattr(exc, "transient", False)),
                deadline=config.api_deadline,
            )
            _policies[key] = policy
        return policy


@dataclass(frozen=True)
class _Ok:
    value: Any


_ERROR_BY_STATUS: dict[int, type[InternalAPIError]] = {
    400: APIValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    408: APITimeoutError,
    409: ConflictError,
    422: APIValidationError,
    429: RateLimitedError,
}


_ERROR_BY_CODE: dict[str | None, type[InternalAPIError]] = {
    "lease_lost": LeaseLostError,
    "lease_held": LeaseHeldError,
}


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an integer from 1 to {MAX_EPOCH}, got {epoch!r}")
    return epoch


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not value.strip():
        raise ValueError(f"{what} must be a non-blank string of 1 to 255 characters")
    return value


def _check_lease_seconds(seconds: int) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise ValueError(f"lease_seconds must be a positive integer, got {seconds!r}")
    return seconds


def _reason(error: InternalAPIError) -> str:
    if isinstance(error, APITimeoutError):
        return "timeout"
    if isinstance(error, APIConnectionError):
        return "connection_error"
    return str(error.status) if error.status is not None else type(error).__name__


def _error_body(raw: bytes) -> tuple[str | None, str | None]:
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("error")
    detail = data.get("detail")
    return (str(code) if code is not None else None, str(detail) if detail is not None else None)


def _seg(value: str) -> str:
    text = str(value)
    if not text.strip():
        raise ValueError("an id must be a non-empty string")
    return quote(text, safe="")


def _relative(path: str) -> str:
    # Never let a caller point the bearer key at another host.
    text = str(path)
    if "://" in text or text.startswith("//"):
        raise ValueError(f"path must be relative to the internal API, got {text!r}")
    return text.lstrip("/")


def _request_id() -> str:
    from .logging_utils import current_context

    context = current_context()
    for name in ("request_id", "task_id", "execution_id"):
        value = context.get(name)
        if value:
            # A header value: visible ASCII only, bounded (a bound id may hold anything).
            return _UNSAFE_ID_CHARS.sub("_", str(value))[:MAX_REQUEST_ID]
    return uuid.uuid4().hex


os.register_at_fork(after_in_child=_forget_after_fork)
