"""The client's execution lifecycle calls against a real HTTP server on loopback that answers as
the contract says (tests/fault_server.py): the requests they send, the answers they parse,
``lease_lost`` / ``lease_held`` errors, ``X-Lease-Epoch`` fencing from the context variable
only, and ``send_webhook`` with the backend's ``webhook_id``. Bad arguments are refused before
anything is sent. The same calls against the real backend are in test_lifecycle_live.py."""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from backend.workers.shared import retry_utils
from backend.workers.shared.api_client import (
    Claim,
    ConflictError,
    InternalAPIClient,
    LeaseHeldError,
    LeaseLostError,
    holding_lease,
)
from backend.workers.shared.config import WorkerConfig
from backend.workers.shared.tasks import is_transient
from tests.fault_server import FaultServer, RecordedRequest, Respond

pytestmark = pytest.mark.usefixtures("no_sleep")

EXECUTION_ID = "3f2b6c1e-0000-4000-8000-00000000000a"
WEBHOOK_ID = "msg_" + "ab" * 16
EXECUTION = {
    "id": EXECUTION_ID,
    "workflow_id": "wf",
    "status": "IN_PROGRESS",
    "lease": {"epoch": 3, "worker": "host:1", "expires_at": "2026-01-01T00:00:30Z"},
    "webhook_url": "",
    "lost_count": 0,
    "webhook": None,
}
CLAIM = {"execution": EXECUTION, "lease": {"epoch": 3, "expires_at": "2026-01-01T00:00:30Z"}}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, EXECUTION)) as fault:
        yield fault


def make_client(server: FaultServer, **overrides: Any) -> InternalAPIClient:
    values: dict[str, Any] = {
        "internal_service_api_key": "swi-test-key-7Q2xK9-lifecycle",
        "django_app_backend_url": server.url,
        "organization_id": "org-a",
        "api_retry_attempts": 2,
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.1,
        "api_retry_budget_min_per_second": 1000.0,
        "circuit_breaker_failure_threshold": 2,
        "webhook_allowed_hosts": "localhost",
        "_env_file": None,
    }
    values.update(overrides)
    return InternalAPIClient(WorkerConfig(**values))


def sent(server: FaultServer) -> list[tuple[str, str]]:
    return [(r.method, r.path.split("/internal/v1/", 1)[1]) for r in server.requests]


def only(server: FaultServer) -> RecordedRequest:
    assert len(server.requests) == 1, sent(server)
    return server.requests[0]


def test_claim_sends_worker_lease_and_dispatch_and_parses_the_claim(server: FaultServer) -> None:
    server.push(Respond(200, CLAIM))
    claim = make_client(server).claim_execution(
        EXECUTION_ID, worker="host:1", lease_seconds=30, task="w.process", queue="q1"
    )
    assert isinstance(claim, Claim)
    assert (claim.lease.epoch, claim.execution.status) == (3, "IN_PROGRESS")
    assert claim.execution.lease is not None and claim.execution.lease.worker == "host:1"
    request = only(server)
    assert request.path.endswith(f"/workflow-executions/{EXECUTION_ID}/claim/")
    assert request.json() == {
        "worker": "host:1",
        "lease_seconds": 30,
        "dispatch": {"task": "w.process", "queue": "q1"},
    }
    assert "x-lease-epoch" not in request.headers


def test_claim_without_task_sends_no_dispatch(server: FaultServer) -> None:
    server.push(Respond(200, CLAIM))
    make_client(server).claim_execution(EXECUTION_ID, worker="w", lease_seconds=5)
    assert only(server).json() == {"worker": "w", "lease_seconds": 5}


