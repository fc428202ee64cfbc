"""Atomic changes of workflow executions: status transitions, claims, leases, dispatches.

Every change is one conditional ``UPDATE ... WHERE id = %s AND organization_id = %s AND
<condition> RETURNING <row>``: the database decides, under its row lock (PostgreSQL) or write
lock (SQLite), whether the row is still in a state the change applies to. Of two workers
racing (two claims, two terminal statuses) exactly one UPDATE matches; the other gets no row
back, reads the row, and answers why (409 ``illegal_transition``, ``lease_held``,
``lease_lost``, or 200 when the row already is what was asked). No read-modify-write window
exists, so no update is lost.

A change of status also writes its :class:`~backend.internal_api.models.ExecutionEvent` in the
same statement (PostgreSQL: one ``WITH`` statement that locks the row, updates it and inserts
the event when the status really changed) or the same transaction (SQLite: read the status,
update, insert, under the write lock ``BEGIN IMMEDIATE`` takes). A change that applies costs one
statement on PostgreSQL; one that does not, two.

Fencing: a lease holder's writes name its epoch; they apply only while that epoch is the
current one and its lease is live (or the execution finished, so the holder may still record
its webhook).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from backend.internal_api.errors import APIError
from backend.internal_api.models import (
    ALLOWED_SOURCES,
    TERMINAL_STATUSES,
    EventReason,
    ExecutionEvent,
    ExecutionStatus,
    WorkflowExecution,
)

# The fields a finish (or PATCH) may set besides the status, with the status endpoint's names.
RESULT_FIELDS = ("result", "total_files", "successful_files", "failed_files")
_TERMINAL_SQL = "('COMPLETED', 'ERROR', 'STOPPED')"


@dataclass
class Change:
    """One conditional UPDATE of an execution: ``SET`` terms and the ``WHERE`` condition
    beyond id and organization, each with its parameters; ``reason`` names the event written
    when the status changes (None: the change writes no event)."""

    sets: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    condition: list[str] = field(default_factory=list)
    condition_params: list[Any] = field(default_factory=list)
    reason: str | None = None
    leased: bool = False  # the event names the lease holder and its epoch
    # The event is written even when the status stays (a takeover claim: a new holder).
    always_event: bool = False
    # The change bumps ``lease_epoch`` (the reaper fencing a lost holder out): the event names
    # the epoch before it, the lost holder's.
    epoch_bumped: bool = False

    def set(self, term: str, *params: Any) -> None:
        """Add ``term`` (``column = <expression>``) to the SET clause."""
        self.sets.append(term)
        self.params.extend(params)

    def where(self, term: str, *params: Any) -> None:
        """Add ``term`` to the WHERE clause (AND)."""
        self.condition.append(term)
        self.condition_params.extend(params)


def apply(organization_id: str, execution_id: Any, change: Change) -> WorkflowExecution | None:
    """Apply ``change`` to one execution; the row as stored afterwards (its status before
    the change in ``from_status``), or None when no row matched (unknown, or the condition
    does not hold)."""
    now = _prep("at", timezone.now(), ExecutionEvent)
    where = " AND ".join(change.condition) or "TRUE"
    keys = [_prep("id", execution_id), organization_id]
    if connection.vendor == "postgresql":
        return _apply_postgresql(keys, change, where, now)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT status FROM {_TABLE} WHERE id = %s AND organization_id = %s", keys
            )
            found = cursor.fetchone()
        if found is None:
            return None
        sql = (
            f"UPDATE {_TABLE} SET {', '.join(change.sets)} "
            f"WHERE id = %s AND organization_id = %s AND {where} RETURNING {_COLUMNS}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*change.params, *keys, *change.condition_params])
            values = cursor.fetchone()
            if values is None:
                return None
            row = _instance(values)
            row.from_status = found[0]
            if change.reason is not None and (change.always_event or row.from_status != row.status):
                cursor.execute(
                    f"INSERT INTO {_EVENTS} (execution_id, from_status, to_status, at, worker, "
                    "epoch, reason) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [
                        keys[0],
                        row.from_status,
                        row.status,
                        now,
                        row.lease_worker if change.leased else "",
                        row.lease_epoch - change.epoch_bumped if change.leased else None,
                        change.reason,
                    ],
                )
        return row


def _apply_postgresql(
    keys: list[Any], change: Change, where: str, now: Any
) -> WorkflowExecution | None:
    """The change as one statement: lock the row (so its status before is the one the
    update sees), update it, insert the event when the status changed."""
    sql = (
        f"WITH old AS (SELECT id AS old_id, status AS old_status FROM {_TABLE} "
        "WHERE id = %s AND organization_id = %s FOR UPDATE), "
        f"changed AS (UPDATE {_TABLE} SET {', '.join(change.sets)} FROM old "
        f"WHERE id = old.old_id AND {where} RETURNING {_QUALIFIED}, old.old_status)"
    )
    params = [*keys, *change.params, *change.condition_params]
    if change.reason is not None:
        epoch = "lease_epoch - 1" if change.epoch_bumped else "lease_epoch"
        worker, epoch = ("lease_worker", epoch) if change.leased else ("''", "NULL")
        when = "TRUE" if change.always_event else "old_status <> status"
        sql += (
            f", event AS (INSERT INTO {_EVENTS} (execution_id, from_status, to_status, at, "
            f"worker, epoch, reason) SELECT id, old_status, status, %s, {worker}, {epoch}, %s "
            f"FROM changed WHERE {when})"
        )
        params += [now, change.reason]
    with connection.cursor() as cursor:
        cursor.execute(sql + " SELECT * FROM changed", params)
        values = cursor.fetchone()
    if values is None:
        return None
    row = _instance(values)
    row.from_status = values[-1]
    return row


def read(organization_id: str, execution_id: Any) -> WorkflowExecution:
    """The execution as stored; 404 when unknown (or another organization's). The
    transitions' own: they sit below the declarations (``views.WORKFLOW_EXECUTIONS.get``)."""
    execution = WorkflowExecution.objects.filter(
        pk=execution_id, organization_id=organization_id
    ).first()
    if execution is None:
        raise APIError(404, "not_found", "no such workflow execution")
    return execution


def fence(change: Change, epoch: int, now: Any) -> None:
    """Let ``change`` apply only for the holder of lease ``epoch``: current, and live or
    finished."""
    change.where(
        f"lease_epoch = %s AND (lease_expires_at >= %s OR status IN {_TERMINAL_SQL})", epoch, now
    )


def apply_fenced(
    organization_id: str, execution_id: Any, change: Change, epoch: int | None
) -> tuple[WorkflowExecution, bool]:
    """:func:`apply` ``change``; returns the row and True when it applied. When it did not, the
    row as stored and False, after :func:`check_fence` (409 ``lease_lost`` for a superseded or
    expired ``epoch``): the caller says why else it was refused."""
    updated = apply(organization_id, execution_id, change)
    if updated is not None:
        return updated, True
    execution = read(organization_id, execution_id)
    check_fence(execution, epoch)
    return execution, False


def check_fence(execution: WorkflowExecution, epoch: int | None) -> None:
    """409 ``lease_lost`` when ``epoch`` (from ``X-Lease-Epoch``) no longer holds
    ``execution``; nothing when it does, or when no epoch was given."""
    if epoch is None:
        return
    if execution.lease_epoch != epoch:
        raise superseded(epoch)
    if execution.status not in TERMINAL_STATUSES and not lease_live(execution):
        raise APIError(409, "lease_lost", f"the lease of epoch {epoch} has expired")


def superseded(epoch: int) -> APIError:
    """The 409 ``lease_lost`` for a write under an epoch that is not the current one."""
    return APIError(
        409,
        "lease_lost",
        f"lease epoch {epoch} is not the current one: another claim superseded it",
    )


def lease_live(execution: WorkflowExecution, now: datetime | None = None) -> bool:
    """True while the execution's lease has not expired."""
    expires = execution.lease_expires_at
    return expires is not None and expires >= (now or timezone.now())


def apply_status(
    organization_id: str,
    execution_id: Any,
    target: str,
    *,
    epoch: int | None = None,
    error_message: str | None = None,
    attempts: int | None = None,
    execution_time: float | None = None,
    result: Any = None,
    total_files: int | None = None,
    successful_files: int | None = None,
    failed_files: int | None = None,
) -> WorkflowExecution:
    """Move one execution to ``target``; returns it as stored afterwards.

    Setting the status it already has changes no status or timestamp; for a non-terminal
    status the optional fields sent with it (a retry's ``attempts``, say) are recorded, for a
    terminal one nothing at all changes. A terminal status is a finish: it takes the result
    and file counts with it, ends the lease (the epoch stays, so the holder can still record
    its webhook) and makes the webhook due when the execution has a ``webhook_url``. With
    ``epoch`` (``X-Lease-Epoch``) only that lease's holder may change it. Raises 404 for an
    unknown execution (or another organization's), 409 ``illegal_transition`` for a move the
    rules forbid, 409 ``lease_lost`` for a superseded or expired ``epoch``.
    """
    now = _prep("modified_at", timezone.now())
    change = Change(reason=EventReason.STATUS)
    change.set("status = %s", target)
    change.set("modified_at = %s", now)
    if target == ExecutionStatus.QUEUED:
        change.set("queued_at = CASE WHEN status = 'QUEUED' THEN queued_at ELSE %s END", now)
    if target == ExecutionStatus.IN_PROGRESS:
        change.set("started_at = COALESCE(started_at, %s)", now)
    if target in TERMINAL_STATUSES:
        change.set("finished_at = %s", now)
        change.set("lease_expires_at = NULL")
        change.set(
            "webhook_id = CASE WHEN webhook_url = '' THEN '' ELSE %s END",
            f"msg_{secrets.token_hex(16)}",
        )
        change.set("webhook_handed_at = CASE WHEN webhook_url = '' THEN NULL ELSE %s END", now)
        change.set("webhook_handed_count = CASE WHEN webhook_url = '' THEN 0 ELSE 1 END")
    for name, value in (
        ("error_message", error_message),
        ("attempts", attempts),
        ("execution_time", execution_time),
        ("result", result),
        ("total_files", total_files),
        ("successful_files", successful_files),
        ("failed_files", failed_files),
    ):
        if value is not None:
            change.set(f"{name} = %s", _prep(name, value))
    sources: Sequence[str] = ALLOWED_SOURCES[target]
    if target not in TERMINAL_STATUSES:
        sources = (*sources, target)
    change.where(f"status IN ({', '.join(['%s'] * len(sources))})", *sources)
    if epoch is not None:
        fence(change, epoch, now)
        change.leased = True
        if target in TERMINAL_STATUSES:
            change.reason = EventReason.FINISHED
    execution, applied = apply_fenced(organization_id, execution_id, change, epoch)
    if applied:
        return execution
    if execution.status != target:
        raise APIError(
            409,
            "illegal_transition",
            f"cannot change status from {execution.status} to {target}",
        )
    return execution


def update_fields(
    organization_id: str, execution_id: Any, values: dict[str, Any], *, epoch: int | None
) -> WorkflowExecution:
    """Set non-status fields (PATCH); with ``epoch`` only for that lease's holder."""
    now = _prep("modified_at", timezone.now())
    change = Change()
    change.set("modified_at = %s", now)
    for name, value in values.items():
        if value is None:
            change.set(f"{name} = NULL")  # SQL NULL, as the ORM writes it (not JSON null)
        else:
            change.set(f"{name} = %s", _prep(name, value))
    if epoch is not None:
        fence(change, epoch, now)
    execution, applied = apply_fenced(organization_id, execution_id, change, epoch)
    if applied:
        return execution
    raise APIError(409, "lease_lost", f"the lease of epoch {epoch} changed meanwhile")


@dataclass(frozen=True)
class Claim:
    """A successful claim: the execution as stored and when its lease (or webhook hand-over)
    ends."""

    execution: WorkflowExecution
    epoch: int
    expires_at: datetime


def claim(
    organization_id: str,
    execution_id: Any,
    *,
    worker: str,
    lease_seconds: int,
    task: str | None = None,
    queue: str | None = None,
) -> Claim:
    """Take the lease of an execution (rules in DESIGN.md, "Execution lifecycle").

    PENDING or QUEUED, or IN_PROGRESS without a live lease: -> IN_PROGRESS, new epoch, one
    more attempt. Terminal with its webhook due and not handed out within
    ``WEBHOOK_DUE_TIMEOUT``: a new epoch for delivering the webhook, status unchanged. A live
    lease, or a webhook handed out recently: 409 ``lease_held`` (``Retry-After``); otherwise
    terminal: 409 ``illegal_transition``. A claim by the worker that holds the live lease (or
    the webhook's hand-out) is that claim retried, its answer lost: it gets the same lease back,
    unchanged, so a claim needs no ``Idempotency-Key``.
    """
    for _ in range(3):  # a lease may expire between the UPDATE and the read that explains it
        now = timezone.now()
        stamp = _prep("modified_at", now)
        # A takeover (IN_PROGRESS whose lease ran out) keeps the status: its event is written
        # all the same, so the history names every holder.
        change = Change(reason=EventReason.CLAIMED, leased=True, always_event=True)
        change.set("status = 'IN_PROGRESS'")
        change.set("lease_epoch = lease_epoch + 1")
        change.set("lease_worker = %s", worker)
        change.set(
            "lease_expires_at = %s",
            _prep("lease_expires_at", now + timedelta(seconds=lease_seconds)),
        )
        change.set("lease_seconds = %s", lease_seconds)
        change.set("attempts = attempts + 1")
        change.set("unclaimed_dispatches = 0")
        change.set("started_at = COALESCE(started_at, %s)", stamp)
        change.set("modified_at = %s", stamp)
        if task is not None:
            change.set("dispatch_task = %s", task)
            change.set("dispatch_queue = %s", queue or "celery")
        change.where(
            "(status IN ('PENDING', 'QUEUED') OR (status = 'IN_PROGRESS' AND "
            "(lease_expires_at IS NULL OR lease_expires_at < %s)))",
            stamp,
        )
        updated = apply(organization_id, execution_id, change)
        if updated is not None:
            assert updated.lease_expires_at is not None
            return Claim(updated, updated.lease_epoch, updated.lease_expires_at)
        execution = read(organization_id, execution_id)
        if execution.status == ExecutionStatus.IN_PROGRESS and lease_live(execution, now):
            assert execution.lease_expires_at is not None
            if execution.lease_worker == worker:
                return Claim(execution, execution.lease_epoch, execution.lease_expires_at)
            raise _lease_held(execution.lease_expires_at - now, "a live lease is held")
        if execution.status in TERMINAL_STATUSES:
            return _claim_webhook(organization_id, execution, worker, lease_seconds, now)
    raise _lease_held(timedelta(seconds=1), "the execution is changing; retry")


def _claim_webhook(
    organization_id: str,
    execution: WorkflowExecution,
    worker: str,
    lease_seconds: int,
    now: datetime,
) -> Claim:
    """The claim of a terminal execution: its due webhook, when nobody delivers it now."""
    if (
        not execution.webhook_id
        or execution.webhook_delivered_at is not None
        or execution.webhook_failed_at is not None
    ):
        raise APIError(
            409, "illegal_transition", f"the execution is {execution.status}: nothing to run"
        )
    timeout = timedelta(seconds=settings.WEBHOOK_DUE_TIMEOUT)
    handed = execution.webhook_handed_at
    stamp = _prep("modified_at", now)
    if handed is None or handed < now - timeout:
        change = Change()
        change.set("lease_epoch = lease_epoch + 1")
        change.set("lease_worker = %s", worker)
        change.set("lease_seconds = %s", lease_seconds)
        change.set("webhook_handed_at = %s", stamp)
        change.set("webhook_handed_count = webhook_handed_count + 1")
        change.set("modified_at = %s", stamp)
        change.where(
            f"status IN {_TERMINAL_SQL} AND webhook_id = %s AND webhook_delivered_at IS NULL "
            "AND webhook_failed_at IS NULL "
            "AND (webhook_handed_at IS NULL OR webhook_handed_at < %s)",
            execution.webhook_id,
            _prep("modified_at", now - timeout),
        )
        updated = apply(organization_id, execution.pk, change)
        if updated is not None:
            return Claim(updated, updated.lease_epoch, now + timeout)
        execution = read(organization_id, execution.pk)
        handed = execution.webhook_handed_at or now
    if execution.lease_worker == worker and handed >= now - timeout:  # its retried claim
        return Claim(execution, execution.lease_epoch, handed + timeout)
    raise _lease_held(handed + timeout - now, "its due webhook is being delivered")


def _lease_held(remaining: timedelta, why: str) -> APIError:
    seconds = max(1, math.ceil(remaining.total_seconds()))
    return APIError(
        409, "lease_held", f"{why}; retry in {seconds} s", {"Retry-After": str(seconds)}
    )


def heartbeat(
    organization_id: str, execution_id: Any, epoch: int, lease_seconds: int | None
) -> WorkflowExecution:
    """Extend the live lease ``epoch`` by ``lease_seconds`` (default: the claimed length);
    409 ``lease_lost`` when that lease is no longer current and live."""
    now = timezone.now()
    stamp = _prep("modified_at", now)
    change = Change()
    if lease_seconds is not None:
        expires = _prep("lease_expires_at", now + timedelta(seconds=lease_seconds))
        change.set("lease_expires_at = %s", expires)
        change.set("lease_seconds = %s", lease_seconds)
    elif connection.vendor == "postgresql":
        change.set("lease_expires_at = %s::timestamptz + make_interval(secs => lease_seconds)", now)
    else:
        change.set(
            "lease_expires_at = strftime('%%Y-%%m-%%d %%H:%%M:%%f', %s, "
            "'+' || lease_seconds || ' seconds')",
            stamp,
        )
    change.set("modified_at = %s", stamp)
    change.where(
        "status = 'IN_PROGRESS' AND lease_epoch = %s AND lease_expires_at >= %s", epoch, stamp
    )
    execution, applied = apply_fenced(organization_id, execution_id, change, epoch)
    if applied:
        return execution
    raise APIError(409, "lease_lost", f"the lease of epoch {epoch} has ended")


def release(
    organization_id: str, execution_id: Any, epoch: int, retry_in: float
) -> WorkflowExecution:
    """Give lease ``epoch`` back: IN_PROGRESS -> QUEUED, due for dispatch ``retry_in``
    seconds from now; 409 ``lease_lost`` when it is no longer the holder's."""
    now = timezone.now()
    stamp = _prep("modified_at", now)
    change = Change(reason=EventReason.RELEASED, leased=True)
    change.set("status = 'QUEUED'")
    change.set("lease_expires_at = NULL")
    change.set("queued_at = %s", _prep("queued_at", now + timedelta(seconds=retry_in)))
    change.set("modified_at = %s", stamp)
    change.where(
        "status = 'IN_PROGRESS' AND lease_epoch = %s AND lease_expires_at IS NOT NULL", epoch
    )
    execution, applied = apply_fenced(organization_id, execution_id, change, epoch)
    if applied:
        return execution
    raise APIError(409, "lease_lost", f"the lease of epoch {epoch} has ended")


def mark_dispatched(organization_id: str, execution_id: Any) -> WorkflowExecution | None:
    """Record that an execution's message was published: PENDING/QUEUED -> QUEUED with
    ``queued_at = now`` (event ``dispatched`` when the status changed); None when the
    execution has moved on (claimed, terminal) or is gone."""
    stamp = _prep("modified_at", timezone.now())
    change = Change(reason=EventReason.DISPATCHED)
    change.set("status = 'QUEUED'")
    change.set("queued_at = %s", stamp)
    change.set("unclaimed_dispatches = unclaimed_dispatches + 1")
    change.set("modified_at = %s", stamp)
    change.where("status IN ('PENDING', 'QUEUED')")
    return apply(organization_id, execution_id, change)


_META = WorkflowExecution._meta
_TABLE = connection.ops.quote_name(_META.db_table)
_EVENTS = connection.ops.quote_name(ExecutionEvent._meta.db_table)
_COLUMNS = ", ".join(connection.ops.quote_name(f.column) for f in _META.concrete_fields)
_QUALIFIED = ", ".join(
    f"{_TABLE}.{connection.ops.quote_name(f.column)}" for f in _META.concrete_fields
)


_FIELDS = _META.concrete_fields
_ATTNAMES = [f.attname for f in _FIELDS]
# (column index, column, converters) of the columns the driver's value needs converting for
# (JSON text, SQLite's timestamps and UUIDs), as the ORM's compiler would convert them.


def _converters() -> list[tuple[int, Any, list[Any]]]:
    out = []
    for index, model_field in enumerate(_FIELDS):
        col = model_field.get_col(_META.db_table)
        found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
        if found:
            out.append((index, col, found))
    return out


_CONVERTERS = _converters()


def _instance(values: Sequence[Any]) -> WorkflowExecution:
    """A model instance of a row (its columns in ``_COLUMNS`` order, extra ones after),
    without the ORM's per-query machinery: one of these is built per request."""
    converted = list(values[: len(_FIELDS)])
    for index, col, converters in _CONVERTERS:
        value = converted[index]
        for converter in converters:
            value = converter(value, col, connection)
        converted[index] = value
    return WorkflowExecution.from_db(connection.alias, _ATTNAMES, converted)


def _prep(field_name: str, value: Any, model: type[Any] = WorkflowExecution) -> Any:
    """``value`` as the database driver wants it for the named field."""
    return model._meta.get_field(field_name).get_db_prep_value(value, connection)
