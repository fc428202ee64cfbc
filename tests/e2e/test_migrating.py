"""docs/migrating.md's two tasks, the Django ORM one and its twin on the internal API client,
each run by a real ``celery worker`` of its own (the ORM one in the backend's environment, the
client one in the worker environment, which has no Django) fed through a real broker, against
one live backend's database: they leave the same execution and the same files. On SQLite with
the embedded filesystem broker, and on PostgreSQL with Redis.

The guide's tasks are run as written: the workers get their broker from a Celery configuration
module (``CELERY_CONFIG_MODULE``), which the guide's ``Celery(...)`` apps read by themselves.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from backend.workers.shared import InternalAPIClient
from tests.conftest import REDIS_URL
from tests.e2e.harness import REPO_ROOT, WorkerProcess, client_config, wait_until
from tests.live_backend import LiveBackend, backend_python

pytestmark = pytest.mark.timeout(180)

GUIDE = REPO_ROOT / "docs" / "migrating.md"
WORKER_PYTHON = REPO_ROOT / ".venv-worker" / "bin" / "python"
# The broker and result store of both workers and of the test's producer, by broker kind.
FILESYSTEM_CONFIG = """
from pathlib import Path

from backend.workers.shared import _fs_transport

globals().update(_fs_transport.celery_conf(Path({broker_dir!r})))
broker_url = "filesystem://"
result_backend = {results!r}
"""
REDIS_CONFIG = """
broker_url = {url!r}
result_backend = {url!r}
"""
FILES = [
    {"file_name": "a.pdf"},
    {"file_name": "b.bad"},
    {"file_name": "c.txt"},
    {"file_name": "z.done", "status": "COMPLETED", "result": {"length": 0}},
]


def guide_tasks() -> tuple[str, str]:
    """The guide's two Python blocks: the ORM task, then the client task."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 2, "docs/migrating.md holds the ORM task and the client task"
    return blocks[0], blocks[1]


def celery_config(kind: str, folder: Path) -> str:
    """The text of the Celery configuration module of one broker kind."""
    if kind == "filesystem":
        (folder / "results").mkdir()
        return FILESYSTEM_CONFIG.format(broker_dir=str(folder / "broker"),
                                        results=f"file://{folder / 'results'}")
    return REDIS_CONFIG.format(url=f"{REDIS_URL.rsplit('/', 1)[0]}/{random.randint(1, 15)}")


