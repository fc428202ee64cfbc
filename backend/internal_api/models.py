"""Database models of the internal API: organizations, executions, their files, deliveries,
idempotency.

Status transitions of a :class:`WorkflowExecution` (the only ones the API applies)::

    PENDING ──> QUEUED ──> IN_PROGRESS ──> COMPLETED | ERROR | STOPPED
       │           └──────────────────────> COMPLETED | ERROR | STOPPED
       └──────────────────────────────────> QUEUED | IN_PROGRESS | COMPLETED | ERROR | STOPPED

Status only moves forward: any non-terminal status may jump to a later one, a terminal status
(COMPLETED, ERROR, STOPPED) never changes, and setting the status an execution already has is a
no-op, so a retried update is harmless. ``started_at`` is set by the first move to IN_PROGRESS,
``finished_at`` by the move to a terminal status.

The execution lifecycle (DESIGN.md, "Execution lifecycle") adds one backward move: the reaper
(``lifecycle``) and a lease holder's release return an IN_PROGRESS execution to QUEUED. A claim
takes a lease (``lease_epoch`` bumped, ``lease_expires_at`` set); a :class:`Dispatch` row is the
outbox of a Celery message still to publish; every status change is an
:class:`ExecutionEvent`; a terminal execution with a ``webhook_url`` has a webhook due
(``webhook_id``) until a delivery with that id is recorded.
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
    webhook_url = models.URLField(max_length=2048, blank=True, default="")
    dispatch_task = models.CharField(max_length=255, blank=True, default="")
    dispatch_queue = models.CharField(max_length=255, blank=True, default="")
    queued_at = models.DateTimeField(
        null=True, blank=True, help_text="last move to QUEUED or last publish"
    )
    lease_epoch = models.PositiveIntegerField(default=0, help_text="bumped by every claim")
    lease_worker = models.CharField(max_length=255, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True, help_text="null: no lease")
    lease_seconds = models.PositiveIntegerField(
        default=0, help_text="length of the lease taken; a heartbeat renews it by as much"
    )
    lost_count = models.PositiveIntegerField(default=0)
    webhook_id = models.CharField(
        max_length=40, blank=True, default="", help_text="msg_<32 hex> once a webhook is due"
    )
    webhook_handed_at = models.DateTimeField(null=True, blank=True)
    webhook_delivered_at = models.DateTimeField(null=True, blank=True)
    # Times the due webhook was handed to a worker (the finisher, then each claim of it); at
    # WEBHOOK_MAX_ATTEMPTS, or at a ``blocked`` record, it is given up: ``webhook_failed_at``.
    webhook_handed_count = models.PositiveIntegerField(default=0, db_default=0)
    webhook_failed_at = models.DateTimeField(null=True, blank=True)
    # Messages published since the last claim; the redispatch interval doubles with each, and
    # at EXECUTION_MAX_DISPATCHES the execution ends ERROR "never claimed".
    unclaimed_dispatches = models.PositiveIntegerField(default=0, db_default=0)

    class Meta:
        indexes = [
            # What the lifecycle process scans each pass: the few executions still moving,
            # and the webhooks due and not delivered.
            models.Index(
                fields=["status"],
                condition=models.Q(status__in=("QUEUED", "IN_PROGRESS")),
                name="exec_active",
            ),
            models.Index(
                fields=["webhook_handed_at"],
                condition=models.Q(webhook_delivered_at__isnull=True) & ~models.Q(webhook_id=""),
                name="exec_webhook_due",
            ),
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
    webhook_id = models.CharField(max_length=40, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A due webhook is recorded delivered once, whoever delivered it.
            models.UniqueConstraint(
                fields=["webhook_id"],
                condition=models.Q(outcome="delivered") & ~models.Q(webhook_id=""),
                name="hook_delivered_once",
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"], name="hook_org_created"),
            models.Index(
                fields=["organization", "execution", "-created_at", "-id"], name="hook_org_exec"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.outcome}"


class FileStatus(models.TextChoices):
    """States of one file of an execution, in their forward order."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"


FILE_TERMINAL_STATUSES = frozenset({"COMPLETED", "ERROR", "SKIPPED"})
_FILE_ORDER = {"PENDING": 0, "IN_PROGRESS": 1, "COMPLETED": 2, "ERROR": 2, "SKIPPED": 2}
# Target status -> the file statuses it may be reached from: forward only, terminal final.
FILE_ALLOWED_SOURCES: dict[str, tuple[str, ...]] = {
    target: tuple(
        source
        for source in _FILE_ORDER
        if source not in FILE_TERMINAL_STATUSES and _FILE_ORDER[source] < _FILE_ORDER[target]
    )
    for target in _FILE_ORDER
}


