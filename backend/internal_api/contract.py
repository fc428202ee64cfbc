"""What every endpoint of ``/internal/v1/`` shares: the organization (``X-Organization-ID``,
failing closed), the lease epoch (``X-Lease-Epoch``), body validation, cursor pages, the
refusal of a precondition an endpoint cannot honour (:class:`InternalView`), and the OpenAPI
parameters and error responses that say so."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

from backend.internal_api.errors import APIError, printable
from backend.internal_api.models import Organization
from backend.internal_api.serializers import ErrorSerializer

DEFAULT_PAGE = 100
MAX_PAGE = 500
ORG_HEADER = "X-Organization-ID"
EPOCH_HEADER = "X-Lease-Epoch"
MAX_EPOCH = 2**31

# Organization id -> monotonic time until which its existence is trusted without a query.
_known_orgs: dict[str, float] = {}


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """The OpenAPI error responses ``{error, detail}`` for ``codes``."""
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
EPOCH_PARAMETER = OpenApiParameter(
    EPOCH_HEADER,
    {"type": "integer", "minimum": 1, "maximum": MAX_EPOCH},
    OpenApiParameter.HEADER,
    required=False,
    description=(
        "The writer's lease epoch: applied only while it is the current, live lease "
        "(else 409 lease_lost, nothing applied)."
    ),
)
IF_NONE_MATCH_PARAMETER = OpenApiParameter(
    "If-None-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="ETags of a copy the caller holds: 304 (no body) when one is current.",
)
IF_MATCH_PARAMETER = OpenApiParameter(
    "If-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Apply only while the object's ETag is one of these (or `*`): else 412 "
    "precondition_failed, nothing applied.",
)
IF_MATCH_READ_PARAMETER = OpenApiParameter(
    "If-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Answer only while the current ETag is one of these (or `*`): else 412 "
    "precondition_failed.",
)
NOT_MODIFIED = OpenApiResponse(description="not modified: the If-None-Match copy is current")
# Errors any endpoint may answer (Host or Content-Length header, auth, body size, database).
COMMON = (400, 401, 413, 503)
# Errors of every org-scoped endpoint.
SCOPED = (*COMMON, 404)
# Errors of a POST (or PATCH) with a body (the 409/422 come from Idempotency-Key).
WRITE = (*SCOPED, 409, 415, 422)


class InternalView(APIView):
    """An endpoint of ``/internal/v1/``: ``If-Match`` is honoured by the methods in
    ``if_match_methods`` and refused elsewhere (400 naming the header), never ignored: a
    precondition the server does not check would let the caller believe it held. So is
    ``If-None-Match`` on any method but GET and HEAD (where an unversioned answer is simply
    never a 304)."""

    if_match_methods: frozenset[str] = frozenset()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """DRF's checks, then the refusal of a precondition this method cannot honour."""
        super().initial(request, *args, **kwargs)
        where = f"{request.method} {printable(request.path)} cannot honour it"
        if "If-Match" in request.headers and request.method not in self.if_match_methods:
            raise APIError(
                400,
                "validation_error",
                f"If-Match: {where}; only the GET, PATCH and DELETE of one object and the GET "
                "of a list take it",
            )
        if "If-None-Match" in request.headers and request.method not in ("GET", "HEAD"):
            raise APIError(
                400, "validation_error", f"If-None-Match: {where}; only a GET or HEAD takes it"
            )


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


def is_decimal(text: str) -> bool:
    """Only ASCII digits (``str.isdigit`` also accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def lease_epoch(request: Request) -> int | None:
    """The epoch in ``X-Lease-Epoch`` (ASCII digits, 1 to 2**31), None without the header;
    400 naming the header for anything else."""
    raw = request.headers.get(EPOCH_HEADER)
    if raw is None:
        return None
    if not (is_decimal(raw) and len(raw) <= 10 and 1 <= int(raw) <= MAX_EPOCH):
        raise APIError(
            400,
            "validation_error",
            f"{EPOCH_HEADER}: must be a whole number from 1 to {MAX_EPOCH} in ASCII digits",
        )
    return int(raw)


def validated(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    """``data`` validated by ``serializer_class`` (400 naming the fields otherwise)."""
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def page(
    request: Request, rows: QuerySet[Any], ordering: str = "created_at"
) -> tuple[list[Any], str | None]:
    """Newest first by ``ordering`` (ties by primary key), ``limit`` rows after ``cursor``;
    the cursor of the next page or None."""
    raw_limit = request.query_params.get("limit", str(DEFAULT_PAGE))
    if not is_decimal(raw_limit) or len(raw_limit) > 3 or not 1 <= int(raw_limit) <= MAX_PAGE:
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
            created = created.astimezone(UTC)  # a date the database cannot hold fails here
        except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
            raise APIError(
                400, "invalid_cursor", "cursor: not a cursor this API returned"
            ) from None
        rows = rows.filter(
            Q(**{f"{ordering}__lt": created}) | Q(**{ordering: created, "pk__lt": last_id})
        )
    items = list(rows.order_by(f"-{ordering}", "-pk")[: limit + 1])
    more = len(items) > limit
    items = items[:limit]
    if not more:
        return items, None
    raw = f"{getattr(items[-1], ordering).isoformat()}|{items[-1].pk}".encode()
    return items, base64.urlsafe_b64encode(raw).decode().rstrip("=")
