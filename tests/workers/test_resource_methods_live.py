"""The execution and webhook-delivery methods of ``InternalAPIClient`` are built on
``Resource`` (``workflow-executions``, ``webhook-deliveries``), against the real backend on
SQLite and PostgreSQL: their reads go through the conditional-GET cache (a repeated read of
an unchanged object is a 304, a read after another process changed it answers the change),
their answers stay typed, the client's own lifecycle writes drop the kept copy, and the
errors raised before sending name the method. Requests are counted by a forwarding proxy;
the other process is a real ``python`` subprocess with a client of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared.api_client import (
    ExecutionStatus,
    InternalAPIClient,
    NotFoundError,
    OrganizationRequiredError,
    PreconditionFailedError,
    WebhookDelivery,
    WorkflowExecution,
)
from backend.workers.shared.config import WorkerConfig
from tests.fault_server import FaultServer, Forward, Respond
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.usefixtures("no_sleep")

REPO_ROOT = Path(__file__).resolve().parents[2]
# Another worker process: runs one client call given as JSON on argv, prints its answer.
OTHER_PROCESS = """
import json, sys
from backend.workers.shared.api_client import InternalAPIClient
from backend.workers.shared.config import WorkerConfig
settings, method, args, kwargs = json.loads(sys.argv[1])
with InternalAPIClient(WorkerConfig(_env_file=None, **settings)) as client:
    answer = getattr(client, method)(*args, **kwargs)
print(json.dumps(answer.model_dump(mode="json") if answer is not None else None))
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> LiveBackend:
    name = "live_backend" if request.param == "sqlite" else "live_backend_pg"
    live: LiveBackend = request.getfixturevalue(name)
    return live


def settings(url: str, backend: LiveBackend, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "internal_service_api_key": backend.api_key,
        "django_app_backend_url": url,
        "organization_id": backend.org_id,
        "worker_name": "resource-methods-worker",
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.1,
        "api_retry_budget_min_per_second": 1000.0,
    }
    values.update(overrides)
    return values


@pytest.fixture
def proxy(backend: LiveBackend) -> Iterator[FaultServer]:
    with FaultServer(default=Forward(backend.url)) as server:
        yield server


@pytest.fixture
def client(proxy: FaultServer, backend: LiveBackend) -> Iterator[InternalAPIClient]:
    with InternalAPIClient(WorkerConfig(_env_file=None, **settings(proxy.url, backend))) as api:
        yield api


def in_other_process(
    proxy: FaultServer, backend: LiveBackend, method: str, *args: Any, **kwargs: Any
) -> Any:
    """``method(*args, **kwargs)`` of a client in another process (its own cache), through
    the same proxy: its decoded answer."""
    call = json.dumps([settings(proxy.url, backend), method, args, kwargs])
    done = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, call],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def gets(proxy: FaultServer) -> list[tuple[str | None, int]]:
    """Each GET answered since the last reset: the ``If-None-Match`` it sent, its status."""
    return [
        (request.headers.get("if-none-match"), status)
        for request, status, _ in proxy.answers
        if request.method == "GET"
    ]


def test_an_execution_read_after_another_process_changed_it_answers_the_change(
    client: InternalAPIClient, proxy: FaultServer, backend: LiveBackend
) -> None:
    created = client.create_workflow_execution(f"wf-rm-{uuid.uuid4().hex[:10]}", total_files=2)
    assert isinstance(created, WorkflowExecution) and created.etag
    proxy.reset()
    first = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(created.etag, 304)]  # the create's answer was kept
    assert isinstance(first, WorkflowExecution) and first == created
    assert first.etag == created.etag and first.status == ExecutionStatus.PENDING

    moved = in_other_process(proxy, backend, "update_workflow_execution_status",
                             created.id, "IN_PROGRESS", attempts=1)
    assert moved["status"] == "IN_PROGRESS"
    proxy.reset()
    read = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(created.etag, 200)]  # revalidated: the kept copy is stale
    assert isinstance(read, WorkflowExecution) and read.status == ExecutionStatus.IN_PROGRESS
    assert read.attempts == 1 and read.started_at is not None
    assert read.etag and read.etag != created.etag

    again = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(created.etag, 200), (read.etag, 304)]
    assert isinstance(again, WorkflowExecution) and again == read and again is not read
    assert again.started_at == read.started_at and again.etag == read.etag

    # A claim by another process changes the answer (its lease): read again in full.
    claim = in_other_process(proxy, backend, "claim_execution", created.id,
                             worker="other:1", lease_seconds=60)
    assert claim["execution"]["lease"]["worker"] == "other:1"
    proxy.reset()
    held = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(read.etag, 200)]
    assert held.lease is not None and held.lease.worker == "other:1"

    in_other_process(proxy, backend, "finish_execution", created.id, "COMPLETED",
                     result={"pages": 3})
    proxy.reset()
    done = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(held.etag, 200)]
    assert done.status == ExecutionStatus.COMPLETED and done.result == {"pages": 3}
    assert done.lease is None and done.finished_at is not None


