"""A real ``celery worker`` (prefork, two children) whose tasks all fail is not reported healthy.

The worker is the module README's Quick Start module, followed to the letter: no
``ORGANIZATION_ID``, so every ``my_task`` raises ``OrganizationRequiredError``, which
``@retry(max_attempts=3)`` does not retry. The task outcomes happen in the pool's children; the
health server in the main process reads them from the children's heartbeats. Tasks are sent
through the embedded filesystem broker; the backend is the live one (reachable, so only the
tasks make the worker unhealthy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared.health import TASK_MIN_SAMPLE
from tests.conftest import die_with_parent, free_port
from tests.e2e.harness import http_get, wait_until
from tests.live_backend import LiveBackend

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

WORKER_MODULE = '''
import os
from celery import Celery
from backend.workers.shared import (
    WorkerConfig, InternalAPIClient, WorkerLogger,
    HealthChecker, HealthServer, monitor_performance, retry
)

WorkerLogger.configure(
    log_level=os.getenv('LOG_LEVEL', 'INFO'),
    log_format='structured',
    worker_name='my-worker'
)

logger = WorkerLogger.get_logger(__name__)
config = WorkerConfig()

app = Celery('my_worker')
app.config_from_object({
    'broker_url': os.getenv('CELERY_BROKER_URL'),
    **config.get_celery_config()
})

health_checker = HealthChecker(config)
health_server = HealthServer(health_checker, port=config.metrics_port)
health_server.start()

@app.task(bind=True)
@monitor_performance
@retry(max_attempts=3)
def my_task(self, execution_id: str):
    logger.info(f"Processing execution {execution_id}")
    with InternalAPIClient(config) as client:
        execution = client.get_workflow_execution(execution_id)
    return {'status': 'success'}

@app.task
def fine_task():
    return 'ok'
'''


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    cwd: Path
    log: Path

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        status, body = http_get(self.url + path, timeout=10)
        return status, json.loads(body)

    def worker_process(self) -> dict[str, Any]:
        return dict(self.get("/health")[1]["checks"]["worker_process"])

    def send(self, task: str, count: int) -> None:
        code = (f"import my_worker, uuid\n"
                f"for _ in range({count}):\n"
                f"    my_worker.app.send_task('my_worker.{task}', args="
                f"{'[uuid.uuid4().hex]' if task == 'my_task' else '[]'})\n")
        # A sender importing the worker module starts a second health server on the
        # worker's port: one WARNING naming the port and the way out, no ERROR, sent anyway.
        sent = subprocess.run([sys.executable, "-c", code], cwd=self.cwd, env=self.env,
                              timeout=60, capture_output=True, text=True)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        records = [json.loads(line) for line in (sent.stdout + sent.stderr).splitlines()
                   if line.startswith("{")]
        port = self.env["METRICS_PORT"]
        warned = [r for r in records if f"cannot listen on 0.0.0.0:{port}" in r["message"]]
        assert [r["level"] for r in warned] == ["WARNING"], records
        assert "METRICS_PORT=0" in warned[0]["message"]
        assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records


@pytest.fixture
def worker(live_backend: LiveBackend, tmp_path: Path) -> Iterator[Worker]:
    (tmp_path / "my_worker.py").write_text(textwrap.dedent(WORKER_MODULE))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR", "ENV_FILE",
                        "ORGANIZATION_ID")}
    env.update({
        "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
        "DJANGO_APP_BACKEND_URL": live_backend.url,
        "WORKER_NAME": f"my-worker-{uuid.uuid4().hex[:8]}",
        "WORKER_DATA_DIR": str(tmp_path / "data"),
        "METRICS_PORT": str(port),
        "HEALTH_CHECK_INTERVAL": "0.5",
        "HEALTH_HEARTBEAT_TIMEOUT": "10",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
    })
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "my_worker", "worker", "--pool", "prefork",
             "--concurrency", "2", "--loglevel", "INFO", "-Q", env["WORKER_NAME"]],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
    running = Worker(process, f"http://127.0.0.1:{port}", env, tmp_path, log)

    def ready() -> bool:
        try:
            return running.get("/readyz")[0] == 200
        except OSError:
            return False

    try:
        try:
            wait_until(ready, 90, "the worker to be ready")
        except TimeoutError:
            pytest.fail(f"worker not ready; its log:\n{log.read_text()[-4000:]}")
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_a_worker_whose_tasks_all_fail_is_unhealthy_and_not_ready(worker: Worker) -> None:
    first = worker.worker_process()
    assert first["status"] == "healthy", first  # the check's message and details say why
    worker.send("my_task", TASK_MIN_SAMPLE - 1)
    wait_until(lambda: worker.worker_process().get("details", {}).get("recent_tasks", {})
               .get("count") == TASK_MIN_SAMPLE - 1, 90, "the first failed tasks to be counted")
    early = worker.worker_process()
    assert early["status"] == "healthy"  # too few tasks to judge the worker by
    assert early["details"]["recent_tasks"]["failed"] == TASK_MIN_SAMPLE - 1
    assert worker.get("/readyz")[0] == 200
    worker.send("my_task", 4 - (TASK_MIN_SAMPLE - 1))
    wait_until(lambda: worker.worker_process().get("details", {}).get("recent_tasks", {})
               .get("count") == 4, 90, "the four failed tasks to be counted")

    check = worker.worker_process()
    assert check["status"] == "unhealthy"
    assert check["message"] == "all 4 recent tasks failed (OrganizationRequiredError x4)"
    recent = check["details"]["recent_tasks"]
    assert recent["failed"] == 4
    assert recent["failures"] == {"OrganizationRequiredError": 4}
    assert recent["failing_tasks"] == {"my_worker.my_task": 4}
    status, report = worker.get("/health")
    assert status == 503 and report["status"] == "unhealthy"
    assert report["checks"]["api_connectivity"]["status"] == "healthy"  # only the tasks fail
    status, ready = worker.get("/readyz")
    assert status == 503 and ready["checks"]["recent_tasks"] == {
        "ok": False, "count": 4, "failed": 4, "failed_permanently": 4,
        "failures": {"OrganizationRequiredError": 4}}
    assert worker.get("/livez")[0] == 200  # a restart would not fix a configuration error

    # Not retried: OrganizationRequiredError says it is not transient.
    log = worker.log.read_text()
    assert "retrying my_worker.my_task" not in log
    children = {json.loads(line)["pid"] for line in log.splitlines()
                if line.startswith("{") and "Processing execution" in line}
    assert children and os.getpid() not in children  # the failures happened in children

    # Half of the recent tasks failing is degraded, and ready again.
    worker.send("fine_task", 4)
    wait_until(lambda: worker.worker_process()["details"]["recent_tasks"]["count"] == 8, 90,
               "the four good tasks to be counted")
    check = worker.worker_process()
    assert check["status"] == "degraded"
    assert check["message"] == "4 of 8 recent tasks failed (OrganizationRequiredError x4)"
    assert worker.get("/readyz")[0] == 200
    assert worker.get("/health")[0] == 200



def test_transient_failures_make_the_worker_unhealthy_but_leave_readiness_to_the_backend_check(
        tmp_path: Path) -> None:
    from celery import Celery

    from backend.workers.shared import _celery
    from backend.workers.shared.api_client import APIConnectionError, AuthenticationError
    from backend.workers.shared.config import WorkerConfig
    from backend.workers.shared.health import HealthChecker

    _celery.install()
    app = Celery("transient_failures", set_as_current=False)
    app.conf.update(broker_url="memory://", task_always_eager=True, task_store_eager_result=False)

    @app.task
    def down() -> None:
        raise APIConnectionError("cannot reach the backend")

    @app.task
    def refused() -> None:
        raise AuthenticationError("bad key", status=401)

    checker = HealthChecker(WorkerConfig(
        internal_service_api_key="swi-test-key-transient-1",
        django_app_backend_url="http://127.0.0.1:9", worker_data_dir=tmp_path,
        api_retry_attempts=0, _env_file=None))
    for _ in range(3):
        down.apply(throw=False)
    check = checker.check_worker_process()
    assert check.status.value == "unhealthy"
    assert check.message == "all 3 recent tasks failed (APIConnectionError x3)"
    tasks = checker.readiness()[1]["recent_tasks"]
    assert tasks["ok"] is True and tasks["failed_permanently"] == 0

    for _ in range(3):
        refused.apply(throw=False)
    assert checker.readiness()[1]["recent_tasks"]["ok"] is True  # 3 of 6 are transient
    for _ in range(47):
        refused.apply(throw=False)  # the window keeps the last 50: all permanent now
    tasks = checker.readiness()[1]["recent_tasks"]
    assert tasks == {"ok": False, "count": 50, "failed": 50, "failed_permanently": 50,
                     "failures": {"AuthenticationError": 50}}
