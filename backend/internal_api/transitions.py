"""Atomic status transitions of workflow executions (the rules are in ``models``' docstring).

One conditional ``UPDATE ... WHERE id = %s AND organization_id = %s AND status IN (<allowed
sources>)`` applies a transition: the database decides, under its row lock (PostgreSQL) or
write lock (SQLite), whether the row still has a status the target may be reached from. Of
two workers racing to different terminal statuses exactly one UPDATE matches; the other sees
zero rows, reads the row, and gets 409 ``illegal_transition``. No read-modify-write window
exists, so no update is lost. A plain transition costs two statements: the UPDATE and the
SELECT that returns the row (which, under a race, may already show a later status).
"""

from __future__ import annotations

from typing import Any

from django.db.models import DateTimeField, F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from backend.internal_api.errors import APIError
from backend.internal_api.models import (
    ALLOWED_SOURCES,
    TERMINAL_STATUSES,
    ExecutionStatus,
    WorkflowExecution,
)


def apply_status(
    organization_id: str,
    execution_id: Any,
    target: str,
    *,
    error_message: str | None = None,
    attempts: int | None = None,
    execution_time: float | None = None,
) -> WorkflowExecution:
    """Move one execution to ``target``; returns it as stored afterwards.

    Setting the status it already has changes no status or timestamp; for a non-terminal
    status the optional fields sent with it (a retry's ``attempts``, say) are recorded, for a
    terminal one nothing at all changes. Raises 404 for an unknown execution (or another
    organization's), 409 ``illegal_transition`` for a move the rules forbid.
    """
    now = timezone.now()
    changes: dict[str, Any] = {"status": target, "modified_at": now}
    if target == ExecutionStatus.IN_PROGRESS:
        changes["started_at"] = Coalesce(F("started_at"), Value(now, output_field=DateTimeField()))
    if target in TERMINAL_STATUSES:
        changes["finished_at"] = now
    if error_message is not None:
        changes["error_message"] = error_message
    if attempts is not None:
        changes["attempts"] = attempts
    if execution_time is not None:
        changes["execution_time"] = execution_time
    sources = ALLOWED_SOURCES[target]
    if target not in TERMINAL_STATUSES:
        sources = (*sources, target)

    rows = WorkflowExecution.objects.filter(pk=execution_id, organization_id=organization_id)
    applied = rows.filter(status__in=sources).update(**changes)
    execution = rows.first()
    if execution is None:
        raise APIError(404, "not_found", "no such workflow execution")
    if not applied and execution.status != target:
        raise APIError(
            409,
            "illegal_transition",
            f"cannot change status from {execution.status} to {target}",
        )
    return execution
