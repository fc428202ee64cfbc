"""InternalAPIClient against the real backend (gunicorn subprocess), on SQLite and PostgreSQL.

Every operation, pagination over several pages, organization scoping, the error each failure
maps to, and a POST whose response is dropped (by a fault proxy in front of the backend)
and retried: the backend applies it once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from backend.workers.shared.api_client import (
    APIValidationError,
    AuthenticationError,
    BackendHealth,
    ConflictError,
    ExecutionStatus,
    InternalAPIClient,
    NotFoundError,
    WebhookResult,
    WorkflowExecution,
)
from backend.workers.shared.config import WorkerConfig
from backend.workers.shared.logging_utils import log_context
from tests.fault_server import FaultServer, Forward, Respond
from tests.live_backend import LiveBackend


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> LiveBackend:
    name = "live_backend" if request.param == "sqlite" else "live_backend_pg"
    live: LiveBackend = request.getfixturevalue(name)
    return live


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


def make_config(url: str, backend: LiveBackend, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "internal_service_api_key": backend.api_key,
        "django_app_backend_url": url,
        "organization_id": backend.org_id,
        "worker_name": "live-worker",
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.1,
        "api_retry_budget_min_per_second": 1000.0,
        "_env_file": None,
    }
    values.update(overrides)
    return WorkerConfig(**values)


@pytest.fixture
def client(backend: LiveBackend) -> Iterator[InternalAPIClient]:
    with InternalAPIClient(make_config(backend.url, backend)) as api:
        yield api


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_health_check(client: InternalAPIClient) -> None:
    health = client.health_check()
    assert isinstance(health, BackendHealth)
    assert health.status == "healthy" and health.version and health.timestamp is not None
    assert client.get("health/")["status"] == "healthy"


def test_execution_lifecycle(client: InternalAPIClient, backend: LiveBackend) -> None:
    workflow = unique("wf")
    created = client.create_workflow_execution(workflow, total_files=4, pipeline_id="p-1")
    assert isinstance(created, WorkflowExecution)
    assert created.workflow_id == workflow and created.status == ExecutionStatus.PENDING
    assert created.organization_id == backend.org_id and created.total_files == 4

    read = client.get_workflow_execution(created.id)
    assert read.id == created.id and read.pipeline_id == "p-1"

    updated = client.update_workflow_execution(created.id, result={"pages": [1, 2]},
                                               successful_files=3, failed_files=1)
    assert updated.result == {"pages": [1, 2]} and updated.successful_files == 3

    running = client.update_workflow_execution_status(created.id, "IN_PROGRESS", attempts=1)
    assert running.status == "IN_PROGRESS" and running.started_at is not None
    again = client.update_workflow_execution_status(created.id, ExecutionStatus.IN_PROGRESS)
    assert again.status == "IN_PROGRESS"  # same status: a harmless no-op
    failed = client.update_workflow_execution_status(created.id, "ERROR", "disk full",
                                                     execution_time=1.5)
    assert failed.status == "ERROR" and failed.error_message == "disk full"
    assert failed.is_final and failed.finished_at is not None

    with pytest.raises(ConflictError) as info:
        client.update_workflow_execution_status(created.id, "COMPLETED")
    assert info.value.status == 409 and info.value.error_code == "illegal_transition"

    client.delete_workflow_execution(created.id)
    with pytest.raises(NotFoundError) as gone:
        client.get_workflow_execution(created.id)
    assert gone.value.error_code == "not_found"
    with pytest.raises(NotFoundError):
        client.delete_workflow_execution(created.id)


def test_pagination_walks_every_page_lazily(backend: LiveBackend) -> None:
    workflow = unique("wf-pages")
    with FaultServer(default=Forward(backend.url)) as proxy:
        client = InternalAPIClient(make_config(proxy.url, backend))
        ids = [client.create_workflow_execution(workflow).id for _ in range(7)]
        proxy.reset()
        listed = client.list_workflow_executions(workflow_id=workflow, page_size=3)
        assert proxy.requests == []  # nothing is fetched before iterating
        first = next(listed)
        assert len(proxy.requests) == 1
        rest = list(listed)
        assert [e.id for e in [first, *rest]] == list(reversed(ids))  # newest first
        gets = [r.path for r in proxy.requests]
        assert len(gets) == 3 and "cursor=" not in gets[0] and "cursor=" in gets[2]

        proxy.reset()
        five = list(client.list_workflow_executions(workflow_id=workflow, limit=5,
                                                    page_size=3))
        assert [e.id for e in five] == list(reversed(ids))[:5]
        assert "limit=2" in proxy.requests[-1].path  # the last page asks only for what's left

    pending = list(InternalAPIClient(make_config(backend.url, backend)).list_workflow_executions(
        status="PENDING", workflow_id=workflow))
    assert len(pending) == 7


def test_organization_scoping(client: InternalAPIClient, backend: LiveBackend) -> None:
    other = backend.create_organization(unique("org-other"))
    mine = client.create_workflow_execution(unique("wf"))
    theirs = client.create_workflow_execution(unique("wf"), organization_id=other)
    assert theirs.organization_id == other

    with pytest.raises(NotFoundError):
        client.get_workflow_execution(theirs.id)  # another organization's object is a 404
    with pytest.raises(NotFoundError):
        client.get_workflow_execution(mine.id, organization_id=other)
    client.set_organization_context(other)
    assert client.get_workflow_execution(theirs.id).id == theirs.id
    assert mine.id not in {e.id for e in client.list_workflow_executions(limit=50)}

    with pytest.raises(NotFoundError) as info:
        client.get_workflow_execution(mine.id, organization_id=unique("no-such-org"))
    assert info.value.error_code == "organization_not_found"


def test_error_mapping(client: InternalAPIClient, backend: LiveBackend) -> None:
    execution = client.create_workflow_execution(unique("wf"))
    with pytest.raises(APIValidationError) as bad_status:
        client.update_workflow_execution_status(execution.id, "FINISHED-ISH")
    assert bad_status.value.status == 400 and "FINISHED-ISH" in bad_status.value.detail
    with pytest.raises(APIValidationError) as unknown_field:
        client.update_workflow_execution(execution.id, colour="blue")
    assert "colour" in unknown_field.value.detail
    with pytest.raises(NotFoundError):
        client.get_workflow_execution(str(uuid.uuid4()))

    wrong_key = make_config(backend.url, backend, internal_service_api_key="wrong-key-123")
    with pytest.raises(AuthenticationError) as denied:
        InternalAPIClient(wrong_key).get_workflow_execution(execution.id)
    assert denied.value.status == 401
    assert "wrong-key-123" not in str(denied.value) and backend.api_key not in str(denied.value)


def test_request_id_reaches_the_backend_log(client: InternalAPIClient,
                                            backend: LiveBackend) -> None:
    marker = unique("task")
    with log_context(task_id=marker):
        client.health_check()
    assert marker in backend.logs()
    assert backend.api_key not in backend.logs()


def test_post_retried_after_dropped_response_is_applied_once(backend: LiveBackend) -> None:
    workflow = unique("wf-once")
    with FaultServer(default=Forward(backend.url)) as proxy:
        # The backend creates the execution; the proxy drops its answer; the client retries.
        proxy.push(Forward(backend.url, drop_response=True))
        client = InternalAPIClient(make_config(proxy.url, backend))
        created = client.create_workflow_execution(workflow, total_files=2)
        posts = [r for r in proxy.requests if r.method == "POST"]
        assert len(posts) == 2
        assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]

        proxy.push(Forward(backend.url, drop_response=True))
        moved = client.update_workflow_execution_status(created.id, "IN_PROGRESS", attempts=1)
        assert moved.status == "IN_PROGRESS"

    executions = list(InternalAPIClient(make_config(backend.url, backend))
                      .list_workflow_executions(workflow_id=workflow))
    assert [e.id for e in executions] == [created.id]
    assert executions[0].attempts == 1


def test_webhook_delivery_is_recorded(client: InternalAPIClient, backend: LiveBackend) -> None:
    execution = client.create_workflow_execution(unique("wf"))
    with FaultServer(default=Respond(200, {"received": True})) as receiver:
        config = make_config(backend.url, backend, webhook_allowed_hosts="localhost")
        with InternalAPIClient(config) as hooks:
            result = hooks.send_webhook(f"http://localhost:{receiver.port}/hook",
                                        {"event": "done"}, execution_id=execution.id)
    assert isinstance(result, WebhookResult) and result.ok
    assert receiver.requests[0].json() == {"event": "done"}
    delivery = client.get_webhook_delivery(result.delivery_id)
    assert delivery.outcome == "delivered" and delivery.status_code == 200
    assert delivery.execution_id == execution.id and delivery.attempts == 1
    listed = list(client.list_webhook_deliveries(execution_id=execution.id))
    assert [d.id for d in listed] == [result.delivery_id]
    with pytest.raises(NotFoundError):
        client.get_webhook_delivery(str(uuid.uuid4()))
