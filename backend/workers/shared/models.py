"""The typed results of the internal API client: the backend's answers and a webhook's outcome.

``WorkflowExecution``, ``Claim``, ``Lease``, ``ExecutionEvent``, ``WebhookDelivery``,
``BackendHealth``, ``ExecutionWebhook`` and ``FileExecution`` are pydantic models that keep
fields the backend adds later in ``model_extra``; ``WebhookResult`` is what ``send_webhook``
returns; ``Record`` is a declared resource's object when no model is asked for. This module
imports pydantic and nothing of the client (no ``httpx2``), so a type hint or a test can use
the models without loading it; :mod:`backend.workers.shared.api_client` and the package
re-export every class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

__all__ = [
    "FINAL_FILE_STATUSES",
    "FINAL_STATUSES",
    "BackendHealth",
    "Claim",
    "ExecutionEvent",
    "ExecutionStatus",
    "ExecutionWebhook",
    "FileExecution",
    "FileStatus",
    "Lease",
    "Record",
    "ResultModel",
    "WebhookDelivery",
    "WebhookResult",
    "WorkflowExecution",
]

FINAL_STATUSES: Final = frozenset({"COMPLETED", "ERROR", "STOPPED"})
FINAL_FILE_STATUSES: Final = frozenset({"COMPLETED", "ERROR", "SKIPPED"})


class ExecutionStatus(StrEnum):
    """The statuses of a workflow execution; ``COMPLETED``, ``ERROR``, ``STOPPED`` are final."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    STOPPED = "STOPPED"


class FileStatus(StrEnum):
    """The statuses of a file of an execution: ``PENDING -> IN_PROGRESS -> COMPLETED | ERROR |
    SKIPPED`` (forward only); the three last are final."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"


class ResultModel(BaseModel):
    """The base of the backend's answers: immutable, and keeping the fields it adds later."""

    # Fields the backend adds later are kept (model_extra), never an error. The validator is
    # built on first use, not at import (worker start-up is measured).
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)
    _etag: str | None = PrivateAttr(None)

    @property
    def etag(self) -> str | None:
        """The version of this object the backend answered with it (its ``ETag``), for an
        ``If-Match``; ``None`` for an object read from a list or a batch answer."""
        return self._etag

    def stamped(self, etag: str | None) -> Self:
        """This object carrying ``etag`` (set once, by the call that read it)."""
        self._etag = etag
        return self

    def __eq__(self, other: object) -> bool:
        # The same fields are the same object, whichever answer (and ETag) brought it.
        if not isinstance(other, BaseModel):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.__dict__ == other.__dict__
            and self.__pydantic_extra__ == other.__pydantic_extra__
        )

    __hash__ = BaseModel.__hash__


class Record(dict[str, Any]):
    """A declared resource's object as a plain ``dict``, with the ``etag`` it was answered
    with (``None`` from a list or a batch answer)."""

    def __init__(self, data: dict[str, Any], etag: str | None = None) -> None:
        super().__init__(data)
        self.etag = etag

    def stamped(self, etag: str | None) -> Self:
        """This record carrying ``etag`` (set once, by the call that read it)."""
        self.etag = etag
        return self


class Lease(ResultModel):
    """A worker's lease on an execution: ``epoch`` fences its writes until ``expires_at``."""

    epoch: int
    worker: str = ""
    expires_at: datetime | None = None


class ExecutionWebhook(ResultModel):
    """The completion webhook due for an execution: ``id`` is its ``webhook-id``
    (``msg_...``, the same on every attempt), ``delivered`` whether it was recorded so,
    ``failed`` whether the backend gave it up (no more attempts)."""

    id: str
    url: str
    delivered: bool = False
    failed: bool = False


class WorkflowExecution(ResultModel):
    """One workflow execution as the backend returns it."""

    id: str
    organization_id: str | None = None
    workflow_id: str
    pipeline_id: str | None = None
    status: str
    error_message: str | None = None
    attempts: int = 0
    execution_time: float | None = None
    total_files: int = 0
    successful_files: int = 0
    failed_files: int = 0
    result: Any = None
    task_id: str | None = None
    created_at: datetime | None = None
    modified_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    webhook_url: str | None = None
    lease: Lease | None = None
    lost_count: int = 0
    webhook: ExecutionWebhook | None = None

    @property
    def is_final(self) -> bool:
        """True once the status can no longer change (``COMPLETED``, ``ERROR``, ``STOPPED``)."""
        return self.status in FINAL_STATUSES

    @property
    def webhook_due(self) -> ExecutionWebhook | None:
        """The completion webhook still to deliver, if any (neither delivered nor given up)."""
        hook = self.webhook
        return hook if hook is not None and not (hook.delivered or hook.failed) else None


class Claim(ResultModel):
    """What a successful claim returns: the execution (as it is now) and the new lease."""

    execution: WorkflowExecution
    lease: Lease


class ExecutionEvent(ResultModel):
    """One status change in an execution's history (``from_status`` is ``from``)."""

    from_status: str | None = Field(None, alias="from")
    to_status: str = Field(alias="to")
    at: datetime | None = None
    worker: str = ""
    epoch: int | None = None
    reason: str = ""


class WebhookDelivery(ResultModel):
    """One recorded webhook delivery (what was sent where, and how it ended)."""

    id: str
    organization_id: str | None = None
    url: str
    execution_id: str | None = None
    status_code: int | None = None
    attempts: int = 0
    duration: float = 0.0
    outcome: str
    error_message: str = ""
    created_at: datetime | None = None


class FileExecution(ResultModel):
    """One file of a workflow execution and how its processing went (``file-executions/``)."""

    id: str
    organization_id: str | None = None
    execution_id: str
    file_name: str
    file_hash: str = ""
    status: str = FileStatus.PENDING
    error_message: str = ""
    execution_time: float | None = None
    result: Any = None
    created_at: datetime | None = None
    modified_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        """True once the status can no longer change (``COMPLETED``, ``ERROR``, ``SKIPPED``)."""
        return self.status in FINAL_FILE_STATUSES


class BackendHealth(ResultModel):
    """The backend's answer to ``GET health/``."""

    status: str
    version: str | None = None
    timestamp: datetime | None = None


@dataclass(frozen=True)
class WebhookResult:
    """What ``send_webhook`` did: ``outcome`` is ``delivered`` (2xx) or ``failed``.

    ``delivery_id`` is the backend's record of it (empty only in a
    :class:`WebhookNotRecordedError`), ``message_id`` the ``webhook-id`` the
    receiver saw, ``status_code`` the receiver's last answer (``None`` if none came),
    ``duration`` seconds over all attempts, ``error`` why it failed, ``response_body`` the
    first 64 KiB at most of the receiver's answer.
    """

    delivery_id: str
    message_id: str
    url: str
    outcome: str
    status_code: int | None
    attempts: int
    duration: float
    error: str | None = None
    response_body: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """True when the receiver accepted the webhook (2xx)."""
        return self.outcome == "delivered"
