"""The leased run of an ExecutionTask: claim, heartbeat, body, finish, completion webhook."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Reject, Retry, TaskPredicate

from ._lease import LeaseKeeper, Run, current_run
from ._policy import IN_FLIGHT_CODE
from .errors import is_transient

if TYPE_CHECKING:
    from .api_client import InternalAPIClient, WorkflowExecution

logger = logging.getLogger("backend.workers.shared.tasks")  # one logger for ExecutionTask

_slot = threading.local()  # this thread's claim token (LeasedRun._worker_name)
#: Task and queue names the backend accepts in a claim's ``dispatch`` (and their lengths).
DISPATCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@-]*")
MAX_TASK_NAME = 255
MAX_QUEUE_NAME = 128


class LeasedRun(Task):
    """ExecutionTask's run under a lease (see :mod:`tasks`); ExecutionTask supplies ``config()``,
    the options, ``webhook_payload`` and the failure rule's ``_fail`` and ``_requeue``."""

    def _run_leased(
        self,
        execution_id: str,
        organization_id: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Claim the execution, run the body under its lease, finish, deliver the webhook."""
        from .api_client import InternalAPIClient

        config = self.config()
        lease_seconds = self.lease_seconds or config.execution_lease_seconds
        with InternalAPIClient(config, organization_id=organization_id) as client:
            return self._claim_and_run(client, execution_id, lease_seconds, args, kwargs)

    def _claim_and_run(
        self,
        client: InternalAPIClient,
        execution_id: str,
        lease_seconds: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        from .api_client import ConflictError, LeaseHeldError, LeaseLostError, holding_lease

        task, queue = self._dispatch()
        try:
            claim = client.claim_execution(
                execution_id,
                worker=self._worker_name(),
                lease_seconds=lease_seconds,
                task=task,
                queue=queue,
            )
        except (LeaseHeldError, ConflictError) as exc:
            if isinstance(exc, LeaseHeldError) or exc.error_code == "illegal_transition":
                # A duplicate message, or one for an execution already done: another run
                # owns it (or nobody needs to), so this one ends without a trace of failure.
                logger.info(
                    "execution not claimed: %s; this run ends",
                    exc.error_code,
                    extra={"execution_id": execution_id, "retry_after": exc.retry_after},
                )
                return None
            self._claim_failed(exc, execution_id, args, kwargs)
            raise
        except Exception as exc:
            self._claim_failed(exc, execution_id, args, kwargs)
            raise
        run = Run(claim.execution, claim.lease.epoch, client.organization_id)
        token = current_run.set(run)
        try:
            with holding_lease(execution_id, claim.lease.epoch) as held:
                run.held = held
                return self._run_claimed(client, run, lease_seconds, args, kwargs)
        except LeaseLostError as exc:
            logger.warning(
                "lease lost: another worker owns the execution now; this run ends "
                "without writing",
                extra={"execution_id": execution_id, "epoch": run.epoch, "error": str(exc)},
            )
            return None
        finally:
            current_run.reset(token)

    def _claim_failed(
        self,
        exc: Exception,
        execution_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """A claim that failed marks nothing: without a lease an ERROR mark is unfenced, and
        the claim may have been applied (its answer lost) or belong to another run. A claim
        whose outcome is unknown is tried again later (raises ``Retry``; the next claim is
        refused with ``lease_held`` if this one was applied, and the lease then runs out);
        any other refusal is logged and raised, and the backend's repairs own the execution."""
        from .api_client import APIResponseError, ConflictError

        unknown = (
            is_transient(exc)
            or isinstance(exc, APIResponseError)
            or (isinstance(exc, ConflictError) and exc.error_code == IN_FLIGHT_CODE)
        )
        if unknown:
            self._requeue(exc, args, kwargs)
        logger.error(
            "claim failed: %s; the execution is not marked",
            exc,
            extra={"execution_id": execution_id, "error_type": type(exc).__name__},
        )

    def _run_claimed(
        self,
        client: InternalAPIClient,
        run: Run,
        lease_seconds: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The body under the lease (heartbeats while it runs), then the finish."""
        execution = run.execution
        if execution.is_final:  # handed out again for its webhook only
            self._deliver_webhook(client, execution)
            return None
        noted = not self.request.is_eager and bool(self.request.id)
        keeper = LeaseKeeper(
            self.config(),
            run,
            lease_seconds=lease_seconds,
            note_for=str(self.request.id) if noted else None,
            note_within=self._hard_time_limit() if noted else None,
        )
        keeper.start()
        try:
            return self._body_and_finish(client, run, keeper, args, kwargs)
        finally:
            keeper.close()

    def _body_and_finish(
        self,
        client: InternalAPIClient,
        run: Run,
        keeper: LeaseKeeper,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The body (heartbeats while it runs), the finish, the webhook."""
        from .api_client import ConflictError, LeaseLostError

        execution = run.execution
        try:
            try:
                retval = super().__call__(*args, **kwargs)
            finally:
                keeper.stop()
            if keeper.lost:
                raise LeaseLostError(
                    "the heartbeat found the lease gone", error_code="lease_lost"
                )
            finished = run.held.finished if run.held is not None else None
            if finished is None:
                try:
                    finished = client.finish_execution(
                        execution.id,
                        "COMPLETED",
                        result=retval if isinstance(retval, dict) else None,
                    )
                except ConflictError as exc:
                    if exc.error_code != "illegal_transition" or isinstance(exc, LeaseLostError):
                        raise
                    logger.info(
                        "execution already final (stopped meanwhile?); result not recorded",
                        extra={"execution_id": execution.id},
                    )
                    return retval
        except TaskPredicate as chosen:
            # The body re-queued itself (or its message): give the lease back first.
            if isinstance(chosen, Retry):
                self._release_lease(_seconds_until(chosen.when))
            elif isinstance(chosen, Reject) and chosen.requeue:
                self._release_lease(None)
            raise
        except LeaseLostError:
            raise
        except Exception as exc:
            self._fail(exc, args, kwargs)
            raise
        self._deliver_webhook(client, finished)
        return retval

    def _deliver_webhook(self, client: InternalAPIClient, execution: WorkflowExecution) -> None:
        """Deliver and record the execution's due webhook, if it has one. A failure is
        logged: the backend keeps the webhook due and hands it out again (same id)."""
        from .api_client import (
            InternalAPIError,
            LeaseLostError,
            WebhookError,
            WebhookNotRecordedError,
        )

        due = execution.webhook_due
        if due is None:
            return
        fields = {"execution_id": execution.id, "webhook_id": due.id}
        try:
            sent = client.send_webhook(
                due.url, self.webhook_payload(execution), execution_id=execution.id,
                webhook_id=due.id,
            )
        except WebhookNotRecordedError as exc:
            if isinstance(exc.__cause__, LeaseLostError):
                raise exc.__cause__ from None
            logger.warning(
                "completion webhook %s but not recorded: %s; it stays due",
                exc.result.outcome,
                exc.__cause__,
                extra=fields,
            )
            return
        except LeaseLostError:
            raise
        except (InternalAPIError, WebhookError, ValueError) as exc:
            logger.warning("completion webhook not delivered: %s", exc, extra=fields)
            return
        level = logging.INFO if sent.ok else logging.WARNING
        logger.log(
            level,
            "completion webhook %s",
            sent.outcome,
            extra={**fields, "status_code": sent.status_code, "attempts": sent.attempts},
        )

    def _release_lease(self, retry_in: float | None) -> None:
        """Give the held lease back before a re-queue (best effort: if the backend cannot
        be told, the lease runs out and the backend sends the task again)."""
        from .api_client import InternalAPIClient

        run = current_run.get()
        if run is None:
            return
        try:
            with InternalAPIClient(self.config(), organization_id=run.organization_id) as client:
                client.release_execution(
                    run.execution.id,
                    run.epoch,
                    retry_in=None if retry_in is None else min(max(retry_in, 0.0), 86400.0),
                )
        except Exception as exc:
            logger.warning(
                "could not give the lease back before the re-queue: %s",
                exc,
                extra={"execution_id": run.execution.id, "error_type": type(exc).__name__},
            )

    def _hard_time_limit(self) -> float | None:
        """Seconds this run may take before the pool kills it (``None``: no limit)."""
        limits = self.request.timelimit or (None, None)
        hard = limits[1] if len(limits) > 1 else None
        return hard or self.time_limit or self.app.conf.task_time_limit or None

    def _worker_name(self) -> str:
        """``<celery hostname>:<pid>:<token>``: who holds a lease, as the backend records it.
        The token is drawn once per process and thread, so no two running tasks share a name
        (hostnames and pids repeat across hosts and containers): the backend hands its live
        lease back only to a claim of the same name, the same claim retried."""
        host = self.request.hostname or socket.gethostname()
        pid = os.getpid()
        if getattr(_slot, "pid", None) != pid:  # a thread's first claim, or a forked child's
            _slot.pid, _slot.token = pid, secrets.token_hex(4)
        return f"{str(host)[:230]}:{pid}:{_slot.token}"

    def _dispatch(self) -> tuple[str | None, str | None]:
        """This task's name and the queue its message came from, for the claim, so the
        backend can send the task there again; ``(None, None)`` (the backend keeps what it
        knows) when either is not a name the backend accepts (:data:`DISPATCH_NAME`)."""
        queue = self._queue_name()
        if (
            queue is None
            or not DISPATCH_NAME.fullmatch(self.name)
            or len(self.name) > MAX_TASK_NAME
            or not DISPATCH_NAME.fullmatch(queue)
            or len(queue) > MAX_QUEUE_NAME
            or queue.startswith("amq.")
        ):
            return None, None
        return self.name, queue

    def _queue_name(self) -> str | None:
        """The name of the queue this message came from: the consumed queue bound with its
        exchange and routing key (a routing key is not a queue name under a topic exchange
        or custom routes); run eagerly, the task's own or the default queue."""
        info = self.request.delivery_info or {}
        routing_key = info.get("routing_key")
        if routing_key is None:
            queue = getattr(self, "queue", None) or self.app.conf.task_default_queue
            return str(queue) if queue else None
        exchange = info.get("exchange") or ""
        queues = self.app.amqp.queues
        for candidate in queues.values():
            bound_to = getattr(candidate.exchange, "name", "") or ""
            if candidate.routing_key == routing_key and bound_to == exchange:
                return str(candidate.name)
        return str(routing_key) if routing_key in queues else None


def _seconds_until(when: Any) -> float | None:
    """A ``Retry``'s ``when`` (seconds or a datetime) as seconds from now."""
    if isinstance(when, int | float) and not isinstance(when, bool):
        return float(when)
    if isinstance(when, datetime):
        moment = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return (moment - datetime.now(UTC)).total_seconds()
    return None
