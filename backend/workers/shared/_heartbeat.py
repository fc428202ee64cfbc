"""What the main process of a Celery worker knows about itself and its prefork children.

The main process registers its ``WorkController`` here at start-up and gets a private run
directory (multiprocess metrics, child heartbeats). Every prefork child runs a daemon thread
that rewrites ``heartbeats/<pid>.json`` every :data:`BEAT_INTERVAL` seconds (and soon after
each task) with its recent task outcomes. The health checks read it all from the main
process: which children are alive and fresh, whether the consumer holds a broker connection,
and the recent outcomes merged over all children, those that exited included. (Task and
call statistics are not shipped here: the multiprocess metrics hold them.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import _metrics, _runtime, _stats, _threads

BEAT_INTERVAL = 2.0  # seconds between two heartbeats of a child
_MIN_SPACING = 0.25  # at most four extra heartbeats per second after tasks
_RUN_PREFIX = "celery-worker-run-"

log = logging.getLogger(__name__)


class _MainState:
    """The worker of this (main) process, its run directory, and exited children's recent
    task outcomes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: Any = None
        self.expected = False
        self.ready = False
        self.run_dir: Path | None = None
        self.heartbeat_dir: Path | None = None
        self.retired_recent: list[_stats.Outcome] = []


def _in_child(inherited: _MainState) -> _MainState:
    """A forked child (a prefork pool's) is not the main process: it keeps only the
    heartbeat directory, where its own heartbeat thread writes."""
    state = _MainState()
    state.heartbeat_dir = inherited.heartbeat_dir
    return state


_MAIN = _runtime.part("worker main process", _MainState, _in_child)


class _ChildBeat:
    """The heartbeat thread of a prefork child."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.path: Path | None = None

    def start(self, directory: Path) -> None:
        self.path = directory / f"{os.getpid()}.json"
        self.wake = threading.Event()
        self.write()
        self.thread = _threads.start_daemon(self._run, "worker-heartbeat")

    def _run(self) -> None:
        while True:
            self.wake.wait(BEAT_INTERVAL)
            self.wake.clear()
            self.write()
            time.sleep(_MIN_SPACING)

    def write(self) -> None:
        path = self.path
        if path is None:
            return
        body = json.dumps(
            {
                "pid": os.getpid(),
                "time": time.time(),
                "recent_tasks": _stats.recent().snapshot(),
            }
        )
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(body, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # the main process removed the directory: it is shutting down
            log.debug("heartbeat not written to %s: %s", path, exc)


_CHILD = _runtime.part("child heartbeat", _ChildBeat, lambda _inherited: _ChildBeat())


def start_main(worker: Any) -> None:
    """In the main process at worker start: run directory, multiprocess metrics (cleaned)."""
    state = _MAIN.get()
    with state.lock:
        state.worker = worker
        if state.run_dir is not None:
            return
        _remove_abandoned_run_dirs()
        run_dir = Path(tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{os.getpid()}-"))
        metrics_dir = os.environ.get(_metrics.ENV_DIR) or str(run_dir / "metrics")
        _metrics.enable_multiprocess(metrics_dir)
        heartbeat_dir = run_dir / "heartbeats"
        heartbeat_dir.mkdir()
        state.run_dir, state.heartbeat_dir = run_dir, heartbeat_dir


def _remove_abandoned_run_dirs() -> None:
    # Run directories of killed workers (no shutdown signal ran) are removed by the next.
    for path in Path(tempfile.gettempdir()).glob(f"{_RUN_PREFIX}*-*"):
        pid_text = path.name.removeprefix(_RUN_PREFIX).split("-", 1)[0]
        if pid_text.isdigit() and not _metrics.pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def consumer_ready() -> bool:
    """True while the worker's consumer runs (between ``worker_ready`` and shutdown)."""
    return bool(_MAIN.get().ready)


def set_ready(ready: bool) -> None:
    """The consumer started (or the worker is stopping)."""
    state = _MAIN.get()
    state.ready = ready


