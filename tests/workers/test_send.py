"""``python -m backend.workers.shared send TASK``: an execution created with ``dispatch``, its
task published by name by the backend (on the backend's broker)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared import InternalAPIClient, WorkflowExecution
from backend.workers.shared.config import WorkerConfig
from tests.conftest import free_port
from tests.live_backend import LiveBackend

REPO = Path(__file__).resolve().parents[2]
_CONFIG_NAMES = {f.upper() for f in WorkerConfig.model_fields} | {"ENV_FILE"}


def run_send(env_vars: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in _CONFIG_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "backend.workers.shared", "send", *args],
        env={**clean, "PYTHONPATH": str(REPO), "ENV_FILE": os.devnull, **env_vars},
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def backend_env(live_backend: LiveBackend, tmp_path: Path) -> dict[str, str]:
    return {
        "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
        "DJANGO_APP_BACKEND_URL": live_backend.url,
        "ORGANIZATION_ID": live_backend.org_id,
        "WORKER_NAME": "send-test",
        "WORKER_DATA_DIR": str(tmp_path / ".data"),
    }


def read_execution(live_backend: LiveBackend, execution_id: str) -> WorkflowExecution:
    config = WorkerConfig(
        _env_file=None, internal_service_api_key=live_backend.api_key,
        django_app_backend_url=live_backend.url, organization_id=live_backend.org_id,
    )  # fmt: skip
    with InternalAPIClient(config) as client:
        return client.get_workflow_execution(execution_id)


# A worker module in the sender's directory that leaves a mark when imported.
IMPORTED_MARKER = "open('imported', 'w').close()\n"


def sent_id(stdout: str) -> str:
    """The execution id from ``send``'s first line (``execution <id>: ...``)."""
    first = stdout.splitlines()[0]
    assert first.startswith("execution "), stdout
    return first.split()[1].rstrip(":")


@pytest.mark.parametrize("organization", [None, ""])
def test_no_organization_is_refused_with_the_way_to_get_one(
    tmp_path: Path, organization: str | None
) -> None:
    env = {"INTERNAL_SERVICE_API_KEY": "k", "DJANGO_APP_BACKEND_URL": "http://127.0.0.1:9"}
    if organization is not None:
        env["ORGANIZATION_ID"] = organization
    result = run_send(env, tmp_path, "my_worker.my_task")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ORGANIZATION_ID is not set" in result.stderr
    assert "manage.py create_organization" in result.stderr
    assert result.stdout == ""


def test_an_invalid_configuration_exits_2(tmp_path: Path) -> None:
    result = run_send({"ORGANIZATION_ID": "acme"}, tmp_path, "my_worker.my_task")
    assert result.returncode == 2
    assert "INTERNAL_SERVICE_API_KEY" in result.stderr


def backend_messages(live_backend: LiveBackend, queue: str) -> list[dict[str, Any]]:
    """The Celery messages the backend published to ``queue`` on its embedded broker."""
    folder = live_backend.data_dir / "broker" / "queue"
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*.{queue}.msg"))]


def test_the_backend_dispatches_the_task_by_name_with_the_execution_id(
    live_backend: LiveBackend, tmp_path: Path
) -> None:
    (tmp_path / "my_worker.py").write_text(IMPORTED_MARKER)
    env = backend_env(live_backend, tmp_path)
    result = run_send(env, tmp_path, "my_worker.my_task", "--workflow-id", "wf-send")
    assert result.returncode == 0, result.stderr
    execution_id = sent_id(result.stdout)
    assert "my_worker.my_task sent to queue 'send-test'" in result.stdout
    execution = read_execution(live_backend, execution_id)
    assert execution.status == "QUEUED"
    assert execution.workflow_id == "wf-send"
    mine = []
    for message in backend_messages(live_backend, "send-test"):
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if args == [execution_id]:
            mine.append((message["headers"]["task"], kwargs))
    assert mine == [("my_worker.my_task", {"organization_id": live_backend.org_id})]
    assert not (tmp_path / "imported").exists()  # the worker module (its health server) never ran


def test_waiting_without_a_worker_ends_1_naming_the_queue(
    live_backend: LiveBackend, tmp_path: Path
) -> None:
    env = backend_env(live_backend, tmp_path)
    result = run_send(env, tmp_path, "my_worker.my_task", "--queue", "nobody", "--wait", "1")
    assert result.returncode == 1
    assert "still QUEUED after 1s" in result.stderr
    assert "queue 'nobody'" in result.stderr


def test_the_sender_needs_no_broker_of_its_own(live_backend: LiveBackend, tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = {**backend_env(live_backend, tmp_path), "CELERY_BROKER_URL": closed}
    result = run_send(env, tmp_path, "my_worker.my_task", "--queue", "send-nobroker")
    assert result.returncode == 0, result.stderr
    execution_id = sent_id(result.stdout)
    assert read_execution(live_backend, execution_id).status == "QUEUED"
    assert len(backend_messages(live_backend, "send-nobroker")) == 1
    assert live_backend.api_key not in result.stdout + result.stderr


def test_an_unreachable_backend_ends_1_pointing_at_check(tmp_path: Path) -> None:
    env = {
        "INTERNAL_SERVICE_API_KEY": "swi-send-test-key",
        "DJANGO_APP_BACKEND_URL": f"http://127.0.0.1:{free_port()}",
        "ORGANIZATION_ID": "acme",
        "API_RETRY_ATTEMPTS": "0",
        "WORKER_DATA_DIR": str(tmp_path / ".data"),
    }
    result = run_send(env, tmp_path, "my_worker.my_task")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "python -m backend.workers.shared check" in result.stderr
    assert "Traceback" not in result.stderr
    assert "swi-send-test-key" not in result.stderr
    assert not list((tmp_path / ".data" / "broker" / "queue").glob("*.msg"))  # nothing sent
