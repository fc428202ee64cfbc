"""@retry under real Celery tasks with the module README's decorator stack:

    @app.task(bind=True)
    @monitor_performance
    @retry(max_attempts=3)
    def my_task(self, execution_id): ...

Eagerly (a real Celery app, task_always_eager) and in a real ``celery worker`` subprocess with
the filesystem broker.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry

from backend.workers.shared import monitor_performance, retry

REPO = Path(__file__).resolve().parents[2]
attempts: Counter[str] = Counter()

app = Celery("test_retry_celery")
app.conf.update(
    broker_url="memory://",
    result_backend="cache+memory://",
    task_always_eager=True,
    task_eager_propagates=True,
)


@app.task(bind=True)
@monitor_performance
@retry(max_attempts=3, base_delay=0.01)
def my_task(self: Any, execution_id: str, fail_times: int = 2) -> dict[str, Any]:
    """Process one execution (fails ``fail_times`` times first)."""
    attempts[execution_id] += 1
    if attempts[execution_id] <= fail_times:
        raise ConnectionError(f"backend unreachable (attempt {attempts[execution_id]})")
    return {"status": "success", "execution_id": execution_id, "task": self.name,
            "task_id": self.request.id}


@app.task(bind=True, max_retries=1)
@monitor_performance
@retry(max_attempts=3, base_delay=0.01)
def task_using_celery_retry(self: Any, execution_id: str) -> str:
    """Asks Celery itself to retry once; our decorator must let Celery's Retry through."""
    attempts[execution_id] += 1
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return f"done after {self.request.retries} celery retry"


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


def test_readme_stack_retries_inside_the_task_and_keeps_identity() -> None:
    execution_id = uuid.uuid4().hex
    result = my_task.delay(execution_id).get()
    assert result["status"] == "success"
    assert result["task"] == f"{__name__}.my_task"  # Celery named it from the kept __name__
    assert result["task_id"]
    assert attempts[execution_id] == 3
    assert my_task.__doc__ == my_task.run.__doc__ == (
        "Process one execution (fails ``fail_times`` times first)."
    )
    assert list(inspect.signature(my_task.run).parameters) == ["execution_id", "fail_times"]


def test_celery_checks_arguments_against_the_kept_signature() -> None:
    execution_id = uuid.uuid4().hex
    with pytest.raises(TypeError):
        my_task.delay(execution_id, 0, "unexpected")
    assert attempts[execution_id] == 0  # refused by Celery before any attempt


def test_readme_stack_raises_the_original_error_after_the_last_attempt() -> None:
    execution_id = uuid.uuid4().hex
    with pytest.raises(ConnectionError, match=r"attempt 3\)$"):
        my_task.apply(args=(execution_id,), kwargs={"fail_times": 10}).get()
    assert attempts[execution_id] == 3


def test_celery_retry_is_not_retried_by_the_decorator() -> None:
    execution_id = uuid.uuid4().hex
    outcome = task_using_celery_retry.apply(args=(execution_id,), throw=False)
    assert outcome.get() == "done after 1 celery retry"
    assert attempts[execution_id] == 2  # one run per Celery attempt, none added by @retry
    assert issubclass(Retry, Exception)  # caught by exceptions=(Exception,) were it not exempt


WORKER_MODULE = '''
import os
from celery import Celery
from backend.workers.shared import monitor_performance, retry

DATA = os.environ["RETRY_TEST_DATA"]
app = Celery("retry_worker_app")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={{"data_folder_in": DATA + "/q", "data_folder_out": DATA + "/q",
                               "control_folder": DATA + "/c"}},
    result_backend="file://" + DATA + "/results",
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_default_queue="{queue}",
)


@app.task(bind=True)
@monitor_performance
@retry(max_attempts=3, base_delay=0.05)
def my_task(self, execution_id):
    """Fails twice, then succeeds."""
    with open(os.path.join(DATA, "attempts"), "a") as log:
        log.write(f"{{os.getpid()}}\\n")
    with open(os.path.join(DATA, "attempts")) as log:
        count = len(log.readlines())
    if count < 3:
        raise ConnectionError(f"attempt {{count}} failed")
    return {{"status": "success", "execution_id": execution_id, "attempts": count,
            "name": self.name, "pid": os.getpid()}}
'''


def test_readme_stack_in_a_real_celery_worker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for sub in ("q", "c", "results"):
        (data / sub).mkdir(parents=True)
    queue = f"retry-test-{uuid.uuid4().hex[:8]}"
    module = tmp_path / "retry_worker_app.py"
    module.write_text(textwrap.dedent(WORKER_MODULE.format(queue=queue)))
    env = {
        **os.environ,
        "RETRY_TEST_DATA": str(data),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "retry_worker_app", "worker", "--pool=solo",
         "--concurrency=1", "-Q", queue, "--loglevel=WARNING", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        client = subprocess.run(
            [sys.executable, "-c",
             "import json, retry_worker_app as m\n"
             "r = m.my_task.delay('exec-1')\n"
             "print(json.dumps(r.get(timeout=60)))"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
        )
    finally:
        worker.terminate()
        log, _ = worker.communicate(timeout=30)
    assert client.returncode == 0, client.stderr + log
    result = json.loads(client.stdout)
    assert result["status"] == "success"
    assert result["attempts"] == 3  # two retries by @retry inside one Celery run
    assert result["name"] == "retry_worker_app.my_task"
    pids = set((data / "attempts").read_text().split())
    assert pids == {str(result["pid"])}  # all attempts in the worker process
    assert "retrying retry_worker_app.my_task" in log  # the retries were logged
