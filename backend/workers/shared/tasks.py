"""Celery tasks that process one workflow execution: the lease and the failure rule.

Use :class:`ExecutionTask` as the base of any task that works on an execution::

    @app.task(bind=True, base=ExecutionTask)
    def process(self, execution_id: str, organization_id: str | None = None) -> dict: ...

**The lease** (``claim_execution``, on by default). Before the body runs, the task claims the
execution for ``<celery hostname>:<pid>`` with a lease of ``EXECUTION_LEASE_SECONDS`` (its
name and delivery queue go with the claim, so the backend can send it again). While the body
runs, a thread heartbeats every third of the lease (a shorter task sends none; each heartbeat
within a third of the lease, so one stalled request does not cost it). The claimed
execution is ``self.execution`` (no second read), and the body's writes about it carry the
lease's epoch (``X-Lease-Epoch``). When the body returns without having finished the
execution itself, it is finished in one call (``COMPLETED``, ``result`` = the return value
when that is a dict); then the webhook the backend made due is delivered and recorded (SSRF
guard, signature, ``webhook-id`` = the backend's id). A claim refused with ``lease_held``
(a duplicate message) or ``illegal_transition`` (already final) ends the task quietly (INFO);
a claimed execution already final with a webhook due gets the webhook only. A claim that
fails marks nothing (unfenced, and it may have been applied): one whose outcome is unknown
(transient, an unusable answer, ``idempotency_in_flight``) re-queues the task, any other
refusal is raised. A ``LeaseLostError`` anywhere (another worker owns the execution now)
ends the task quietly (WARNING): nothing is marked, nothing re-queued.
``claim_execution=False`` turns all of this off: the body alone sets the statuses, as the
module README's Quick Start task does.

**Failures**, when the task body raises, are sorted once, here:

- **transient** (the backend unreachable or timing out, a 5xx or 429 after the client's own
  retries, an open circuit breaker: any exception whose ``transient`` attribute is true, and
  every :class:`~backend.workers.shared.retry_utils.CircuitBreakerOpenError`): the lease is
  given back (``release`` with the countdown as ``retry_in``), then the task is re-queued
  with Celery's ``retry``. The countdown is the exception's ``retry_after``
  (the server's ``Retry-After`` or the breaker's remaining open time, plus up to a quarter
  more at random) when it has one, else
  exponential backoff with full jitter (``retry_backoff`` doubling up to
  ``retry_backoff_max``). The execution is **not** marked ``ERROR``. Only when
  ``max_retries`` re-queues are spent does the task give up and mark it. If the broker
  refuses the re-queued task, the message goes back to the queue (Celery would drop it).
- **permanent** (validation, not found, a conflict, a bug in the task, a soft time limit):
  the execution is marked ``ERROR`` with a one-line message naming the exception (under the
  lease, and its webhook delivered), and the exception propagates so Celery records the
  failure. A task killed at its hard time limit
  runs no code of its own: Celery's ``on_failure`` hook in the worker's main process marks
  its execution ``ERROR`` instead (in a thread, so the consumer is never blocked), since the
  message is acknowledged and the task will not run again. A leased run's mark is fenced by
  its epoch, which the run left in its lease note (``_lease``); a run without a lease marks
  nothing.

The execution is found by the task's ``execution_id`` argument (positional or keyword), and
its organization by an ``organization_id`` argument or ``ORGANIZATION_ID``. Logging context,
heartbeats and metrics are wired by Celery signals elsewhere (``_celery.install``); this
module adds none of its own.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import re
import secrets
import socket
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task
from celery.exceptions import Reject, Retry, TaskPredicate, TimeLimitExceeded, WorkerLostError

from . import _redact
from ._lease import LeaseKeeper, LeaseNote, Run, current_run
from ._policy import IN_FLIGHT_CODE
from .config import WorkerConfig
from .errors import is_transient

if TYPE_CHECKING:
    from .api_client import InternalAPIClient, WorkflowExecution

logger = logging.getLogger(__name__)

#: Longest ``error_message`` written to the backend.
MAX_ERROR_MESSAGE = 1000
_slot = threading.local()  # this thread's claim token (ExecutionTask._worker_name)
#: Task and queue names the backend accepts in a claim's ``dispatch`` (and their lengths).
DISPATCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@-]*")
MAX_TASK_NAME = 255
MAX_QUEUE_NAME = 128


class ExecutionTask(Task):
    """Base class for tasks that process one workflow execution (``base=ExecutionTask``).

    Task options (``@app.task(base=ExecutionTask, max_retries=..., worker_config=...)``):
    ``max_retries`` re-queues for transient failures (default 20), ``retry_backoff`` the first
    backoff in seconds (default 1), ``retry_backoff_max`` the cap on one countdown, also on a
    server's ``Retry-After`` (default 120), ``retry_jitter`` full jitter on the backoff and
    up to a quarter added to a ``Retry-After`` (default on), ``worker_config`` the
    :class:`WorkerConfig` used to reach the backend (default: read from the environment on
    first use), ``claim_execution`` (default on: claim, heartbeat, finish, webhook; off: the
    body alone sets statuses), ``lease_seconds`` (default ``EXECUTION_LEASE_SECONDS``).
    """

    max_retries: ClassVar[int | None] = 20
    retry_backoff: ClassVar[float] = 1.0
    retry_backoff_max: ClassVar[float] = 120.0
    retry_jitter: ClassVar[bool] = True
    worker_config: ClassVar[WorkerConfig | None] = None
    claim_execution: ClassVar[bool] = True
    lease_seconds: ClassVar[int | None] = None

    @property
    def execution(self) -> WorkflowExecution | None:
        """The execution this run claimed, as the claim returned it (``None`` without a
        claim: ``claim_execution=False``, or a plain call outside a worker)."""
        run = current_run.get()
        return run.execution if run is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.request.called_directly and self.claim_execution:
            execution_id, organization_id = self._execution_of(args, kwargs)
            if execution_id is not None:
                return self._run_leased(execution_id, organization_id, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except TaskPredicate:
            raise  # Retry, Ignore, Reject: the task already chose what happens
        except Exception as exc:
            if self.request.called_directly:
                raise  # a plain function call, outside any worker: nothing to re-queue
            self._fail(exc, args, kwargs)
            raise

    def webhook_payload(self, execution: WorkflowExecution) -> dict[str, Any]:
        """The body of the execution's completion webhook (override to send another)."""
        return {
            "type": f"workflow_execution.{execution.status.lower()}",
            "execution_id": execution.id,
            "workflow_id": execution.workflow_id,
            "status": execution.status,
            "result": execution.result,
            "error_message": execution.error_message,
            "execution_time": execution.execution_time,
            "finished_at": execution.finished_at.isoformat() if execution.finished_at else None,
        }

    # --- the leased run: claim, heartbeat, body, finish, webhook ------------------------
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

    def _fail(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The transient/permanent rule: re-queue (raises ``Retry``) or mark ``ERROR``."""
        if is_transient(exc):
            self._requeue(exc, args, kwargs)
        self._mark_error(exc, args, kwargs)

    def transient_countdown(self, exc: BaseException) -> float:
        """Seconds before the re-queued task runs again after the transient ``exc``."""
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            # "Not before": jitter only adds (up to a quarter), so tasks re-queued by one
            # outage do not all come back in the same instant the breaker half-opens.
            wait = float(min(retry_after, self.retry_backoff_max))
            return wait + random.uniform(0, wait / 4) if self.retry_jitter else wait
        delay = min(self.retry_backoff_max, self.retry_backoff * 2**self.request.retries)
        return random.uniform(0, delay) if self.retry_jitter else delay

    def config(self) -> WorkerConfig:
        """The configuration used to reach the backend: the task's, or the environment's."""
        config = type(self).worker_config
        if config is None:
            config = WorkerConfig()
            type(self).worker_config = config
        return config

    def _requeue(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Re-queue with Celery's retry (raises ``Retry``); returns when retries are spent."""
        countdown = self.transient_countdown(exc)
        execution_id, _ = self._execution_of(args, kwargs)
        attempt = self.request.retries + 1
        if self.max_retries is None or attempt <= self.max_retries:
            logger.warning(
                "transient failure, task re-queued",
                extra={
                    "execution_id": execution_id,
                    "error_type": type(exc).__name__,
                    "error": str(exc),
                    "countdown": round(countdown, 3),
                    "retry": attempt,
                    "max_retries": self.max_retries,
                },
            )
            self._release_lease(countdown)  # so the backend does not send the task twice
        try:
            raise self.retry(exc=exc, countdown=countdown)
        except Reject as rejected:
            if rejected.requeue:
                raise
            # Celery could not publish the retry (the broker refused it) and would drop the
            # message: it goes back to the queue instead, to be delivered again.
            logger.error(
                "could not publish the re-queued task; message returned to the queue",
                extra={"execution_id": execution_id, "error": str(rejected.reason)},
            )
            raise Reject(rejected.reason, requeue=True) from exc
        except TaskPredicate:
            raise
        except Exception as final:
            if final is not exc:
                raise
            logger.error(
                "transient failures exhausted the task's retries",
                extra={"execution_id": execution_id, "retries": self.request.retries},
            )

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Celery's failure hook: after a hard time limit, mark the execution ``ERROR``.

        Celery calls it in the worker's main process once it killed the task's process; the
        mark runs in a thread so that the consumer is not held up by the backend. A leased
        run's mark carries the lease's epoch (the run left it in a :class:`LeaseNote`), so
        the backend refuses it once another worker holds the execution; a run that held no
        lease (its claim failed or was refused) marks nothing.
        """
        if not isinstance(exc, TimeLimitExceeded | WorkerLostError):
            return  # every other failure was sorted in __call__, inside the task's process
        noted = LeaseNote(self.config(), task_id).take() if self.claim_execution else None
        if isinstance(exc, WorkerLostError):
            return  # the message goes back to the queue (task_reject_on_worker_lost)
        execution_id, organization_id = self._execution_of(tuple(args or ()), dict(kwargs or {}))
        if execution_id is None:
            return
        epoch = None
        if self.claim_execution:
            if noted is None or noted[0] != execution_id:
                logger.warning(
                    "hard time limit: this run held no lease on the execution; not marked",
                    extra={"execution_id": execution_id},
                )
                return
            epoch = noted[1]
        message = _error_message(exc, 0)
        threading.Thread(
            target=self._mark_or_log,
            args=(execution_id, organization_id, message, epoch),
            name=f"mark-error-{execution_id}",
            daemon=True,
        ).start()

    def _mark_error(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Mark the task's execution ``ERROR`` with a message naming ``exc``.

        When the backend cannot be reached for that, the task is re-queued instead (the
        failure is then seen again and marked on a later run); any other refusal (the
        execution is unknown or already terminal) is logged.
        """
        execution_id, organization_id = self._execution_of(args, kwargs)
        if execution_id is None:
            logger.error(
                "task failed and has no execution_id argument to mark ERROR",
                extra={"error_type": type(exc).__name__},
                exc_info=exc,
            )
            return
        logger.error(
            "task failed",
            extra={"execution_id": execution_id, "error_type": type(exc).__name__},
            exc_info=exc,
        )
        from .api_client import LeaseLostError

        self.config()  # built first: it registers the secrets the message is scrubbed of
        message = _error_message(exc, self.request.retries)
        run = current_run.get()
        # Under a lease the backend counts the attempts (one per claim).
        attempts = None if run is not None else self.request.retries + 1
        try:
            marked = self._mark(execution_id, organization_id, message, attempts)
        except LeaseLostError:
            raise  # the new holder owns the execution: this run ends quietly
        except Exception as mark_exc:
            if is_transient(mark_exc):
                self._requeue(mark_exc, args, kwargs)
            _log_not_marked(execution_id, mark_exc)
            return
        if run is not None:
            from .api_client import InternalAPIClient

            with InternalAPIClient(self.config(), organization_id=organization_id) as client:
                self._deliver_webhook(client, marked)

    def _mark_or_log(
        self, execution_id: str, organization_id: str | None, message: str, epoch: int | None
    ) -> None:
        """Mark the execution ``ERROR`` (fenced by ``epoch`` when the run held a lease, then
        its webhook delivered); a refusal is logged (for use outside the task)."""
        from .api_client import InternalAPIClient, LeaseLostError, holding_lease

        try:
            if epoch is None:
                self._mark(execution_id, organization_id, message, None)
                return
            with holding_lease(execution_id, epoch):
                marked = self._mark(execution_id, organization_id, message, None)
                with InternalAPIClient(self.config(), organization_id=organization_id) as client:
                    self._deliver_webhook(client, marked)
        except LeaseLostError as exc:
            logger.warning(
                "lease lost: another worker owns the execution now; not marked ERROR",
                extra={"execution_id": execution_id, "epoch": epoch, "error": str(exc)},
            )
        except Exception as exc:
            _log_not_marked(execution_id, exc)

    def _mark(
        self, execution_id: str, organization_id: str | None, message: str, attempts: int | None
    ) -> WorkflowExecution:
        """Move the execution to ``ERROR`` with ``message`` (and ``attempts`` when known);
        under a lease the write is fenced by it (``X-Lease-Epoch``)."""
        from .api_client import InternalAPIClient

        fields: dict[str, Any] = {} if attempts is None else {"attempts": attempts}
        with InternalAPIClient(self.config()) as client:
            if organization_id is not None:
                client.set_organization_context(organization_id)
            marked = client.update_workflow_execution_status(
                execution_id, "ERROR", error_message=message, **fields
            )
        logger.error(
            "execution marked ERROR", extra={"execution_id": execution_id, "error": message}
        )
        return marked

    def _execution_of(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str | None, str | None]:
        """The ``execution_id`` and ``organization_id`` arguments of this call, if any."""
        signature = self.__dict__.get("_run_signature")
        if signature is None:  # the same for every call: read once per task
            signature = self.__dict__["_run_signature"] = inspect.signature(self.run)
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        execution_id = bound.get("execution_id")
        organization_id = bound.get("organization_id")
        return (
            None if execution_id is None else str(execution_id),
            None if organization_id is None else str(organization_id),
        )


def _seconds_until(when: Any) -> float | None:
    """A ``Retry``'s ``when`` (seconds or a datetime) as seconds from now."""
    if isinstance(when, int | float) and not isinstance(when, bool):
        return float(when)
    if isinstance(when, datetime):
        moment = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return (moment - datetime.now(UTC)).total_seconds()
    return None


def _log_not_marked(execution_id: str, exc: Exception) -> None:
    logger.error(
        "could not mark the execution ERROR",
        extra={"execution_id": execution_id, "error_type": type(exc).__name__, "error": str(exc)},
    )


def _error_message(exc: BaseException, retries: int) -> str:
    """One line for the execution's ``error_message``: type, text, retries; no secret."""
    text = " ".join(_redact.scrub(f"{type(exc).__name__}: {exc}").split())
    if retries:
        text += f" (after {retries} re-queue(s))"
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 3] + "..."
    return text
