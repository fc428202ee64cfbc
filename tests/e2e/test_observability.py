"""Observability of a real ``celery worker`` (prefork, two children) against the real backend.

The worker (``observability_worker.py``) is built the module README's Quick Start way. Its stdout
and stderr are captured separately; every line must be a JSON object. Tasks are sent through the
filesystem broker in a temporary directory; counts are read back from ``/metrics`` and
``/health/metrics`` served by the worker's main process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import die_with_parent, free_port
from tests.e2e.harness import http_get, wait_until
from tests.live_backend import LiveBackend

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
TASK = "observability_worker.work"
OK_TASKS = 6
FAILING_TASKS = 2

pytestmark = pytest.mark.timeout(300)


@dataclass
class Worker:
    """The worker subprocess and what the tests need to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    queue: str
    data_dir: Path
    out_path: Path
    err_path: Path
    api_key: str
    org_id: str

    def get(self, path: str) -> tuple[int, Any]:
        status, body = http_get(self.url + path, timeout=10)
        return status, (json.loads(body) if body.startswith(b"{") else body.decode())

    def lines(self) -> list[tuple[str, str]]:
        out = []
        for stream, path in (("stdout", self.out_path), ("stderr", self.err_path)):
            out += [(stream, line) for line in path.read_text().splitlines()]
        return out

    def log_tail(self) -> str:
        return "\n".join(line for _, line in self.lines()[-40:])


@pytest.fixture(scope="module")
def backend() -> Iterator[LiveBackend]:
    live = LiveBackend()  # our own: the last test stops and restarts it
    try:
        yield live.start()
    finally:
        live.close()


