"""Views of ``/internal/v1/``: health, workflow executions, webhook deliveries.

Authentication, the body limit, request ids and idempotency are middleware (see
``middleware``); the views check the organization and do the work. Org-scoped endpoints fail
closed: no ``X-Organization-ID`` is 400 ``organization_required``, an unknown organization 404,
another organization's object 404.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q, QuerySet
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework import renderers, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.internal_api import lifecycle
from backend.internal_api.errors import APIError, printable
from backend.internal_api.models import (
    ExecutionStatus,
    Organization,
    WebhookDelivery,
    WorkflowExecution,
)
from backend.internal_api.serializers import (
    STATUS_VALUES,
    UUID_TEXT,
    DeliveryPageSerializer,
    ErrorSerializer,
    ExecutionCreateSerializer,
    ExecutionPageSerializer,
    ExecutionSerializer,
    ExecutionUpdateSerializer,
    HealthSerializer,
    StatusUpdateSerializer,
    WebhookDeliveryCreateSerializer,
    WebhookDeliverySerializer,
)
from backend.internal_api.transitions import apply_status

try:
    BACKEND_VERSION = version("shared-worker-infrastructure")
except PackageNotFoundError:
    BACKEND_VERSION = "unknown"

DEFAULT_PAGE = 100
MAX_PAGE = 500
ORG_HEADER = "X-Organization-ID"

# Organization id -> monotonic time until which its existence is trusted without a query.
_known_orgs: dict[str, float] = {}


def _errors(*codes: int) -> dict[int, OpenApiResponse]:
    return {code: OpenApiResponse(ErrorSerializer) for code in codes}


ORG_PARAMETER = OpenApiParameter(
    ORG_HEADER,
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=True,
    description="The organization the request acts for.",
)
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Same key and body within 24 h replays the stored response.",
)
REQUEST_ID_PARAMETER = OpenApiParameter(
    "X-Request-ID",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Echoed in the response and in the backend's log lines.",
)
# Errors any endpoint may answer (Host or Content-Length header, auth, body size, database).
COMMON = (400, 401, 413, 503)
# Errors of every org-scoped endpoint.
SCOPED = (*COMMON, 404)
# Errors of a POST (or PATCH) with a body (the 409/422 come from Idempotency-Key).
WRITE = (*SCOPED, 409, 415, 422)


def require_organization(request: Request) -> str:
    """The organization id from ``X-Organization-ID``; 400 without it, 404 if unknown."""
    org_id = request.headers.get(ORG_HEADER, "").strip()
    if not org_id:
        raise APIError(
            400, "organization_required", f"the {ORG_HEADER} header is required on this endpoint"
        )
    now = time.monotonic()
    if _known_orgs.get(org_id, 0.0) > now:
        return org_id
    if len(org_id) > 64 or not Organization.objects.filter(pk=org_id).exists():
        raise APIError(404, "organization_not_found", "no such organization")
    _known_orgs[org_id] = now + settings.ORGANIZATION_CACHE_SECONDS
    return org_id


def _is_decimal(text: str) -> bool:
    """Only ASCII digits (``str.isdigit`` also accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _validated(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _encode_cursor(row: WorkflowExecution | WebhookDelivery) -> str:
    raw = f"{row.created_at.isoformat()}|{row.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page(request: Request, rows: QuerySet[Any]) -> tuple[list[Any], str | None]:
    """Newest first, ``limit`` rows after ``cursor``; the cursor of the next page or None."""
    raw_limit = request.query_params.get("limit", str(DEFAULT_PAGE))
    if not _is_decimal(raw_limit) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise APIError(400, "validation_error", f"limit: must be an integer from 1 to {MAX_PAGE}")
    limit = int(raw_limit)
    cursor = request.query_params.get("cursor")
    if cursor:
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            stamp, _, pk = text.partition("|")
            created = datetime.fromisoformat(stamp)
            last_id = uuid.UUID(pk)
            if created.tzinfo is None:
                raise ValueError("naive timestamp")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise APIError(
                400, "invalid_cursor", "cursor: not a cursor this API returned"
            ) from None
        rows = rows.filter(Q(created_at__lt=created) | Q(created_at=created, pk__lt=last_id))
    items = list(rows.order_by("-created_at", "-pk")[: limit + 1])
    more = len(items) > limit
    items = items[:limit]
    return items, (_encode_cursor(items[-1]) if more else None)


class HealthView(APIView):
    """``GET health/``: the backend process answers, with the lifecycle's overdue counts."""

    @extend_schema(
        operation_id="health",
        parameters=[REQUEST_ID_PARAMETER],
        responses={200: HealthSerializer, **_errors(*COMMON)},
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


class MetricsView(APIView):
    """``GET metrics/``: the lifecycle's gauges and counters, read from the database."""

    renderer_classes = [PrometheusRenderer]

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


def _execution(org_id: str, pk: uuid.UUID) -> WorkflowExecution:
    execution = WorkflowExecution.objects.filter(pk=pk, organization_id=org_id).first()
    if execution is None:
        raise APIError(404, "not_found", "no such workflow execution")
    return execution


class ExecutionListView(APIView):
    """``GET/POST workflow-executions/``."""

    @extend_schema(
        operation_id="workflow_executions_list",
        parameters=[
            ORG_PARAMETER,
            REQUEST_ID_PARAMETER,
            OpenApiParameter(
                "status", OpenApiTypes.STR, enum=ExecutionStatus.values, required=False
            ),
            OpenApiParameter("workflow_id", OpenApiTypes.STR, required=False),
            OpenApiParameter(
                "limit", OpenApiTypes.INT, required=False, description=f"1 to {MAX_PAGE}"
            ),
            OpenApiParameter("cursor", OpenApiTypes.STR, required=False),
        ],
        responses={200: ExecutionPageSerializer, **_errors(*SCOPED)},
    )
    def get(self, request: Request) -> Response:
        """List the organization's executions, newest first, a page at a time."""
        org_id = require_organization(request)
        rows = WorkflowExecution.objects.filter(organization_id=org_id)
        status = request.query_params.get("status")
        if status is not None:
            if status not in ExecutionStatus.values:
                raise APIError(
                    400,
                    "validation_error",
                    f'status: "{printable(status)}" is not a valid status; '
                    f"allowed: {STATUS_VALUES}",
                )
            rows = rows.filter(status=status)
        workflow_id = request.query_params.get("workflow_id")
        if workflow_id is not None:
            rows = rows.filter(workflow_id=workflow_id)
        items, next_cursor = _page(request, rows)
        return Response(
            {"results": ExecutionSerializer(items, many=True).data, "next_cursor": next_cursor}
        )

    @extend_schema(
        operation_id="workflow_executions_create",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER],
        request=ExecutionCreateSerializer,
        responses={201: ExecutionSerializer, **_errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        """Create an execution in status PENDING."""
        org_id = require_organization(request)
        data = _validated(ExecutionCreateSerializer, request.data)
        execution = WorkflowExecution.objects.create(organization_id=org_id, **data)
        return Response(ExecutionSerializer(execution).data, status=201)


class ExecutionDetailView(APIView):
    """``GET/PATCH/DELETE workflow-executions/{id}/``."""

    @extend_schema(
        operation_id="workflow_executions_read",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        responses={200: ExecutionSerializer, **_errors(*SCOPED)},
    )
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        """Read one execution."""
        org_id = require_organization(request)
        return Response(ExecutionSerializer(_execution(org_id, pk)).data)

    @extend_schema(
        operation_id="workflow_executions_update",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        request=ExecutionUpdateSerializer,
        responses={200: ExecutionSerializer, **_errors(*WRITE)},
    )
    def patch(self, request: Request, pk: uuid.UUID) -> Response:
        """Update result, file counts, task id or pipeline id (never the status)."""
        org_id = require_organization(request)
        data = _validated(ExecutionUpdateSerializer, request.data)
        rows = WorkflowExecution.objects.filter(pk=pk, organization_id=org_id)
        if data and not rows.update(modified_at=timezone.now(), **data):
            raise APIError(404, "not_found", "no such workflow execution")
        return Response(ExecutionSerializer(_execution(org_id, pk)).data)

    @extend_schema(
        operation_id="workflow_executions_delete",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        responses={204: None, **_errors(*SCOPED)},
    )
    def delete(self, request: Request, pk: uuid.UUID) -> Response:
        """Delete one execution (its webhook deliveries stay, unlinked)."""
        org_id = require_organization(request)
        deleted = WorkflowExecution.objects.filter(pk=pk, organization_id=org_id).delete()[0]
        if not deleted:
            raise APIError(404, "not_found", "no such workflow execution")
        return Response(status=204)


class ExecutionStatusView(APIView):
    """``POST workflow-executions/{id}/status/``: one atomic status transition."""

    @extend_schema(
        operation_id="workflow_executions_status",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER],
        request=StatusUpdateSerializer,
        responses={200: ExecutionSerializer, **_errors(*WRITE)},
    )
    def post(self, request: Request, pk: uuid.UUID) -> Response:
        """Apply a transition (rules in ``models``); 409 ``illegal_transition`` if forbidden."""
        org_id = require_organization(request)
        data = _validated(StatusUpdateSerializer, request.data)
        execution = apply_status(org_id, pk, data.pop("status"), **data)
        return Response(ExecutionSerializer(execution).data)


class DeliveryListView(APIView):
    """``GET/POST webhook-deliveries/``."""

    @extend_schema(
        operation_id="webhook_deliveries_list",
        parameters=[
            ORG_PARAMETER,
            REQUEST_ID_PARAMETER,
            OpenApiParameter("execution_id", OpenApiTypes.UUID, required=False),
            OpenApiParameter(
                "limit", OpenApiTypes.INT, required=False, description=f"1 to {MAX_PAGE}"
            ),
            OpenApiParameter("cursor", OpenApiTypes.STR, required=False),
        ],
        responses={200: DeliveryPageSerializer, **_errors(*SCOPED)},
    )
    def get(self, request: Request) -> Response:
        """List the organization's deliveries (optionally of one execution), newest first."""
        org_id = require_organization(request)
        rows = WebhookDelivery.objects.filter(organization_id=org_id)
        execution_id = request.query_params.get("execution_id")
        if execution_id is not None:
            if not UUID_TEXT.fullmatch(execution_id):
                raise APIError(400, "validation_error", "execution_id: must be a UUID")
            rows = rows.filter(execution_id=uuid.UUID(execution_id))
        items, next_cursor = _page(request, rows)
        return Response(
            {
                "results": WebhookDeliverySerializer(items, many=True).data,
                "next_cursor": next_cursor,
            }
        )

    @extend_schema(
        operation_id="webhook_deliveries_create",
        parameters=[ORG_PARAMETER, IDEMPOTENCY_PARAMETER, REQUEST_ID_PARAMETER],
        request=WebhookDeliveryCreateSerializer,
        responses={201: WebhookDeliverySerializer, **_errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        """Record one delivery; ``execution_id`` must be one of the organization's."""
        org_id = require_organization(request)
        data = _validated(WebhookDeliveryCreateSerializer, request.data)
        execution_id = data.get("execution_id")
        if (
            execution_id is not None
            and not WorkflowExecution.objects.filter(
                pk=execution_id, organization_id=org_id
            ).exists()
        ):
            raise APIError(400, "validation_error", "execution_id: no such workflow execution")
        delivery = WebhookDelivery.objects.create(organization_id=org_id, **data)
        return Response(WebhookDeliverySerializer(delivery).data, status=201)


class DeliveryDetailView(APIView):
    """``GET webhook-deliveries/{id}/``."""

    @extend_schema(
        operation_id="webhook_deliveries_read",
        parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER],
        responses={200: WebhookDeliverySerializer, **_errors(*SCOPED)},
    )
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        """Read one delivery."""
        org_id = require_organization(request)
        delivery = WebhookDelivery.objects.filter(pk=pk, organization_id=org_id).first()
        if delivery is None:
            raise APIError(404, "not_found", "no such webhook delivery")
        return Response(WebhookDeliverySerializer(delivery).data)
