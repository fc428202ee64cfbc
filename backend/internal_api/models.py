"""Database models of the internal API: organizations, executions, deliveries, idempotency.

Status transitions of a :class:`WorkflowExecution` (the only ones the API applies)::

    PENDING ──> QUEUED ──> IN_PROGRESS ──> COMPLETED | ERROR | STOPPED
       │           └──────────────────────> COMPLETED | ERROR | STOPPED
       └──────────────────────────────────> QUEUED | IN_PROGRESS | COMPLETED | ERROR | STOPPED

Status only moves forward: any non-terminal status may jump to a later one, a terminal status
(COMPLETED, ERROR, STOPPED) never changes, and setting the status an execution already has is a
no-op, so a retried update is harmless. ``started_at`` is set by the first move to IN_PROGRESS,
``finished_at`` by the move to a terminal status.
"""

from __future__ import annotations

import uuid

from django.db import models


class ExecutionStatus(models.TextChoices):
    """Lifecycle states of a workflow execution, in their forward order."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    STOPPED = "STOPPED"


TERMINAL_STATUSES = frozenset({"COMPLETED", "ERROR", "STOPPED"})
# Forward order of the statuses; the three terminal ones share the last rank.
_ORDER = {"PENDING": 0, "QUEUED": 1, "IN_PROGRESS": 2, "COMPLETED": 3, "ERROR": 3, "STOPPED": 3}
# Target status -> the statuses it may be reached from (excluding itself: that is a no-op).
ALLOWED_SOURCES: dict[str, tuple[str, ...]] = {
    target: tuple(
        source
        for source in _ORDER
        if source not in TERMINAL_STATUSES and _ORDER[source] < _ORDER[target]
    )
    for target in _ORDER
}


class Organization(models.Model):
    """A tenant; every execution and delivery belongs to exactly one."""

    id = models.CharField(primary_key=True, max_length=64)
    name = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.id


class WorkflowExecution(models.Model):
    """One run of a workflow, advanced by workers through the status endpoint."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="executions"
    )
    workflow_id = models.CharField(max_length=255)
    pipeline_id = models.CharField(max_length=255, null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=ExecutionStatus.choices, default=ExecutionStatus.PENDING
    )
    error_message = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    execution_time = models.FloatField(null=True, blank=True, help_text="seconds")
    total_files = models.PositiveIntegerField(default=0)
    successful_files = models.PositiveIntegerField(default=0)
    failed_files = models.PositiveIntegerField(default=0)
    result = models.JSONField(null=True, blank=True)
    task_id = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"], name="exec_org_created"),
            models.Index(
                fields=["organization", "status", "-created_at", "-id"], name="exec_org_status"
            ),
            models.Index(
                fields=["organization", "workflow_id", "-created_at", "-id"],
                name="exec_org_workflow",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.status}"


class DeliveryOutcome(models.TextChoices):
    """How one webhook delivery ended."""

    DELIVERED = "delivered"
    FAILED = "failed"
    BLOCKED = "blocked"


class WebhookDelivery(models.Model):
    """The record of one webhook delivery a worker made (or refused to make)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="webhook_deliveries"
    )
    execution = models.ForeignKey(
        WorkflowExecution,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="webhook_deliveries",
    )
    url = models.URLField(max_length=2048)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=1)
    duration = models.FloatField(default=0.0, help_text="seconds, all attempts together")
    outcome = models.CharField(max_length=16, choices=DeliveryOutcome.choices)
    error_message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"], name="hook_org_created"),
            models.Index(
                fields=["organization", "execution", "-created_at", "-id"], name="hook_org_exec"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.outcome}"


class IdempotencyRecord(models.Model):
    """The stored response of a POST made with an ``Idempotency-Key`` (see ``idempotency``)."""

    key_hash = models.CharField(
        primary_key=True, max_length=64, help_text="sha256 of organization header and key"
    )
    fingerprint = models.CharField(max_length=64, help_text="sha256 of method, path and body")
    response_status = models.PositiveSmallIntegerField()
    response_body = models.BinaryField()
    response_content_type = models.CharField(max_length=100)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.key_hash[:12]} {self.response_status}"
