"""Helper threads that leave the signals sent to the process to its main thread.

A prefork pool child gets SIGTERM from its parent (billiard answers a child's DEATH message
with one; Celery's cold shutdown terminates running tasks with it) and SIGUSR1 at a soft time
limit. billiard blocks SIGTERM in the child's main thread while it writes to the result queue
under the queue's process-shared lock, so that the signal waits until the lock is given back.
The kernel hands a process-directed signal to any thread that does not block it: a helper
thread of ours would take it then, and with the default action (after the first SIGTERM) the
child dies holding that lock; the pool's shutdown then waits for the lock for ever. A signal
taken by a helper thread also leaves the main thread's blocking call running (a sleep, a
read) where the main thread would have been interrupted. Python runs signal handlers in the
main thread anyway, so a helper thread loses nothing by blocking these signals.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

# The asynchronous signals another process (the pool's parent, an operator) sends.
PROCESS_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` with :data:`PROCESS_SIGNALS` blocked."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    if not hasattr(signal, "pthread_sigmask"):  # no per-thread signal masks (Windows)
        thread.start()
        return thread
    # Blocked here around the start, the new thread inherits the mask from its first moment.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread
