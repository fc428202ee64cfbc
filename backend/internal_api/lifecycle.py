"""The backend's repairs of executions (DESIGN.md "Execution lifecycle"): one :func:`run_pass`.

``manage.py run_lifecycle`` calls :func:`run_pass` every ``LIFECYCLE_INTERVAL`` seconds. A pass
has four steps, each made of short transactions of at most :data:`BATCH` rows:

1. :func:`publish_pending` publishes the outbox (unpublished :class:`Dispatch` rows) with
   ``publish.publish_dispatch``, which records each row published and makes a PENDING or
   QUEUED execution QUEUED with ``queued_at = now``. When a publish fails, a connection probe
   (``publish.broker_reachable``) decides: the broker is down (the step stops until the next
   pass; the row is not blamed) or it refused this row (``attempts + 1``, the next rows are
   tried). A row refused ``DISPATCH_MAX_FAILURES`` times is dead: its execution ends ERROR
   "cannot be dispatched: ..." (a terminal one's webhook is given up).
2. :func:`reap`: an IN_PROGRESS execution whose lease expired (or that never had one and did
   not change for ``UNLEASED_TIMEOUT``) was lost by its worker: ``lost_count + 1`` and
   ``lease_epoch + 1`` (the lost holder's later writes are ``lease_lost``), then ERROR "lost by
   its worker N times" at ``EXECUTION_MAX_ATTEMPTS`` losses, else QUEUED and dispatched again
   (ERROR as well when no task is known to dispatch it with).
3. :func:`redispatch_queued`: QUEUED and not claimed within its dispatch timeout (the broker
   lost the message, or it waits behind a backlog): dispatched again. The timeout is
   ``DISPATCH_TIMEOUT``, doubled for each dispatch nobody claimed, at most
   ``DISPATCH_TIMEOUT_MAX``; after ``EXECUTION_MAX_DISPATCHES`` of them the execution ends
   ERROR "never claimed: task X on queue Y".
4. :func:`rehand_webhooks`: terminal with a webhook due, neither delivered nor claimed within
   ``WEBHOOK_DUE_TIMEOUT``: dispatched again, so that a worker's claim gets the webhook; once
   handed ``WEBHOOK_MAX_ATTEMPTS`` times it is given up (``webhook_failed_at``).

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
    ExecutionEvent,
    ExecutionStatus,
    WorkflowExecution,
)
from backend.internal_api.publish import broker_reachable, publish_dispatch
from backend.internal_api.transitions import Change, apply

logger = logging.getLogger("backend.lifecycle")

BATCH = 100
DEFAULT_QUEUE = "celery"


@dataclass
class PassResult:
    """What one pass did, by kind of work (the command prints it with ``--once``)."""

    published: int = 0
    publish_failed: int = 0
    requeued: int = 0
    lost: int = 0
    redispatched: int = 0
    webhooks_rehanded: int = 0
    given_up: int = 0  # executions ended "never claimed" / "cannot be dispatched", webhooks failed

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return asdict(self)


# --- what is overdue: the one definition the steps, health and metrics share ----------------


def _no_unpublished_dispatch() -> Q:
    return ~Q(Exists(unpublished_dispatches().filter(execution=OuterRef("pk"))))


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


def dispatch_timeout(unclaimed: int) -> float:
    """Seconds a QUEUED execution waits for its claim after its ``unclaimed``-th unclaimed
    dispatch: DISPATCH_TIMEOUT, doubled for each one after the first, at most
    DISPATCH_TIMEOUT_MAX (a backlog is not flooded with duplicates)."""
    doublings = min(max(unclaimed - 1, 0), 30)
    return float(min(settings.DISPATCH_TIMEOUT * 2**doublings, settings.DISPATCH_TIMEOUT_MAX))


def _past_dispatch_timeout(now: datetime) -> Q:
    """``queued_at`` older than the dispatch timeout of the execution's unclaimed count."""
    overdue = Q(queued_at__isnull=True)
    unclaimed = 1
    while dispatch_timeout(unclaimed) < settings.DISPATCH_TIMEOUT_MAX:
        cutoff = now - timedelta(seconds=dispatch_timeout(unclaimed))
        lowest = Q(unclaimed_dispatches__lte=1) if unclaimed == 1 else Q()
        count = lowest | Q(unclaimed_dispatches=unclaimed)
        overdue |= count & Q(queued_at__lt=cutoff)
        unclaimed += 1
    cutoff = now - timedelta(seconds=settings.DISPATCH_TIMEOUT_MAX)
    rest = Q(unclaimed_dispatches__gte=unclaimed) if unclaimed > 1 else Q()
    return overdue | (rest & Q(queued_at__lt=cutoff))


def overdue_dispatches(now: datetime) -> QuerySet[WorkflowExecution]:
    """QUEUED executions with a known task, not claimed within the dispatch timeout of their
    last publish, and no message waiting in the outbox."""
    return (
        WorkflowExecution.objects.filter(status=ExecutionStatus.QUEUED)
        .filter(_past_dispatch_timeout(now))
        .exclude(dispatch_task="")
        .filter(_no_unpublished_dispatch())
    )


def overdue_webhooks(now: datetime) -> QuerySet[WorkflowExecution]:
    """Terminal executions with a webhook due, neither delivered nor handed to a worker (nor
    published for one) within WEBHOOK_DUE_TIMEOUT, with a task to hand it with."""
    return _webhooks_past_due(now).exclude(dispatch_task="").filter(_no_unpublished_dispatch())


def _webhooks_past_due(now: datetime) -> QuerySet[WorkflowExecution]:
    """Terminal executions whose webhook is due (not delivered, not given up) and was not
    handed to a worker within WEBHOOK_DUE_TIMEOUT."""
    cutoff = now - timedelta(seconds=settings.WEBHOOK_DUE_TIMEOUT)
    return (
        WorkflowExecution.objects.filter(
            status__in=TERMINAL_STATUSES,
            webhook_delivered_at__isnull=True,
            webhook_failed_at__isnull=True,
        )
        .exclude(webhook_id="")
        .filter(Q(webhook_handed_at__isnull=True) | Q(webhook_handed_at__lt=cutoff))
        .filter(Q(queued_at__isnull=True) | Q(queued_at__lt=cutoff))
    )


def undeliverable_webhooks(now: datetime) -> QuerySet[WorkflowExecution]:
    """Webhooks past due on executions no task is known for (finished by plain status
    updates): nothing can hand them to a worker, so they are only counted."""
    return _webhooks_past_due(now).filter(dispatch_task="")


def unpublished_dispatches() -> QuerySet[Dispatch]:
    """Outbox rows not published yet and not dead (refused DISPATCH_MAX_FAILURES times)."""
    return Dispatch.objects.filter(
        published_at__isnull=True, attempts__lt=settings.DISPATCH_MAX_FAILURES
    )


