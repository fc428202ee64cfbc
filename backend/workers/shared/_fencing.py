"""Fencing: the lease this context holds, whose writes carry ``X-Lease-Epoch``.

:func:`holding_lease` (re-exported by :mod:`backend.workers.shared.api_client`) puts a
:class:`HeldLease` in a context variable: never on a client, never shared between threads or
asyncio tasks that do not copy the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import WorkflowExecution

#: Largest lease epoch the backend accepts in ``X-Lease-Epoch``.
MAX_EPOCH = 2**31


@dataclass
class HeldLease:
    """The lease a task holds, in a context variable (see :func:`holding_lease`).

    ``finished`` is the execution as a write under this lease left it in a final status
    (``None`` while the task has not finished it). ``lost`` is set once the backend said the
    lease is gone (a heartbeat refused with ``lease_lost``): from then on a write under it
    raises :class:`LeaseLostError` without being sent.
    """

    execution_id: str
    epoch: int
    finished: WorkflowExecution | None = None
    lost: bool = False


_held_lease: ContextVar[HeldLease | None] = ContextVar("held_lease", default=None)


@contextlib.contextmanager
def holding_lease(execution_id: str, epoch: int) -> Iterator[HeldLease]:
    """While inside, this context's writes about ``execution_id`` carry ``X-Lease-Epoch``.

    Context-local (threads and asyncio tasks do not see each other's lease); nested blocks
    restore the outer lease on exit. A thread started inside sees it only when it runs in a
    copy of this context (``contextvars.copy_context().run``, one copy per thread).
    """
    held = HeldLease(str(execution_id), check_epoch(epoch))
    token = _held_lease.set(held)
    try:
        yield held
    finally:
        _held_lease.reset(token)


def lease_of(execution_id: str | None) -> HeldLease | None:
    """The lease this context holds on ``execution_id``, if it holds one."""
    held = _held_lease.get()
    if held is None or execution_id is None or held.execution_id != str(execution_id):
        return None
    return held


def note_final(execution: WorkflowExecution) -> None:
    """Remember on the held lease an execution that a write under it left final."""
    held = lease_of(execution.id)
    if held is not None and execution.is_final:
        held.finished = execution


def check_epoch(epoch: int) -> int:
    """``epoch`` when it is a lease epoch the backend accepts; else a ``ValueError``."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an integer from 1 to {MAX_EPOCH}, got {epoch!r}")
    return epoch