def test_lease_held_is_a_conflict_with_retry_after_and_is_not_retried(
    server: FaultServer,
) -> None:
    server.push(
        Respond(409, {"error": "lease_held", "detail": "held by w2"}, {"Retry-After": "7"})
    )
    with pytest.raises(LeaseHeldError) as caught:
        make_client(server).claim_execution(EXECUTION_ID, worker="w", lease_seconds=30)
    assert isinstance(caught.value, ConflictError)
    assert caught.value.retry_after == 7.0 and caught.value.error_code == "lease_held"
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.heartbeat_execution(EXECUTION_ID, 3),
        lambda c: c.release_execution(EXECUTION_ID, 3, retry_in=2),
        lambda c: c.finish_execution(EXECUTION_ID, "COMPLETED"),
        lambda c: c.update_workflow_execution_status(EXECUTION_ID, "IN_PROGRESS"),
        lambda c: c.update_workflow_execution(EXECUTION_ID, result={"a": 1}),
    ],
)
def test_lease_lost_is_permanent_not_retried_and_not_a_backend_failure(
    server: FaultServer, call: Any
) -> None:
    for _ in range(3):
        server.push(Respond(409, {"error": "lease_lost", "detail": "epoch 3 is not current"}))
    client = make_client(server)
    for _ in range(3):  # more than the breaker's threshold: a refusal is an answer
        with pytest.raises(LeaseLostError) as caught:
            call(client)
    assert isinstance(caught.value, ConflictError) and not is_transient(caught.value)
    assert len(server.requests) == 3
    assert client.breaker.state is retry_utils.CircuitState.CLOSED


def test_another_conflict_stays_a_plain_conflict(server: FaultServer) -> None:
    server.push(Respond(409, {"error": "illegal_transition", "detail": "COMPLETED is final"}))
    with pytest.raises(ConflictError) as caught:
        make_client(server).claim_execution(EXECUTION_ID, worker="w", lease_seconds=30)
    assert type(caught.value) is ConflictError


def test_heartbeat_and_release_bodies(server: FaultServer) -> None:
    server.push(Respond(200, {"lease": {"epoch": 3, "expires_at": "2026-01-01T00:01:00Z"}}))
    client = make_client(server)
    lease = client.heartbeat_execution(EXECUTION_ID, 3)
    assert lease.epoch == 3 and lease.expires_at is not None
    server.push(Respond(200, {"lease": {"epoch": 3, "expires_at": "2026-01-01T00:01:00Z"}}))
    client.heartbeat_execution(EXECUTION_ID, 3, lease_seconds=90)
    server.push(Respond(200, {**EXECUTION, "status": "QUEUED", "lease": None}))
    released = client.release_execution(EXECUTION_ID, 3, retry_in=1.25)
    assert released.status == "QUEUED" and released.lease is None
    client.release_execution(EXECUTION_ID, 3)
    bodies = [r.json() for r in server.requests]
    assert bodies == [
        {"epoch": 3},
        {"epoch": 3, "lease_seconds": 90},
        {"epoch": 3, "retry_in": 1.25},
        {"epoch": 3},
    ]
    assert [p for _, p in sent(server)] == [
        f"workflow-executions/{EXECUTION_ID}/heartbeat/",
        f"workflow-executions/{EXECUTION_ID}/heartbeat/",
        f"workflow-executions/{EXECUTION_ID}/release/",
        f"workflow-executions/{EXECUTION_ID}/release/",
    ]


def test_finish_sends_the_result_in_one_status_call(server: FaultServer) -> None:
    due = {"id": WEBHOOK_ID, "url": "https://example.com/h", "delivered": False}
    server.push(Respond(200, {**EXECUTION, "status": "COMPLETED", "webhook": due}))
    finished = make_client(server).finish_execution(
        EXECUTION_ID, "COMPLETED", result={"files": 3}, total_files=3, successful_files=3,
        failed_files=0, execution_time=1.5,
    )
    assert finished.webhook_due is not None and finished.webhook_due.id == WEBHOOK_ID
    request = only(server)
    assert request.path.endswith(f"/workflow-executions/{EXECUTION_ID}/status/")
    assert request.json() == {
        "status": "COMPLETED",
        "result": {"files": 3},
        "total_files": 3,
        "successful_files": 3,
        "failed_files": 0,
        "execution_time": 1.5,
    }


