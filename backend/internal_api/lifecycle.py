"""The backend's repairs of executions (DESIGN.md "Execution lifecycle"): one :func:`run_pass`.

``manage.py run_lifecycle`` calls :func:`run_pass` every ``LIFECYCLE_INTERVAL`` seconds. A pass
has four steps, each made of short transactions of at most :data:`BATCH` rows:

1. :func:`publish_pending` publishes the outbox (unpublished :class:`Dispatch` rows) with
   ``publish.publish_dispatch``, which records each row published and makes a PENDING or
   QUEUED execution QUEUED with ``queued_at = now``.
2. :func:`reap`: an IN_PROGRESS execution whose lease expired (or that never had one and did
   not change for ``UNLEASED_TIMEOUT``) was lost by its worker: ``lost_count + 1``, then ERROR
   "lost by its worker N times" once it was claimed ``EXECUTION_MAX_ATTEMPTS`` times, else
   QUEUED and dispatched again (ERROR as well when no task is known to dispatch it with).
3. :func:`redispatch_queued`: QUEUED and not claimed within ``DISPATCH_TIMEOUT`` (the broker
   lost the message): dispatched again.
4. :func:`rehand_webhooks`: terminal with a webhook due, neither delivered nor claimed within
   ``WEBHOOK_DUE_TIMEOUT``: dispatched again, so that a worker's claim gets the webhook.

Rows are taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several processes
share the work and never take the same row; SQLite's single writer (``BEGIN IMMEDIATE``)
serialises them. Status changes go through ``transitions`` (their event in the same statement);
a step's status changes, events and new outbox rows commit together. The
outbox is published inside the transaction that holds its rows: a process killed after the
publish and before the commit leaves them unpublished, and they are published again (a
duplicate message is harmless: the second claim is refused), never lost.

What the steps would repair now is also what :func:`overdue_counts` counts (the ``lifecycle``
part of ``GET health/``) and :func:`metrics_text` exposes (``GET metrics/``): the same
querysets, read from the database, so every gunicorn worker answers the same.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend.internal_api.models import (
    TERMINAL_STATUSES,
    Dispatch,
    DispatchReason,
    EventReason,
    ExecutionStatus,
    WorkflowExecution,
)
from backend.internal_api.publish import publish_dispatch
from backend.internal_api.transitions import Change, apply

logger = logging.getLogger("backend.lifecycle")

BATCH = 100
DEFAULT_QUEUE = "celery"
# Publishes failing in a row that stop the step until the next pass: the broker is down (one
# failure may be its row's own, a queue name the broker refuses: the next rows are tried).
BROKER_DOWN_AFTER = 2


@dataclass
class PassResult:
    """What one pass did, by kind of work (the command prints it with ``--once``)."""

    published: int = 0
    publish_failed: int = 0
    requeued: int = 0
    lost: int = 0
    redispatched: int = 0
    webhooks_rehanded: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return asdict(self)


# --- what is overdue: the one definition the steps, health and metrics share ----------------


def _no_unpublished_dispatch() -> Q:
    return ~Q(Exists(Dispatch.objects.filter(execution=OuterRef("pk"), published_at__isnull=True)))


def expired_leases(now: datetime) -> QuerySet[WorkflowExecution]:
    """IN_PROGRESS executions whose lease ran out (their worker stopped renewing it)."""
    return WorkflowExecution.objects.filter(
        status=ExecutionStatus.IN_PROGRESS, lease_expires_at__lt=now
    )


def unleased_overdue(now: datetime) -> QuerySet[WorkflowExecution]:
    """IN_PROGRESS executions without a lease (a plain task's) unchanged for UNLEASED_TIMEOUT."""
    return WorkflowExecution.objects.filter(
        status=ExecutionStatus.IN_PROGRESS,
        lease_expires_at__isnull=True,
        modified_at__lt=now - timedelta(seconds=settings.UNLEASED_TIMEOUT),
    )


def overdue_dispatches(now: datetime) -> QuerySet[WorkflowExecution]:
    """QUEUED executions with a known task, not claimed within DISPATCH_TIMEOUT of their
    last publish, and no message waiting in the outbox."""
    cutoff = now - timedelta(seconds=settings.DISPATCH_TIMEOUT)
    return (
        WorkflowExecution.objects.filter(status=ExecutionStatus.QUEUED)
        .filter(Q(queued_at__isnull=True) | Q(queued_at__lt=cutoff))
        .exclude(dispatch_task="")
        .filter(_no_unpublished_dispatch())
    )


def overdue_webhooks(now: datetime) -> QuerySet[WorkflowExecution]:
    """Terminal executions with a webhook due, neither delivered nor handed to a worker (nor
    published for one) within WEBHOOK_DUE_TIMEOUT, with a task to hand it with."""
    cutoff = now - timedelta(seconds=settings.WEBHOOK_DUE_TIMEOUT)
    return (
        WorkflowExecution.objects.filter(
            status__in=TERMINAL_STATUSES, webhook_delivered_at__isnull=True
        )
        .exclude(webhook_id="")
        .exclude(dispatch_task="")
        .filter(Q(webhook_handed_at__isnull=True) | Q(webhook_handed_at__lt=cutoff))
        .filter(Q(queued_at__isnull=True) | Q(queued_at__lt=cutoff))
        .filter(_no_unpublished_dispatch())
    )


def unpublished_dispatches() -> QuerySet[Dispatch]:
    """Outbox rows not published yet."""
    return Dispatch.objects.filter(published_at__isnull=True)


def overdue_counts(now: datetime | None = None) -> dict[str, int]:
    """What is waiting for a repair now: the ``lifecycle`` part of ``GET health/``."""
    now = now or timezone.now()
    return {
        "overdue_leases": expired_leases(now).count() + unleased_overdue(now).count(),
        "overdue_dispatches": overdue_dispatches(now).count(),
        "unpublished_dispatches": unpublished_dispatches().count(),
        "overdue_webhooks": overdue_webhooks(now).count(),
    }


# --- the steps --------------------------------------------------------------------------------


def _locked_batch(rows: QuerySet[WorkflowExecution]) -> list[WorkflowExecution]:
    """Up to BATCH rows, locked for this transaction; rows another process holds are skipped."""
    return list(rows.order_by("pk").select_for_update(skip_locked=True)[:BATCH])


def _dispatch(execution: WorkflowExecution, reason: str) -> Dispatch:
    return Dispatch(
        execution=execution,
        task=execution.dispatch_task,
        queue=execution.dispatch_queue or DEFAULT_QUEUE,
        reason=reason,
    )


def _log_repair(message: str, execution: WorkflowExecution, repair: str, **fields: object) -> None:
    logger.info(
        message,
        extra={
            "execution_id": str(execution.pk),
            "organization_id": execution.organization_id,
            "repair": repair,
            **fields,
        },
    )


def publish_pending(result: PassResult | None = None) -> PassResult:
    """Step 1: publish the outbox, oldest first; ``publish.publish_dispatch`` records each
    row published (and the execution QUEUED) in the transaction that holds the rows."""
    result = result or PassResult()
    failed: list[int] = []
    while True:
        failures_in_a_row = 0
        with transaction.atomic():
            batch = list(
                unpublished_dispatches()
                .exclude(pk__in=failed)
                .select_related("execution")
                .order_by("pk")
                .select_for_update(skip_locked=True, of=("self",))[:BATCH]
            )
            if not batch:
                return result
            for row in batch:
                try:
                    publish_dispatch(row)
                except DatabaseError:
                    raise  # the transaction is lost: the pass ends, the rows wait
                except Exception as exc:  # whatever the broker raised: the row waits
                    failed.append(row.pk)
                    result.publish_failed += 1
                    failures_in_a_row += 1
                    _log_publish_failure(row, exc)
                    if failures_in_a_row == BROKER_DOWN_AFTER:
                        break
                    continue
                failures_in_a_row = 0
                result.published += 1
        if failures_in_a_row == BROKER_DOWN_AFTER:
            return result


def _log_publish_failure(row: Dispatch, exc: BaseException) -> None:
    logger.warning(
        "dispatch not published; retried next pass",
        extra={
            "execution_id": str(row.execution_id),
            "dispatch_id": row.pk,
            "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300],
        },
    )


def reap(result: PassResult | None = None) -> PassResult:
    """Step 2: executions lost by their workers go back to QUEUED, or end ERROR."""
    result = result or PassResult()
    for rows, requeue_reason, lost_reason in (
        (expired_leases, DispatchReason.LEASE_EXPIRED, EventReason.LOST),
        (unleased_overdue, DispatchReason.UNLEASED_TIMEOUT, EventReason.UNLEASED_TIMEOUT),
    ):
        while _reap_batch(rows, requeue_reason, lost_reason, result):
            pass
    return result


def _reap_batch(
    rows: Callable[[datetime], QuerySet[WorkflowExecution]],
    requeue_reason: str,
    lost_reason: str,
    result: PassResult,
) -> bool:
    """One transaction of the reaper; False when nothing was left to reap."""
    with transaction.atomic():
        now = timezone.now()
        batch = _locked_batch(rows(now))
        for execution in batch:
            lost = execution.lost_count + 1
            if execution.attempts < settings.EXECUTION_MAX_ATTEMPTS and execution.dispatch_task:
                result.requeued += _requeue(execution, lost, requeue_reason, now)
            else:
                result.lost += _end_lost(execution, lost, lost_reason, now)
    return len(batch) == BATCH


def _lost_change(execution: WorkflowExecution, reason: str, now: datetime) -> Change:
    """The change of a lost execution: one more loss, no lease; only if it still is the
    IN_PROGRESS execution this pass found (same epoch)."""
    stamp = connection.ops.adapt_datetimefield_value(now)
    change = Change(reason=reason, leased=execution.lease_epoch > 0)
    change.set("lost_count = lost_count + 1")
    change.set("lease_expires_at = NULL")
    change.set("modified_at = %s", stamp)
    change.where("status = 'IN_PROGRESS' AND lease_epoch = %s", execution.lease_epoch)
    return change


def _requeue(execution: WorkflowExecution, lost: int, reason: str, now: datetime) -> bool:
    """QUEUED again with a new dispatch; False if the execution moved on meanwhile."""
    change = _lost_change(execution, reason, now)
    change.set("status = 'QUEUED'")
    change.set("queued_at = %s", connection.ops.adapt_datetimefield_value(now))
    if apply(execution.organization_id, execution.pk, change) is None:
        return False
    _dispatch(execution, reason).save()
    _log_repair(
        "execution lost by its worker: dispatched again",
        execution,
        reason,
        lost_count=lost,
        attempts=execution.attempts,
    )
    return True


def _end_lost(execution: WorkflowExecution, lost: int, reason: str, now: datetime) -> bool:
    """ERROR "lost by its worker N times"; False if the execution moved on meanwhile."""
    message = f"lost by its worker {lost} times"
    if execution.attempts < settings.EXECUTION_MAX_ATTEMPTS:
        message += "; no task is known to dispatch it again"
    stamp = connection.ops.adapt_datetimefield_value(now)
    change = _lost_change(execution, reason, now)
    change.set("status = 'ERROR'")
    change.set("error_message = %s", message)
    change.set("finished_at = %s", stamp)
    # The ERROR's completion webhook is due, as for any terminal status; no worker has it yet.
    change.set(
        "webhook_id = CASE WHEN webhook_url = '' THEN '' ELSE %s END",
        f"msg_{secrets.token_hex(16)}",
    )
    hand = bool(execution.webhook_url and execution.dispatch_task)
    if hand:
        change.set("queued_at = %s", stamp)
    if apply(execution.organization_id, execution.pk, change) is None:
        return False
    if hand:
        # Handed to a worker at once: its claim of the ERROR gets the webhook.
        _dispatch(execution, DispatchReason.WEBHOOK_DUE).save()
    _log_repair(
        "execution lost by its worker: ended ERROR",
        execution,
        reason,
        lost_count=lost,
        attempts=execution.attempts,
    )
    return True


def redispatch_queued(result: PassResult | None = None) -> PassResult:
    """Step 3: QUEUED executions not claimed within DISPATCH_TIMEOUT are dispatched again."""
    result = result or PassResult()
    while True:
        with transaction.atomic():
            now = timezone.now()
            batch = _locked_batch(overdue_dispatches(now))
            Dispatch.objects.bulk_create(
                _dispatch(execution, DispatchReason.DISPATCH_TIMEOUT) for execution in batch
            )
            WorkflowExecution.objects.filter(pk__in=[e.pk for e in batch]).update(queued_at=now)
        for execution in batch:
            _log_repair(
                "execution not claimed in time: dispatched again",
                execution,
                DispatchReason.DISPATCH_TIMEOUT,
            )
        result.redispatched += len(batch)
        if len(batch) < BATCH:
            return result


def rehand_webhooks(result: PassResult | None = None) -> PassResult:
    """Step 4: webhooks due and not recorded within WEBHOOK_DUE_TIMEOUT are handed again."""
    result = result or PassResult()
    while True:
        with transaction.atomic():
            now = timezone.now()
            batch = _locked_batch(overdue_webhooks(now))
            Dispatch.objects.bulk_create(
                _dispatch(execution, DispatchReason.WEBHOOK_DUE) for execution in batch
            )
            WorkflowExecution.objects.filter(pk__in=[e.pk for e in batch]).update(queued_at=now)
        for execution in batch:
            _log_repair(
                "webhook due and not recorded: handed to a worker again",
                execution,
                DispatchReason.WEBHOOK_DUE,
            )
        result.webhooks_rehanded += len(batch)
        if len(batch) < BATCH:
            return result


def run_pass() -> PassResult:
    """One pass of the four steps; the repairs' new dispatches are published in the same pass."""
    result = publish_pending()
    reap(result)
    redispatch_queued(result)
    rehand_webhooks(result)
    if result.requeued or result.lost or result.redispatched or result.webhooks_rehanded:
        publish_pending(result)
    return result


# --- metrics ----------------------------------------------------------------------------------


class _LifecycleCollector(Collector):
    """The lifecycle's figures, read from the database at each scrape."""

    def collect(self) -> Iterable[Metric]:
        """Overdue gauges, lost and dispatch counters."""
        overdue = GaugeMetricFamily(
            "internal_api_lifecycle_overdue",
            "Executions waiting for a repair of this kind now (what GET health/ counts)",
            labels=["kind"],
        )
        for name, value in overdue_counts().items():
            overdue.add_metric([name.removeprefix("overdue_")], value)
        yield overdue
        lost = WorkflowExecution.objects.aggregate(total=Sum("lost_count"))["total"] or 0
        yield CounterMetricFamily(
            "internal_api_lifecycle_lost",
            "Times executions were found lost by their workers (lease expired or unleased)",
            value=lost,
        )
        dispatches = CounterMetricFamily(
            "internal_api_lifecycle_dispatches",
            "Dispatches (Celery messages) created, by reason",
            labels=["reason"],
        )
        by_reason = dict(
            Dispatch.objects.values_list("reason")
            .annotate(n=Count("pk"))
            .values_list("reason", "n")
        )
        for reason in DispatchReason.values:
            dispatches.add_metric([reason], by_reason.get(reason, 0))
        yield dispatches
        executions = GaugeMetricFamily(
            "internal_api_executions", "Executions by status", labels=["status"]
        )
        by_status = dict(
            WorkflowExecution.objects.values_list("status")
            .annotate(n=Count("pk"))
            .values_list("status", "n")
        )
        for status in ExecutionStatus.values:
            executions.add_metric([status], by_status.get(status, 0))
        yield executions


def metrics_text() -> bytes:
    """``GET metrics/``: the Prometheus text exposition of the lifecycle's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LifecycleCollector())
    return generate_latest(registry)
