"""The lease a leased run of :class:`~backend.workers.shared.tasks.ExecutionTask` holds:
the run itself (in a context variable), the heartbeats that keep its lease, the one scheduling
thread per process that starts them only for runs that need them, and the note the worker's
main process reads after a hard-time-limit kill."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from . import _threads
from .config import WorkerConfig

if TYPE_CHECKING:
    from .api_client import HeldLease, WorkflowExecution

# The lease's lines are the task's: one logger for what ExecutionTask does.
logger = logging.getLogger("backend.workers.shared.tasks")


@dataclass
class Run:
    """One leased run of a task: the claimed execution, its epoch, its organization."""

    execution: WorkflowExecution
    epoch: int
    organization_id: str | None
    held: HeldLease | None = None


current_run: ContextVar[Run | None] = ContextVar("execution_task_run", default=None)


class LeaseKeeper:
    """Heartbeats the run's lease from a thread while the body runs, at every third of the
    lease (a fixed schedule: a slow or failed heartbeat does not push the next one back).
    Each heartbeat gets at most a sixth of the lease per attempt and a third in all (never
    more than ``API_TIMEOUT`` / ``API_DEADLINE``), so one stalled request cannot cost the
    lease; a failed one is tried again at the next tick.
    ``lost`` turns True when the backend says the lease is gone, and the run's held lease
    is marked lost, so the body's writes under it stop (raised, never sent).

    A short run costs no thread: the process's :class:`Schedule` starts the heartbeat thread
    (and writes the :class:`LeaseNote` of task ``note_for``) only when the run outlives the
    first third of its lease, or half of ``note_within`` (the hard time limit), whichever
    comes first. ``stop`` ends the heartbeats when the body returns; ``close`` ends the run
    (after its finish and webhook, which the note still covers)."""

    def __init__(
        self,
        config: WorkerConfig,
        run: Run,
        *,
        lease_seconds: float,
        note_for: str | None = None,
        note_within: float | None = None,
    ) -> None:
        self._config = config
        self._run = run
        self._interval = lease_seconds / 3
        self._note_for = note_for
        self._note_within = note_within
        self._note: LeaseNote | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._schedule: Schedule | None = None
        self._first_beat = 0.0
        self._context = contextvars.Context()
        self.lost = False

    def start(self) -> None:
        """Schedule the run's heartbeats (the first one after ``interval``)."""
        now = time.monotonic()
        self._first_beat = now + self._interval
        launch = self._first_beat
        if self._note_for is not None and self._note_within:
            launch = min(launch, now + self._note_within / 2)
        # The task's context (its log fields, so its X-Request-ID), not a shared one.
        self._context = contextvars.copy_context()
        self._schedule = Schedule.of_this_process()
        self._schedule.add(self, launch)

    def launch(self) -> None:
        """Note the lease and start the heartbeat thread (called by the schedule, once)."""
        if self._note_for is not None:
            note = LeaseNote(self._config, self._note_for)
            if note.write(self._run.execution.id, self._run.epoch):
                self._note = note
        if self._stopped.is_set():  # the body ended: the note still covers finish and webhook
            return
        self._thread = threading.Thread(
            target=self._context.run,
            args=(self._beat,),
            name=f"lease-{self._run.execution.id}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop heartbeating (the body ended); waits a moment for a heartbeat in flight."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=min(self._interval, 5.0))

    def close(self) -> None:
        """The run ended (finish and webhook included): nothing more is launched, and the
        lease note is forgotten."""
        self._stopped.set()
        if self._schedule is not None:
            self._schedule.discard(self)  # after this, no launch can begin
        if self._note is not None:
            self._note.remove()

    def _beat(self) -> None:
        from .api_client import InternalAPIClient, LeaseLostError

        run = self._run
        fields = {"execution_id": run.execution.id, "epoch": run.epoch}
        interval = self._interval
        timeout = min(interval / 2, self._config.api_timeout)
        deadline = min(interval, self._config.api_deadline)
        due = self._first_beat
        with InternalAPIClient(self._config, organization_id=run.organization_id) as client:
            while not self._stopped.wait(max(0.0, due - time.monotonic())):
                due = max(due + interval, time.monotonic())
                try:
                    client.heartbeat_execution(
                        run.execution.id, run.epoch, timeout=timeout, deadline=deadline
                    )
                except LeaseLostError:
                    self.lost = True  # also when it answers after stop(): no finish then
                    if run.held is not None:
                        run.held.lost = True
                    logger.warning("heartbeat: the lease is lost", extra=fields)
                    return
                except Exception as exc:  # the next beat tries again; the lease may hold
                    logger.info(
                        "heartbeat failed: %s", exc, extra={**fields, "error": type(exc).__name__}
                    )


