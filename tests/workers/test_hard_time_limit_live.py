"""A leased task killed at its hard time limit, in a real ``celery worker`` (prefork) against
the real backend (gunicorn), dispatched by the backend through the embedded filesystem broker.
The worker's main process marks the execution ``ERROR`` under the run's lease (its epoch in
``X-Lease-Epoch``): applied while the run still holds the lease, refused once another worker
holds it, so the other worker's execution is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.workers.shared import InternalAPIClient, WorkerConfig
from tests.fault_server import FaultServer, Respond
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.timeout(180)

REPO_ROOT = Path(__file__).resolve().parents[2]
QUEUE = "hard-limit"  # WORKER_NAME: the worker's queue
REFUSED = "lease lost: another worker owns the execution now; not marked ERROR"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBackend]:
    live = LiveBackend(data_dir=tmp_path_factory.mktemp("hard_limit_backend"))
    live.start()
    yield live
    live.close()


@pytest.fixture
def worker(backend: LiveBackend, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A worker of its own for each test, consuming the broker the backend publishes to; yields
    its log file. Not shared: a task received while the pool replaces a child killed at the hard
    limit can stay unstarted in that pool (celery/celery#4789), which is Celery's to fix and the
    backend's reaper's to repair (a later dispatch), not what these tests are about."""
    log_path = backend.data_dir / f"worker-{request.node.name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "LOG_"))}
    env.update({
        "INTERNAL_SERVICE_API_KEY": backend.api_key,
        "DJANGO_APP_BACKEND_URL": backend.url,
        "ORGANIZATION_ID": backend.org_id,
        "WORKER_DATA_DIR": str(backend.data_dir),
        "WEBHOOK_ALLOWED_HOSTS": "localhost",
        "WORKER_NAME": QUEUE,
        "TASK_SOFT_TIME_LIMIT": "2",
        "TASK_TIME_LIMIT": "3",
        "PYTHONPATH": str(REPO_ROOT),
    })  # fmt: skip
    command = [sys.executable, "-m", "celery", "-A", "tests.workers.hard_limit_worker", "worker",
               "--pool=prefork", "--concurrency=2", "--loglevel=INFO"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env=env, cwd=backend.data_dir, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    try:
        yield log_path
    finally:
        proc.terminate()  # the main process only: it stops its pool, as in production
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def client(backend: LiveBackend) -> Iterator[InternalAPIClient]:
    config = WorkerConfig(_env_file=None, internal_service_api_key=backend.api_key,
                          django_app_backend_url=backend.url, organization_id=backend.org_id)
    with InternalAPIClient(config) as api:
        yield api


def wait_for(done: object, what: str, log_path: Path) -> None:
    """Until ``done()`` is true; a generous bound, only so that a hang fails (not a timing)."""
    deadline = time.monotonic() + 60
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}; worker log:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)


def test_the_mark_at_the_hard_limit_carries_the_lease_and_delivers_the_webhook(
    client: InternalAPIClient, worker: Path
) -> None:
    with FaultServer(default=Respond(200, b"ok")) as receiver:
        execution = client.create_workflow_execution(
            "wf-hard-limit", webhook_url=f"http://localhost:{receiver.port}/hook",
            dispatch={"task": "hard_limit.held", "queue": QUEUE},
        )  # fmt: skip

        def delivered() -> bool:
            now = client.get_workflow_execution(execution.id)
            return now.webhook is not None and now.webhook.delivered

        wait_for(delivered, "the ERROR mark and its webhook", worker)
    done = client.get_workflow_execution(execution.id)
    assert done.status == "ERROR"
    assert str(done.error_message).startswith("TimeLimitExceeded"), done.error_message
    ended = [e for e in client.list_execution_events(execution.id) if e.to_status == "ERROR"]
    assert [(e.reason, e.epoch) for e in ended] == [("finished", 1)]  # fenced by the lease
    (hook,) = receiver.requests
    assert hook.json()["status"] == "ERROR" and done.webhook is not None
    assert hook.headers["webhook-id"] == done.webhook.id


def test_the_mark_at_the_hard_limit_leaves_another_worker_s_lease_alone(
    client: InternalAPIClient, worker: Path
) -> None:
    execution = client.create_workflow_execution(
        "wf-hard-limit-taken", dispatch={"task": "hard_limit.taken_over", "queue": QUEUE}
    )

    def settled() -> bool:  # the main process's mark was refused (or, wrongly, applied)
        refused = execution.id in "\n".join(
            line for line in worker.read_text().splitlines() if REFUSED in line
        )
        return refused or client.get_workflow_execution(execution.id).status == "ERROR"

    wait_for(settled, "the main process's mark", worker)
    now = client.get_workflow_execution(execution.id)
    assert now.status == "IN_PROGRESS", now.error_message
    assert now.lease is not None and (now.lease.epoch, now.lease.worker) == (2, "other:9")
    assert all(e.to_status != "ERROR" for e in client.list_execution_events(execution.id))