def test_the_clients_own_writes_never_leave_a_stale_copy(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    created = client.create_workflow_execution(f"wf-rm-{uuid.uuid4().hex[:10]}")
    updated = client.update_workflow_execution(created.id, result={"step": 1})
    proxy.reset()
    read = client.get_workflow_execution(created.id)
    assert gets(proxy) == [(updated.etag, 304)]  # the PATCH's answer was kept
    assert read.result == {"step": 1} and read.etag == updated.etag

    # Lifecycle answers carry no ETag: each drops the kept copy; the next read is in full,
    # then kept again.
    epochs: list[int] = []
    writes: list[Callable[[], Any]] = [
        lambda: client.update_workflow_execution_status(created.id, "QUEUED"),
        lambda: epochs.append(
            client.claim_execution(created.id, worker="me:1", lease_seconds=60).lease.epoch
        ),
        lambda: client.heartbeat_execution(created.id, epochs[-1], lease_seconds=120),
        lambda: client.release_execution(created.id, epochs[-1]),
        lambda: client.claim_execution(created.id, worker="me:2", lease_seconds=60),
        lambda: client.finish_execution(created.id, "COMPLETED", total_files=1),
    ]
    for write in writes:
        write()
        proxy.reset()
        first = client.get_workflow_execution(created.id)
        second = client.get_workflow_execution(created.id)
        assert gets(proxy) == [(None, 200), (first.etag, 304)]
        assert second == first
    assert first.status == ExecutionStatus.COMPLETED and first.total_files == 1

    client.delete_workflow_execution(created.id)
    with pytest.raises(NotFoundError):
        client.get_workflow_execution(created.id)


def test_a_recorded_delivery_is_kept_and_revalidated(
    client: InternalAPIClient, proxy: FaultServer, backend: LiveBackend
) -> None:
    execution = client.create_workflow_execution(f"wf-rm-{uuid.uuid4().hex[:10]}")
    with FaultServer(default=Respond(200, {"received": True})) as receiver:
        config = WorkerConfig(
            _env_file=None, **settings(proxy.url, backend, webhook_allowed_hosts="localhost")
        )
        with InternalAPIClient(config) as hooks:
            result = hooks.send_webhook(
                f"http://localhost:{receiver.port}/hook", {"event": "done"},
                execution_id=execution.id,
            )
    assert result.ok and result.delivery_id
    proxy.reset()
    delivery = client.get_webhook_delivery(result.delivery_id)
    assert [status for _, status in gets(proxy)] == [304]  # the record's answer was kept
    assert isinstance(delivery, WebhookDelivery) and delivery.etag
    assert (delivery.execution_id, delivery.outcome) == (execution.id, "delivered")
    listed = list(client.list_webhook_deliveries(execution.id))
    assert listed == [delivery] and isinstance(listed[0], WebhookDelivery)

    # Deleting its execution changes the delivery (execution_id becomes null) in another
    # process: the next read answers the change, the one after is a 304 again.
    in_other_process(proxy, backend, "delete_workflow_execution", execution.id)
    proxy.reset()
    orphan = client.get_webhook_delivery(result.delivery_id)
    again = client.get_webhook_delivery(result.delivery_id)
    assert gets(proxy) == [(delivery.etag, 200), (orphan.etag, 304)]
    assert orphan.execution_id is None and again == orphan
    assert isinstance(again, WebhookDelivery)


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("get_workflow_execution", lambda c: c.get_workflow_execution(str(uuid.uuid4()))),
        ("list_workflow_executions", lambda c: c.list_workflow_executions()),
        ("create_workflow_execution", lambda c: c.create_workflow_execution("wf")),
        ("update_workflow_execution",
         lambda c: c.update_workflow_execution(str(uuid.uuid4()), result={})),
        ("delete_workflow_execution",
         lambda c: c.delete_workflow_execution(str(uuid.uuid4()))),
        ("claim_execution",
         lambda c: c.claim_execution(str(uuid.uuid4()), worker="w", lease_seconds=5)),
        ("heartbeat_execution", lambda c: c.heartbeat_execution(str(uuid.uuid4()), 1)),
        ("release_execution", lambda c: c.release_execution(str(uuid.uuid4()), 1)),
        ("finish_execution",
         lambda c: c.finish_execution(str(uuid.uuid4()), "COMPLETED")),
        ("get_webhook_delivery", lambda c: c.get_webhook_delivery(str(uuid.uuid4()))),
        ("list_webhook_deliveries", lambda c: c.list_webhook_deliveries()),
        ("send_webhook", lambda c: c.send_webhook("https://example.com/hook", {})),
    ],
)
def test_without_an_organization_the_error_names_the_method(
    proxy: FaultServer,
    backend: LiveBackend,
    operation: str,
    call: Callable[[InternalAPIClient], Any],
) -> None:
    config = WorkerConfig(_env_file=None, **settings(proxy.url, backend, organization_id=None))
    with InternalAPIClient(config) as client, pytest.raises(OrganizationRequiredError) as error:
        call(client)
    assert str(error.value).startswith(f"{operation} is organization-scoped")
    assert proxy.requests == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.update_workflow_execution(str(uuid.uuid4())), ValueError,
         "update_workflow_execution needs at least one field"),
        (lambda c: c.create_workflow_execution("wf", dispatch={"queue": "q"}), ValueError,
         "dispatch must be"),
        (lambda c: c.create_workflow_execution("wf", dispatch="task"), ValueError,
         "dispatch must be"),
        (lambda c: c.get_workflow_execution(""), ValueError, "non-empty"),
        (lambda c: c.get_workflow_execution(5), TypeError, "str or UUID"),
        (lambda c: c.get_workflow_execution("x" * 256), ValueError, "at most 255"),
        (lambda c: c.update_workflow_execution(None, result={}), TypeError, "str or UUID"),
        (lambda c: c.delete_workflow_execution(["x"]), TypeError, "str or UUID"),
        (lambda c: c.get_webhook_delivery("  "), ValueError, "non-empty"),
        (lambda c: c.list_workflow_executions(page_size=0), ValueError, "page_size"),
        (lambda c: c.list_workflow_executions(limit="3"), TypeError, "limit"),
        (lambda c: c.list_webhook_deliveries(page_size=True), TypeError, "page_size"),
        (lambda c: c.list_workflow_executions(status=["COMPLETED"]), TypeError, "status"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(
    client: InternalAPIClient,
    proxy: FaultServer,
    call: Callable[[InternalAPIClient], Any],
    error: type[Exception],
    message: str,
) -> None:
    proxy.reset()
    with pytest.raises(error, match=message):
        call(client)
    assert proxy.requests == []


def test_forget_drops_the_copy_a_generic_call_made_stale(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    created = client.create_workflow_execution(f"wf-rm-{uuid.uuid4().hex[:10]}")
    executions = client.resource("workflow-executions", WorkflowExecution)
    client.patch(f"workflow-executions/{created.id}/", {"result": {"by": "patch"}})
    executions.forget(created.id)
    executions.forget(str(uuid.uuid4()))  # nothing kept: nothing to do
    proxy.reset()
    read = client.get_workflow_execution(created.id)  # the resource's entry, one cache
    assert executions.get(created.id) == read and read.result == {"by": "patch"}
    assert gets(proxy) == [(None, 200), (read.etag, 304)]
    for bad, error in ((5, TypeError), ("", ValueError), ("x" * 256, ValueError)):
        with pytest.raises(error):
            executions.forget(bad)
    with pytest.raises(OrganizationRequiredError, match=r"^workflow-executions\.forget "):
        executions.forget(created.id, organization_id=None)


def test_update_workflow_execution_with_if_match_is_the_conditional_patch(
    client: InternalAPIClient, proxy: FaultServer, backend: LiveBackend
) -> None:
    execution = client.create_workflow_execution(f"wf-{uuid.uuid4().hex[:8]}")
    read = client.get_workflow_execution(execution.id)
    assert read.etag
    updated = client.update_workflow_execution(execution.id, if_match=read.etag, total_files=2)
    assert updated.total_files == 2 and updated.etag and updated.etag != read.etag
    with pytest.raises(PreconditionFailedError):  # that version is gone: nothing applied
        client.update_workflow_execution(execution.id, if_match=read.etag, total_files=9)
    assert in_other_process(proxy, backend, "get_workflow_execution", execution.id)[
        "total_files"] == 2
