"""The example worker fleet end to end: real backend, real brokers, real prefork workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import StatusRecorder, fleet, legal_history, wait_for_log
from tests.e2e.harness import REPO_ROOT, WorkerProcess, wait_quiet, wait_until

pytestmark = pytest.mark.timeout(240)

BROKERS = [
    pytest.param("filesystem", id="filesystem"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq, id="rabbitmq"),
]


@pytest.mark.parametrize("broker", BROKERS)
def test_200_executions_complete_with_legal_histories(
    live_backend: Any, tmp_path: Path, broker: str
) -> None:
    with fleet(live_backend, tmp_path, broker) as crew:
        # Both ways the example worker runs: `python -m ...` and `celery -A ... -Q <name>`.
        celery_command = [sys.executable, "-m", "celery", "-A",
                          "backend.workers.shared.example_worker", "worker", "-Q", crew.name]
        crew.start_worker(celery_command if broker == "rabbitmq" else None)
        ids = crew.create(200)
        with StatusRecorder(crew.client) as recorder:
            crew.submit(ids)
            crew.wait_all(ids, "COMPLETED", timeout=150)
            recorder.poll()
        executions = {e.id: e for e in crew.client.list_workflow_executions()}
        assert len(executions) == 200
        for execution_id in ids:
            execution = executions[execution_id]
            history = recorder.histories[execution_id]
            assert legal_history(history), (execution_id, history)
            assert history[0] in ("QUEUED", "IN_PROGRESS", "COMPLETED")
            assert history[-1] == "COMPLETED"
            assert not execution.error_message
            assert execution.attempts >= 1
            assert execution.successful_files == execution.total_files == 2
            assert execution.started_at is not None and execution.finished_at is not None
            assert execution.created_at is not None
            assert execution.created_at <= execution.started_at <= execution.finished_at
        # The recorder saw work in flight, not only before and after.
        assert any("IN_PROGRESS" in h for h in recorder.histories.values())


@pytest.mark.parametrize("broker", [BROKERS[0], BROKERS[1]])
def test_sigterm_finishes_or_requeues_every_task(
    live_backend: Any, tmp_path: Path, broker: str
) -> None:
    with fleet(live_backend, tmp_path, broker, concurrency=2,
               work={"EXAMPLE_WORK_SECONDS": "1.5"}) as crew:
        worker = crew.start_worker()
        ids = crew.create(8)
        crew.submit(ids)
        wait_until(lambda: list(crew.statuses().values()).count("IN_PROGRESS") >= 2, 30,
                   "two tasks in flight")
        in_flight = {i for i, s in crew.statuses().items() if s == "IN_PROGRESS"}
        assert worker.terminate(timeout=60) == 0, worker.log_tail()
        after_stop = crew.statuses()
        # Warm shutdown: the tasks that were running finished; nothing failed.
        assert all(after_stop[i] == "COMPLETED" for i in in_flight), after_stop
        assert "ERROR" not in after_stop.values()
        assert "QUEUED" in after_stop.values(), "the stop came too late to test re-queueing"
        crew.start_worker()
        crew.wait_all(ids, "COMPLETED", timeout=60)


def test_make_demo_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env["DEMO_DATA_DIR"] = str(tmp_path / "demo")
    done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo OK" in done.stdout
    assert "COMPLETED" in done.stdout
    assert "signatures verified by the receiver" in done.stdout
    assert processes_using(str(tmp_path)) == [], "the demo left processes behind"


def processes_using(text: str) -> list[int]:
    """Pids of the processes whose command line or environment mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def test_transient_failures_requeue_permanent_ones_mark_error(
    live_backend: Any, tmp_path: Path
) -> None:
    """ExecutionTask's rule, through a real misbehaving server between worker and backend."""
    import uuid

    from tests.fault_server import FaultServer, Forward, Respond

    with FaultServer(default=Forward(live_backend.url)) as fault, fleet(
        live_backend, tmp_path, "filesystem", concurrency=1,
        work={"DJANGO_APP_BACKEND_URL": fault.url, "API_RETRY_ATTEMPTS": "0",
              "HEALTH_CHECK_INTERVAL": "300"},
    ) as crew:
        crew.start_worker()
        wait_until(lambda: any(r.path.endswith("/health/") for r in fault.requests), 30,
                   "the worker's first health check")

        def seen() -> list[tuple[str, str]]:
            return [(r.method, r.path) for r in fault.requests]

        # Transient: every call answers 503 with Retry-After until the task is re-queued
        # (whatever else calls meanwhile); then the backend is back and the task completes.
        fault.reset(default=Respond(503, {"error": "unavailable", "detail": "shedding load"},
                                    headers={"Retry-After": "3"}))
        (transient,) = crew.create(1)
        crew.submit([transient])
        requeue = wait_for_log(crew, lambda r: r.get("message") ==
                               "transient failure, task re-queued", 30,
                               f"the re-queue line (requests: {seen()})")
        fault.reset(default=Forward(live_backend.url))
        assert requeue["execution_id"] == transient
        assert 3.0 <= requeue["countdown"] <= 3.75  # Retry-After, plus up to a quarter
        assert requeue["error_type"] == "ServerError"
        crew.wait_all([transient], "COMPLETED", timeout=60)
        # attempts counts claims: the first run's claim was answered 503 by the fault server
        # and never reached the backend; the re-queued run's claim is the one attempt.
        assert crew.client.get_workflow_execution(transient).attempts == 1

        # Permanent: the backend rejects the finish's input: the execution is marked ERROR,
        # once, under the run's lease. The claim goes through; the 422 goes to the request
        # after it, so no other request may be in flight. (A refused claim marks nothing:
        # without a lease the mark would be unfenced; the backend's repairs own it.)
        wait_quiet(fault)
        fault.push(Forward(live_backend.url),
                   Respond(422, {"error": "validation_error", "detail": "workflow is invalid"}))
        (permanent,) = crew.create(1)
        crew.submit([permanent])
        crew.wait_all([permanent], "ERROR", timeout=60)
        message = str(crew.client.get_workflow_execution(permanent).error_message)
        assert message.startswith("APIValidationError: 422 validation_error"), (message, seen())
        assert "workflow is invalid" in message

        # A task for an execution that does not exist: its claim is refused, nothing is
        # marked, and it says so.
        missing = str(uuid.uuid4())
        crew.submit([missing])
        line = wait_for_log(crew, lambda r: str(r.get("message", "")).startswith(
            "claim failed: ") and r.get("execution_id") == missing, 30, "the refusal line")
        assert line["execution_id"] == missing and line["error_type"] == "NotFoundError"


