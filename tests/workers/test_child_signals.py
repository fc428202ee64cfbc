"""A prefork child's helper threads (heartbeat, lease schedule) leave SIGTERM to its main thread.

billiard blocks SIGTERM in a pool child's main thread while it writes to the shared result queue
under the queue's lock; the signal must then wait until the main thread unblocks it. Were it
taken by a helper thread instead, its default action would kill the child with the lock taken,
and the pool's shutdown would wait for that lock for ever. A real process plays the child here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.workers.shared import _threads

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import signal, sys, time
from pathlib import Path
from backend.workers.shared import _heartbeat, _lease

_heartbeat._MAIN.get().heartbeat_dir = Path(sys.argv[1])
_heartbeat.start_child()  # as on worker_process_init
_lease.Schedule.of_this_process()  # its thread, as for a leased run
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as billiard around its write
print("blocked", flush=True)
time.sleep(1.5)  # the signal arrives here
print("survived", flush=True)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # delivered now: default action
time.sleep(30)
print("not terminated", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_sigterm_waits_for_the_main_thread_to_unblock_it(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    ) as child:
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "blocked"
            assert [p.name for p in tmp_path.glob("*.json")] == [f"{child.pid}.json"]
            child.send_signal(signal.SIGTERM)
            rest = child.stdout.read()
            code = child.wait(timeout=20)
        finally:
            child.kill()
    assert rest.split() == ["survived"]  # not killed while the main thread blocked it
    assert code == -signal.SIGTERM


def test_the_signals_left_to_the_main_thread() -> None:
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1} <= _threads.PROCESS_SIGNALS
    assert signal.SIGSEGV not in _threads.PROCESS_SIGNALS  # a fault stays the faulting thread's
