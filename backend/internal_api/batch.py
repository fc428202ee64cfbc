"""``POST <name>/batch/`` of a declared resource: up to ``MAX_BATCH`` creates and updates in
one transaction, all or nothing, errors naming the item; the updates written in one
``UPDATE ... FROM (VALUES ...)``."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import connection, models, transaction
from django.http import HttpResponse
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

from backend.internal_api.contract import (
    EPOCH_PARAMETER,
    IDEMPOTENCY_PARAMETER,
    ORG_PARAMETER,
    REQUEST_ID_PARAMETER,
    WRITE,
    InternalView,
    errors,
    require_organization,
    validated,
)
from backend.internal_api.declaration import Declaration
from backend.internal_api.errors import APIError
from backend.internal_api.serializers import UUID_TEXT, StrictSerializer
from backend.internal_api.versions import versioned

MAX_BATCH = 500
UPDATE_CHUNK = 500


def _batch_serializer(resource: Declaration) -> type[serializers.Serializer]:
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


def batch_view(resource: Declaration) -> type[APIView]:
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


def _validated_item(resource: Declaration, index: int, item: Any) -> tuple[Any, dict[str, Any]]:
    """``(id or None, validated fields)`` of item ``index``; 400 ``items[i].field: ...``."""
    assert resource.create_serializer is not None and resource.update_serializer is not None
    if not isinstance(item, dict):
        raise APIError(400, "validation_error", f"items[{index}]: must be an object")
    fields = dict(item)
    is_update = "id" in fields  # {"id": null} is a bad id, never a create
    pk = fields.pop("id", None)
    serializer = (resource.update_serializer if is_update else resource.create_serializer)(
        data=fields
    )
    problems: dict[str, Any] = {}
    if is_update and not (isinstance(pk, str) and UUID_TEXT.fullmatch(pk)):
        problems["id"] = ["must be a UUID"]
    if not serializer.is_valid():
        problems.update(serializer.errors)
    if problems:
        raise serializers.ValidationError({f"items[{index}]": problems})
    return (None if pk is None else uuid.UUID(pk)), dict(serializer.validated_data)


def apply_batch(
    resource: Declaration, org_id: str, items: list[Any], epoch: int | None = None
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
        # Answered as stored (see ``Declaration.answer_write``), one query for the batch.
        rows = resource.model.objects.in_bulk([instance.pk for instance in out])
    return list(resource.serializer([rows[instance.pk] for instance in out], many=True).data)


def _save_all(
    resource: Declaration, created: list[Any], changed: list[Any], names: set[str]
) -> None:
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
