"""What the example worker logs about its completion webhook, in a real process.

``example_worker.notify`` runs in a subprocess (importing the example configures the
process's logging) against real loopback servers: a webhook receiver, and a backend that
knows the execution but refuses to record the delivery. The webhook went out, so the line
must say it was sent and only the record is missing, never that it was not sent.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fault_server import FaultServer, Respond

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from backend.workers.shared import InternalAPIClient
from backend.workers.shared import example_worker

with InternalAPIClient(example_worker.config) as client:
    example_worker.notify(client, sys.argv[1], sys.argv[2], 0.25)
"""

pytestmark = pytest.mark.timeout(120)


def test_a_webhook_sent_but_not_recorded_is_logged_as_sent(tmp_path: Path) -> None:
    execution = {"id": str(uuid.uuid4()), "workflow_id": "wf", "status": "COMPLETED"}
    refused = {"error": "validation_error", "detail": "execution_id: no such workflow execution"}
    with FaultServer(default=Respond(200, {"received": True})) as receiver, \
            FaultServer(default=Respond(400, refused)) as backend:
        backend.push(Respond(200, execution))  # the execution is there when checked
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAMPLE_", "LOG_"))}
        env.update({
            "INTERNAL_SERVICE_API_KEY": "swi-test-key-7Q2xK9-notify",
            "DJANGO_APP_BACKEND_URL": backend.url,
            "WEBHOOK_SIGNING_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
            "WEBHOOK_ALLOWED_HOSTS": "localhost",
            "ORGANIZATION_ID": "org-notify",
            "WORKER_NAME": "notify-test",
            "WORKER_DATA_DIR": str(tmp_path),
            "LOG_FORMAT": "structured",
            "PYTHONPATH": str(REPO_ROOT),
        })
        url = f"http://localhost:{receiver.port}/hooks/done"
        run = subprocess.run([sys.executable, "-c", SCRIPT, url, execution["id"]], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr
        assert [r.method for r in backend.requests] == ["GET", "POST"], run.stderr
        assert len(receiver.requests) == 1
        webhook_id = receiver.requests[0].headers["webhook-id"]
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    about = [r for r in records if r["message"].startswith("completion webhook")]
    assert len(about) == 1, about
    line = about[0]
    assert line["level"] == "WARNING"
    assert line["message"].startswith("completion webhook sent but not recorded: ")
    assert "no such workflow execution" in line["message"]
    assert (line["webhook_id"], line["outcome"], line["attempts"]) == (webhook_id, "delivered", 1)
    assert line["error_type"] == "APIValidationError"


def test_a_refused_redirect_is_caught_logged_and_recorded_as_blocked(tmp_path: Path) -> None:
    execution = {"id": str(uuid.uuid4()), "workflow_id": "wf", "status": "COMPLETED"}
    with FaultServer(default=Respond(302, b"", {"Location": "http://0177.0.0.1/"})) as receiver, \
            FaultServer(default=Respond(201, {"id": "d-9", "url": "u", "outcome": "blocked"})) \
            as backend:
        backend.push(Respond(200, execution))  # the execution is there when checked
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAMPLE_", "LOG_"))}
        env.update({
            "INTERNAL_SERVICE_API_KEY": "swi-test-key-7Q2xK9-notify",
            "DJANGO_APP_BACKEND_URL": backend.url,
            "WEBHOOK_ALLOWED_HOSTS": "localhost",
            "ORGANIZATION_ID": "org-notify",
            "WORKER_NAME": "notify-test",
            "WORKER_DATA_DIR": str(tmp_path),
            "LOG_FORMAT": "structured",
            "PYTHONPATH": str(REPO_ROOT),
        })
        url = f"http://localhost:{receiver.port}/hooks/done"
        run = subprocess.run([sys.executable, "-c", SCRIPT, url, execution["id"]], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr  # caught: the completion stands
        assert "Traceback" not in run.stderr and "InvalidURL" not in run.stderr
        recorded = [r.json() for r in backend.requests if r.method == "POST"]
        assert [r["outcome"] for r in recorded] == ["blocked"], run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    about = [r for r in records if r["message"].startswith("completion webhook")]
    assert len(about) == 1, about
    assert about[0]["message"].startswith("completion webhook blocked: webhook URL refused: ")
    assert about[0]["delivery_id"] == "d-9"