def stop_main() -> None:
    """In the main process at worker shutdown: remove the run directory."""
    state = _MAIN.get()
    with state.lock:
        run_dir, state.run_dir, state.heartbeat_dir = state.run_dir, None, None
        state.ready = False
        state.worker = None
        state.expected = False
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def start_child() -> None:
    """In a prefork child after fork: start the heartbeat thread."""
    state = _MAIN.get()
    if state.heartbeat_dir is not None:
        _CHILD.get().start(state.heartbeat_dir)


def child_exiting() -> None:
    """In a prefork child about to exit: last heartbeat, drop its live gauges."""
    _CHILD.get().write()
    _metrics.mark_process_dead(os.getpid())


def task_done() -> None:
    """Ask the heartbeat thread for an early beat, so the task's outcome shows up promptly."""
    _CHILD.get().wake.set()


def expect_worker() -> None:
    """This process runs ``celery worker``: until the worker attaches it is starting."""
    state = _MAIN.get()
    state.expected = True


def worker_attached() -> bool:
    """True when a Celery worker runs in this process, or is starting (``celery worker``)."""
    state = _MAIN.get()
    return state.worker is not None or state.expected


def worker_started() -> bool:
    """True once the Celery worker of this process has initialised (``worker_init``)."""
    state = _MAIN.get()
    return state.worker is not None


def consumer_connected() -> bool:
    """True when the worker's consumer holds a live broker connection."""
    state = _MAIN.get()
    worker = state.worker
    consumer = getattr(worker, "consumer", None)
    connection = getattr(consumer, "connection", None)
    if connection is None:
        return False
    return bool(connection.connected)


def pool_pids() -> list[int]:
    """Process ids of the prefork pool's children (empty for solo or thread pools)."""
    state = _MAIN.get()
    pool = getattr(getattr(state.worker, "pool", None), "_pool", None)
    processes = getattr(pool, "_pool", None)
    if not isinstance(processes, list):
        return []
    return [int(p.pid) for p in list(processes) if getattr(p, "pid", None)]


def child_heartbeats(timeout: float) -> list[dict[str, Any]]:
    """Each pool child: its pid, seconds since its last heartbeat, and whether that is fresh."""
    state = _MAIN.get()
    directory = state.heartbeat_dir
    now = time.time()
    out = []
    for pid in pool_pids():
        age: float | None = None
        if directory is not None:
            try:
                age = max(0.0, now - (directory / f"{pid}.json").stat().st_mtime)
            except FileNotFoundError:
                age = None
        if age is None:
            started = _process_age(pid)
            if started is None:  # exited since the pool listed it: being replaced, not stale
                continue
            fresh = started < timeout  # still starting up
        else:
            fresh = age <= timeout
        out.append(
            {
                "pid": pid,
                "heartbeat_age_seconds": None if age is None else round(age, 3),
                "fresh": fresh,
            }
        )
    return out


def _process_age(pid: int) -> float | None:
    import psutil

    try:
        return time.time() - psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _live_beats() -> list[dict[str, Any]]:
    """The heartbeats of live children; an exited child's outcomes move to the retired ones."""
    state = _MAIN.get()
    directory = state.heartbeat_dir
    if directory is None:
        return []
    beats = []
    with state.lock:
        for path in directory.glob("*.json"):
            try:
                beat = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # replaced or removed while we read it
            pid = int(beat.get("pid", 0))
            if pid and not _metrics.pid_alive(pid):
                state.retired_recent = _stats.merge_recent(
                    [state.retired_recent, beat.get("recent_tasks", [])]
                )
                path.unlink(missing_ok=True)
                continue
            beats.append(beat)
    return beats


def recent_tasks() -> list[_stats.Outcome]:
    """The last task outcomes of this process, its children and exited children, oldest
    first (at most :data:`_stats.RECENT_SIZE`)."""
    state = _MAIN.get()
    beats = _live_beats()
    snapshots: list[Any] = [_stats.recent().snapshot(), state.retired_recent]
    snapshots += [beat.get("recent_tasks", []) for beat in beats]
    return _stats.merge_recent(snapshots)