@pytest.mark.redis
def test_a_requeue_the_broker_refuses_puts_the_message_back(
    live_backend: Any, tmp_path: Path
) -> None:
    """Backend down and the broker refusing new connections: Celery cannot publish the retry
    and would drop the message (Reject, requeue=False); it goes back to the queue instead."""
    from tests.fault_server import FaultServer, Forward, Respond, TcpProxy

    door = TcpProxy("127.0.0.1", 6379)
    database = random.randint(1, 15)
    try:
        with FaultServer(default=Forward(live_backend.url)) as fault, fleet(
            live_backend, tmp_path, "redis", concurrency=1,
            work={"DJANGO_APP_BACKEND_URL": fault.url, "API_RETRY_ATTEMPTS": "0",
                  "CELERY_BROKER_URL": f"redis://127.0.0.1:{door.port}/{database}"},
        ) as crew:
            crew.start_worker()
            (execution_id,) = crew.create(1)
            # The task's first call is held 3 s, long enough to shut the door behind it.
            fault.reset(default=Respond(503, {"error": "unavailable", "detail": "down"},
                                        headers={"Retry-After": "1"}, delay=3.0))
            crew.submit([execution_id])
            wait_until(lambda: any(execution_id in r.path for r in fault.requests), 30,
                       "the task's first call")
            door.mode = "refuse"
            wait_for_log(crew, lambda r: "requeue=" in str(r.get("message")), 60,
                         "Celery's line about the rejected task")
            door.mode = "forward"
            fault.reset(default=Forward(live_backend.url))
            crew.wait_all([execution_id], "COMPLETED", timeout=60)
    finally:
        door.stop()


def test_hard_time_limit_marks_the_execution_error(live_backend: Any, tmp_path: Path) -> None:
    """A task killed at its hard time limit runs no code of its own; the worker's main process
    marks its execution ERROR (the message is acknowledged: nothing would run it again)."""
    with fleet(live_backend, tmp_path, "filesystem", concurrency=1,
               work={"TASK_SOFT_TIME_LIMIT": "1", "TASK_TIME_LIMIT": "2"}) as crew:
        command = [sys.executable, "-m", "celery", "-A", "tests.e2e.rules_worker", "worker",
                   "-Q", crew.name, "--pool=prefork", "--concurrency=1"]
        crew.workers.append(WorkerProcess(crew.env, tmp_path / "rules.log", command).launch())
        (execution_id,) = crew.create(1)
        crew.app.send_task("rules.runaway", args=[execution_id],
                           kwargs={"organization_id": crew.organization_id}, queue=crew.name)
        crew.wait_all([execution_id], "ERROR", timeout=60)
        message = str(crew.client.get_workflow_execution(execution_id).error_message)
        assert message.startswith("TimeLimitExceeded"), message


def test_ctrl_c_stops_the_example_worker_and_its_pool(live_backend: Any, tmp_path: Path) -> None:
    with fleet(live_backend, tmp_path, "filesystem") as crew:
        worker = crew.start_worker()
        children = worker.children()
        assert len(children) == 4
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGINT)
        assert worker.proc.wait(60) == 0, worker.log_tail()
        wait_until(lambda: not any(_running(pid) for pid in children), 10,
                   "the pool processes to exit")


def _running(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
