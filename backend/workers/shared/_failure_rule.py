"""ExecutionTask's failure rule: a transient failure re-queues, a permanent one marks ERROR."""

from __future__ import annotations

import logging
import random
import threading
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Reject, TaskPredicate, TimeLimitExceeded, WorkerLostError

from . import _redact
from ._lease import LeaseNote, current_run
from ._retry_policy import RetryPolicy, retry_after_of
from .errors import is_transient

if TYPE_CHECKING:
    from .api_client import WorkflowExecution

logger = logging.getLogger("backend.workers.shared.tasks")  # one logger for ExecutionTask

#: Longest ``error_message`` written to the backend.
MAX_ERROR_MESSAGE = 1000


class FailureRule(Task):
    """ExecutionTask's transient/permanent rule (see :mod:`tasks`); ExecutionTask supplies
    ``config()``, the options, and the leased run's ``_release_lease`` and ``_deliver_webhook``."""

    def _fail(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The transient/permanent rule: re-queue (raises ``Retry``) or mark ``ERROR``."""
        if is_transient(exc):
            self._requeue(exc, args, kwargs)
        self._mark_error(exc, args, kwargs)

    def transient_countdown(self, exc: BaseException) -> float:
        """Seconds before the re-queued task runs again after the transient ``exc``: the retry
        engine's schedule for re-queue ``retries + 1`` (``retry_backoff`` doubling up to
        ``retry_backoff_max``, ``retry_jitter``; a server's ``Retry-After`` first)."""
        schedule = RetryPolicy(
            base_delay=min(self.retry_backoff, self.retry_backoff_max),
            max_delay=self.retry_backoff_max,
            jitter=self.retry_jitter,
        )
        wait = schedule.next_delay(self.request.retries + 1, exc)
        if self.retry_jitter and retry_after_of(exc) is not None:
            # "Not before": jitter only adds (up to a quarter), so tasks re-queued by one
            # outage do not all come back in the same instant the breaker half-opens.
            wait += random.uniform(0, wait / 4)
        return wait

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
