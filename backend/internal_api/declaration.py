"""A declared resource's parts (:class:`Filter`, :class:`Transitions`, :class:`Reference`)
and :class:`Declaration`, the data of a ``resources.Resource`` and the queries, checks and
changes of its objects that its views and batches share."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import models
from django.db.models import QuerySet
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.request import Request

from backend.internal_api.contract import lease_epoch
from backend.internal_api.errors import APIError, printable
from backend.internal_api.serializers import UUID_TEXT
from backend.internal_api.versions import check_if_match, etag_of, render, versioned

OPERATIONS = frozenset({"list", "create", "read", "update", "delete"})



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


# ``create(resource, org_id, request, data)`` -> (object, HTTP status): a resource's own create
# (``resource`` is the ``resources.Resource``, typed Any: a creator may annotate it so).
Creator = Callable[[Any, str, Request, dict[str, Any]], tuple[models.Model, int]]
# ``update(resource, org_id, request, pk, data)`` -> the object as stored: a resource's own
# update (it calls ``resource.check_if_match`` under the row's lock).
Updater = Callable[[Any, str, Request, Any, dict[str, Any]], models.Model]
# ``after_write(org_id, objects)``: runs in the write's transaction (derived values to keep).
AfterWrite = Callable[[str, list[models.Model]], None]


@dataclass(frozen=True)
class Declaration:
    """What a resource declares and how its objects are found, checked and changed
    (``resources.Resource`` adds its URLs; see the module docstring there). The model has a
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
