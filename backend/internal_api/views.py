"""Views of ``/internal/v1/``: health, the lifecycle of workflow executions (status, claim,
heartbeat, release, events), and the declared resources (``resources``): workflow executions'
plain CRUD, webhook deliveries and file executions.

Authentication, the body limit, request ids and idempotency are middleware (see
``middleware``); the views check the organization (``contract.require_organization``) and do
the work. Org-scoped endpoints fail closed: no ``X-Organization-ID`` is 400
``organization_required``, an unknown organization 404, another organization's object 404.
"""

from __future__ import annotations

import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework import renderers
from rest_framework.request import Request
from rest_framework.response import Response

from backend.internal_api import lifecycle
from backend.internal_api.contract import (
    COMMON,
    EPOCH_HEADER,
    EPOCH_PARAMETER,
    IDEMPOTENCY_PARAMETER,
    ORG_PARAMETER,
    REQUEST_ID_PARAMETER,
    SCOPED,
    WRITE,
    InternalView,
    errors,
    lease_epoch,
    require_organization,
    validated,
)
from backend.internal_api.errors import APIError
from backend.internal_api.models import (
    FILE_ALLOWED_SOURCES,
    DeliveryOutcome,
    Dispatch,
    DispatchReason,
    ExecutionEvent,
    ExecutionStatus,
    FileExecution,
    FileStatus,
    WebhookDelivery,
    WorkflowExecution,
)
from backend.internal_api.publish import publish_after_commit
from backend.internal_api.resources import Filter, Reference, Resource, Transitions
from backend.internal_api.serializers import (
    ClaimResultSerializer,
    ClaimSerializer,
    ErrorSerializer,
    EventListSerializer,
    ExecutionCreateSerializer,
    ExecutionSerializer,
    ExecutionUpdateSerializer,
    FileExecutionCreateSerializer,
    FileExecutionSerializer,
    FileExecutionUpdateSerializer,
    HealthSerializer,
    HeartbeatResultSerializer,
    HeartbeatSerializer,
    ReleaseSerializer,
    StatusUpdateSerializer,
    WebhookDeliveryCreateSerializer,
    WebhookDeliverySerializer,
    timestamp,
)
from backend.internal_api.transitions import (
    apply_status,
    check_fence,
    claim,
    heartbeat,
    release,
    superseded,
    update_fields,
)

try:
    BACKEND_VERSION = version("shared-worker-infrastructure")
except PackageNotFoundError:
    BACKEND_VERSION = "unknown"


class HealthView(InternalView):
    """``GET health/``: the backend process answers, with the lifecycle's overdue counts."""

    @extend_schema(
        operation_id="health",
        parameters=[REQUEST_ID_PARAMETER],
        responses={200: HealthSerializer, **errors(*COMMON)},
    )
    def get(self, request: Request) -> Response:
        """Liveness for workers; ``lifecycle`` is null when the database cannot be read (the
        process still answers: liveness needs no database)."""
        try:
            counts: dict[str, int] | None = lifecycle.overdue_counts()
        except DatabaseError:
            counts = None
        return Response(
            {
                "status": "healthy",
                "version": BACKEND_VERSION,
                "timestamp": timezone.now().isoformat(),
                "lifecycle": counts,
            }
        )


class PrometheusRenderer(renderers.BaseRenderer):
    """The Prometheus text exposition format (``GET metrics/``)."""

    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        """``data`` is the exposition already."""
        return bytes(data)


class MetricsView(InternalView):
    """``GET metrics/``: the lifecycle's gauges and counters, read from the database."""

    renderer_classes = [PrometheusRenderer]
    metadata_class = None  # OPTIONS is 405: DRF's metadata is JSON, not this format

    @extend_schema(
        operation_id="metrics",
        parameters=[REQUEST_ID_PARAMETER],
        responses={
            (200, "text/plain"): OpenApiResponse(
                OpenApiTypes.STR,
                description="Prometheus text format: internal_api_lifecycle_overdue{kind}, "
                "internal_api_lifecycle_lost_total, "
                "internal_api_lifecycle_dispatches_total{reason}, "
                "internal_api_executions{status}",
            ),
            **{(code, "application/json"): OpenApiResponse(ErrorSerializer) for code in COMMON},
        },
    )
    def get(self, request: Request) -> HttpResponse:
        """The figures every gunicorn worker reads alike (nothing kept in memory)."""
        return HttpResponse(lifecycle.metrics_text(), content_type=CONTENT_TYPE_LATEST)


