"""The example worker's task in a real process against the real backend, every request counted
at a real server in front of it (tests/fault_server.py): fault-free, an execution costs four
backend requests (claim, one batch of its files, finish, webhook record) besides the webhook
itself. And a task body
that forks while its lease's heartbeat thread runs: the children are not wedged by it."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from standardwebhooks.webhooks import Webhook

from backend.workers.shared import ExecutionTask, InternalAPIClient, WorkerConfig
from tests.fault_server import FaultServer, Forward, Respond
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
SIGNING_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
SCRIPT = """
import sys
from backend.workers.shared import example_worker

outcome = example_worker.process_execution.apply(args=[sys.argv[1]])
print(outcome.state, outcome.result)
"""


@pytest.fixture
def counted(live_backend: LiveBackend) -> Iterator[FaultServer]:
    with FaultServer(default=Forward(live_backend.url)) as server:
        yield server


def client_of(live_backend: LiveBackend) -> InternalAPIClient:
    return InternalAPIClient(WorkerConfig(
        _env_file=None, internal_service_api_key=live_backend.api_key,
        django_app_backend_url=live_backend.url, organization_id=live_backend.org_id,
    ))  # fmt: skip


def test_the_example_worker_costs_four_requests_per_execution(
    live_backend: LiveBackend, counted: FaultServer, tmp_path: Path
) -> None:
    with FaultServer(default=Respond(200, b"ok")) as receiver:
        url = f"http://localhost:{receiver.port}/hooks/done"
        with client_of(live_backend) as client:
            execution = client.create_workflow_execution("wf-example", webhook_url=url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAMPLE_", "LOG_"))}
        env.update({
            "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
            "DJANGO_APP_BACKEND_URL": counted.url,
            "ORGANIZATION_ID": live_backend.org_id,
            "WEBHOOK_SIGNING_SECRET": SIGNING_SECRET,
            "WEBHOOK_ALLOWED_HOSTS": "localhost",
            "WORKER_NAME": "example-lifecycle",
            "WORKER_DATA_DIR": str(tmp_path),
            "EXAMPLE_WORK_SECONDS": "0",
            "PYTHONPATH": str(REPO_ROOT),
        })  # fmt: skip
        run = subprocess.run([sys.executable, "-c", SCRIPT, execution.id], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=90)  # fmt: skip
        assert run.returncode == 0 and run.stdout.startswith("SUCCESS"), run.stderr
        assert [(r.method, r.path.rstrip("/").rsplit("/", 1)[1]) for r in counted.requests] == [
            ("POST", "claim"), ("POST", "batch"), ("POST", "status"),
            ("POST", "webhook-deliveries"),
        ]
        (hook,) = receiver.requests
        payload = Webhook(SIGNING_SECRET).verify(hook.body, hook.headers)
    with client_of(live_backend) as client:
        done = client.get_workflow_execution(execution.id)
        deliveries = list(client.list_webhook_deliveries(execution.id))
    assert done.status == "COMPLETED" and done.total_files == done.successful_files == 3
    assert done.result is not None and len(done.result["files"]) == 3
    with client_of(live_backend) as client:
        files = list(client.resource("file-executions").list(execution_id=execution.id))
    assert sorted(f["file_name"] for f in files) == ["file-0", "file-1", "file-2"]
    assert {f["status"] for f in files} == {"COMPLETED"}
    assert done.webhook is not None and done.webhook.delivered
    assert hook.headers["webhook-id"] == done.webhook.id
    assert payload["execution_id"] == execution.id and payload["status"] == "COMPLETED"
    assert [d.outcome for d in deliveries] == ["delivered"]


def test_a_later_run_updates_the_files_an_earlier_one_recorded(
    live_backend: LiveBackend, counted: FaultServer, tmp_path: Path
) -> None:
    with client_of(live_backend) as client:
        execution = client.create_workflow_execution("wf-example-rerun")
        earlier = client.claim_execution(execution.id, worker="earlier", lease_seconds=30)
        files = client.resource("file-executions")
        files.batch([
            {"execution_id": execution.id, "file_name": "file-0"},
            {"execution_id": execution.id, "file_name": "file-1", "status": "ERROR"},
        ])  # fmt: skip
        client.release_execution(execution.id, earlier.lease.epoch)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAMPLE_", "LOG_"))}
    env.update({
        "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
        "DJANGO_APP_BACKEND_URL": counted.url,
        "ORGANIZATION_ID": live_backend.org_id,
        "WORKER_NAME": "example-rerun",
        "WORKER_DATA_DIR": str(tmp_path),
        "EXAMPLE_WORK_SECONDS": "0",
        "PYTHONPATH": str(REPO_ROOT),
    })  # fmt: skip
    run = subprocess.run([sys.executable, "-c", SCRIPT, execution.id], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    assert run.returncode == 0 and run.stdout.startswith("SUCCESS"), run.stderr
    with client_of(live_backend) as client:
        done = client.get_workflow_execution(execution.id)
        stored = {f["file_name"]: f["status"] for f in
                  client.resource("file-executions").list(execution_id=execution.id)}
    assert stored == {"file-0": "COMPLETED", "file-1": "ERROR", "file-2": "COMPLETED"}
    assert (done.total_files, done.successful_files, done.failed_files) == (3, 2, 1)


def test_children_forked_while_the_heartbeat_runs_are_not_wedged(
    live_backend: LiveBackend, counted: FaultServer
) -> None:
    config = WorkerConfig(
        _env_file=None, internal_service_api_key=live_backend.api_key,
        django_app_backend_url=counted.url, organization_id=live_backend.org_id,
    )  # fmt: skip
    exits: list[int] = []

    def heartbeats() -> int:
        return sum(r.path.endswith("/heartbeat/") for r in counted.requests)

    def body(self: ExecutionTask, execution_id: str) -> None:
        deadline = time.monotonic() + 30
        while heartbeats() < 6:  # forks while heartbeats are in flight or between them
            pid = os.fork()
            if pid == 0:  # the child: no heartbeat thread of its own, a pool of its own
                code = 1
                try:
                    with InternalAPIClient(config) as client:
                        code = 0 if client.get_workflow_execution(execution_id).id else 1
                finally:
                    os._exit(code)
            exits.append(_wait(pid, deadline))
            time.sleep(0.05)

    app = Celery("fork-during-heartbeat")
    task = app.task(bind=True, base=ExecutionTask, worker_config=config, lease_seconds=1)(body)
    with client_of(live_backend) as client:
        execution = client.create_workflow_execution("wf-fork")
    assert task.apply(args=[execution.id]).successful()
    assert exits and set(exits) == {0}
    with client_of(live_backend) as client:
        assert client.get_workflow_execution(execution.id).status == "COMPLETED"


def _wait(pid: int, deadline: float) -> int:
    """The child's exit code; a child still running at ``deadline`` is killed (a failure)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9
