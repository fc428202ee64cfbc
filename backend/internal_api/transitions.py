"""Atomic status transitions of workflow executions (the rules are in ``models``' docstring).

One conditional ``UPDATE ... WHERE id = %s AND organization_id = %s AND status IN (<allowed
sources>) RETURNING <row>`` applies a transition: the database decides, under its row lock
(PostgreSQL) or write lock (SQLite), whether the row still has a status the target may be
reached from. Of two workers racing to different terminal statuses exactly one UPDATE matches;
the other gets no row back, reads the row, and answers 409 ``illegal_transition`` (or 200 when
the row already has the wanted status). No read-modify-write window exists, so no update is
lost. A transition that applies costs one statement; one that does not, two.
"""

from __future__ import annotations

from typing import Any

from django.db import connection
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
    now = _prep("modified_at", timezone.now())
    sets = ["status = %s", "modified_at = %s"]
    params: list[Any] = [target, now]
    if target == ExecutionStatus.IN_PROGRESS:
        sets.append("started_at = COALESCE(started_at, %s)")
        params.append(now)
    if target in TERMINAL_STATUSES:
        sets.append("finished_at = %s")
        params.append(now)
    for name, value in (
        ("error_message", error_message),
        ("attempts", attempts),
        ("execution_time", execution_time),
    ):
        if value is not None:
            sets.append(f"{name} = %s")
            params.append(_prep(name, value))
    sources = ALLOWED_SOURCES[target]
    if target not in TERMINAL_STATUSES:
        sources = (*sources, target)
    sql = (
        f"UPDATE {_TABLE} SET {', '.join(sets)} WHERE id = %s AND organization_id = %s "
        f"AND status IN ({', '.join(['%s'] * len(sources))}) RETURNING {_COLUMNS}"
    )
    params += [_prep("id", execution_id), organization_id, *sources]
    # raw() turns the RETURNING row into a model instance with the backend's converters.
    updated = list(WorkflowExecution.objects.raw(sql, params))
    if updated:
        return updated[0]
    execution = WorkflowExecution.objects.filter(
        pk=execution_id, organization_id=organization_id
    ).first()
    if execution is None:
        raise APIError(404, "not_found", "no such workflow execution")
    if execution.status != target:
        raise APIError(
            409,
            "illegal_transition",
            f"cannot change status from {execution.status} to {target}",
        )
    return execution


_META = WorkflowExecution._meta
_TABLE = connection.ops.quote_name(_META.db_table)
_COLUMNS = ", ".join(connection.ops.quote_name(f.column) for f in _META.concrete_fields)


def _prep(field_name: str, value: Any) -> Any:
    """``value`` as the database driver wants it for the named field."""
    return _META.get_field(field_name).get_db_prep_value(value, connection)
