"""The execution lifecycle against the real backend (gunicorn, its own SQLite database): the
client's claim/heartbeat/release/finish/events, fencing by epoch, and ExecutionTask run
eagerly (``Task.apply``) through a real misbehaving server in front of the backend where a
fault is needed (tests/fault_server.py). Each result is read back from the backend: what it
applied, its event history, its webhook deliveries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from backend.workers.shared import (
    ExecutionTask,
    InternalAPIClient,
    LeaseHeldError,
    LeaseLostError,
    WorkerConfig,
)
from backend.workers.shared.api_client import holding_lease
from tests.fault_server import FaultServer, Forward, Respond, Stall
from tests.live_backend import LiveBackend

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_sleep")]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBackend]:
    """A backend of this module's own: a webhook handed out is handed again after 0.5 s."""
    live = LiveBackend(
        data_dir=tmp_path_factory.mktemp("lifecycle_backend"),
        extra_env={"WEBHOOK_DUE_TIMEOUT": "0.5"},
    )
    live.start()
    yield live
    live.close()


@pytest.fixture
def fault(backend: LiveBackend) -> Iterator[FaultServer]:
    with FaultServer(default=Forward(backend.url)) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, b"ok")) as server:
        yield server


def make_config(backend: LiveBackend, url: str | None = None, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "_env_file": None,
        "internal_service_api_key": backend.api_key,
        "django_app_backend_url": url or backend.url,
        "organization_id": backend.org_id,
        "api_retry_attempts": 0,
        "webhook_allowed_hosts": "localhost",
        "execution_lease_seconds": 3,
        "circuit_breaker_failure_threshold": 1000,
    }
    values.update(overrides)
    return WorkerConfig(**values)


@pytest.fixture
def client(backend: LiveBackend) -> Iterator[InternalAPIClient]:
    with InternalAPIClient(make_config(backend)) as api:
        yield api


def make_task(config: WorkerConfig, body: Any, **options: Any) -> Any:
    app = Celery(f"lifecycle-live-{id(body)}")
    # shared=False: a later test's app must not be handed this body under the same name.
    return app.task(bind=True, base=ExecutionTask, worker_config=config, shared=False,
                    **options)(body)  # fmt: skip


def history(client: InternalAPIClient, execution_id: str) -> list[tuple[Any, ...]]:
    return [(e.from_status, e.to_status, e.reason, e.epoch)
            for e in client.list_execution_events(execution_id)]


def hook_url(receiver: FaultServer) -> str:
    return f"http://localhost:{receiver.port}/hook"


# --- the client against the real backend --------------------------------------------------


def test_claim_heartbeat_release_and_a_second_claim_refused(client: InternalAPIClient) -> None:
    execution = client.create_workflow_execution("wf-lease")
    claim = client.claim_execution(execution.id, worker="w1:1", lease_seconds=30)
    assert claim.lease.epoch == 1 and claim.execution.status == "IN_PROGRESS"
    assert claim.execution.attempts == 1
    with pytest.raises(LeaseHeldError) as held:
        client.claim_execution(execution.id, worker="w2:2", lease_seconds=30)
    assert held.value.retry_after is not None and held.value.retry_after >= 1
    longer = client.heartbeat_execution(execution.id, 1, lease_seconds=60)
    assert claim.lease.expires_at is not None and longer.expires_at is not None
    assert longer.expires_at > claim.lease.expires_at  # the backend's own clock, both times
    released = client.release_execution(execution.id, 1, retry_in=0)
    assert released.status == "QUEUED" and released.lease is None
    with pytest.raises(LeaseLostError):
        client.heartbeat_execution(execution.id, 1)
    again = client.claim_execution(execution.id, worker="w2:2", lease_seconds=30)
    assert again.lease.epoch == 2 and again.execution.attempts == 2
    assert history(client, execution.id) == [
        ("PENDING", "IN_PROGRESS", "claimed", 1),
        ("IN_PROGRESS", "QUEUED", "released", 1),
        ("QUEUED", "IN_PROGRESS", "claimed", 2),
    ]


