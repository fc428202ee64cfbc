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

Layout: :class:`ExecutionTask` (its options, the call, the configuration) combines the leased
run (``_leased_run.LeasedRun``: claim, heartbeat, finish, webhook) and the failure rule
(``_failure_rule.FailureRule``: re-queue or mark ``ERROR``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

from celery.exceptions import TaskPredicate

from ._failure_rule import MAX_ERROR_MESSAGE as MAX_ERROR_MESSAGE, FailureRule
from ._lease import current_run
from ._leased_run import (
    DISPATCH_NAME as DISPATCH_NAME,
    MAX_QUEUE_NAME as MAX_QUEUE_NAME,
    MAX_TASK_NAME as MAX_TASK_NAME,
    LeasedRun,
)
from ._resilience import check_number
from .config import WorkerConfig
from .errors import is_transient as is_transient

if TYPE_CHECKING:
    from .api_client import WorkflowExecution


class ExecutionTask(LeasedRun, FailureRule):
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery makes a subclass per task: its backoff options are checked there, at start-up,
        # not on the first failure (whose handling must not fail). ``retry_backoff=True`` is
        # Celery's form of 1 s.
        super().__init_subclass__(**kwargs)
        name = getattr(cls, "name", None) or cls.__name__
        backoff = 1.0 if cls.retry_backoff is True else cls.retry_backoff
        cls.retry_backoff = check_number(f"{name}: retry_backoff", backoff, minimum=0.0)
        cls.retry_backoff_max = check_number(
            f"{name}: retry_backoff_max", cls.retry_backoff_max, minimum=0.0
        )
        if not isinstance(cls.retry_jitter, bool):
            jitter = cls.retry_jitter
            raise ValueError(f"{name}: retry_jitter must be True or False, got {jitter!r}")

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

    def config(self) -> WorkerConfig:
        """The configuration used to reach the backend: the task's, or the environment's."""
        config = type(self).worker_config
        if config is None:
            config = WorkerConfig()
            type(self).worker_config = config
        return config

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
