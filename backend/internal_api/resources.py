"""Declared resources: a model served under ``/internal/v1/<name>/`` by one declaration.

A :class:`Resource` names the model, the serializers (output, create, update), the field
holding the organization, the operations served, the list filters, optional status
transitions and the time field lists are ordered by; :meth:`Resource.urls` gives its URL
patterns. Each gets every guarantee of the contract (DESIGN.md, "The internal API contract"),
from the one implementation here and in the middleware:

- bearer auth, the body limit and ``Idempotency-Key`` on every POST (``middleware``,
  ``idempotency``: they guard everything under ``/internal/``);
- ``X-Organization-ID`` failing closed (:func:`require_organization`: 400
  ``organization_required``, 404 for an unknown organization) and every query scoped by it
  (another organization's object is a 404);
- cursor lists, newest first (:func:`page`: ``limit`` 1 to 500, ``next_cursor``);
- versions: every object GET, list, create and PATCH answers an ``ETag`` (a hash of the body
  it answers, or of the object's ``version_field``), ``If-None-Match`` gives 304, a write
  with a stale ``If-Match`` 412 ``precondition_failed``; the check and the write run under
  the row's lock (``SELECT ... FOR UPDATE``; SQLite: the ``BEGIN IMMEDIATE`` write lock), so
  of two writers with the same ``If-Match`` exactly one applies;
- ``POST <name>/batch/`` (``batch=True``): up to 500 creates and updates in one transaction,
  all or nothing, errors naming the item;
- ``{"error", "detail"}`` errors (``errors``) and the OpenAPI document (``schema/``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.db import connection, models, transaction
from django.db.models import Q, QuerySet
from django.http import HttpResponse
from django.urls import URLPattern, path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from backend.internal_api.errors import APIError, printable
from backend.internal_api.models import Organization
from backend.internal_api.serializers import UUID_TEXT, ErrorSerializer, StrictSerializer

DEFAULT_PAGE = 100
MAX_PAGE = 500
MAX_BATCH = 500
UPDATE_CHUNK = 500
ORG_HEADER = "X-Organization-ID"
EPOCH_HEADER = "X-Lease-Epoch"
MAX_EPOCH = 2**31
OPERATIONS = frozenset({"list", "create", "read", "update", "delete"})

# Organization id -> monotonic time until which its existence is trusted without a query.
_known_orgs: dict[str, float] = {}
_RENDERER = JSONRenderer()

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
    precondition the server does not check would let the caller believe it held."""

    if_match_methods: frozenset[str] = frozenset()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """DRF's checks, then the refusal of an ``If-Match`` this method cannot honour."""
        super().initial(request, *args, **kwargs)
        if "If-Match" in request.headers and request.method not in self.if_match_methods:
            raise APIError(
                400,
                "validation_error",
                f"If-Match: {request.method} {printable(request.path)} cannot honour it; only "
                "the GET, PATCH and DELETE of one object and the GET of a list take it",
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


# --- versions ----------------------------------------------------------------------------------


def etag_of(body: bytes) -> str:
    """The strong ETag of an answer's body."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def render(data: Any) -> bytes:
    """``data`` as the JSON body the API answers (the bytes its ETag is the hash of)."""
    return bytes(_RENDERER.render(data))


def _tags(header: str) -> set[str]:
    return {tag.strip() for tag in header.split(",") if tag.strip()}


def not_modified(request: Request, etag: str) -> HttpResponse | None:
    """The 304 (no body) when ``If-None-Match`` names ``etag`` or ``*`` (a weak ``W/`` tag
    matches its strong twin, as RFC 9110 compares for GET), else None."""
    presented = request.headers.get("If-None-Match")
    if presented is None:
        return None
    tags = {tag.removeprefix("W/") for tag in _tags(presented)}
    if "*" not in tags and etag not in tags:
        return None
    response = HttpResponse(status=304)
    del response["Content-Type"]  # a 304 has no body, hence no type
    response["ETag"] = etag
    return response


def versioned(
    request: Request, data: Any, status: int = 200, etag: str | None = None
) -> HttpResponse:
    """The JSON answer with its ``ETag`` (given, or the hash of the body); for a GET (or HEAD),
    the 412 when ``If-Match`` does not name it, the 304 when ``If-None-Match`` does."""
    body = render(data)
    etag = etag or etag_of(body)
    if status == 200 and request.method in ("GET", "HEAD"):
        check_if_match(request, etag)
        unchanged = not_modified(request, etag)
        if unchanged is not None:
            return unchanged
    response = HttpResponse(body, status=status, content_type="application/json")
    response["ETag"] = etag
    return response


def check_if_match(request: Request, etag: str) -> None:
    """412 ``precondition_failed`` when ``If-Match`` is given and names neither ``*`` nor
    ``etag``, the object's as stored (strong comparison). Call it while holding the row's
    lock, so that nothing changes between the check and the write."""
    presented = request.headers.get("If-Match")
    if presented is None:
        return
    tags = _tags(presented)
    if "*" not in tags and etag not in tags:
        raise APIError(
            412,
            "precondition_failed",
            "If-Match: the object changed since that version was read; read it again",
        )


# --- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """A list filter: query parameter -> model field (``field``, default the parameter's
    name); ``kind`` is ``text``, ``uuid`` (ASCII UUID text) or ``choice`` (one of
    ``choices``)."""

    kind: str = "text"
    field: str | None = None
    choices: tuple[str, ...] = ()

    def parameter(self, name: str) -> OpenApiParameter:
        """The OpenAPI query parameter."""
        kind = OpenApiTypes.UUID if self.kind == "uuid" else OpenApiTypes.STR
        return OpenApiParameter(name, kind, enum=self.choices or None, required=False)

    def lookup(self, name: str, value: str) -> dict[str, Any]:
        """The queryset filter for ``value``; 400 naming the parameter when it is invalid."""
        if self.kind == "uuid":
            if not UUID_TEXT.fullmatch(value):
                raise APIError(400, "validation_error", f"{name}: must be a UUID")
            return {self.field or name: uuid.UUID(value)}
        if self.kind == "choice" and value not in self.choices:
            raise APIError(
                400,
                "validation_error",
                f'{name}: "{printable(value)}" is not a valid {name}; '
                f"allowed: {', '.join(self.choices)}",
            )
        return {self.field or name: value}


@dataclass(frozen=True)
class Transitions:
    """Status moves a resource allows: ``allowed[target]`` are the statuses ``target`` may be
    reached from; setting the status an object already has is always a no-op."""

    field: str
    allowed: Mapping[str, tuple[str, ...]]

    def check(self, current: str, target: str) -> None:
        """409 ``illegal_transition`` unless ``current`` may move to ``target``."""
        if current != target and current not in self.allowed.get(target, ()):
            raise APIError(
                409, "illegal_transition", f"cannot change status from {current} to {target}"
            )


@dataclass(frozen=True)
class Reference:
    """A field naming another organization-scoped object (``execution_id`` ->
    ``WorkflowExecution``): a create or batch item naming one the organization does not
    have is 400 naming the field, nothing written. With ``lock``, every write locks the
    referenced rows (``FOR NO KEY UPDATE``, in key order) before its own rows: an
    ``after_write`` that updates them (an execution's file counts) then sees every earlier
    writer's rows, and writers of one parent take their locks in one order (no deadlock)."""

    model: type[models.Model]
    label: str
    organization_field: str = "organization"
    lock: bool = False
    #: ``fence(referenced, epoch)`` raises when a write under ``X-Lease-Epoch`` ``epoch`` may
    #: not touch objects of ``referenced`` (an execution whose lease that epoch lost: 409
    #: ``lease_lost``); the resource's writes then read the header (400 when malformed).
    fence: Callable[[Any, int], None] | None = None


# ``create(resource, org_id, request, data)`` -> (object, HTTP status): a resource's own create.
Creator = Callable[["Resource", str, Request, dict[str, Any]], tuple[models.Model, int]]
# ``update(resource, org_id, request, pk, data)`` -> the object as stored: a resource's own
# update (it calls ``resource.check_if_match`` under the row's lock).
Updater = Callable[["Resource", str, Request, Any, dict[str, Any]], models.Model]
# ``after_write(org_id, objects)``: runs in the write's transaction (derived values to keep).
AfterWrite = Callable[[str, list[models.Model]], None]


@dataclass(frozen=True)
class Resource:
    """One model served under ``/internal/v1/<name>/`` (module docstring). The model has a
    UUID primary key and a direct foreign key ``organization_field`` to the organization;
    ``ordering`` is the time field lists are ordered by, newest first. ``version_field``, a
    field that every change of the object's answer changes (an ``auto_now`` timestamp),
    makes an object's ETag the hash of its id and that field: a read with a
    current ``If-None-Match`` then costs one narrow query, not the row and its rendering.
    Without it, the ETag is the hash of the body."""

    name: str
    model: type[models.Model]
    serializer: type[serializers.Serializer]
    label: str
    create_serializer: type[serializers.Serializer] | None = None
    update_serializer: type[serializers.Serializer] | None = None
    operations: frozenset[str] = OPERATIONS
    organization_field: str = "organization"
    filters: Mapping[str, Filter] = field(default_factory=dict)
    references: Mapping[str, Reference] = field(default_factory=dict)
    transitions: Transitions | None = None
    ordering: str = "created_at"
    batch: bool = False
    create: Creator | None = None
    after_write: AfterWrite | None = None
    create_parameters: tuple[OpenApiParameter, ...] = ()
    create_responses: Mapping[int, Any] | None = None
    update: Updater | None = None
    update_parameters: tuple[OpenApiParameter, ...] = ()
    version_field: str | None = None

    def __post_init__(self) -> None:
        # References are checked where objects are made (creates, batch creates): an update
        # that could re-point one at another organization's object is refused here.
        if self.update_serializer is not None:
            meta = getattr(self.update_serializer, "Meta", None)
            updatable = set(getattr(self.update_serializer, "_declared_fields", {}))
            updatable |= set(getattr(meta, "fields", ()) or ())
            moved = sorted(updatable & set(self.references))
            if moved:
                raise ValueError(
                    f"resource {self.name!r}: the update serializer must not change the "
                    f"reference(s) {', '.join(moved)}"
                )

    @property
    def operation_prefix(self) -> str:
        """``file_executions`` of ``file-executions``: the start of its operation ids."""
        return self.name.replace("-", "_")

    def scoped(self, org_id: str) -> QuerySet[Any]:
        """The organization's objects."""
        return self.model.objects.filter(**{self.organization_field: org_id})

    def get(self, org_id: str, pk: Any, *, lock: bool = False) -> Any:
        """The organization's object ``pk`` (locked for update with ``lock``); 404 otherwise."""
        rows = self.scoped(org_id)
        found = (rows.select_for_update() if lock else rows).filter(pk=pk).first()
        if found is None:
            raise APIError(404, "not_found", f"no such {self.label}")
        return found

    def etag(self, instance: Any) -> str:
        """The object's ETag as stored (see ``version_field``)."""
        if self.version_field is None:
            return etag_of(render(self.represent(instance)))
        return self._version_etag(instance.pk, getattr(instance, self.version_field))

    def _version_etag(self, pk: Any, version: Any) -> str:
        text = version.isoformat() if isinstance(version, datetime) else str(version)
        return etag_of(f"{self.name}|{pk}|{text}".encode())

    def current_etag(self, org_id: str, pk: Any) -> str | None:
        """The ETag of the organization's object ``pk`` from its version alone (None without
        ``version_field``); 404 when there is none."""
        if self.version_field is None:
            return None
        rows = self.scoped(org_id).filter(pk=pk).values_list(self.version_field, flat=True)
        version = rows.first()
        if version is None:
            raise APIError(404, "not_found", f"no such {self.label}")
        return self._version_etag(pk, version)

    def answer(self, request: Request, instance: Any, status: int = 200) -> HttpResponse:
        """The object's representation with its ETag (304 for a current ``If-None-Match``)."""
        etag = None if self.version_field is None else self.etag(instance)
        return versioned(request, self.represent(instance), status, etag)

    def answer_write(self, request: Request, instance: Any, status: int = 200) -> HttpResponse:
        """:meth:`answer` for an object just written from the request's values, read back
        first: the database may store a JSON value otherwise than it was sent (``jsonb``
        reorders keys, writes ``-0.0`` as ``0.0`` and a float of 1e16 or more as an integer),
        and the body and ETag answered must be those a later read gives."""
        with contextlib.suppress(ObjectDoesNotExist):  # deleted meanwhile: as written
            instance.refresh_from_db()
        return self.answer(request, instance, status)

    def check_if_match(self, request: Request, instance: Any) -> None:
        """:func:`check_if_match` against ``instance`` (locked by the caller); nothing to
        compute without the header."""
        if "If-Match" in request.headers:
            check_if_match(request, self.etag(instance))

    def represent(self, instance: Any) -> Any:
        """The object as the API answers it."""
        return self.serializer(instance).data

    def check_references(
        self,
        org_id: str,
        values: Iterable[tuple[str, str, Any]],
        stored: Iterable[Any] = (),
        epoch: int | None = None,
    ) -> None:
        """400 naming the first ``(where, field, value)`` whose referenced object the
        organization does not have (one query per referenced model); the references to lock
        (``Reference.lock``) are locked, those of the ``stored`` objects too; under ``epoch``
        (``X-Lease-Epoch``) every referenced object passes the reference's ``fence``."""
        values, stored = list(values), list(stored)
        for name, reference in self.references.items():
            fenced = reference.fence is not None and epoch is not None
            uses = [(where, v) for where, n, v in values if n == name and v is not None]
            held = (
                {getattr(instance, name) for instance in stored}
                if reference.lock or fenced
                else set()
            )
            if not uses and not held:
                continue
            rows = reference.model.objects.filter(
                **{reference.organization_field: org_id},
                pk__in={value for _, value in uses} | held,
            )
            if reference.lock:
                rows = rows.select_for_update(no_key=True).order_by("pk")
            if fenced:
                assert reference.fence is not None and epoch is not None
                referenced = list(rows)
                for row in referenced:
                    reference.fence(row, epoch)
                found = {row.pk for row in referenced}
            else:
                found = set(rows.values_list("pk", flat=True))
            for where, value in uses:
                if value not in found:
                    raise APIError(
                        400, "validation_error", f"{where}{name}: no such {reference.label}"
                    )

    def locked(self, org_id: str, pk: Any, epoch: int | None = None) -> Any:
        """The organization's object ``pk`` locked for a write, after the references it holds
        (``Reference.lock``; fenced under ``epoch``); 404 when there is none."""
        if epoch is not None or any(reference.lock for reference in self.references.values()):
            self.check_references(org_id, (), [self.get(org_id, pk)], epoch)
        return self.get(org_id, pk, lock=True)

    @property
    def fenced(self) -> bool:
        """Whether a reference fences this resource's writes by ``X-Lease-Epoch``."""
        return any(reference.fence is not None for reference in self.references.values())

    def write_epoch(self, request: Request) -> int | None:
        """The ``X-Lease-Epoch`` a write of this resource is fenced by (None: unfenced)."""
        return lease_epoch(request) if self.fenced else None

    def new(self, org_id: str, data: dict[str, Any]) -> Any:
        """An unsaved object of the organization with ``data``."""
        return self.model(**{f"{self.organization_field}_id": org_id}, **data)

    def change(self, instance: Any, data: dict[str, Any]) -> None:
        """Apply an update's ``data`` to ``instance`` (not saved): 409 for an illegal status
        move."""
        if self.transitions is not None and self.transitions.field in data:
            current = getattr(instance, self.transitions.field)
            self.transitions.check(current, data[self.transitions.field])
        for name, value in data.items():
            setattr(instance, name, value)

    def urls(self) -> list[URLPattern]:
        """The resource's URL patterns (``<name>/``, ``<name>/batch/``, ``<name>/<id>/``)."""
        patterns = [path(f"{self.name}/", _list_view(self).as_view(), name=self.name)]
        if self.batch:
            patterns.append(
                path(f"{self.name}/batch/", _batch_view(self).as_view(), name=f"{self.name}-batch")
            )
        if self.operations & {"read", "update", "delete"}:
            patterns.append(
                path(f"{self.name}/<uuid:pk>/", _detail_view(self).as_view(), name=self.label)
            )
        return patterns


def _page_serializer(resource: Resource) -> type[serializers.Serializer]:
    name = resource.serializer.__name__.removesuffix("Serializer")
    return type(
        f"{name}PageSerializer",
        (serializers.Serializer,),
        {
            "__doc__": f"One page of {resource.name}.",
            "results": resource.serializer(many=True),
            "next_cursor": serializers.CharField(allow_null=True),
        },
    )


def _list_view(resource: Resource) -> type[APIView]:
    """``GET`` (list) and ``POST`` (create) of ``<name>/``, as declared."""
    prefix = resource.operation_prefix
    fence = (EPOCH_PARAMETER,) if resource.fenced else ()
    attributes: dict[str, Any] = {
        "__doc__": f"``GET/POST {resource.name}/``.",
        "if_match_methods": frozenset({"GET", "HEAD"}),
    }
    if "list" in resource.operations:
        filter_parameters = [f.parameter(name) for name, f in resource.filters.items()]

        @extend_schema(
            operation_id=f"{prefix}_list",
            parameters=[
                ORG_PARAMETER,
                REQUEST_ID_PARAMETER,
                IF_NONE_MATCH_PARAMETER,
                IF_MATCH_READ_PARAMETER,
                *filter_parameters,
                OpenApiParameter(
                    "limit", OpenApiTypes.INT, required=False, description=f"1 to {MAX_PAGE}"
                ),
                OpenApiParameter("cursor", OpenApiTypes.STR, required=False),
            ],
            responses={
                200: _page_serializer(resource),
                304: NOT_MODIFIED,
                **errors(*SCOPED, 412),
            },
        )
        def get(self: APIView, request: Request) -> HttpResponse:
            """List the organization's objects, newest first, a page at a time."""
            org_id = require_organization(request)
            rows = resource.scoped(org_id)
            for name, declared in resource.filters.items():
                value = request.query_params.get(name)
                if value is not None:
                    rows = rows.filter(**declared.lookup(name, value))
            items, next_cursor = page(request, rows, resource.ordering)
            results = resource.serializer(items, many=True).data
            return versioned(request, {"results": results, "next_cursor": next_cursor})

        attributes["get"] = get
    if "create" in resource.operations:
        assert resource.create_serializer is not None, f"{resource.name}: create_serializer"
        create_serializer = resource.create_serializer
        responses = resource.create_responses or {201: resource.serializer}

        @extend_schema(
            operation_id=f"{prefix}_create",
            parameters=[
                ORG_PARAMETER,
                IDEMPOTENCY_PARAMETER,
                REQUEST_ID_PARAMETER,
                *resource.create_parameters,
                *fence,
            ],
            request=create_serializer,
            responses={**responses, **errors(*WRITE)},
        )
        def post(self: APIView, request: Request) -> HttpResponse:
            """Create one object of the organization."""
            org_id = require_organization(request)
            data = validated(create_serializer, request.data)
            if resource.create is not None:
                instance, status = resource.create(resource, org_id, request, data)
                return resource.answer_write(request, instance, status)
            epoch = resource.write_epoch(request)
            with transaction.atomic():
                resource.check_references(
                    org_id, [("", k, v) for k, v in data.items()], epoch=epoch
                )
                instance = resource.new(org_id, data)
                instance.save(force_insert=True)
                if resource.after_write is not None:
                    resource.after_write(org_id, [instance])
            return resource.answer_write(request, instance, 201)

        attributes["post"] = post
    return type(f"{resource.model.__name__}ListView", (InternalView,), attributes)


def _detail_view(resource: Resource) -> type[APIView]:
    """``GET``, ``PATCH`` and ``DELETE`` of ``<name>/<id>/``, as declared."""
    prefix = resource.operation_prefix
    fence = (EPOCH_PARAMETER,) if resource.fenced else ()
    attributes: dict[str, Any] = {
        "__doc__": f"``{resource.name}/{{id}}/``.",
        "if_match_methods": frozenset({"GET", "HEAD", "PATCH", "DELETE"}),
    }
    if "read" in resource.operations:

        @extend_schema(
            operation_id=f"{prefix}_read",
            parameters=[
                ORG_PARAMETER,
                REQUEST_ID_PARAMETER,
                IF_NONE_MATCH_PARAMETER,
                IF_MATCH_READ_PARAMETER,
            ],
            responses={200: resource.serializer, 304: NOT_MODIFIED, **errors(*SCOPED, 412)},
        )
        def get(self: APIView, request: Request, pk: uuid.UUID) -> HttpResponse:
            """Read one object (412 for a stale ``If-Match``, 304 for a current
            ``If-None-Match``)."""
            org_id = require_organization(request)
            if "If-None-Match" in request.headers or "If-Match" in request.headers:
                etag = resource.current_etag(org_id, pk)
                if etag is not None:
                    check_if_match(request, etag)
                    unchanged = not_modified(request, etag)
                    if unchanged is not None:
                        return unchanged
            return resource.answer(request, resource.get(org_id, pk))

        attributes["get"] = get
    if "update" in resource.operations:
        assert resource.update_serializer is not None, f"{resource.name}: update_serializer"
        update_serializer = resource.update_serializer

        @extend_schema(
            operation_id=f"{prefix}_update",
            parameters=[
                ORG_PARAMETER,
                REQUEST_ID_PARAMETER,
                IF_MATCH_PARAMETER,
                *resource.update_parameters,
                *fence,
            ],
            request=update_serializer,
            responses={200: resource.serializer, **errors(*WRITE, 412)},
        )
        def patch(self: APIView, request: Request, pk: uuid.UUID) -> HttpResponse:
            """Update fields of one object; with ``If-Match``, only that version of it."""
            org_id = require_organization(request)
            data = validated(update_serializer, request.data)
            if resource.update is not None:
                updated = resource.update(resource, org_id, request, pk, data)
                return resource.answer(request, updated)
            epoch = resource.write_epoch(request)
            with transaction.atomic():
                instance = resource.locked(org_id, pk, epoch)
                resource.check_if_match(request, instance)
                resource.change(instance, data)
                instance.save()
                if resource.after_write is not None:
                    resource.after_write(org_id, [instance])
            return resource.answer_write(request, instance)

        attributes["patch"] = patch
    if "delete" in resource.operations:

        @extend_schema(
            operation_id=f"{prefix}_delete",
            parameters=[ORG_PARAMETER, REQUEST_ID_PARAMETER, IF_MATCH_PARAMETER, *fence],
            responses={204: None, **errors(*SCOPED, 412, *((409,) if fence else ()))},
        )
        def delete(self: APIView, request: Request, pk: uuid.UUID) -> HttpResponse:
            """Delete one object; with ``If-Match``, only that version of it."""
            org_id = require_organization(request)
            epoch = resource.write_epoch(request)
            with transaction.atomic():
                instance = resource.locked(org_id, pk, epoch)
                resource.check_if_match(request, instance)
                resource.model.objects.filter(pk=instance.pk).delete()
                if resource.after_write is not None:
                    resource.after_write(org_id, [instance])
            deleted = HttpResponse(status=204)
            del deleted["Content-Type"]  # no body, as before the declaration (DRF's answer)
            return deleted

        attributes["delete"] = delete
    return type(f"{resource.model.__name__}DetailView", (InternalView,), attributes)


# --- batches -----------------------------------------------------------------------------------


def _batch_serializer(resource: Resource) -> type[serializers.Serializer]:
    """The batch body: ``items``, each a create or an update (with ``id``). The items are
    validated one by one (:func:`apply_batch`), so that an error names its index."""
    assert resource.create_serializer is not None and resource.update_serializer is not None
    name = resource.serializer.__name__.removesuffix("Serializer")
    update_item = type(
        f"{name}BatchUpdateSerializer",
        (resource.update_serializer,),
        {
            "__doc__": f"An update of one {resource.label} in a batch.",
            "id": serializers.UUIDField(),
        },
    )
    proxy = PolymorphicProxySerializer(
        component_name=f"{name}BatchItem",
        serializers=[resource.create_serializer, update_item],
        resource_type_field_name=None,
    )
    item_field = extend_schema_field(proxy)(
        type(f"{name}BatchItemField", (_Item,), {"__doc__": f"One item: {proxy.component_name}."})
    )
    return type(
        f"{name}BatchSerializer",
        (StrictSerializer,),
        {
            "__doc__": f"Up to {MAX_BATCH} creates (no ``id``) and updates (``id``) of "
            f"{resource.name}, applied together or not at all.",
            "items": serializers.ListField(child=item_field(), min_length=1, max_length=MAX_BATCH),
        },
    )


class _Item(serializers.Field):
    """A batch item as the parser gave it (checked by :func:`apply_batch`)."""

    def to_internal_value(self, data: Any) -> Any:
        """The item unchanged."""
        return data

    def to_representation(self, value: Any) -> Any:
        """The item unchanged."""
        return value


def _batch_view(resource: Resource) -> type[APIView]:
    """``POST <name>/batch/``: creates and updates in one transaction, all or nothing."""
    body_serializer = _batch_serializer(resource)
    page_serializer = type(
        f"{resource.serializer.__name__.removesuffix('Serializer')}BatchResultSerializer",
        (serializers.Serializer,),
        {
            "__doc__": "The batch's objects as stored, in the order of its items.",
            "results": resource.serializer(many=True),
        },
    )

    @extend_schema(
        operation_id=f"{resource.operation_prefix}_batch",
        parameters=[
            ORG_PARAMETER,
            IDEMPOTENCY_PARAMETER,
            REQUEST_ID_PARAMETER,
            *((EPOCH_PARAMETER,) if resource.fenced else ()),
        ],
        request=body_serializer,
        responses={200: page_serializer, **errors(*WRITE)},
    )
    def post(self: APIView, request: Request) -> HttpResponse:
        """Apply every item or none: the first bad item is a 400 naming its index and field
        (409 for an illegal status move), and nothing is written."""
        org_id = require_organization(request)
        items = validated(body_serializer, request.data)["items"]
        epoch = resource.write_epoch(request)
        return versioned(request, {"results": apply_batch(resource, org_id, items, epoch)})

    return type(
        f"{resource.model.__name__}BatchView",
        (InternalView,),
        {"__doc__": f"``POST {resource.name}/batch/``.", "post": post},
    )


def _validated_item(resource: Resource, index: int, item: Any) -> tuple[Any, dict[str, Any]]:
    """``(id or None, validated fields)`` of item ``index``; 400 ``items[i].field: ...``."""
    assert resource.create_serializer is not None and resource.update_serializer is not None
    if not isinstance(item, dict):
        raise APIError(400, "validation_error", f"items[{index}]: must be an object")
    fields = dict(item)
    pk = fields.pop("id", None)
    serializer = (resource.create_serializer if pk is None else resource.update_serializer)(
        data=fields
    )
    problems: dict[str, Any] = {}
    if pk is not None and not (isinstance(pk, str) and UUID_TEXT.fullmatch(pk)):
        problems["id"] = ["must be a UUID"]
    if not serializer.is_valid():
        problems.update(serializer.errors)
    if problems:
        raise serializers.ValidationError({f"items[{index}]": problems})
    return (None if pk is None else uuid.UUID(pk)), dict(serializer.validated_data)


def apply_batch(
    resource: Resource, org_id: str, items: list[Any], epoch: int | None = None
) -> list[Any]:
    """Create (no ``id``) or update (``id``) every item in one transaction, fenced by
    ``epoch``; the objects' representations in item order. All or nothing: any refusal raises
    before the commit."""
    checked = [_validated_item(resource, index, item) for index, item in enumerate(items)]
    wanted = {pk for pk, _ in checked if pk is not None}
    with transaction.atomic():
        resource.check_references(
            org_id,
            [
                (f"items[{index}].", name, value)
                for index, (pk, data) in enumerate(checked)
                if pk is None
                for name, value in data.items()
            ],
            resource.scoped(org_id).filter(pk__in=wanted).only("pk", *resource.references)
            if wanted
            else (),
            epoch,
        )
        stored = {
            row.pk: row
            for row in resource.scoped(org_id)
            .select_for_update()
            .filter(pk__in=wanted)
            .order_by("pk")
        }
        created: list[Any] = []
        changed: dict[Any, Any] = {}
        names: set[str] = set()
        out: list[Any] = []
        for index, (pk, data) in enumerate(checked):
            if pk is None:
                instance = resource.new(org_id, data)
                created.append(instance)
            else:
                instance = stored.get(pk)
                if instance is None:
                    raise APIError(
                        400, "validation_error", f"items[{index}].id: no such {resource.label}"
                    )
                try:
                    resource.change(instance, data)
                except APIError as refused:
                    field_name = resource.transitions.field if resource.transitions else ""
                    raise APIError(
                        refused.status_code,
                        refused.error_code,
                        f"items[{index}].{field_name}: {refused.message}",
                    ) from None
                changed[pk] = instance
                names.update(data)
            out.append(instance)
        _save_all(resource, created, list(changed.values()), names)
        if resource.after_write is not None:
            resource.after_write(org_id, out)
        # Answered as stored (see ``Resource.answer_write``), one query for the batch.
        rows = resource.model.objects.in_bulk([instance.pk for instance in out])
    return list(resource.serializer([rows[instance.pk] for instance in out], many=True).data)


def _save_all(resource: Resource, created: list[Any], changed: list[Any], names: set[str]) -> None:
    """Insert ``created`` and write the fields ``names`` of ``changed`` back, a few statements
    for all of them; their ``auto_now`` timestamps set as ``save()`` would."""
    manager = resource.model.objects
    stamped = [f for f in resource.model._meta.concrete_fields if getattr(f, "auto_now", False)]
    if created:
        manager.bulk_create(created)  # bulk_create runs the fields' pre_save itself
    if changed:
        for instance in changed:
            for stamp in stamped:
                stamp.pre_save(instance, add=False)
        _update_rows(resource.model, changed, sorted(names | {f.name for f in stamped}))


def _update_rows(model: type[models.Model], rows: list[Any], names: list[str]) -> None:
    """Write the fields ``names`` of ``rows`` in one ``UPDATE ... FROM`` a ``VALUES`` list per
    ``UPDATE_CHUNK`` rows (Django's ``bulk_update`` builds a ``CASE`` per field and row, ten
    times slower at 500 rows). PostgreSQL gets each value cast to its column's type; SQLite
    (3.33 or later) stores by the column's affinity."""
    meta = model._meta
    fields = [meta.pk, *(meta.get_field(name) for name in names)]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    if connection.vendor == "postgresql":
        row = ", ".join(f"CAST(%s AS {field.db_type(connection)})" for field in fields)
    else:
        row = ", ".join(["%s"] * len(fields))
    columns = ", ".join(f"c{i}" for i in range(len(fields)))
    sets = ", ".join(f"{quote(field.column)} = v.c{i}" for i, field in enumerate(fields) if i)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), UPDATE_CHUNK):
            chunk = rows[start : start + UPDATE_CHUNK]
            params = [
                field.get_db_prep_save(getattr(instance, field.attname), connection)
                for instance in chunk
                for field in fields
            ]
            values = ", ".join([f"({row})"] * len(chunk))
            cursor.execute(
                f"WITH v({columns}) AS (VALUES {values}) UPDATE {table} SET {sets} FROM v "
                f"WHERE {table}.{quote(meta.pk.column)} = v.c0",
                params,
            )
