"""Celery tasks that process one workflow execution: the transient/permanent failure rule.

Use :class:`ExecutionTask` as the base of any task that works on an execution::

    @app.task(bind=True, base=ExecutionTask)
    def process(self, execution_id: str, organization_id: str | None = None) -> dict: ...

When the task body raises, the failure is sorted once, here:

- **transient** (the backend unreachable or timing out, a 5xx or 429 after the client's own
  retries, an open circuit breaker: any exception whose ``transient`` attribute is true, and
  every :class:`~backend.workers.shared.retry_utils.CircuitBreakerOpenError`): the task is
  re-queued with Celery's ``retry``. The countdown is the exception's ``retry_after``
  (the server's ``Retry-After`` or the breaker's remaining open time, plus up to a quarter
  more at random) when it has one, else
  exponential backoff with full jitter (``retry_backoff`` doubling up to
  ``retry_backoff_max``). The execution is **not** marked ``ERROR``. Only when
  ``max_retries`` re-queues are spent does the task give up and mark it. If the broker
  refuses the re-queued task, the message goes back to the queue (Celery would drop it).
- **permanent** (validation, not found, a conflict, a bug in the task, a soft time limit):
  the execution is marked ``ERROR`` with a one-line message naming the exception, and the
  exception propagates so Celery records the failure. A task killed at its hard time limit
  runs no code of its own: Celery's ``on_failure`` hook in the worker's main process marks
  its execution ``ERROR`` instead (in a thread, so the consumer is never blocked), since the
  message is acknowledged and the task will not run again.

The execution is found by the task's ``execution_id`` argument (positional or keyword), and
its organization by an ``organization_id`` argument or ``ORGANIZATION_ID``. Logging context,
heartbeats and metrics are wired by Celery signals elsewhere (``_celery.install``); this
module adds none of its own.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Reject, TaskPredicate, TimeLimitExceeded

from . import _redact
from .config import WorkerConfig
from .retry_utils import CircuitBreakerOpenError

logger = logging.getLogger(__name__)

#: Longest ``error_message`` written to the backend.
MAX_ERROR_MESSAGE = 1000


def is_transient(exc: BaseException) -> bool:
    """True when trying the task again later may succeed (see the module docstring)."""
    return isinstance(exc, CircuitBreakerOpenError) or getattr(exc, "transient", False) is True


class ExecutionTask(Task):
    """Base class for tasks that process one workflow execution (``base=ExecutionTask``).

    Task options (``@app.task(base=ExecutionTask, max_retries=..., worker_config=...)``):
    ``max_retries`` re-queues for transient failures (default 20), ``retry_backoff`` the first
    backoff in seconds (default 1), ``retry_backoff_max`` the cap on one countdown, also on a
    server's ``Retry-After`` (default 120), ``retry_jitter`` full jitter on the backoff and
    up to a quarter added to a ``Retry-After`` (default on), ``worker_config`` the
    :class:`WorkerConfig` used to reach the backend (default: read from the environment on
    first use).
    """

    max_retries: ClassVar[int | None] = 20
    retry_backoff: ClassVar[float] = 1.0
    retry_backoff_max: ClassVar[float] = 120.0
    retry_jitter: ClassVar[bool] = True
    worker_config: ClassVar[WorkerConfig | None] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except TaskPredicate:
            raise  # Retry, Ignore, Reject: the task already chose what happens
        except Exception as exc:
            if self.request.called_directly:
                raise  # a plain function call, outside any worker: nothing to re-queue
            if is_transient(exc):
                self._requeue(exc, args, kwargs)
            self._mark_error(exc, args, kwargs)
            raise

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
        mark runs in a thread so that the consumer is not held up by the backend.
        """
        if not isinstance(exc, TimeLimitExceeded):
            return  # every other failure was sorted in __call__, inside the task's process
        execution_id, organization_id = self._execution_of(tuple(args or ()), dict(kwargs or {}))
        if execution_id is None:
            return
        self.config()
        message = _error_message(exc, 0)
        threading.Thread(
            target=self._mark_or_log,
            args=(execution_id, organization_id, message, None),
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
        self.config()  # built first: it registers the secrets the message is scrubbed of
        message = _error_message(exc, self.request.retries)
        attempts = self.request.retries + 1
        try:
            self._mark(execution_id, organization_id, message, attempts)
        except Exception as mark_exc:
            if is_transient(mark_exc):
                self._requeue(mark_exc, args, kwargs)
            _log_not_marked(execution_id, mark_exc)

    def _mark_or_log(
        self, execution_id: str, organization_id: str | None, message: str, attempts: int | None
    ) -> None:
        """Mark the execution ``ERROR``; a refusal is logged (for use outside the task)."""
        try:
            self._mark(execution_id, organization_id, message, attempts)
        except Exception as exc:
            _log_not_marked(execution_id, exc)

    def _mark(
        self, execution_id: str, organization_id: str | None, message: str, attempts: int | None
    ) -> None:
        """Move the execution to ``ERROR`` with ``message`` (and ``attempts`` when known)."""
        from .api_client import InternalAPIClient

        fields: dict[str, Any] = {} if attempts is None else {"attempts": attempts}
        with InternalAPIClient(self.config()) as client:
            if organization_id is not None:
                client.set_organization_context(organization_id)
            client.update_workflow_execution_status(
                execution_id, "ERROR", error_message=message, **fields
            )
        logger.error(
            "execution marked ERROR", extra={"execution_id": execution_id, "error": message}
        )

    def _execution_of(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str | None, str | None]:
        """The ``execution_id`` and ``organization_id`` arguments of this call, if any."""
        try:
            bound = inspect.signature(self.run).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        execution_id = bound.get("execution_id")
        organization_id = bound.get("organization_id")
        return (
            None if execution_id is None else str(execution_id),
            None if organization_id is None else str(organization_id),
        )


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