class ExecutionStatusView(InternalView):
    """``POST workflow-executions/{id}/status/``: one atomic status transition."""

    @extend_schema(
        operation_id="workflow_executions_status",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER, EPOCH_PARAMETER],
        request=StatusUpdateSerializer,
        responses={200: ExecutionSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        """Apply a transition (rules in ``models``); 409 ``illegal_transition`` if forbidden.
        A terminal status with its result and file counts is the finish, in one call."""
        org_id = require_organization(request)
        epoch = lease_epoch(request)
        data = validated(StatusUpdateSerializer, request.data)
        execution = apply_status(org_id, pk, data.pop("status"), epoch=epoch, **data)
        return Response(ExecutionSerializer(execution).data)


class ExecutionClaimView(InternalView):
    """``POST workflow-executions/{id}/claim/``: take the execution's lease."""

    @extend_schema(
        operation_id="workflow_executions_claim",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER],
        request=ClaimSerializer,
        responses={200: ClaimResultSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        """Claim: -> IN_PROGRESS under a new lease; 409 ``lease_held`` (``Retry-After``) or
        ``illegal_transition``. A finished execution with its webhook due is handed out for
        the webhook only. The worker that holds the lease gets it back unchanged (its claim
        retried), so a claim needs no ``Idempotency-Key``."""
        org_id = require_organization(request)
        data = validated(ClaimSerializer, request.data)
        dispatch = data.get("dispatch") or {}
        granted = claim(
            org_id,
            pk,
            worker=data["worker"],
            lease_seconds=data["lease_seconds"],
            task=dispatch.get("task"),
            queue=dispatch.get("queue"),
        )
        return Response(
            {
                "execution": ExecutionSerializer(granted.execution).data,
                "lease": {"epoch": granted.epoch, "expires_at": timestamp(granted.expires_at)},
            }
        )


class ExecutionHeartbeatView(InternalView):
    """``POST workflow-executions/{id}/heartbeat/``: extend a live lease."""

    @extend_schema(
        operation_id="workflow_executions_heartbeat",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        request=HeartbeatSerializer,
        responses={200: HeartbeatResultSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        """Extend lease ``epoch``; 409 ``lease_lost`` when it is no longer current and live."""
        org_id = require_organization(request)
        data = validated(HeartbeatSerializer, request.data)
        execution = heartbeat(org_id, pk, data["epoch"], data.get("lease_seconds"))
        return Response(
            {
                "lease": {
                    "epoch": execution.lease_epoch,
                    "worker": execution.lease_worker,
                    "expires_at": timestamp(execution.lease_expires_at),
                }
            }
        )


class ExecutionReleaseView(InternalView):
    """``POST workflow-executions/{id}/release/``: give a lease back (IN_PROGRESS -> QUEUED)."""

    @extend_schema(
        operation_id="workflow_executions_release",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER],
        request=ReleaseSerializer,
        responses={200: ExecutionSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        """Release lease ``epoch``; due for dispatch again after ``retry_in`` seconds."""
        org_id = require_organization(request)
        data = validated(ReleaseSerializer, request.data)
        execution = release(org_id, pk, data["epoch"], data["retry_in"])
        return Response(ExecutionSerializer(execution).data)


class ExecutionEventsView(InternalView):
    """``GET workflow-executions/{id}/events/``: the status history, oldest first."""

    @extend_schema(
        operation_id="workflow_executions_events",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        responses={200: EventListSerializer, **errors(*SCOPED)},
    )
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        """Every status change of the execution."""
        org_id = require_organization(request)
        if not WorkflowExecution.objects.filter(pk=pk, organization_id=org_id).exists():
            raise APIError(404, "not_found", "no such workflow execution")
        events = ExecutionEvent.objects.filter(execution_id=pk).order_by("id")
        return Response(
            {
                "results": [
                    {
                        "from": event.from_status,
                        "to": event.to_status,
                        "at": timestamp(event.at),
                        "worker": event.worker,
                        "epoch": event.epoch,
                        "reason": event.reason,
                    }
                    for event in events
                ]
            }
        )


def _mark_delivered(execution_id: Any, delivery: WebhookDelivery) -> None:
    """The execution's due webhook is delivered (``delivery`` recorded it)."""
    WorkflowExecution.objects.filter(pk=execution_id, webhook_delivered_at__isnull=True).update(
        webhook_delivered_at=delivery.created_at
    )


def _delivered(webhook_id: str, org_id: str) -> WebhookDelivery | None:
    """The ``delivered`` record of ``webhook_id``; 409 when another organization has it."""
    existing = WebhookDelivery.objects.filter(
        webhook_id=webhook_id, outcome=DeliveryOutcome.DELIVERED
    ).first()
    if existing is not None and existing.organization_id != org_id:
        raise APIError(409, "conflict", "webhook_id: already recorded")
    return existing


def record_delivery(
    resource: Resource, org_id: str, request: Request, data: dict[str, Any]
) -> tuple[WebhookDelivery, int]:
    """Record one delivery (``POST webhook-deliveries/``); ``execution_id`` must be one of
    the organization's. A ``delivered`` record of a ``webhook_id`` is stored once (the webhook
    is then no longer due); recording it again answers 200 with the stored record."""
    epoch = lease_epoch(request)
    execution_id = data.get("execution_id")
    if epoch is not None and execution_id is None:
        raise APIError(400, "validation_error", f"{EPOCH_HEADER}: only with an execution_id")
    webhook_id = data["webhook_id"]
    once = bool(webhook_id) and data["outcome"] == DeliveryOutcome.DELIVERED
    with transaction.atomic():
        due_id = ""
        if execution_id is not None:
            # Not a declared Reference: this one look-up locks the row FOR UPDATE and reads
            # its lease epoch and due webhook, which a Reference's existence check does not.
            found = (
                WorkflowExecution.objects.select_for_update()
                .filter(pk=execution_id, organization_id=org_id)
                .values_list("lease_epoch", "webhook_id")
                .first()
            )
            if found is None:
                raise APIError(400, "validation_error", "execution_id: no such workflow execution")
            current_epoch, due_id = found
            if epoch is not None and epoch != current_epoch:
                raise superseded(epoch)
        ours = bool(webhook_id) and webhook_id == due_id
        if once:
            existing = _delivered(webhook_id, org_id)
            if existing is not None:
                # The first record may not have named this execution: it is delivered.
                if ours:
                    _mark_delivered(execution_id, existing)
                return existing, 200
        try:
            with transaction.atomic():
                delivery = WebhookDelivery.objects.create(organization_id=org_id, **data)
        except IntegrityError:  # recorded by a concurrent request meanwhile
            existing = _delivered(webhook_id, org_id) if once else None
            if existing is None:
                raise
            return existing, 200
        if ours and once:
            _mark_delivered(execution_id, delivery)
        elif ours and data["outcome"] == DeliveryOutcome.BLOCKED:
            # Refused by the worker's guard: it never will be delivered; no more hand-outs.
            WorkflowExecution.objects.filter(
                pk=execution_id,
                webhook_delivered_at__isnull=True,
                webhook_failed_at__isnull=True,
            ).update(webhook_failed_at=delivery.created_at)
    return delivery, 201


def create_execution(
    resource: Resource, org_id: str, request: Request, data: dict[str, Any]
) -> tuple[WorkflowExecution, int]:
    """Create an execution in status PENDING (``POST workflow-executions/``); with
    ``dispatch``, also its outbox row in the same transaction, published after the commit
    (then QUEUED)."""
    dispatch = data.pop("dispatch", None)
    if dispatch is None:
        return WorkflowExecution.objects.create(organization_id=org_id, **data), 201
    published: list[WorkflowExecution] = []
    with transaction.atomic():
        execution = WorkflowExecution.objects.create(
            organization_id=org_id,
            dispatch_task=dispatch["task"],
            dispatch_queue=dispatch["queue"],
            **data,
        )
        row = Dispatch.objects.create(
            execution=execution,
            task=dispatch["task"],
            queue=dispatch["queue"],
            reason=DispatchReason.CREATED,
        )
        publish_after_commit(row, published)
    return (published[-1] if published else execution), 201


def update_execution(
    resource: Resource, org_id: str, request: Request, pk: Any, data: dict[str, Any]
) -> WorkflowExecution:
    """Update result, file counts, task id or pipeline id (``PATCH workflow-executions/{id}/``,
    never the status) in one conditional UPDATE, fenced by ``X-Lease-Epoch``; with
    ``If-Match``, under the row's lock after checking the version."""
    epoch = lease_epoch(request)
    if "If-Match" not in request.headers:
        return _update_fields(resource, org_id, pk, data, epoch)
    with transaction.atomic():
        resource.check_if_match(request, resource.locked(org_id, pk))
        return _update_fields(resource, org_id, pk, data, epoch)


def _update_fields(
    resource: Resource, org_id: str, pk: Any, data: dict[str, Any], epoch: int | None
) -> WorkflowExecution:
    if data:
        return update_fields(org_id, pk, data, epoch=epoch)
    execution = resource.get(org_id, pk)
    check_fence(execution, epoch)
    return execution


def count_files(org_id: str, files: list[Any]) -> None:
    """The file counts of the executions of ``files`` follow from their files, in the
    write's transaction: ``total_files`` counts every file (any status, SKIPPED included),
    ``successful_files`` the COMPLETED ones, ``failed_files`` the ERROR ones."""
    execution_ids = {file.execution_id for file in files}
    if not execution_ids:
        return

    def counted(**status: str) -> Coalesce:
        rows = (
            FileExecution.objects.filter(execution_id=OuterRef("pk"), **status)
            .order_by()
            .values("execution_id")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return Coalesce(Subquery(rows), 0)

    # The executions are locked already (``Reference.lock``), so this statement's snapshot
    # has the files of every transaction that held them before: under READ COMMITTED an
    # UPDATE that waited for the lock itself would count from its older snapshot instead.
    WorkflowExecution.objects.filter(pk__in=execution_ids, organization_id=org_id).update(
        total_files=counted(),
        successful_files=counted(status=FileStatus.COMPLETED),
        failed_files=counted(status=FileStatus.ERROR),
        modified_at=timezone.now(),
    )


WORKFLOW_EXECUTIONS = Resource(
    name="workflow-executions",
    model=WorkflowExecution,
    serializer=ExecutionSerializer,
    label="workflow execution",
    create_serializer=ExecutionCreateSerializer,
    update_serializer=ExecutionUpdateSerializer,
    filters={
        "status": Filter("choice", choices=tuple(ExecutionStatus.values)),
        "workflow_id": Filter(),
    },
    create=create_execution,
    update=update_execution,
    update_parameters=(EPOCH_PARAMETER,),
)
WEBHOOK_DELIVERIES = Resource(
    name="webhook-deliveries",
    model=WebhookDelivery,
    serializer=WebhookDeliverySerializer,
    label="webhook delivery",
    create_serializer=WebhookDeliveryCreateSerializer,
    operations=frozenset({"list", "create", "read"}),
    filters={"execution_id": Filter("uuid")},
    create=record_delivery,
    # No version field: deleting its execution changes a delivery (execution_id becomes null)
    # without any time of its own changing, so its ETag is the hash of its body.
    create_parameters=(EPOCH_PARAMETER,),
    create_responses={
        200: OpenApiResponse(
            WebhookDeliverySerializer, "this webhook_id was already recorded delivered"
        ),
        201: WebhookDeliverySerializer,
    },
)
FILE_EXECUTIONS = Resource(
    name="file-executions",
    model=FileExecution,
    serializer=FileExecutionSerializer,
    label="file execution",
    create_serializer=FileExecutionCreateSerializer,
    update_serializer=FileExecutionUpdateSerializer,
    filters={
        "execution_id": Filter("uuid"),
        "status": Filter("choice", choices=tuple(FileStatus.values)),
    },
    references={
        "execution_id": Reference(
            WorkflowExecution, "workflow execution", lock=True, fence=check_fence
        )
    },
    transitions=Transitions("status", FILE_ALLOWED_SOURCES),
    batch=True,
    after_write=count_files,
    version_field="modified_at",
)
