"""docs/migrating.md's two tasks, the Django ORM one and its twin on the internal API client,
each run as a Celery task in a process of its own against the same live backend's database:
they leave the same execution and the same files. The client's process never imports Django.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared import InternalAPIClient
from tests.e2e.harness import REPO_ROOT, client_config
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.timeout(180)

GUIDE = REPO_ROOT / "docs" / "migrating.md"
WORKER_PYTHON = REPO_ROOT / ".venv-worker" / "bin" / "python"
RUN = """
import sys
sys.path.insert(0, sys.argv[1])
module = __import__(sys.argv[2])
outcome = module.process_files.apply(args=[sys.argv[3], sys.argv[4]])
print(outcome.state, outcome.result, "django" in sys.modules)
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


def run_task(python: str, module: str, folder: Path, execution_id: str, org: str,
             env: dict[str, str]) -> str:
    run = subprocess.run([python, "-c", RUN, str(folder), module, execution_id, org],
                         env=env, cwd=folder, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


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


def test_the_orm_task_and_its_client_twin_leave_the_same_results(
    live_backend: LiveBackend, tmp_path: Path
) -> None:
    orm_source, client_source = guide_tasks()
    assert "django" not in client_source.lower().replace("no django", "")
    (tmp_path / "orm_tasks.py").write_text(orm_source)
    (tmp_path / "client_tasks.py").write_text(client_source)
    org = live_backend.org_id
    config = client_config(live_backend, org)  # the breaker settings of every test-side client
    with InternalAPIClient(config) as client:
        ids = []
        for _ in range(2):
            execution = client.create_workflow_execution(f"wf-migrate-{uuid.uuid4().hex[:8]}")
            client.resource("file-executions").batch(
                [{"execution_id": execution.id, **item} for item in FILES])
            ids.append(execution.id)

        orm_env = {k: v for k, v in live_backend.env.items() if not k.startswith("LOG_")}
        orm = run_task(sys.executable, "orm_tasks", tmp_path, ids[0], org, orm_env)

        worker_env = {k: v for k, v in os.environ.items()
                      if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
        worker_env.update({
            "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
            "DJANGO_APP_BACKEND_URL": live_backend.url,
            "ORGANIZATION_ID": org,
            "WORKER_DATA_DIR": str(tmp_path),
            "PYTHONPATH": str(REPO_ROOT),
        })
        python = str(WORKER_PYTHON) if WORKER_PYTHON.exists() else sys.executable
        twin = run_task(python, "client_tasks", tmp_path, ids[1], org, worker_env)

        assert orm.startswith("SUCCESS") and orm.endswith("True")
        assert twin.startswith("SUCCESS") and twin.endswith("False")  # no Django imported
        before, after = outcome(client, ids[0]), outcome(client, ids[1])
    assert before == after
    assert before["status"] == "COMPLETED" and before["counts"] == (4, 3, 1)
    assert before["result"] == {"processed": 3}
    assert ("b.bad", "ERROR", "b.bad: not a document", None) in before["files"]
    assert ("a.pdf", "COMPLETED", "", {"length": 5}) in before["files"]