class Schedule:
    """One thread per process that launches each run's :class:`LeaseKeeper` when it is due,
    so that a run shorter than that starts no thread at all. Made anew in a forked child
    (threads do not survive a fork)."""

    _current: ClassVar[Schedule | None] = None

    @classmethod
    def of_this_process(cls) -> Schedule:
        """The schedule of the calling process, made (with its thread) on first use."""
        schedule = cls._current
        if schedule is None or schedule.pid != os.getpid():
            schedule = cls._current = cls()
        return schedule

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._due: dict[LeaseKeeper, float] = {}
        self._wake_at = math.inf
        self._changed = threading.Condition()
        # Its keepers' threads are started from it: they inherit its blocked signals.
        _threads.start_daemon(self._run, "lease-schedule")

    def add(self, keeper: LeaseKeeper, at: float) -> None:
        """Launch ``keeper`` at ``at`` (``time.monotonic()``), unless discarded before."""
        with self._changed:
            self._due[keeper] = at
            if at < self._wake_at:  # else the thread wakes before it is due anyway
                self._changed.notify()

    def discard(self, keeper: LeaseKeeper) -> None:
        """Do not launch ``keeper`` (it may have been launched already)."""
        with self._changed:
            self._due.pop(keeper, None)

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for keeper in [k for k, at in self._due.items() if at <= now]:
                    del self._due[keeper]
                    try:
                        keeper.launch()
                    except Exception:  # a thread that cannot start: that run goes unbeaten
                        logger.exception("cannot start the lease's heartbeat thread")
                self._wake_at = min(self._due.values(), default=math.inf)
                self._changed.wait(None if self._wake_at == math.inf else self._wake_at - now)


class LeaseNote:
    """The lease a run holds, in a file the worker's main process can read: a task killed at
    its hard time limit runs no code of its own, and the main process's ``ERROR`` mark must
    carry the lease's epoch. ``WORKER_DATA_DIR/leases/<hash of the task id>``, written after
    the claim and removed when the run ends (or by the main process's failure hook)."""

    def __init__(self, config: WorkerConfig, task_id: str) -> None:
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
        self.path = config.worker_data_dir / "leases" / digest

    def write(self, execution_id: str, epoch: int) -> bool:
        """Note the lease; a note that cannot be written is logged (no mark at the limit)
        and False is returned."""
        text = f"{execution_id} {epoch}\n"
        try:
            try:
                self.path.write_text(text)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(text)
        except OSError as exc:
            logger.warning(
                "cannot note the lease for the hard time limit: %s",
                exc,
                extra={"execution_id": execution_id, "error_type": type(exc).__name__},
            )
            return False
        return True

    def take(self) -> tuple[str, int] | None:
        """The noted ``(execution_id, epoch)``, removing the note; ``None`` when there is none
        (or it is unreadable: cut short by the kill)."""
        try:
            parts = self.path.read_text().split()
        except OSError:
            return None
        self.remove()
        if len(parts) != 2 or not parts[1].isdigit():
            return None
        return parts[0], int(parts[1])

    def remove(self) -> None:
        """Forget the note (there may be none)."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