def test_a_superseded_epoch_applies_nothing(client: InternalAPIClient) -> None:
    execution = client.create_workflow_execution("wf-fence")
    client.claim_execution(execution.id, worker="old:1", lease_seconds=1)
    time.sleep(1.1)  # the backend lets another claim only once the lease has run out
    client.claim_execution(execution.id, worker="new:2", lease_seconds=30)
    with holding_lease(execution.id, 1):
        with pytest.raises(LeaseLostError):
            client.update_workflow_execution(execution.id, result={"from": "old"})
        with pytest.raises(LeaseLostError):
            client.finish_execution(execution.id, "COMPLETED", result={"from": "old"})
    now = client.get_workflow_execution(execution.id)
    assert (now.status, now.result) == ("IN_PROGRESS", None)
    assert now.lease is not None and (now.lease.epoch, now.lease.worker) == (2, "new:2")
    with holding_lease(execution.id, 2):
        done = client.finish_execution(execution.id, "COMPLETED", result={"from": "new"})
    assert (done.status, done.result) == ("COMPLETED", {"from": "new"})


# --- ExecutionTask against the real backend ---------------------------------------------


def test_a_run_claims_finishes_and_delivers_the_webhook_once_with_one_id(
    backend: LiveBackend, client: InternalAPIClient, receiver: FaultServer
) -> None:
    def body(self: ExecutionTask, execution_id: str) -> dict[str, Any]:
        assert self.execution is not None and self.execution.status == "IN_PROGRESS"
        return {"pages": 2}

    task = make_task(make_config(backend), body)
    execution = client.create_workflow_execution("wf-run", webhook_url=hook_url(receiver))
    assert task.apply(args=[execution.id]).result == {"pages": 2}
    done = client.get_workflow_execution(execution.id)
    assert (done.status, done.result) == ("COMPLETED", {"pages": 2})
    assert done.webhook is not None and done.webhook.delivered
    (hook,) = receiver.requests
    assert hook.headers["webhook-id"] == done.webhook.id
    deliveries = list(client.list_webhook_deliveries(execution.id))
    assert [(d.outcome, d.model_extra.get("webhook_id")) for d in deliveries] == [
        ("delivered", done.webhook.id)
    ]
    assert history(client, execution.id) == [
        ("PENDING", "IN_PROGRESS", "claimed", 1),
        ("IN_PROGRESS", "COMPLETED", "finished", 1),
    ]
    # The same message again (a redelivery): refused at the claim, nothing runs or is sent.
    assert task.apply(args=[execution.id]).result is None
    assert len(receiver.requests) == 1


def test_a_webhook_that_failed_is_handed_out_again_and_recorded_delivered_once(
    backend: LiveBackend, client: InternalAPIClient, receiver: FaultServer
) -> None:
    ran: list[str] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        ran.append(execution_id)

    task = make_task(make_config(backend), body)
    execution = client.create_workflow_execution("wf-hook", webhook_url=hook_url(receiver))
    receiver.push(Respond(500, b"down"))  # the first delivery fails (one attempt configured)
    task.apply(args=[execution.id])
    assert len(receiver.requests) == 1
    time.sleep(0.6)  # past WEBHOOK_DUE_TIMEOUT: the backend hands the webhook out again
    task.apply(args=[execution.id])  # the message sent again: the webhook only
    assert ran == [execution.id]
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    done = client.get_workflow_execution(execution.id)
    assert done.webhook is not None and done.webhook.delivered and ids == {done.webhook.id}
    outcomes = sorted(d.outcome for d in client.list_webhook_deliveries(execution.id))
    assert outcomes == ["delivered", "failed"]
    time.sleep(0.6)
    task.apply(args=[execution.id])  # delivered: nothing more is handed out
    assert len(receiver.requests) == 2


def test_a_lease_lost_mid_task_applies_no_further_write(
    backend: LiveBackend, client: InternalAPIClient, fault: FaultServer
) -> None:
    execution = client.create_workflow_execution("wf-lost")
    stolen: list[int] = []

    def body(self: ExecutionTask, execution_id: str) -> dict[str, str]:
        # This worker's heartbeats do not get through (a network fault), so its lease runs
        # out and another worker claims the execution.
        fault.push(*[Respond(503, {"error": "unavailable", "detail": "x"})] * 10)
        deadline = time.monotonic() + 30
        while not stolen:
            assert time.monotonic() < deadline
            try:
                stolen.append(
                    client.claim_execution(execution_id, worker="other:9", lease_seconds=60)
                    .lease.epoch
                )
            except LeaseHeldError as exc:
                time.sleep(min(exc.retry_after or 0.2, 0.5))
        fault.reset(default=Forward(backend.url))
        return {"written_by": "the old holder"}

    task = make_task(make_config(backend, fault.url), body, lease_seconds=1)
    outcome = task.apply(args=[execution.id])
    assert outcome.successful() and outcome.result is None  # ended quietly, no re-queue
    now = client.get_workflow_execution(execution.id)
    assert (now.status, now.result) == ("IN_PROGRESS", None)
    assert now.lease is not None and now.lease.epoch == stolen[0] == 2
    assert [r for r in history(client, execution.id) if r[2] == "finished"] == []