def test_events_are_parsed_oldest_first(server: FaultServer) -> None:
    events = [
        {"from": "PENDING", "to": "QUEUED", "at": "2026-01-01T00:00:00Z", "worker": "",
         "epoch": None, "reason": "dispatched"},
        {"from": "QUEUED", "to": "IN_PROGRESS", "at": "2026-01-01T00:00:01Z", "worker": "h:1",
         "epoch": 1, "reason": "claimed"},
    ]
    server.push(Respond(200, {"results": events}))
    got = make_client(server).list_execution_events(EXECUTION_ID)
    assert [(e.from_status, e.to_status, e.epoch, e.reason) for e in got] == [
        ("PENDING", "QUEUED", None, "dispatched"),
        ("QUEUED", "IN_PROGRESS", 1, "claimed"),
    ]
    assert sent(server) == [("GET", f"workflow-executions/{EXECUTION_ID}/events/")]


def test_create_with_webhook_url_and_dispatch(server: FaultServer) -> None:
    server.push(Respond(201, {**EXECUTION, "status": "PENDING", "lease": None}))
    make_client(server).create_workflow_execution(
        "wf", webhook_url="https://example.com/h", dispatch={"task": "w.t", "queue": "q"}
    )
    assert only(server).json() == {
        "workflow_id": "wf",
        "webhook_url": "https://example.com/h",
        "dispatch": {"task": "w.t", "queue": "q"},
    }


# --- fencing: X-Lease-Epoch only inside holding_lease, only for that execution -------------


def test_writes_about_the_held_execution_carry_the_epoch(server: FaultServer) -> None:
    client = make_client(server)
    other = "3f2b6c1e-0000-4000-8000-00000000000b"
    with holding_lease(EXECUTION_ID, 3) as held:
        client.update_workflow_execution_status(EXECUTION_ID, "IN_PROGRESS")
        client.update_workflow_execution(EXECUTION_ID, result={"a": 1})
        client.update_workflow_execution_status(other, "IN_PROGRESS")
        client.get_workflow_execution(EXECUTION_ID)
        assert held.finished is None
        server.push(Respond(200, {**EXECUTION, "status": "COMPLETED"}))
        client.finish_execution(EXECUTION_ID, "COMPLETED")
        assert held.finished is not None and held.finished.status == "COMPLETED"
    client.update_workflow_execution_status(EXECUTION_ID, "IN_PROGRESS")
    epochs = [r.headers.get("x-lease-epoch") for r in server.requests]
    assert epochs == ["3", "3", None, None, "3", None]


def test_the_lease_is_not_seen_by_other_threads_or_contexts(server: FaultServer) -> None:
    client = make_client(server)
    seen: list[str | None] = []

    def write() -> None:
        client.update_workflow_execution_status(EXECUTION_ID, "IN_PROGRESS")

    with holding_lease(EXECUTION_ID, 4):
        thread = threading.Thread(target=write)
        thread.start()
        thread.join()
        with holding_lease(EXECUTION_ID, 5):
            write()
        write()
        contextvars.Context().run(write)  # a fresh context holds no lease
    seen = [r.headers.get("x-lease-epoch") for r in server.requests]
    assert seen == [None, "5", "4", None]


