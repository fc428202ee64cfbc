"""How ``worker_process`` judges each prefork child (``_heartbeat.child_heartbeats``), with real
processes standing for the pool's children: a fresh heartbeat file, a stale one, none yet (a
child starting, or one started long ago), and a child that exited since the pool listed it
(being replaced: neither fresh nor stale, it is left out)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backend.workers.shared import _heartbeat

TIMEOUT = 10.0
OLD_PROCESS = 1  # init: started with the machine, long before any test


@pytest.fixture
def heartbeat_dir(tmp_path: Path) -> Iterator[Path]:
    """A stand-in Celery worker whose pool lists the pids :func:`judge` is given."""
    state = _heartbeat._MAIN.get()
    saved = (state.worker, state.heartbeat_dir)
    state.worker = SimpleNamespace(pool=SimpleNamespace(_pool=SimpleNamespace(_pool=[])))
    state.heartbeat_dir = tmp_path
    yield tmp_path
    state.worker, state.heartbeat_dir = saved


def judge(pids: list[int]) -> list[dict[str, Any]]:
    _heartbeat._MAIN.get().worker.pool._pool._pool = [SimpleNamespace(pid=pid) for pid in pids]
    return _heartbeat.child_heartbeats(TIMEOUT)


def beat(directory: Path, pid: int, age: float) -> None:
    path = directory / f"{pid}.json"
    path.write_text("{}")
    when = time.time() - age
    os.utime(path, (when, when))


@pytest.mark.parametrize(
    ("case", "fresh"),
    [
        ("heartbeat 1 s ago", True),
        ("heartbeat 15 s ago", False),
        ("no heartbeat, started just now", True),
        ("no heartbeat, started long ago", False),
    ],
)
def test_each_child_is_judged_by_its_heartbeat_or_else_its_age(
    heartbeat_dir: Path, case: str, fresh: bool
) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as young:
        try:
            pid = OLD_PROCESS if case.endswith("long ago") else young.pid
            if case.startswith("heartbeat"):
                beat(heartbeat_dir, pid, float(case.split()[1]))
            (judged,) = judge([pid])
            assert (judged["pid"], judged["fresh"]) == (pid, fresh), judged
        finally:
            young.kill()


def test_a_child_that_exited_since_the_pool_listed_it_is_left_out(heartbeat_dir: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    beat(heartbeat_dir, OLD_PROCESS, 1.0)
    judged = judge([gone.pid, OLD_PROCESS])
    assert [(c["pid"], c["fresh"]) for c in judged] == [(OLD_PROCESS, True)]