class FileExecution(models.Model):
    """One file of a workflow execution and how its processing went. The execution's
    ``total_files``, ``successful_files`` and ``failed_files`` follow from its files
    (``views.count_files``)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="file_executions"
    )
    execution = models.ForeignKey(
        WorkflowExecution, on_delete=models.CASCADE, related_name="files"
    )
    file_name = models.CharField(max_length=1024)
    file_hash = models.CharField(max_length=128, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=FileStatus.choices, default=FileStatus.PENDING
    )
    error_message = models.TextField(blank=True, default="")
    execution_time = models.FloatField(null=True, blank=True, help_text="seconds")
    result = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"], name="file_org_created"),
            models.Index(
                fields=["organization", "execution", "-created_at", "-id"], name="file_org_exec"
            ),
            models.Index(fields=["execution", "status"], name="file_exec_status"),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.status}"


class DispatchReason(models.TextChoices):
    """Why a Celery message for an execution was (or is to be) published."""

    CREATED = "created"
    LEASE_EXPIRED = "lease_expired"
    DISPATCH_TIMEOUT = "dispatch_timeout"
    UNLEASED_TIMEOUT = "unleased_timeout"
    WEBHOOK_DUE = "webhook_due"
    REQUESTED = "requested"


class Dispatch(models.Model):
    """The outbox: one Celery message to publish for an execution (``published_at`` null
    until it is)."""

    id = models.BigAutoField(primary_key=True)
    execution = models.ForeignKey(
        WorkflowExecution, on_delete=models.CASCADE, related_name="dispatches"
    )
    task = models.CharField(max_length=255)
    queue = models.CharField(max_length=255)
    reason = models.CharField(max_length=32, choices=DispatchReason.choices)
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)
    # Publishes of this row the broker refused while it was reachable (the row's own fault: a
    # task or queue name it cannot take); at DISPATCH_MAX_FAILURES the row is dead.
    attempts = models.PositiveIntegerField(default=0, db_default=0)
    last_error = models.CharField(max_length=300, blank=True, default="", db_default="")

    class Meta:
        indexes = [
            models.Index(
                fields=["id"],
                condition=models.Q(published_at__isnull=True),
                name="dispatch_unpublished",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.task} {self.reason}"


class EventReason(models.TextChoices):
    """What made an execution change status."""

    DISPATCHED = "dispatched"
    CLAIMED = "claimed"
    RELEASED = "released"
    LEASE_EXPIRED = "lease_expired"
    LOST = "lost"
    UNLEASED_TIMEOUT = "unleased_timeout"
    FINISHED = "finished"
    STATUS = "status"
    NEVER_CLAIMED = "never_claimed"
    UNDISPATCHABLE = "undispatchable"


class ExecutionEvent(models.Model):
    """One status change of an execution (its history, oldest first by ``id``)."""

    id = models.BigAutoField(primary_key=True)
    execution = models.ForeignKey(
        WorkflowExecution, on_delete=models.CASCADE, related_name="events"
    )
    from_status = models.CharField(max_length=16, choices=ExecutionStatus.choices)
    to_status = models.CharField(max_length=16, choices=ExecutionStatus.choices)
    at = models.DateTimeField()
    worker = models.CharField(max_length=255, blank=True, default="")
    epoch = models.PositiveIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=32, choices=EventReason.choices)

    class Meta:
        indexes = [models.Index(fields=["execution", "id"], name="event_exec")]

    def __str__(self) -> str:
        return f"{self.execution_id} {self.from_status}->{self.to_status} {self.reason}"


class IdempotencyRecord(models.Model):
    """The stored response of a POST made with an ``Idempotency-Key`` (see ``idempotency``)."""

    key_hash = models.CharField(
        primary_key=True, max_length=64, help_text="sha256 of organization header and key"
    )
    fingerprint = models.CharField(max_length=64, help_text="sha256 of method, path and body")
    response_status = models.PositiveSmallIntegerField()
    response_body = models.BinaryField()
    response_content_type = models.CharField(max_length=100)
    response_headers = models.TextField(
        default="{}", help_text="JSON object of the replayed headers (the ETag) answered"
    )
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.key_hash[:12]} {self.response_status}"