@pytest.mark.parametrize("epoch", [0, -1, 2**31 + 1, True, "3", 3.0, None])
def test_bad_epochs_are_refused_before_anything_is_sent(server: FaultServer, epoch: Any) -> None:
    client = make_client(server)
    for call in (
        lambda: client.heartbeat_execution(EXECUTION_ID, epoch),
        lambda: client.release_execution(EXECUTION_ID, epoch),
        lambda: holding_lease(EXECUTION_ID, epoch).__enter__(),
    ):
        with pytest.raises(ValueError, match="epoch"):
            call()
    assert server.requests == []


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=0), "lease_seconds"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=True),
         "lease_seconds"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=1.5),
         "lease_seconds"),
        (lambda c: c.heartbeat_execution(EXECUTION_ID, 1, lease_seconds=-3), "lease_seconds"),
        (lambda c: c.release_execution(EXECUTION_ID, 1, retry_in=-1), "retry_in"),
        (lambda c: c.release_execution(EXECUTION_ID, 1, retry_in=86401), "retry_in"),
        (lambda c: c.release_execution(EXECUTION_ID, 1, retry_in=float("nan")), "retry_in"),
        (lambda c: c.release_execution(EXECUTION_ID, 1, retry_in="5"), "retry_in"),
        (lambda c: c.finish_execution(EXECUTION_ID, "IN_PROGRESS"), "final status"),
        (lambda c: c.finish_execution(EXECUTION_ID, "completed"), "final status"),
        (lambda c: c.create_workflow_execution("wf", dispatch={"queue": "q"}), "dispatch"),
        (lambda c: c.create_workflow_execution("wf", dispatch="w.t"), "dispatch"),
        (lambda c: c.claim_execution("", worker="w", lease_seconds=3), "id"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="", lease_seconds=3), "worker"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="  ", lease_seconds=3), "worker"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w" * 256, lease_seconds=3), "worker"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker=7, lease_seconds=3), "worker"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=3, task=""), "task"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=3, task="t" * 256),
         "task"),
        (lambda c: c.claim_execution(EXECUTION_ID, worker="w", lease_seconds=3, task="t",
                                     queue=""), "queue"),
    ],
)
def test_bad_lifecycle_arguments_are_refused_before_anything_is_sent(
    server: FaultServer, call: Any, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        call(make_client(server))
    assert server.requests == []


# --- send_webhook with the backend's webhook_id -----------------------------------------


def test_a_due_webhook_goes_out_with_its_id_and_is_recorded_with_it(server: FaultServer) -> None:
    with FaultServer(default=Respond(200, b"ok")) as receiver:
        server.push(Respond(201, {"id": "d1", "url": "x", "outcome": "delivered"}))
        client = make_client(server)
        url = f"http://localhost:{receiver.port}/hook"
        with holding_lease(EXECUTION_ID, 3):
            result = client.send_webhook(
                url, {"a": 1}, execution_id=EXECUTION_ID, webhook_id=WEBHOOK_ID
            )
        assert result.ok and result.message_id == WEBHOOK_ID and result.delivery_id == "d1"
        assert only(receiver).headers["webhook-id"] == WEBHOOK_ID
    record = only(server)  # no read of the execution first: the backend handed the webhook
    assert record.path.endswith("/webhook-deliveries/")
    assert record.json()["webhook_id"] == WEBHOOK_ID
    assert record.json()["execution_id"] == EXECUTION_ID
    assert record.headers["x-lease-epoch"] == "3"
    assert record.headers["idempotency-key"] != WEBHOOK_ID  # one delivered record per id


@pytest.mark.parametrize(
    "webhook_id",
    ["", "msg_", "msg_" + "g" * 32, "msg_" + "AB" * 16, "MSG_" + "ab" * 16, "ab" * 16,
     "msg_" + "ab" * 17, "msg_" + "ab" * 16 + "\n", 12, uuid.uuid4()],
)
def test_a_webhook_id_not_of_the_backend_form_is_refused(
    server: FaultServer, webhook_id: Any
) -> None:
    with FaultServer(default=Respond(200, b"ok")) as receiver:
        with pytest.raises(ValueError, match="webhook_id"):
            make_client(server).send_webhook(
                f"http://localhost:{receiver.port}/h", {}, webhook_id=webhook_id
            )
        assert receiver.requests == []
    assert server.requests == []