def test_heartbeats_keep_a_long_task_s_lease(
    backend: LiveBackend, client: InternalAPIClient, fault: FaultServer
) -> None:
    execution = client.create_workflow_execution("wf-long")
    extended: list[Any] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        assert self.execution is not None and self.execution.lease is not None
        last = self.execution.lease.expires_at
        deadline = time.monotonic() + 60
        while len(extended) < 2:  # the backend's own clock, moved on twice by heartbeats
            assert time.monotonic() < deadline
            lease = client.get_workflow_execution(execution_id).lease
            assert lease is not None and lease.epoch == 1
            if lease.expires_at > last:
                extended.append(lease.expires_at)
                last = lease.expires_at
            time.sleep(0.05)

    # A lease of 6 s (heartbeats every 2 s): a loaded machine may delay one by seconds.
    task = make_task(make_config(backend, fault.url), body, lease_seconds=6)
    assert task.apply(args=[execution.id]).successful()
    assert sum(r.path.endswith("/heartbeat/") for r in fault.requests) >= 2
    assert client.get_workflow_execution(execution.id).status == "COMPLETED"
    assert history(client, execution.id) == [  # nobody else took it; finished under epoch 1
        ("PENDING", "IN_PROGRESS", "claimed", 1),
        ("IN_PROGRESS", "COMPLETED", "finished", 1),
    ]


def test_one_stalled_heartbeat_does_not_cost_the_lease(
    backend: LiveBackend, client: InternalAPIClient, fault: FaultServer
) -> None:
    execution = client.create_workflow_execution("wf-stall")

    def heartbeats() -> int:
        return sum(r.path.endswith("/heartbeat/") for r in fault.requests)

    def body(self: ExecutionTask, execution_id: str) -> None:
        fault.push(Stall())  # the first heartbeat never gets an answer
        deadline = time.monotonic() + 90
        while heartbeats() < 3:  # it was given up on, and the next ones went through
            assert time.monotonic() < deadline
            time.sleep(0.05)

    # API_TIMEOUT stays 30 s, past the 6 s lease: the heartbeat has its own bounds.
    task = make_task(make_config(backend, fault.url), body, lease_seconds=6)
    assert task.apply(args=[execution.id]).successful()
    assert client.get_workflow_execution(execution.id).status == "COMPLETED"
    assert history(client, execution.id) == [
        ("PENDING", "IN_PROGRESS", "claimed", 1),
        ("IN_PROGRESS", "COMPLETED", "finished", 1),
    ]


class Hiccup(Exception):
    transient = True


def test_a_transient_failure_releases_before_the_requeue(
    backend: LiveBackend, client: InternalAPIClient
) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        if self.request.retries == 0:
            raise Hiccup("input store busy")

    task = make_task(make_config(backend), body)
    execution = client.create_workflow_execution("wf-retry")
    assert task.apply(args=[execution.id]).successful()
    assert history(client, execution.id) == [
        ("PENDING", "IN_PROGRESS", "claimed", 1),
        ("IN_PROGRESS", "QUEUED", "released", 1),
        ("QUEUED", "IN_PROGRESS", "claimed", 2),
        ("IN_PROGRESS", "COMPLETED", "finished", 2),
    ]
    assert client.get_workflow_execution(execution.id).attempts == 2


def test_a_duplicate_message_ends_quietly_while_another_holds_the_lease(
    backend: LiveBackend, client: InternalAPIClient
) -> None:
    ran: list[str] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        ran.append(execution_id)

    task = make_task(make_config(backend), body)
    execution = client.create_workflow_execution("wf-dup")
    client.claim_execution(execution.id, worker="first:1", lease_seconds=60)
    outcome = task.apply(args=[execution.id])
    assert outcome.successful() and outcome.result is None and ran == []
    now = client.get_workflow_execution(execution.id)
    assert now.status == "IN_PROGRESS" and now.lease is not None and now.lease.epoch == 1