def overdue_counts(now: datetime | None = None) -> dict[str, int]:
    """What is waiting for a repair now: the ``lifecycle`` part of ``GET health/``."""
    now = now or timezone.now()
    return {
        "overdue_leases": expired_leases(now).count() + unleased_overdue(now).count(),
        "overdue_dispatches": overdue_dispatches(now).count(),
        "unpublished_dispatches": unpublished_dispatches().count(),
        "overdue_webhooks": overdue_webhooks(now).count(),
        "undeliverable_webhooks": undeliverable_webhooks(now).count(),
        "failed_webhooks": WorkflowExecution.objects.filter(
            webhook_failed_at__isnull=False, webhook_delivered_at__isnull=True
        ).count(),
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
    row published (and the execution QUEUED) in the transaction that holds the rows. A failed
    publish stops the step only when the broker is unreachable (a connection probe); a row the
    broker refused is counted against that row, and the next rows are tried."""
    result = result or PassResult()
    refused: list[int] = []  # rows refused in this call: not tried twice in it
    while True:
        with transaction.atomic():
            batch = list(
                unpublished_dispatches()
                .exclude(pk__in=refused)
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
                except Exception as exc:  # whatever the broker raised
                    result.publish_failed += 1
                    if not broker_reachable():
                        _log_publish_failure(row, exc, "broker unreachable; retried next pass")
                        return result  # the rows published so far commit
                    refused.append(row.pk)
                    _count_refusal(row, exc, result)
                    continue
                result.published += 1


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _log_publish_failure(row: Dispatch, exc: BaseException, message: str) -> None:
    logger.warning(
        message,
        extra={
            "execution_id": str(row.execution_id),
            "dispatch_id": row.pk,
            "attempts": row.attempts,
            "error": _error_text(exc),
        },
    )


def _count_refusal(row: Dispatch, exc: BaseException, result: PassResult) -> None:
    """One more refusal of ``row`` by a reachable broker; at DISPATCH_MAX_FAILURES the row is
    dead and its execution given up."""
    row.attempts += 1
    row.last_error = _error_text(exc)
    Dispatch.objects.filter(pk=row.pk).update(attempts=row.attempts, last_error=row.last_error)
    if row.attempts < settings.DISPATCH_MAX_FAILURES:
        _log_publish_failure(row, exc, "dispatch refused by the broker; retried next pass")
        return
    _log_publish_failure(row, exc, "dispatch refused by the broker too often; given up")
    message = f"cannot be dispatched: task {row.task} on queue {row.queue}: {row.last_error}"
    execution = row.execution
    if execution.status in TERMINAL_STATUSES:
        result.given_up += _give_up_webhook(execution, timezone.now())
    else:
        result.given_up += _give_up(execution, EventReason.UNDISPATCHABLE, message)


def _give_up(execution: WorkflowExecution, reason: str, message: str) -> bool:
    """End a PENDING/QUEUED execution nobody can run ERROR with ``message`` (event
    ``reason``); its webhook, if any, is given up with it: no worker can be reached to deliver
    it. False if the execution moved on meanwhile (claimed, finished)."""
    stamp = connection.ops.adapt_datetimefield_value(timezone.now())
    change = Change(reason=reason)
    change.set("status = 'ERROR'")
    change.set("error_message = %s", message[:10000])
    change.set("finished_at = %s", stamp)
    change.set("modified_at = %s", stamp)
    change.set(
        "webhook_id = CASE WHEN webhook_url = '' THEN '' ELSE %s END",
        f"msg_{secrets.token_hex(16)}",
    )
    change.set("webhook_failed_at = CASE WHEN webhook_url = '' THEN NULL ELSE %s END", stamp)
    change.where("status IN ('PENDING', 'QUEUED')")
    if apply(execution.organization_id, execution.pk, change) is None:
        return False
    _log_repair(f"execution given up: {message}", execution, reason)
    return True


def _give_up_webhook(execution: WorkflowExecution, now: datetime) -> bool:
    """Stop handing the execution's due webhook out: failed for good."""
    given_up = WorkflowExecution.objects.filter(
        pk=execution.pk, webhook_delivered_at__isnull=True, webhook_failed_at__isnull=True
    ).update(webhook_failed_at=now)
    if given_up:
        _log_repair(
            "webhook given up: failed for good",
            execution,
            "webhook_failed",
            handed=execution.webhook_handed_count,
        )
    return bool(given_up)


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
            if lost < settings.EXECUTION_MAX_ATTEMPTS and execution.dispatch_task:
                result.requeued += _requeue(execution, lost, requeue_reason, now)
            else:
                result.lost += _end_lost(execution, lost, lost_reason, now)
    return len(batch) == BATCH


def _lost_change(execution: WorkflowExecution, reason: str, now: datetime) -> Change:
    """The change of a lost execution: one more loss, no lease, a new epoch (the lost
    holder's writes are fenced out); only if it still is the IN_PROGRESS execution this pass
    found (same epoch)."""
    stamp = connection.ops.adapt_datetimefield_value(now)
    leased = execution.lease_epoch > 0
    change = Change(reason=reason, leased=leased, epoch_bumped=leased)
    change.set("lost_count = lost_count + 1")
    if leased:
        change.set("lease_epoch = lease_epoch + 1")
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
    if lost < settings.EXECUTION_MAX_ATTEMPTS:
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
            spent = [
                e for e in batch if e.unclaimed_dispatches >= settings.EXECUTION_MAX_DISPATCHES
            ]
            again = [e for e in batch if e not in spent]
            for execution in spent:
                queue = execution.dispatch_queue or DEFAULT_QUEUE
                message = f"never claimed: task {execution.dispatch_task} on queue {queue}"
                result.given_up += _give_up(execution, EventReason.NEVER_CLAIMED, message)
            Dispatch.objects.bulk_create(
                _dispatch(execution, DispatchReason.DISPATCH_TIMEOUT) for execution in again
            )
            WorkflowExecution.objects.filter(pk__in=[e.pk for e in again]).update(queued_at=now)
        for execution in again:
            _log_repair(
                "execution not claimed in time: dispatched again",
                execution,
                DispatchReason.DISPATCH_TIMEOUT,
                unclaimed_dispatches=execution.unclaimed_dispatches,
            )
        result.redispatched += len(again)
        if len(batch) < BATCH:
            return result


def rehand_webhooks(result: PassResult | None = None) -> PassResult:
    """Step 4: webhooks due and not recorded within WEBHOOK_DUE_TIMEOUT are handed again."""
    result = result or PassResult()
    while True:
        with transaction.atomic():
            now = timezone.now()
            batch = _locked_batch(overdue_webhooks(now))
            spent = [e for e in batch if e.webhook_handed_count >= settings.WEBHOOK_MAX_ATTEMPTS]
            again = [e for e in batch if e not in spent]
            for execution in spent:
                result.given_up += _give_up_webhook(execution, now)
            Dispatch.objects.bulk_create(
                _dispatch(execution, DispatchReason.WEBHOOK_DUE) for execution in again
            )
            WorkflowExecution.objects.filter(pk__in=[e.pk for e in again]).update(queued_at=now)
        for execution in again:
            _log_repair(
                "webhook due and not recorded: handed to a worker again",
                execution,
                DispatchReason.WEBHOOK_DUE,
            )
        result.webhooks_rehanded += len(again)
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
        counts = overdue_counts()
        failed_webhooks = counts.pop("failed_webhooks")
        for name, value in counts.items():
            overdue.add_metric([name.removeprefix("overdue_")], value)
        yield overdue
        given_up = CounterMetricFamily(
            "internal_api_lifecycle_given_up",
            "Executions ended ERROR because no worker could be reached (never_claimed, "
            "undispatchable), and webhooks given up as failed for good (webhook)",
            labels=["kind"],
        )
        by_event = dict(
            ExecutionEvent.objects.filter(
                reason__in=(EventReason.NEVER_CLAIMED, EventReason.UNDISPATCHABLE)
            )
            .values_list("reason")
            .annotate(n=Count("pk"))
            .values_list("reason", "n")
        )
        for reason in (EventReason.NEVER_CLAIMED, EventReason.UNDISPATCHABLE):
            given_up.add_metric([reason], by_event.get(reason, 0))
        given_up.add_metric(["webhook"], failed_webhooks)
        yield given_up
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