def config_module(path: Path) -> ModuleType:
    """The Celery configuration module at ``path``, loaded for the test's producer."""
    spec = importlib.util.spec_from_file_location("migrating_celeryconfig", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def celery_env(base: dict[str, str], folder: Path) -> dict[str, str]:
    """``base`` without inherited Celery variables (they would override the configuration
    module's broker), with the configuration module and the tasks' folder importable."""
    env = {k: v for k, v in base.items() if not k.startswith("CELERY_")}
    env["CELERY_CONFIG_MODULE"] = "celeryconfig"
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO_ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def celery_worker(python: str, module: str, queue: str, folder: Path,
                  env: dict[str, str]) -> WorkerProcess:
    """A ``celery worker`` of the guide's module ``module`` (in ``folder``) on ``queue``."""
    command = [python, "-m", "celery", "-A", module, "worker", "-Q", queue, "--pool=solo",
               f"--hostname={queue}@%h", "--without-gossip", "--without-mingle",
               "--loglevel=INFO"]
    return WorkerProcess(env, folder / f"{module}.log", command=command, cwd=folder).launch()


def worker_ready(worker: WorkerProcess) -> bool:
    """True once the Celery worker logged that it is ready (an exit is an error)."""
    if not worker.alive():
        raise RuntimeError(f"celery worker exited: {worker.log_tail()}")
    return " ready." in worker.log_path.read_text(errors="replace")


def stop_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker at once (each warm shutdown takes a few seconds); wait for all."""
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda worker: worker.terminate(30), workers))


def outcome(client: InternalAPIClient, execution_id: str) -> dict[str, Any]:
    execution = client.get_workflow_execution(execution_id)
    files = client.resource("file-executions").list(execution_id=execution_id)
    return {
        "status": execution.status,
        "counts": (execution.total_files, execution.successful_files, execution.failed_files),
        "result": execution.result,
        "stamped": (execution.started_at is not None, execution.finished_at is not None),
        "files": sorted((f["file_name"], f["status"], f["error_message"], f["result"])
                        for f in files),
    }


def has_django(python: str) -> bool:
    """True when the interpreter ``python`` can import Django."""
    probe = "import importlib.util; print(importlib.util.find_spec('django') is not None)"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


@pytest.fixture(params=[
    pytest.param(("sqlite", "filesystem"), id="sqlite-filesystem"),
    pytest.param(("postgres", "redis"), marks=[pytest.mark.postgres, pytest.mark.redis],
                 id="postgres-redis"),
])
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[LiveBackend, str]]:
    """The live backend of one database and the broker kind the guide's workers use there."""
    database, kind = request.param
    fixture = "live_backend" if database == "sqlite" else "live_backend_pg"
    yield request.getfixturevalue(fixture), kind


def test_the_orm_task_and_its_client_twin_leave_the_same_results(
    stack: tuple[LiveBackend, str], tmp_path: Path
) -> None:
    from celery import Celery

    backend, kind = stack
    orm_source, client_source = guide_tasks()
    assert "django" not in client_source.lower().replace("no django", "")
    (tmp_path / "orm_tasks.py").write_text(orm_source)
    (tmp_path / "client_tasks.py").write_text(client_source)
    (tmp_path / "celeryconfig.py").write_text(celery_config(kind, tmp_path))
    worker_python = str(WORKER_PYTHON) if WORKER_PYTHON.exists() else sys.executable
    if WORKER_PYTHON.exists():
        assert not has_django(worker_python), "the worker environment has no Django"

    org = f"org-migrate-{uuid.uuid4().hex[:8]}"
    backend.create_organization(org)
    orm_env = celery_env({k: v for k, v in backend.env.items() if not k.startswith("LOG_")},
                         tmp_path)
    client_env = {k: v for k, v in os.environ.items()
                  if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    client_env.update({"INTERNAL_SERVICE_API_KEY": backend.api_key,
                       "DJANGO_APP_BACKEND_URL": backend.url, "ORGANIZATION_ID": org,
                       "WORKER_DATA_DIR": str(tmp_path), "ENV_FILE": os.devnull})
    with ExitStack() as running, InternalAPIClient(client_config(backend, org)) as client:
        modules = ("orm_tasks", "client_tasks")
        queues = [f"{module}-{uuid.uuid4().hex[:8]}" for module in modules]
        workers = [celery_worker(backend_python(), modules[0], queues[0], tmp_path, orm_env),
                   celery_worker(worker_python, modules[1], queues[1], tmp_path,
                                 celery_env(client_env, tmp_path))]
        running.callback(stop_all, workers)
        ids = []
        for _ in workers:
            execution = client.create_workflow_execution(f"wf-migrate-{uuid.uuid4().hex[:8]}")
            client.resource("file-executions").batch(
                [{"execution_id": execution.id, **item} for item in FILES])
            ids.append(str(execution.id))
        for worker in workers:
            wait_until(lambda w=worker: worker_ready(w), 60, f"{worker.log_path.name} ready", 0.2)

        producer = Celery("migrating-producer")
        producer.config_from_object(config_module(tmp_path / "celeryconfig.py"))
        running.callback(producer.close)
        results = [
            producer.send_task(f"{module}.process_files", args=[execution_id, org], queue=queue)
            for module, queue, execution_id in zip(modules, queues, ids, strict=True)
        ]
        try:
            answers = [result.get(timeout=60) for result in results]
        except Exception as exc:
            pytest.fail(f"{exc!r}; logs:\n" + "\n".join(w.log_tail() for w in workers))
        assert answers == [{"execution_id": i, "status": "COMPLETED"} for i in ids]
        before, after = outcome(client, ids[0]), outcome(client, ids[1])
    assert before == after
    assert before["status"] == "COMPLETED" and before["counts"] == (4, 3, 1)
    assert before["result"] == {"processed": 3}
    assert before["stamped"] == (True, True)
    assert ("b.bad", "ERROR", "b.bad: not a document", None) in before["files"]
    assert ("a.pdf", "COMPLETED", "", {"length": 5}) in before["files"]