@contextlib.contextmanager
def running_worker(backend: LiveBackend, tmp: Path, *pool: str,
                   extra_env: dict[str, str] | None = None,
                   loglevel: str = "INFO") -> Iterator[Worker]:
    """A ``celery worker`` subprocess with ``pool`` options, ready; warm-stopped at the end."""
    queue = f"obs-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR", "ENV_FILE")}
    env.update({
        "INTERNAL_SERVICE_API_KEY": backend.api_key,
        "DJANGO_APP_BACKEND_URL": backend.url,
        "ORGANIZATION_ID": backend.org_id,
        "WORKER_NAME": queue,
        "WORKER_DATA_DIR": str(tmp / "data"),
        "METRICS_PORT": str(port),
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_CHECK_TIMEOUT": "3",
        "HEALTH_HEARTBEAT_TIMEOUT": "6",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(HERE)]),
        **(extra_env or {}),
    })
    out_path, err_path = tmp / "stdout.log", tmp / "stderr.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "observability_worker", "worker", *pool,
             "--loglevel", loglevel, "-Q", queue, "--hostname", f"{queue}@%h"],
            cwd=tmp, env=env, stdout=out, stderr=err, start_new_session=True,
            preexec_fn=die_with_parent,
        )
    running = Worker(process, f"http://127.0.0.1:{port}", queue, tmp / "data", out_path,
                     err_path, backend.api_key, backend.org_id)
    try:
        try:
            wait_until(lambda: _status(running, "/readyz") == 200, 90, "the worker to be ready")
        except TimeoutError:
            pytest.fail(f"worker did not become ready; its log:\n{running.log_tail()}")
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the main process only: a warm shutdown
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def worker(backend: LiveBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("observability")
    with running_worker(backend, tmp, "--pool", "prefork", "--concurrency", "2") as running:
        yield running


def _status(worker: Worker, path: str) -> int:
    try:
        return worker.get(path)[0]
    except OSError:
        return 0


def _send(worker: Worker, broker_url: str | None = None, **kwargs: Any) -> None:
    from celery import Celery

    from backend.workers.shared.config import WorkerConfig

    kwargs.setdefault("call_backend", True)  # one API call per task, from the child
    config = WorkerConfig(internal_service_api_key=worker.api_key, celery_broker_url=broker_url,
                          worker_data_dir=worker.data_dir, worker_name=worker.queue)
    producer = Celery("observability_producer")
    producer.config_from_object(config.get_celery_config())
    producer.send_task(TASK, kwargs=kwargs, queue=worker.queue)


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        found = dict(part.split("=", 1) for part in head[len(name) + 1:-1].split(","))
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def ran_tasks(worker: Worker) -> list[str]:
    """Runs the tasks once for the module; returns their execution ids (failing ones last)."""
    ids = [f"exec-{i}-{uuid.uuid4().hex[:6]}" for i in range(OK_TASKS + FAILING_TASKS)]
    for i, execution_id in enumerate(ids):
        _send(worker, execution_id=execution_id, organization_id=worker.org_id,
              fail=i >= OK_TASKS, pause=0.3)

    def all_counted() -> bool:
        text = worker.get("/metrics")[1]
        return (_sample(text, "worker_tasks_total", task=TASK, outcome="success")
                + _sample(text, "worker_tasks_total", task=TASK, outcome="failure")
                ) >= len(ids)

    wait_until(all_counted, 90, "the tasks to be counted in /metrics")
    return ids


def test_metrics_count_every_task_across_children(worker: Worker, ran_tasks: list[str]) -> None:
    text = worker.get("/metrics")[1]
    assert _sample(text, "worker_tasks_total", task=TASK, outcome="success") == OK_TASKS
    assert _sample(text, "worker_tasks_total", task=TASK, outcome="failure") == FAILING_TASKS
    assert _sample(text, "worker_task_duration_seconds_count", task=TASK) == len(ran_tasks)
    function = "observability_worker.work"
    assert _sample(text, "worker_function_duration_seconds_count", function=function,
                   outcome="success") == OK_TASKS
    assert _sample(text, "worker_function_duration_seconds_count", function=function,
                   outcome="failure") == FAILING_TASKS
    # The work was really spread over the two children.
    pids = {json.loads(line)["pid"] for _, line in worker.lines()
            if '"task_id"' in line and "processing execution" in line}
    assert len(pids) == 2


def test_health_metrics_merge_the_children(worker: Worker, ran_tasks: list[str]) -> None:
    def merged() -> dict[str, Any]:
        return dict(worker.get("/health/metrics")[1])

    wait_until(lambda: merged()["tasks"].get(TASK, {}).get("count") == len(ran_tasks), 30,
               "the children's task statistics")
    body = merged()
    assert body["tasks"][TASK]["errors"] == FAILING_TASKS
    function = body["functions"]["observability_worker.work"]
    assert function["count"] == len(ran_tasks)
    assert function["errors"] == FAILING_TASKS
    assert function["max_ms"] >= function["p95_ms"] > 0
    # Computed from the Prometheus metrics: the exact max is the max gauge of /metrics
    # (in milliseconds rounded to 3 decimals).
    text = worker.get("/metrics")[1]
    assert function["max_ms"] == round(1000 * _sample(
        text, "worker_function_max_duration_seconds", function="observability_worker.work"), 3)
    assert body["process"]["pool_processes"] == 2
    assert set(body["system"]) >= {"cpu_percent", "memory_percent", "disk_percent"}


def test_task_lines_are_json_with_the_task_context(worker: Worker,
                                                   ran_tasks: list[str]) -> None:
    records = [json.loads(line) for _, line in worker.lines()]
    for execution_id in ran_tasks:
        mine = [r for r in records if r.get("execution_id") == execution_id]
        messages = {r["message"] for r in mine}
        assert f"processing execution {execution_id}" in messages
        assert "stdlib line with args" in messages
        assert "a line printed by the task" in messages  # print() redirected into the log
        task_ids = {r["task_id"] for r in mine}
        assert len(task_ids) == 1
        assert all(r["task_name"] == TASK and r["organization_id"] == worker.org_id
                   for r in mine)
        stdlib = next(r for r in mine if r["message"] == "stdlib line with args")
        assert stdlib["kind"] == "extra" and stdlib["logger"] == "plain.stdlib"
        # The Celery wiring froze the heap before the pool forked (shared, not copied).
        start = next(r for r in mine if r["message"] == f"processing execution {execution_id}")
        assert start["frozen_objects"] > 0
    # Each task called the backend once: at INFO that is not a line (neither ours nor httpx2's).
    assert not [r for r in records if r["logger"].startswith(("httpx2", "httpcore2"))]
    assert not [r for r in records if r["message"] == "internal API call"]
    failures = [r for r in records if r.get("level") == "ERROR" and "exception" in r
                and r.get("logger") == "celery.app.trace"]
    assert len(failures) == FAILING_TASKS
    assert all(r["exception"]["type"] == "ValueError" and r["task_id"] for r in failures)
    # Outside tasks, no task field leaks into the next line of the same child.
    for record in records:
        if record["message"].startswith("celery worker") or record["logger"] == "celery.apps":
            assert "task_id" not in record


def test_health_over_http(worker: Worker, ran_tasks: list[str]) -> None:
    status, body = worker.get("/health")
    assert status == 200, body
    assert list(body) == ["status", "timestamp", "uptime_seconds", "worker_name", "checks"]
    assert body["worker_name"] == worker.queue
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "api_connectivity": "healthy", "system_resources": body["checks"]["system_resources"][
            "status"], "worker_process": "healthy"}
    process = body["checks"]["worker_process"]["details"]
    assert process["consumer_connected"] is True
    assert [child["fresh"] for child in process["pool_processes"]] == [True, True]
    quick_status, quick = worker.get("/health/quick")
    assert quick_status in (200, 503) and list(quick) == list(body)
    assert worker.get("/livez")[0] == 200
    assert worker.get("/nope")[1]["error"] == "not_found"
    history = worker.get("/health/history")[1]
    assert history["count"] >= 2
    for _, line in worker.lines():
        assert worker.api_key not in line


