"""The views of a declared resource: ``GET``/``POST <name>/`` (list, create) and
``GET``/``PATCH``/``DELETE <name>/<id>/``, as its :class:`~declaration.Declaration` says."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

from backend.internal_api.contract import (
    EPOCH_PARAMETER,
    IDEMPOTENCY_PARAMETER,
    IF_MATCH_PARAMETER,
    IF_MATCH_READ_PARAMETER,
    IF_NONE_MATCH_PARAMETER,
    MAX_PAGE,
    NOT_MODIFIED,
    ORG_PARAMETER,
    REQUEST_ID_PARAMETER,
    SCOPED,
    WRITE,
    InternalView,
    errors,
    page,
    require_organization,
    validated,
)
from backend.internal_api.declaration import Declaration
from backend.internal_api.versions import check_if_match, not_modified, versioned


def _page_serializer(resource: Declaration) -> type[serializers.Serializer]:
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


def list_view(resource: Declaration) -> type[APIView]:
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
                # Read back in the write's transaction: no other writer's version is answered.
                return resource.answer_write(request, instance, 201)

        attributes["post"] = post
    return type(f"{resource.model.__name__}ListView", (InternalView,), attributes)


def detail_view(resource: Declaration) -> type[APIView]:
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
                # Under the row's lock: the version answered is this write's, not a later one.
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
