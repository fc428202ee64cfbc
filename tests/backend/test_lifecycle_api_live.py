"""The lifecycle endpoints under real concurrency: a gunicorn backend (SQLite, and PostgreSQL
where several transactions really run at once), requests racing from threads over HTTP.
Also the cross-process publish: what the backend publishes lands in the embedded broker's
folder, where a worker with the default configuration consumes it.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from kombu import Connection

from backend.workers.shared import _fs_transport as fs_transport
from tests.live_backend import LiveBackend

BACKENDS = ["live_backend", pytest.param("live_backend_pg", marks=pytest.mark.postgres)]
RACERS = 8


def call(backend: LiveBackend, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request; (status, parsed JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{backend.url}/internal/v1/{path}",
        data=data,
        method=method,
        headers={**backend.headers(), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def race(requests: list[tuple[str, str, Any]], backend: LiveBackend) -> list[tuple[int, Any]]:
    """Send the requests at once, one thread each; their answers in order."""
    answers: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(index: int) -> None:
        barrier.wait()
        answers[index] = call(backend, *requests[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def new_execution(backend: LiveBackend, **fields: Any) -> str:
    code, body = call(backend, "POST", "workflow-executions/", {"workflow_id": "race", **fields})
    assert code == 201, body
    return str(body["id"])


@pytest.mark.parametrize("backend_fixture", BACKENDS)
def test_of_concurrent_claims_exactly_one_wins(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    for _ in range(3):
        execution_id = new_execution(backend)
        path = f"workflow-executions/{execution_id}/claim/"
        answers = race([("POST", path, {"worker": f"w{i}"}) for i in range(RACERS)], backend)
        codes = sorted(code for code, _ in answers)
        assert codes == [200] + [409] * (RACERS - 1), answers
        assert {body["error"] for code, body in answers if code == 409} == {"lease_held"}
        (winner,) = [body for code, body in answers if code == 200]
        assert winner["lease"]["epoch"] == 1
        _, execution = call(backend, "GET", f"workflow-executions/{execution_id}/")
        assert execution["attempts"] == 1
        assert execution["lease"]["worker"] == winner["execution"]["lease"]["worker"]
        _, history = call(backend, "GET", f"workflow-executions/{execution_id}/events/")
        assert [e["reason"] for e in history["results"]] == ["claimed"]


@pytest.mark.parametrize("backend_fixture", BACKENDS)
def test_of_racing_finishes_exactly_one_applies_with_its_result(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    execution_id = new_execution(backend)
    path = f"workflow-executions/{execution_id}/"
    code, _ = call(backend, "POST", path + "claim/", {"worker": "a", "lease_seconds": 60})
    assert code == 200
    finishes = [
        ("POST", path + "status/", {"status": target, "result": {"by": target}})
        for target in ("COMPLETED", "ERROR", "STOPPED")
    ]
    # Without headers, of three different terminal statuses exactly one applies.
    answers = race(finishes, backend)
    assert sorted(code for code, _ in answers) == [200, 409, 409], answers
    (done,) = [body for code, body in answers if code == 200]
    assert done["result"] == {"by": done["status"]} and done["lease"] is None
    _, execution = call(backend, "GET", path)
    assert execution == done
    _, history = call(backend, "GET", path + "events/")
    assert [(e["from"], e["to"]) for e in history["results"]] == [
        ("PENDING", "IN_PROGRESS"),
        ("IN_PROGRESS", done["status"]),
    ]


@pytest.mark.parametrize("backend_fixture", BACKENDS)
def test_a_dispatch_lands_in_the_embedded_broker(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    execution_id = new_execution(backend, dispatch={"task": "lc.process", "queue": queue})
    _, execution = call(backend, "GET", f"workflow-executions/{execution_id}/")
    assert execution["status"] == "QUEUED"
    conf = fs_transport.celery_conf(backend.data_dir / "broker")  # the workers' folders
    with Connection(
        "filesystem://",
        transport=conf["broker_transport"],
        transport_options=conf["broker_transport_options"],
    ) as conn:
        simple = conn.SimpleQueue(queue)
        message = simple.get(timeout=5)
        message.ack()
        simple.close()
    assert message.headers["task"] == "lc.process"
    args, kwargs, _ = message.decode()
    assert args == [execution_id] and kwargs == {"organization_id": backend.org_id}
