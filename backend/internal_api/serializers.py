"""Request validation and response shapes of the internal API (also the OpenAPI schemas).

Input serializers reject unknown fields and values of the wrong JSON type (``"5"`` for a
number, ``5`` for a string) by name, and bound every number to what the database can hold; the
JSON parser (``errors.StrictJSONParser``) has already refused NUL characters, unpaired
surrogates and overflowing numbers anywhere in the body. Bad input is a 400 naming the field,
never a 500.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from backend.internal_api.models import (
    DeliveryOutcome,
    EventReason,
    ExecutionStatus,
    FileExecution,
    FileStatus,
    WebhookDelivery,
    WorkflowExecution,
)

MAX_INT = 2**31 - 1
MAX_SECONDS = 10.0**9
STATUS_VALUES = ", ".join(ExecutionStatus.values)
OUTCOME_VALUES = ", ".join(DeliveryOutcome.values)
FILE_STATUS_VALUES = ", ".join(FileStatus.values)
# A UUID as the API writes it (or without hyphens), ASCII only: ``uuid.UUID`` alone also takes
# braces, a ``urn:uuid:`` prefix and non-ASCII digits.
UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}", re.ASCII)
WEBHOOK_ID = re.compile(r"msg_[0-9a-f]{32}", re.ASCII)
MAX_RETRY_IN = 86400.0
# Celery task and queue names every transport we publish to takes: the embedded broker puts
# the queue in a file name (``<ms>_<uuid>.<queue>.msg``, at most 255 bytes), RabbitMQ refuses
# names over 255 bytes and reserves ``amq.`` queues; a safe ASCII set keeps paths and routing
# keys literal.
CELERY_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._:@-]*$"
MAX_TASK_NAME = 255
MAX_QUEUE_NAME = 128
# The JSON type each kind of input field takes (checked before DRF's coercions run).
_JSON_TYPES: tuple[tuple[type[serializers.Field], tuple[type, ...], str], ...] = (
    (serializers.BooleanField, (bool,), "a boolean"),
    (serializers.IntegerField, (int,), "an integer"),
    (serializers.FloatField, (int, float), "a number"),
    (serializers.UUIDField, (str,), "a UUID"),
    (serializers.CharField, (str,), "a string"),
    (serializers.ChoiceField, (str,), "a string"),
)


# Field class -> its rule in _JSON_TYPES (the first that applies), or None: found once.
_RULES: dict[type, tuple[type[serializers.Field], tuple[type, ...], str] | None] = {}


def json_type_problem(field: serializers.Field, value: Any) -> str | None:
    """Why ``value`` (not None) has the wrong JSON type for ``field``, or None."""
    field_class = type(field)
    if field_class not in _RULES:
        _RULES[field_class] = next((r for r in _JSON_TYPES if isinstance(field, r[0])), None)
    rule = _RULES[field_class]
    if rule is None:
        return None
    kind, types, what = rule
    if kind is serializers.IntegerField and isinstance(value, float) and value.is_integer():
        return None  # JSON's 1.0 is the integer 1
    if isinstance(value, bool) is not (bool in types) or not isinstance(value, types):
        return f"must be {what}"
    if kind is serializers.UUIDField and not UUID_TEXT.fullmatch(str(value)):
        return "must be a UUID"
    return None


class StrictSerializer(serializers.Serializer):
    """A serializer that names any field it does not know instead of ignoring it.

    Its fields are plain scalar fields, so each instance gets shallow copies of them rather
    than DRF's deep copies (a declared field holds no per-request state until it is bound);
    this is most of DRF's cost per validated request body.
    """

    def get_fields(self) -> dict[str, serializers.Field]:
        """Fresh, unbound copies of the declared fields."""
        return {name: copy.copy(field) for name, field in self._declared_fields.items()}

    def to_internal_value(self, data: Any) -> Any:
        """Validate, first refusing fields this serializer does not declare and values of
        the wrong JSON type."""
        if isinstance(data, dict):
            fields = self.fields
            unknown = sorted(set(data) - set(fields))
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
            wrong = {
                name: [problem]
                for name, value in data.items()
                if value is not None
                and (problem := json_type_problem(fields[name], value)) is not None
            }
            if wrong:
                raise serializers.ValidationError(wrong)
        return super().to_internal_value(data)


def _count(**kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=0, max_value=MAX_INT, **kwargs)


def _seconds(**kwargs: Any) -> serializers.FloatField:
    return serializers.FloatField(min_value=0.0, max_value=MAX_SECONDS, **kwargs)


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise serializers.ValidationError("nested more than 64 levels deep")
    if isinstance(value, dict):
        for item in value.values():
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


def _http_url(value: str) -> None:
    """An http(s) URL with a host; single-label hosts (``http://receiver:8080/``) included."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise serializers.ValidationError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise serializers.ValidationError("must be an http(s) URL with a host")
    if any(c.isspace() for c in value):
        raise serializers.ValidationError("must not contain whitespace")


class ResultField(serializers.JSONField):
    """Any JSON value, nested at most 64 levels (strings and numbers: see the parser)."""

    def to_internal_value(self, data: Any) -> Any:
        """Accept the value after checking its depth. It came from the JSON parser, so it is
        JSON already: DRF's check (a ``json.dumps`` of the whole value) is not repeated."""
        _check_json(data)
        return data


def timestamp(value: datetime | None) -> str | None:
    """A timestamp as DRF renders it: ISO 8601 in UTC, ``Z`` for the offset."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class LeaseSerializer(serializers.Serializer):
    """The live lease of an execution: its epoch, holder and expiry."""

    epoch = serializers.IntegerField()
    worker = serializers.CharField()
    expires_at = serializers.DateTimeField()


class WebhookStateSerializer(serializers.Serializer):
    """The completion webhook due for an execution (its ``id`` is the ``webhook-id``)."""

    id = serializers.CharField()
    url = serializers.CharField()
    delivered = serializers.BooleanField()
    failed = serializers.BooleanField(
        help_text="given up: handed WEBHOOK_MAX_ATTEMPTS times, recorded blocked, or no worker "
        "can be reached to deliver it"
    )


class ExecutionSerializer(serializers.Serializer):
    """A workflow execution as the API returns it.

    The declared fields document the shape (OpenAPI); :meth:`to_representation` builds the
    same dictionary directly, without per-field machinery, because every transition returns
    one (``test_api`` compares it with DRF's generic rendering).
    """

    id = serializers.UUIDField()
    organization_id = serializers.CharField()
    workflow_id = serializers.CharField()
    pipeline_id = serializers.CharField(allow_null=True)
    status = serializers.ChoiceField(choices=ExecutionStatus.choices)
    error_message = serializers.CharField(allow_blank=True)
    attempts = serializers.IntegerField()
    execution_time = serializers.FloatField(allow_null=True, help_text="seconds")
    total_files = serializers.IntegerField()
    successful_files = serializers.IntegerField()
    failed_files = serializers.IntegerField()
    result = serializers.JSONField(allow_null=True)
    task_id = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    modified_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    webhook_url = serializers.CharField(allow_blank=True)
    lease = LeaseSerializer(allow_null=True, help_text="null: no live lease")
    lost_count = serializers.IntegerField(help_text="times its worker lost it")
    webhook = WebhookStateSerializer(allow_null=True, help_text="null: no webhook due")

    def to_representation(self, instance: WorkflowExecution) -> dict[str, Any]:
        """The execution as a JSON-ready dictionary."""
        expires = instance.lease_expires_at
        lease = None
        if expires is not None and expires >= timezone.now():
            lease = {
                "epoch": instance.lease_epoch,
                "worker": instance.lease_worker,
                "expires_at": timestamp(expires),
            }
        webhook = None
        if instance.webhook_id:
            webhook = {
                "id": instance.webhook_id,
                "url": instance.webhook_url,
                "delivered": instance.webhook_delivered_at is not None,
                "failed": instance.webhook_failed_at is not None,
            }
        return {
            "id": str(instance.id),
            "organization_id": instance.organization_id,
            "workflow_id": instance.workflow_id,
            "pipeline_id": instance.pipeline_id,
            "status": instance.status,
            "error_message": instance.error_message,
            "attempts": instance.attempts,
            "execution_time": instance.execution_time,
            "total_files": instance.total_files,
            "successful_files": instance.successful_files,
            "failed_files": instance.failed_files,
            "result": instance.result,
            "task_id": instance.task_id,
            "created_at": timestamp(instance.created_at),
            "modified_at": timestamp(instance.modified_at),
            "started_at": timestamp(instance.started_at),
            "finished_at": timestamp(instance.finished_at),
            "webhook_url": instance.webhook_url,
            "lease": lease,
            "lost_count": instance.lost_count,
            "webhook": webhook,
        }


def _not_reserved_queue(value: str) -> None:
    if value.lower().startswith("amq."):
        raise serializers.ValidationError("queue names starting with 'amq.' are reserved")


_NAME_RULE = (
    "letters, digits and . _ : @ -, starting with a letter, digit or _"
)


class DispatchSerializer(StrictSerializer):
    """The Celery task (and queue) that runs an execution; names every broker takes."""

    task = serializers.RegexField(
        CELERY_NAME,
        max_length=MAX_TASK_NAME,
        help_text=f"Celery task name: {_NAME_RULE}",
        error_messages={"invalid": f"not a usable task name: {_NAME_RULE}"},
    )
    queue = serializers.RegexField(
        CELERY_NAME,
        max_length=MAX_QUEUE_NAME,
        required=False,
        default="celery",
        validators=[_not_reserved_queue],
        help_text=f"Celery queue: {_NAME_RULE}; not amq.*",
        error_messages={"invalid": f"not a usable queue name: {_NAME_RULE}"},
    )


class ExecutionCreateSerializer(StrictSerializer):
    """Body of ``POST workflow-executions/``; with ``dispatch`` the backend publishes it."""

    workflow_id = serializers.CharField(max_length=255)
    pipeline_id = serializers.CharField(max_length=255, required=False, allow_null=True)
    total_files = _count(required=False, default=0)
    task_id = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    webhook_url = serializers.CharField(
        max_length=2048, required=False, validators=[_http_url], help_text="completion webhook"
    )
    dispatch = DispatchSerializer(required=False)


class ExecutionUpdateSerializer(StrictSerializer):
    """Body of ``PATCH workflow-executions/{id}/``: non-status fields only."""

    result = ResultField(required=False, allow_null=True)
    total_files = _count(required=False)
    successful_files = _count(required=False)
    failed_files = _count(required=False)
    task_id = serializers.CharField(max_length=255, required=False, allow_blank=True)
    pipeline_id = serializers.CharField(max_length=255, required=False, allow_null=True)

    def to_internal_value(self, data: Any) -> Any:
        """Validate; a ``status`` field points the caller at the status endpoint."""
        if isinstance(data, dict) and "status" in data:
            raise serializers.ValidationError(
                {"status": ["change the status with POST workflow-executions/{id}/status/"]}
            )
        return super().to_internal_value(data)


class StatusUpdateSerializer(StrictSerializer):
    """Body of ``POST workflow-executions/{id}/status/`` (a null optional field: no change);
    the fields besides ``status`` are applied with it, in the same statement."""

    status = serializers.ChoiceField(
        choices=ExecutionStatus.choices,
        error_messages={
            "invalid_choice": f'"{{input}}" is not a valid status; allowed: {STATUS_VALUES}'
        },
    )
    error_message = serializers.CharField(
        max_length=10000, required=False, allow_blank=True, allow_null=True, trim_whitespace=False
    )
    attempts = _count(required=False, allow_null=True)
    execution_time = _seconds(required=False, allow_null=True)
    # With a terminal status: the finish in one call (also accepted with any other status).
    result = ResultField(required=False, allow_null=True)
    total_files = _count(required=False, allow_null=True)
    successful_files = _count(required=False, allow_null=True)
    failed_files = _count(required=False, allow_null=True)


class ClaimSerializer(StrictSerializer):
    """Body of ``POST workflow-executions/{id}/claim/``."""

    worker = serializers.CharField(max_length=255, help_text="the claiming worker's name")
    lease_seconds = serializers.IntegerField(
        min_value=1, max_value=settings.LEASE_MAX_SECONDS, required=False, default=30
    )
    dispatch = DispatchSerializer(required=False, help_text="how to dispatch it again")


class HeartbeatSerializer(StrictSerializer):
    """Body of ``POST workflow-executions/{id}/heartbeat/``."""

    epoch = serializers.IntegerField(min_value=1, max_value=MAX_INT)
    lease_seconds = serializers.IntegerField(
        min_value=1,
        max_value=settings.LEASE_MAX_SECONDS,
        required=False,
        help_text="default: the length the claim took",
    )


class ReleaseSerializer(StrictSerializer):
    """Body of ``POST workflow-executions/{id}/release/``."""

    epoch = serializers.IntegerField(min_value=1, max_value=MAX_INT)
    retry_in = serializers.FloatField(
        min_value=0.0,
        max_value=MAX_RETRY_IN,
        required=False,
        default=0.0,
        help_text="seconds until it is due for dispatch again",
    )


class LeaseGrantSerializer(serializers.Serializer):
    """The lease a claim took."""

    epoch = serializers.IntegerField()
    expires_at = serializers.DateTimeField()


class ClaimResultSerializer(serializers.Serializer):
    """Answer of a claim: the execution and its new lease."""

    execution = ExecutionSerializer()
    lease = LeaseGrantSerializer()


class HeartbeatResultSerializer(serializers.Serializer):
    """Answer of a heartbeat: the extended lease."""

    lease = LeaseSerializer()


class EventSerializer(serializers.Serializer):
    """One status change of an execution (``from`` and ``to`` are statuses)."""

    from_status = serializers.ChoiceField(choices=ExecutionStatus.choices)
    to_status = serializers.ChoiceField(choices=ExecutionStatus.choices)
    at = serializers.DateTimeField()
    worker = serializers.CharField(allow_blank=True)
    epoch = serializers.IntegerField(allow_null=True)
    reason = serializers.ChoiceField(choices=EventReason.choices)

    def get_fields(self) -> dict[str, serializers.Field]:
        """The fields under their wire names (``from`` is a Python keyword)."""
        fields = super().get_fields()
        fields["from"] = fields.pop("from_status")
        fields["to"] = fields.pop("to_status")
        fields["from"].source = "from_status"
        fields["to"].source = "to_status"
        return fields


class EventListSerializer(serializers.Serializer):
    """The event history of an execution, oldest first."""

    results = EventSerializer(many=True)


class WebhookDeliverySerializer(serializers.ModelSerializer):
    """A recorded webhook delivery as the API returns it."""

    organization_id = serializers.CharField(read_only=True)
    execution_id = serializers.UUIDField(read_only=True, allow_null=True)

    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "organization_id",
            "execution_id",
            "url",
            "status_code",
            "attempts",
            "duration",
            "outcome",
            "error_message",
            "webhook_id",
            "created_at",
        ]
        read_only_fields = fields


@extend_schema_field({"type": "string", "pattern": r"^(msg_[0-9a-f]{32})?$"})
class WebhookIdField(serializers.CharField):
    """``msg_`` and 32 lower-case hex digits (or empty), exactly: nothing trimmed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        """The id, or a ValidationError saying what an id looks like."""
        value = str(super().to_internal_value(data))
        if not WEBHOOK_ID.fullmatch(value):
            raise serializers.ValidationError("must be msg_ and 32 lower-case hex digits")
        return value


class WebhookDeliveryCreateSerializer(StrictSerializer):
    """Body of ``POST webhook-deliveries/``."""

    url = serializers.CharField(max_length=2048, validators=[_http_url])
    execution_id = serializers.UUIDField(required=False, allow_null=True)
    status_code = serializers.IntegerField(
        min_value=100, max_value=599, required=False, allow_null=True
    )
    attempts = serializers.IntegerField(min_value=0, max_value=MAX_INT, required=False, default=1)
    duration = _seconds(required=False, default=0.0)
    outcome = serializers.ChoiceField(
        choices=DeliveryOutcome.choices,
        error_messages={
            "invalid_choice": f'"{{input}}" is not a valid outcome; allowed: {OUTCOME_VALUES}'
        },
    )
    error_message = serializers.CharField(
        max_length=10000, required=False, allow_blank=True, default="", trim_whitespace=False
    )
    webhook_id = WebhookIdField(
        required=False,
        allow_blank=True,
        default="",
        help_text="the webhook-id of the due webhook this delivery was of",
    )


class FileExecutionSerializer(serializers.ModelSerializer):
    """One file of an execution as the API returns it."""

    organization_id = serializers.CharField(read_only=True)
    execution_id = serializers.UUIDField(read_only=True)

    class Meta:
        model = FileExecution
        fields = [
            "id",
            "organization_id",
            "execution_id",
            "file_name",
            "file_hash",
            "status",
            "error_message",
            "execution_time",
            "result",
            "created_at",
            "modified_at",
        ]
        read_only_fields = fields


def _file_status(**kwargs: Any) -> serializers.ChoiceField:
    return serializers.ChoiceField(
        choices=FileStatus.choices,
        error_messages={
            "invalid_choice": f'"{{input}}" is not a valid status; allowed: {FILE_STATUS_VALUES}'
        },
        **kwargs,
    )


class FileExecutionUpdateSerializer(StrictSerializer):
    """Body of ``PATCH file-executions/{id}/`` (and a batch update): any of its fields but
    the execution it belongs to; the status moves forward only."""

    file_name = serializers.CharField(max_length=1024, required=False)
    file_hash = serializers.CharField(max_length=128, required=False, allow_blank=True)
    status = _file_status(required=False)
    error_message = serializers.CharField(
        max_length=10000, required=False, allow_blank=True, trim_whitespace=False
    )
    execution_time = _seconds(required=False, allow_null=True)
    result = ResultField(required=False, allow_null=True)


class FileExecutionCreateSerializer(FileExecutionUpdateSerializer):
    """Body of ``POST file-executions/`` (and a batch create): the update's fields, with
    ``file_name`` required and ``execution_id`` naming one of the organization's executions;
    a field left out takes the model's default (``PENDING``, no hash, no error message)."""

    execution_id = serializers.UUIDField()
    file_name = serializers.CharField(max_length=1024)


class LifecycleCountsSerializer(serializers.Serializer):
    """Executions waiting for a repair by ``run_lifecycle`` (see ``lifecycle``)."""

    overdue_leases = serializers.IntegerField(
        help_text="IN_PROGRESS past their lease (or unleased past UNLEASED_TIMEOUT)"
    )
    overdue_dispatches = serializers.IntegerField(
        help_text="QUEUED and not claimed within DISPATCH_TIMEOUT"
    )
    unpublished_dispatches = serializers.IntegerField(help_text="outbox rows not published yet")
    overdue_webhooks = serializers.IntegerField(
        help_text="webhooks due and not recorded within WEBHOOK_DUE_TIMEOUT"
    )
    undeliverable_webhooks = serializers.IntegerField(
        help_text="webhooks past due on executions without a known task (finished by plain "
        "status updates): nothing can hand them to a worker"
    )
    failed_webhooks = serializers.IntegerField(
        help_text="webhooks given up as failed for good (handed WEBHOOK_MAX_ATTEMPTS times, "
        "recorded blocked, or their execution could not be dispatched)"
    )


class HealthSerializer(serializers.Serializer):
    """Liveness answer of ``GET health/``."""

    status = serializers.CharField()
    version = serializers.CharField()
    timestamp = serializers.DateTimeField()
    lifecycle = LifecycleCountsSerializer(
        allow_null=True, help_text="null when the database cannot be read"
    )


class ErrorSerializer(serializers.Serializer):
    """Every error body: a machine-readable code and a human-readable message."""

    error = serializers.CharField()
    detail = serializers.CharField()
