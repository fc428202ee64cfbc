"""The workflow-execution operations of
:class:`~backend.workers.shared.api_client.InternalAPIClient`: reading, listing, creating,
updating and deleting executions (the declared resource ``workflow-executions``, through
:class:`~._resource.Resource`), and their lifecycle under a lease (claim, heartbeat, release,
finish, events).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, Unpack

from ._client_base import DEFAULT_ORG, DEFAULT_PAGE_SIZE, CallOptions, ClientBase, OrgArg, seg
from ._fencing import check_epoch, lease_of, note_final
from ._resource import Resource
from .errors import APIResponseError
from .models import FINAL_STATUSES, Claim, ExecutionEvent, Lease, WorkflowExecution

# The resource's operations (and id) as this class's methods name them (in their errors).
_LABELS: Final = {
    "id": "execution_id",
    "get": "get_workflow_execution",
    "list": "list_workflow_executions",
    "create": "create_workflow_execution",
    "update": "update_workflow_execution",
    "delete": "delete_workflow_execution",
}


class ExecutionCalls(ClientBase):
    """The client's calls about workflow executions (``workflow-executions/``)."""

    @property
    def _executions(self) -> Resource[WorkflowExecution]:
        """The ``workflow-executions`` resource, its operations named as this class's."""
        return Resource(self, "workflow-executions", WorkflowExecution, labels=_LABELS)

    # --- workflow executions ----------------------------------------------------------
    def get_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = DEFAULT_ORG
    ) -> WorkflowExecution:
        """Read one execution; :class:`NotFoundError` when unknown or another org's. A copy
        read before is revalidated (``If-None-Match``): a 304 answers from it."""
        return self._executions.get(execution_id, organization_id=organization_id)

    def list_workflow_executions(
        self,
        status: str | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> Iterator[WorkflowExecution]:
        """Executions newest first, fetched page by page as the iterator is consumed.

        ``limit`` caps how many are yielded in total (``None``: all of them); ``page_size``
        (1-500) is how many each request asks for. Arguments and the organization are checked
        now, before anything is sent.
        """
        return self._executions.list(
            limit,
            page_size=page_size,
            organization_id=organization_id,
            status=status or None,
            workflow_id=workflow_id or None,
        )

    def create_workflow_execution(
        self,
        workflow_id: str,
        *,
        webhook_url: str | None = None,
        dispatch: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
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
        return self._executions.create(
            idempotency_key=idempotency_key, organization_id=organization_id, **body
        )

    def update_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = DEFAULT_ORG, **fields: Any
    ) -> WorkflowExecution:
        """Update non-status fields (``result``, file counts, ``task_id``) of an execution;
        under its lease (:func:`holding_lease`) the write carries the lease's epoch. With
        ``if_match=`` (an ``etag``), only while it is still that version
        (:class:`PreconditionFailedError` otherwise, nothing changed)."""
        return self._executions.update(execution_id, organization_id=organization_id, **fields)

    def update_workflow_execution_status(
        self,
        execution_id: str,
        status: str,
        error_message: str | None = None,
        *,
        organization_id: OrgArg = DEFAULT_ORG,
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
        lease = lease_of(execution_id)
        data = self._lifecycle_post(
            execution_id,
            "status",
            organization_id,
            operation,
            json_body=body,
            lease=lease,
            keyed=lease is None,  # under a lease a write is idempotent by itself
        )
        execution: WorkflowExecution = self._parse(
            WorkflowExecution, data, "POST", "workflow-executions/{id}/status/"
        )
        note_final(execution)
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
        organization_id: OrgArg = DEFAULT_ORG,
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
        data = self._lifecycle_post(
            execution_id,
            "claim",
            organization_id,
            "claim_execution",
            json_body=body,
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
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> Lease:
        """Extend the lease of ``epoch`` (by ``lease_seconds``, default the claimed length);
        :class:`LeaseLostError` when that lease is no longer the execution's live one.

        ``timeout`` bounds each attempt and ``deadline`` the whole call with its retries
        (default ``API_TIMEOUT`` and ``API_DEADLINE``): a heartbeat must not outlast the
        lease it extends (``ExecutionTask`` gives it a sixth and a third of the lease).
        """
        body: dict[str, Any] = {"epoch": check_epoch(epoch)}
        if lease_seconds is not None:
            body["lease_seconds"] = _check_lease_seconds(lease_seconds)
        data = self._lifecycle_post(
            execution_id,
            "heartbeat",
            organization_id,
            "heartbeat_execution",
            json_body=body,
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
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> WorkflowExecution:
        """Give the lease of ``epoch`` back: the execution returns to ``QUEUED``, and the
        backend's dispatch timeout counts from ``retry_in`` seconds from now (the task's
        own re-queue countdown). :class:`LeaseLostError` when the lease is already gone."""
        body: dict[str, Any] = {"epoch": check_epoch(epoch)}
        if retry_in is not None:
            if (
                isinstance(retry_in, bool)
                or not isinstance(retry_in, int | float)
                or not 0 <= retry_in <= 86400
            ):
                raise ValueError(f"retry_in must be from 0 to 86400 seconds, got {retry_in!r}")
            body["retry_in"] = round(float(retry_in), 3)
        data = self._lifecycle_post(
            execution_id, "release", organization_id, "release_execution", json_body=body
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
        organization_id: OrgArg = DEFAULT_ORG,
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
        self, execution_id: str, *, organization_id: OrgArg = DEFAULT_ORG
    ) -> list[ExecutionEvent]:
        """The execution's status changes, oldest first."""
        path = "workflow-executions/{id}/events/"
        data = self._org_call(
            "GET",
            f"workflow-executions/{seg(execution_id, 'execution_id')}/events/",
            organization_id,
            "list_execution_events",
            endpoint=path,
        )
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise APIResponseError("events answer has no 'results' list", method="GET", path=path)
        return [self._parse(ExecutionEvent, item, "GET", path) for item in data["results"]]

    def delete_workflow_execution(
        self, execution_id: str, *, organization_id: OrgArg = DEFAULT_ORG
    ) -> None:
        """Delete an execution. A 404 after an attempt whose answer was lost counts as
        deleted (that attempt did it); otherwise :class:`NotFoundError`."""
        self._executions.delete(execution_id, organization_id=organization_id)

    def _lifecycle_post(
        self,
        execution_id: str,
        action: str,
        organization_id: OrgArg,
        operation: str,
        **options: Unpack[CallOptions],
    ) -> Any:
        """``POST workflow-executions/{id}/<action>/``, a lifecycle write; once it is
        applied, the copy of the execution the conditional-GET cache kept is dropped: it is
        no longer current, and the answer carries no ``ETag`` to keep in its place."""
        path = f"workflow-executions/{seg(execution_id, 'execution_id')}/{action}/"
        org = self._require_org(organization_id, operation)
        options["endpoint"] = f"workflow-executions/{{id}}/{action}/"
        data = self._call("POST", path, org, **options)
        self._executions.forget(execution_id, organization_id=org)
        return data


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not value.strip():
        raise ValueError(f"{what} must be a non-blank string of 1 to 255 characters")
    return value


def _check_lease_seconds(seconds: int) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise ValueError(f"lease_seconds must be a positive integer, got {seconds!r}")
    return seconds