def test_thread_pool_keeps_each_tasks_context(backend: LiveBackend, tmp_path: Path) -> None:
    with running_worker(backend, tmp_path, "--pool", "threads", "--concurrency", "4") as pool:
        ids = [f"thr-{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
        for execution_id in ids:
            _send(pool, execution_id=execution_id, pause=0.3)
        wait_until(lambda: _sample(pool.get("/metrics")[1], "worker_tasks_total", task=TASK,
                                   outcome="success") == len(ids), 60, "the thread pool's tasks")
        records = [json.loads(line) for _, line in pool.lines()]
    by_task: dict[str, set[str]] = {}
    for record in records:
        if "task_id" in record and "execution_id" in record:
            by_task.setdefault(record["task_id"], set()).add(record["execution_id"])
    assert len(by_task) == len(ids)
    assert sorted(e for found in by_task.values() for e in found) == sorted(ids)
    assert all(len(found) == 1 for found in by_task.values())  # never a neighbour's id
    # The tasks really ran side by side in threads of one process (their spans overlap).
    spans = []
    for task_id in by_task:
        times = [r["timestamp"] for r in records if r.get("task_id") == task_id]
        spans.append((min(times), max(times)))
    spans.sort()
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert len({r["pid"] for r in records if "task_id" in r}) == 1
    assert {r["frozen_objects"] for r in records if "frozen_objects" in r} == {0}  # no fork


def test_without_configure_the_celery_wiring_logs_json(backend: LiveBackend,
                                                       tmp_path: Path) -> None:
    env = {"OBS_SKIP_CONFIGURE": "1", "LOG_FORMAT": "structured"}
    with running_worker(backend, tmp_path, "--pool", "prefork", "--concurrency", "1",
                        extra_env=env, loglevel="DEBUG") as bare:
        _send(bare, execution_id="bare-1")
        wait_until(lambda: _sample(bare.get("/metrics")[1], "worker_tasks_total", task=TASK,
                                   outcome="success") == 1, 60, "the task")
        bare.process.send_signal(signal.SIGTERM)
        assert bare.process.wait(timeout=60) == 0
    records = []
    for stream, line in bare.lines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on {stream}: {line!r}")
    task_line = next(r for r in records if r["message"] == "processing execution bare-1")
    assert task_line["task_id"] and task_line["worker_name"] == bare.queue
    # At DEBUG, the task's one API call is one line: the client's, not httpx2's or httpcore2's.
    assert not [r for r in records if r["logger"].startswith(("httpx2", "httpcore2"))]
    calls = [r for r in records if r.get("task_id") == task_line["task_id"]
             and r["logger"].startswith(("httpx2", "httpcore2", "backend.workers.shared"))
             and r["logger"] != "backend.workers.shared.logging_utils.performance"]
    assert [(r["message"], r["method"], r["path"]) for r in calls] == [
        ("internal API call", "GET", "health/")]


@pytest.mark.redis
def test_redis_broker_counts_and_readiness(backend: LiveBackend, tmp_path: Path) -> None:
    broker = "redis://127.0.0.1:6379/13"  # a queue of our own on a db the others leave alone
    with running_worker(backend, tmp_path, "--pool", "prefork", "--concurrency", "2",
                        extra_env={"CELERY_BROKER_URL": broker}) as on_redis:
        for n in range(4):
            _send(on_redis, broker, execution_id=f"redis-{n}", organization_id=on_redis.org_id)
        wait_until(lambda: _sample(on_redis.get("/metrics")[1], "worker_tasks_total", task=TASK,
                                   outcome="success") == 4, 60, "the Redis tasks")
        status, ready = on_redis.get("/readyz")
        assert status == 200 and ready["checks"]["consumer"] == {"ok": True}
        process = on_redis.get("/health")[1]["checks"]["worker_process"]
        assert process["status"] == "healthy"
        assert process["details"]["consumer_connected"] is True
    lines = [json.loads(line) for _, line in on_redis.lines()]
    assert {r["execution_id"] for r in lines if "execution_id" in r} == {
        f"redis-{n}" for n in range(4)}


def test_a_frozen_child_makes_worker_process_unhealthy(worker: Worker,
                                                       ran_tasks: list[str]) -> None:
    def worker_process() -> dict[str, Any]:
        return dict(worker.get("/health")[1]["checks"]["worker_process"])

    children = [c["pid"] for c in worker_process()["details"]["pool_processes"]]
    assert len(children) == 2
    os.kill(children[0], signal.SIGSTOP)  # alive, but its heartbeat stops
    try:
        wait_until(lambda: worker_process()["status"] == "unhealthy", 30,
                   "the frozen child's heartbeat to go stale")
        check = worker_process()
        assert str(children[0]) in check["message"]
        stale = [c for c in check["details"]["pool_processes"] if not c["fresh"]]
        assert [c["pid"] for c in stale] == [children[0]]
    finally:
        os.kill(children[0], signal.SIGCONT)
    wait_until(lambda: worker_process()["status"] == "healthy", 30, "the child to recover")


def test_backend_down_livez_answers_readyz_does_not(worker: Worker, backend: LiveBackend,
                                                   ran_tasks: list[str]) -> None:
    backend.stop()
    try:
        wait_until(lambda: _status(worker, "/readyz") == 503, 30, "/readyz to turn 503")
        assert _status(worker, "/livez") == 200
        status, body = worker.get("/health")
        assert status == 503
        assert body["checks"]["api_connectivity"]["status"] == "unhealthy"
        assert worker.get("/readyz")[1]["checks"]["backend"]["ok"] is False
    finally:
        backend.start()
    wait_until(lambda: _status(worker, "/readyz") == 200, 90, "/readyz to recover")


def test_every_line_is_json_through_shutdown(worker: Worker, ran_tasks: list[str]) -> None:
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    lines = worker.lines()
    assert lines
    for stream, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line on {stream}: {line!r}")
        assert {"timestamp", "level", "logger", "message", "worker_name", "pid"} <= set(record)
    messages = [json.loads(line)["message"] for _, line in lines]
    assert "celery worker shutting down" in messages
    assert "worker: Warm shutdown (MainProcess)" in messages  # Celery's notice, as JSON


def _records(worker: Worker) -> list[dict[str, Any]]:
    records = []
    for stream, line in worker.lines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on {stream}: {line!r}")
    return records


def test_every_line_is_json_through_ctrl_c(backend: LiveBackend, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the main process) twice during a task: Celery's warm and cold
    shutdown notices come out as JSON lines like everything else."""
    with running_worker(backend, tmp_path, "--pool", "prefork", "--concurrency", "1") as w:
        # Long enough for both presses to come during the task; a cold shutdown still waits
        # for a running task's process, so not much longer.
        _send(w, execution_id="ctrl-c", pause=10)
        wait_until(lambda: any(r["message"] == "processing execution ctrl-c"
                               for r in _records(w)), 60, "the task to start")
        w.process.send_signal(signal.SIGINT)
        wait_until(lambda: any("Hitting Ctrl+C again" in r["message"] for r in _records(w)),
                   30, "the warm shutdown notice")
        w.process.send_signal(signal.SIGINT)  # again: cold shutdown, the task is cancelled
        wait_until(lambda: any("terminate all running tasks" in r["message"]
                               for r in _records(w)), 30, "the cold shutdown notice")
        # The worker exits by itself: a child's helper threads leave SIGTERM to its main
        # thread, so no child dies holding the result queue's lock (billiard's at-exit pool
        # finalizer waited for it for ever, 1 run in 3).
        w.process.wait(timeout=30)
    messages = [r["message"] for r in _records(w)]
    assert "worker: Warm shutdown (MainProcess)" in messages
    assert ("worker: Hitting Ctrl+C again will initiate cold shutdown, terminating all "
            "running tasks!") in messages
    assert "worker: Hitting Ctrl+C again will terminate all running tasks!" in messages
