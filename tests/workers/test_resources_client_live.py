"""``InternalAPIClient.resource()`` against the real backend: a declared resource's get, list,
create, update, delete and batch, its ETags (``If-Match``: 412 as ``PreconditionFailedError``),
the conditional-GET cache (a second read of an unchanged object is a 304, a changed one is read
again, organizations never share an entry, a forked child starts empty) and hostile arguments.
Requests are counted through a forwarding fault proxy in front of the backend.
"""

from __future__ import annotations

import json
import math
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from backend.workers.shared import _resource
from backend.workers.shared.api_client import (
    APIValidationError,
    ConflictError,
    FileExecution,
    FileStatus,
    InternalAPIClient,
    NotFoundError,
    OrganizationRequiredError,
    PreconditionFailedError,
    Record,
    WorkflowExecution,
)
from backend.workers.shared.config import WorkerConfig
from tests.fault_server import FaultServer, Forward
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.usefixtures("no_sleep")


def make_config(url: str, backend: LiveBackend, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "internal_service_api_key": backend.api_key,
        "django_app_backend_url": url,
        "organization_id": backend.org_id,
        "worker_name": "resource-worker",
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.1,
        "api_retry_budget_min_per_second": 1000.0,
        "_env_file": None,
    }
    values.update(overrides)
    return WorkerConfig(**values)


@pytest.fixture
def proxy(live_backend: LiveBackend) -> Iterator[FaultServer]:
    with FaultServer(default=Forward(live_backend.url)) as server:
        yield server


@pytest.fixture
def client(proxy: FaultServer, live_backend: LiveBackend) -> Iterator[InternalAPIClient]:
    with InternalAPIClient(make_config(proxy.url, live_backend)) as api:
        yield api


def new_execution(client: InternalAPIClient, **kwargs: Any) -> WorkflowExecution:
    return client.create_workflow_execution(f"wf-res-{uuid.uuid4().hex[:10]}", **kwargs)


def answers_to(proxy: FaultServer, method: str) -> list[int]:
    return [status for request, status, _ in proxy.answers if request.method == method]


def test_crud_with_typed_models_and_etags(client: InternalAPIClient) -> None:
    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    created = files.create(execution_id=execution.id, file_name="a.pdf", file_hash="h1")
    assert isinstance(created, FileExecution) and created.status == FileStatus.PENDING
    assert created.execution_id == execution.id and created.etag

    read = files.get(created.id)
    assert read.file_name == "a.pdf" and read.etag == created.etag
    assert list(files.list(execution_id=execution.id)) == [read]  # etag is not compared

    moved = files.update(created.id, if_match=read.etag, status="IN_PROGRESS")
    assert moved.status == "IN_PROGRESS" and moved.etag and moved.etag != read.etag
    with pytest.raises(PreconditionFailedError) as stale:
        files.update(created.id, if_match=read.etag, status="COMPLETED")
    assert stale.value.status == 412 and stale.value.error_code == "precondition_failed"
    assert not stale.value.transient
    assert files.get(created.id).status == "IN_PROGRESS"  # nothing applied
    with pytest.raises(PreconditionFailedError):
        files.delete(created.id, if_match=read.etag)
    with pytest.raises(ConflictError):  # a final status cannot be left
        files.update(files.update(created.id, status="COMPLETED").id, status="PENDING")

    files.delete(created.id, if_match=files.get(created.id).etag)
    with pytest.raises(NotFoundError):
        files.get(created.id)
    again = files.create(execution_id=execution.id, file_name="gone.pdf")
    before = _resource.cached_entries()
    client.delete(f"file-executions/{again.id}/")  # deleted behind the cache's back
    with pytest.raises(NotFoundError):
        files.get(again.id)
    assert _resource.cached_entries() == before - 1  # its kept copy is dropped
    counts = client.get_workflow_execution(execution.id)
    assert (counts.total_files, counts.successful_files) == (0, 0)


def test_plain_records_when_no_model_is_given(client: InternalAPIClient) -> None:
    execution = new_execution(client)
    files = client.resource("file-executions")
    created = files.create(execution_id=execution.id, file_name="b.txt")
    assert isinstance(created, Record) and isinstance(created, dict)
    assert created["file_name"] == "b.txt" and created.etag
    listed = list(files.list(execution_id=execution.id))
    assert listed == [created] and listed[0].etag is None  # a list answers no object's ETag


def test_list_pages_and_filters(client: InternalAPIClient, proxy: FaultServer) -> None:
    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    made = files.batch([{"execution_id": execution.id, "file_name": f"f{i}"} for i in range(7)])
    files.update(made[0].id, status=FileStatus.SKIPPED)
    proxy.reset()
    listed = files.list(execution_id=uuid.UUID(execution.id), page_size=3)
    assert proxy.requests == []  # lazy
    assert sorted(f.file_name for f in listed) == [f"f{i}" for i in range(7)]
    assert len(proxy.requests) == 3
    assert [f.id for f in files.list(execution_id=execution.id, status=FileStatus.SKIPPED)] == [
        made[0].id
    ]
    assert len(list(files.list(limit=2, execution_id=execution.id, status=None))) == 2
    deliveries = client.resource("webhook-deliveries")
    assert list(deliveries.list(execution_id=execution.id)) == []


def test_batch_records_an_executions_files_in_one_call(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    execution = new_execution(client, total_files=99)
    files = client.resource("file-executions", FileExecution)
    proxy.reset()
    made = files.batch([{"execution_id": execution.id, "file_name": f"x{i}"} for i in range(3)])
    assert [f.file_name for f in made] == ["x0", "x1", "x2"]
    assert all(isinstance(f, FileExecution) and f.etag is None for f in made)
    outcomes = ["COMPLETED", "ERROR", "SKIPPED"]
    done = files.batch(
        [{"id": f.id, "status": s} for f, s in zip(made, outcomes, strict=True)],
        idempotency_key=f"files-{execution.id}",
    )
    assert [f.status for f in done] == outcomes
    assert [r.method for r in proxy.requests] == ["POST", "POST"]
    counts = client.get_workflow_execution(execution.id)
    assert (counts.total_files, counts.successful_files, counts.failed_files) == (3, 1, 1)

    with pytest.raises(APIValidationError) as bad:  # all or nothing
        files.batch([{"id": made[0].id, "error_message": "x"}, {"id": str(uuid.uuid4())}])
    assert "items[1].id" in bad.value.detail
    assert files.get(made[0].id).error_message == ""
    assert files.batch([]) == []
    with pytest.raises(NotFoundError):  # a resource declared without batch/
        client.resource("webhook-deliveries").batch([{"url": "http://x"}])


def test_a_second_read_of_an_unchanged_object_is_a_304(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    created = files.create(execution_id=execution.id, file_name="c.pdf", result={"pages": [1]})
    proxy.reset()
    first = files.get(created.id)
    second = files.get(created.id)
    assert answers_to(proxy, "GET") == [304, 304]  # the create's answer was kept already
    assert proxy.requests[0].headers["if-none-match"] == created.etag
    assert second == first and second.result == {"pages": [1]} and second.etag == created.etag
    assert second is not first and second.result is not first.result

    # Changed behind the cache's back (a generic PATCH): the next get reads it again.
    client.patch(f"file-executions/{created.id}/", {"file_hash": "changed"})
    proxy.reset()
    again = files.get(created.id)
    assert answers_to(proxy, "GET") == [200]
    assert again.file_hash == "changed" and again.etag != created.etag
    assert files.get(created.id).file_hash == "changed"
    assert answers_to(proxy, "GET") == [200, 304]

    as_record = client.resource("file-executions").get(created.id)  # the same entry, a dict
    assert isinstance(as_record, Record) and as_record["file_hash"] == "changed"
    assert answers_to(proxy, "GET") == [200, 304, 304]


def test_organizations_never_share_a_cache_entry(
    client: InternalAPIClient, proxy: FaultServer, live_backend: LiveBackend
) -> None:
    other_org = live_backend.create_organization(f"org-res-{uuid.uuid4().hex[:8]}")
    other = InternalAPIClient(make_config(proxy.url, live_backend, organization_id=other_org))
    execution = new_execution(client)
    mine = client.resource("file-executions").create(execution_id=execution.id, file_name="m")
    proxy.reset()
    with pytest.raises(NotFoundError):
        other.resource("file-executions").get(mine["id"])
    with pytest.raises(NotFoundError):
        client.resource("file-executions").get(mine["id"], organization_id=other_org)
    assert [r.headers.get("if-none-match") for r in proxy.requests] == [None, None]
    assert answers_to(proxy, "GET") == [404, 404]
    assert client.resource("file-executions").get(mine["id"]) == mine  # still cached for mine
    assert answers_to(proxy, "GET") == [404, 404, 304]


def test_errors_are_never_cached(client: InternalAPIClient, proxy: FaultServer) -> None:
    files = client.resource("file-executions")
    missing = str(uuid.uuid4())
    before = _resource.cached_entries()
    for _ in range(2):
        with pytest.raises(NotFoundError):
            files.get(missing)
    assert _resource.cached_entries() == before
    assert all("if-none-match" not in r.headers for r in proxy.requests)


def in_child(report: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child runs ``report`` and sends its JSON back; the child's answer."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        signal.alarm(20)
        try:
            os.close(read)
            os.write(write, json.dumps(report()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer, "the child reported nothing"
    return dict(json.loads(answer))


def test_a_forked_child_starts_with_an_empty_cache(client: InternalAPIClient) -> None:
    execution = new_execution(client)
    client.resource("file-executions").create(execution_id=execution.id, file_name="fork")
    assert _resource.cached_entries() > 0
    assert in_child(lambda: {"entries": _resource.cached_entries()}) == {"entries": 0}


def test_the_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = _resource._Cache()
    for i in range(_resource.CACHE_ENTRIES + 10):
        cache.put(("u", "org", f"p{i}"), f"e{i}", f'{{"i": {i}}}')
        if i == _resource.CACHE_ENTRIES - 1:  # full: the oldest, used now, is kept
            assert cache.get(("u", "org", "p0")) == ("e0", '{"i": 0}')
    assert len(cache.entries) == _resource.CACHE_ENTRIES
    kept = [n for n in range(12) if cache.get(("u", "org", f"p{n}")) is not None]
    assert kept == [0, 11]
    assert cache.get(("u", "other-org", "p20")) is None


def test_the_cache_bounds_the_text_it_keeps() -> None:
    cache = _resource._Cache()
    largest = _resource.CACHE_CHARS // 16
    cache.put(("u", "org", "small"), "e0", "{}")
    cache.put(("u", "org", "huge"), "e1", "x" * (largest + 1))  # not kept
    assert cache.get(("u", "org", "huge")) is None
    cache.put(("u", "org", "small"), "e2", "x" * (largest + 1))  # a newer, too large version
    assert cache.get(("u", "org", "small")) is None  # the older one is not answered either
    for i in range(20):  # 20 of the largest kept bodies hold more than the cache's total
        cache.put(("u", "org", f"p{i}"), f"e{i}", "y" * largest)
    assert cache.chars <= _resource.CACHE_CHARS
    assert cache.chars == sum(len(body) for _, body in cache.entries.values())
    kept = [i for i in range(20) if cache.get(("u", "org", f"p{i}")) is not None]
    assert kept == list(range(4, 20))  # the oldest four dropped
    for i in range(20):
        cache.forget(("u", "org", f"p{i}"))
    assert cache.chars == 0 and not cache.entries


class NotAResult(BaseModel):
    x: int = 0


@pytest.mark.parametrize(
    ("name", "model", "error"),
    [
        ("", None, ValueError),
        ("File-Executions", None, ValueError),
        ("../health", None, ValueError),
        ("file-executions/", None, ValueError),
        ("a b", None, ValueError),
        ("fichiers-é", None, ValueError),
        ("-x", None, ValueError),
        (5, None, ValueError),
        (None, None, ValueError),
        ("file-executions", dict, TypeError),
        ("file-executions", NotAResult, TypeError),
        ("file-executions", FileExecution(id="1", execution_id="2", file_name="f"), TypeError),
    ],
)
def test_hostile_resource_names_and_models(
    client: InternalAPIClient, name: Any, model: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        client.resource(name, model)


A_UUID = str(uuid.uuid4())
HOSTILE_IDS: list[tuple[Any, type[Exception]]] = [
    ("", ValueError),
    ("   ", ValueError),
    (None, TypeError),
    (5, TypeError),
    (2.5, TypeError),
    (["x"], TypeError),
    (b"abc", TypeError),
    (".", ValueError),  # a dot segment httpx would drop: the list endpoint would answer
    ("..", ValueError),
    (".hidden", ValueError),
    ("../../health", ValueError),
    (f"{A_UUID}/events", ValueError),  # decoded by the server: the events endpoint
    (f"{A_UUID}/claim", ValueError),
    ("a\\b", ValueError),
    ("%2e", ValueError),
    ("%2e%2e", ValueError),
    ("%2F", ValueError),
    ("\uff0e\uff0e", ValueError),  # fullwidth full stops
    ("\u2024", ValueError),  # one dot leader
    ("caf\u00e9", ValueError),
    ("a b", ValueError),
    ("a\x00b", ValueError),
    ("a\r\nX-Evil: 1", ValueError),
    ("a?b=c", ValueError),
    ("a#b", ValueError),
    ("x" * 256, ValueError),
    ("x" * 5000, ValueError),
    ("not-a-uuid", NotFoundError),
    ("x" * 255, NotFoundError),
    (A_UUID, NotFoundError),
    (uuid.UUID(A_UUID), NotFoundError),
]


@pytest.mark.parametrize(("object_id", "error"), HOSTILE_IDS)
def test_hostile_ids(
    client: InternalAPIClient, proxy: FaultServer, object_id: Any, error: type[Exception]
) -> None:
    files = client.resource("file-executions")
    calls: list[Callable[[], Any]] = [
        lambda: files.get(object_id),
        lambda: files.update(object_id, file_hash="x"),
        lambda: files.delete(object_id),
    ]
    if error is not NotFoundError:
        calls += [
            lambda: files.forget(object_id),
            lambda: files.batch([{"id": object_id, "file_hash": "x"}]),
        ]
    for call in calls:
        with pytest.raises(error, match=None if error is NotFoundError else "id"):
            call()
    if error is not NotFoundError:
        assert proxy.requests == []  # refused before anything was sent (nothing cached)
        return
    # What answered is the object's own endpoint: the backend saw that one path, and
    # answered each call with its 404.
    wanted = f"/internal/v1/file-executions/{object_id}/"
    assert [r.path.split("?")[0] for r in proxy.requests] == [wanted] * 3
    assert [status for _, status, _ in proxy.answers] == [404] * 3


@pytest.mark.parametrize(("execution_id", "error"), HOSTILE_IDS)
def test_hostile_execution_ids(
    client: InternalAPIClient, proxy: FaultServer, execution_id: Any, error: type[Exception]
) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.get_workflow_execution(execution_id),
        lambda: client.update_workflow_execution(execution_id, result={}),
        lambda: client.delete_workflow_execution(execution_id),
        lambda: client.list_execution_events(execution_id),
        lambda: client.claim_execution(execution_id, worker="w", lease_seconds=5),
        lambda: client.heartbeat_execution(execution_id, 1),
        lambda: client.release_execution(execution_id, 1),
        lambda: client.update_workflow_execution_status(execution_id, "IN_PROGRESS"),
        lambda: client.finish_execution(execution_id, "COMPLETED"),
    ]
    if execution_id is not None:  # None names no execution: the write is simply unfenced
        calls.append(
            lambda: client.resource("file-executions").update(
                A_UUID, for_execution=execution_id, file_hash="x"
            )
        )
    for call in calls:
        if error is NotFoundError:
            with pytest.raises(NotFoundError):
                call()
            continue
        with pytest.raises(error, match=r"execution_id|for_execution"):
            call()
    if error is not NotFoundError:
        assert proxy.requests == []
        return
    # Every call reached its own endpoint of that execution, and the answer was its 404.
    paths = [r.path.split("?")[0] for r in proxy.requests]
    base = f"/internal/v1/workflow-executions/{execution_id}/"
    assert paths[:3] == [base] * 3
    assert paths[3:-1] == [
        base + action + "/"
        for action in ("events", "claim", "heartbeat", "release", "status", "status")
    ]
    assert {status for _, status, _ in proxy.answers} == {404}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"page_size": 0}, ValueError),
        ({"page_size": 501}, ValueError),
        ({"page_size": 10**12}, ValueError),
        ({"page_size": -1}, ValueError),
        ({"page_size": "10"}, TypeError),
        ({"page_size": 2.5}, TypeError),
        ({"page_size": True}, TypeError),
        ({"limit": -1}, ValueError),
        ({"limit": "3"}, TypeError),
        ({"limit": 1.5}, TypeError),
        ({"cursor": "abc"}, ValueError),
        ({"Bad-Name": "x"}, ValueError),
        ({"status": ["COMPLETED"]}, TypeError),
        ({"status": {"a": 1}}, TypeError),
        ({"execution_id": 2.5}, TypeError),
        ({"execution_id": "y" * 200_000}, ValueError),
        ({"file_name": "y" * 1025}, ValueError),
    ],
)
def test_hostile_list_arguments(
    client: InternalAPIClient, proxy: FaultServer, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error) as refused:
        client.resource("file-executions").list(**kwargs)  # refused now, not on first next()
    assert proxy.requests == []
    assert len(str(refused.value)) < 300  # a huge value is shown shortened


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"status": "FINISHED"}, "status"),
        ({"execution_id": "not-a-uuid"}, "execution_id"),
    ],
)
def test_bad_filter_values_are_the_backends_400(
    client: InternalAPIClient, params: dict[str, Any], detail: str
) -> None:
    with pytest.raises(APIValidationError) as bad:
        list(client.resource("file-executions").list(**params))
    assert detail in bad.value.detail


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"file_name": 123}, APIValidationError),
        ({"file_name": ""}, APIValidationError),
        ({"file_name": "x" * 2000}, APIValidationError),
        ({"file_name": "f", "status": "DONE"}, APIValidationError),
        ({"file_name": "f", "bogus": 1}, APIValidationError),
        ({"file_name": "f", "execution_time": math.nan}, ValueError),
        ({"file_name": "f", "execution_time": "slow"}, APIValidationError),
    ],
)
def test_hostile_create_fields(
    client: InternalAPIClient, fields: dict[str, Any], error: type[Exception]
) -> None:
    execution = new_execution(client)
    with pytest.raises(error):
        client.resource("file-executions").create(execution_id=execution.id, **fields)
    assert client.get_workflow_execution(execution.id).total_files == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r, i: r.update(i), ValueError),  # nothing to change
        (lambda r, i: r.update(i, if_match=5, file_hash="x"), TypeError),
        (lambda r, i: r.update(i, if_match="", file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match="a\nb", file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='"nope"', file_hash="x"), PreconditionFailedError),
        (lambda r, i: r.delete(i, if_match='"nope"'), PreconditionFailedError),
        (lambda r, i: r.update(i, execution_id=str(uuid.uuid4())), APIValidationError),
        (lambda r, i: r.batch({"items": []}), TypeError),
        (lambda r, i: r.batch(["x"]), TypeError),
        (lambda r, i: r.batch([{"id": i}] * 501), ValueError),
        (lambda r, i: r.batch([{"id": i, "status": "DONE"}]), APIValidationError),
        (lambda r, i: r.batch([{"id": 5}]), TypeError),
        (lambda r, i: r.create(idempotency_key="k" * 300, file_name="f"), ValueError),
        (lambda r, i: r.update(i, if_match="x" * 200_000, file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='"' + "x" * 1100 + '"', file_hash="x"), ValueError),
        (lambda r, i: r.delete(i, if_match="x" * 200_000), ValueError),
        (lambda r, i: r.update(i, if_match="nope", file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='"a"\r\nX: y', file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='"a" b', file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='w/"a"', file_hash="x"), ValueError),
        (lambda r, i: r.update(i, if_match='"\u00e9"', file_hash="x"), ValueError),
        (lambda r, i: r.delete(i, if_match='W/"nope"'), PreconditionFailedError),
        (lambda r, i: r.batch([{"id": i, "file_hash": "x"}], for_execution="../x"), ValueError),
        (lambda r, i: r.update(i, for_execution=5, file_hash="x"), TypeError),
    ],
)
def test_hostile_writes(
    client: InternalAPIClient, call: Callable[[Any, str], Any], error: type[Exception]
) -> None:
    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    made = files.create(execution_id=execution.id, file_name="keep")
    with pytest.raises(error) as raised:
        call(files, made.id)
    assert len(str(raised.value)) < 400  # a huge value is shown shortened
    after = files.get(made.id)
    assert (after.file_name, after.file_hash, after.status) == ("keep", "", "PENDING")


def test_calls_need_an_organization(proxy: FaultServer, live_backend: LiveBackend) -> None:
    files = InternalAPIClient(make_config(proxy.url, live_backend, organization_id=None)).resource(
        "file-executions"
    )
    for call in (
        lambda: files.get(str(uuid.uuid4())),
        lambda: files.list(),
        lambda: files.create(file_name="x"),
        lambda: files.batch([{"file_name": "x"}]),
    ):
        with pytest.raises(OrganizationRequiredError):
            call()
    assert proxy.requests == []


def test_file_writes_naming_the_held_execution_are_fenced_by_its_lease(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    from backend.workers.shared._fencing import holding_lease
    from backend.workers.shared.api_client import LeaseLostError

    execution = new_execution(client)
    lost = client.claim_execution(execution.id, worker="w:1", lease_seconds=60).lease.epoch
    client.release_execution(execution.id, lost)
    current = client.claim_execution(execution.id, worker="w:2", lease_seconds=60).lease.epoch
    files = client.resource("file-executions", FileExecution)
    item = {"execution_id": execution.id, "file_name": "late.pdf"}
    with holding_lease(execution.id, lost):
        with pytest.raises(LeaseLostError):
            files.batch([item])
        with pytest.raises(LeaseLostError):
            files.create(**item)
    assert list(files.list(execution_id=execution.id)) == []  # nothing was written
    proxy.reset()
    with holding_lease(execution.id, current):
        assert files.batch([item])[0].file_name == "late.pdf"
    assert [r.headers.get("x-lease-epoch") for r in proxy.requests] == [str(current)]
    unheld = files.batch([{"execution_id": execution.id, "file_name": "free.pdf"}])
    assert unheld[0].file_name == "free.pdf"  # no lease held here: the write is not fenced


def test_writes_of_an_executions_files_by_id_are_fenced_with_for_execution(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    """``for_execution=`` says the objects are the files of that execution: an id-only
    batch, an update and a delete under a lost lease raise ``LeaseLostError`` and change
    nothing; under the live lease they apply, each carrying its epoch."""
    from backend.workers.shared._fencing import holding_lease
    from backend.workers.shared.api_client import LeaseLostError

    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    first, second, third = files.batch(
        [{"execution_id": execution.id, "file_name": name} for name in ("a", "b", "c")]
    )
    lost = client.claim_execution(execution.id, worker="w:1", lease_seconds=60).lease.epoch
    client.release_execution(execution.id, lost)
    current = client.claim_execution(execution.id, worker="w:2", lease_seconds=60).lease.epoch
    writes: list[Callable[[], Any]] = [
        lambda: files.batch(
            [{"id": first.id, "status": "COMPLETED"}], for_execution=execution.id
        ),
        lambda: files.update(
            second.id, for_execution=uuid.UUID(execution.id), status="ERROR", error_message="z"
        ),
        lambda: files.delete(third.id, for_execution=execution.id),
    ]
    with holding_lease(execution.id, lost):
        for write in writes:
            with pytest.raises(LeaseLostError):
                write()
    stored = {f.file_name: f.status for f in files.list(execution_id=execution.id)}
    assert stored == {"a": "PENDING", "b": "PENDING", "c": "PENDING"}  # nothing changed
    proxy.reset()
    with holding_lease(execution.id, current):
        for write in writes:
            write()
    assert [r.headers.get("x-lease-epoch") for r in proxy.requests] == [str(current)] * 3
    stored = {f.file_name: f.status for f in files.list(execution_id=execution.id)}
    assert stored == {"a": "COMPLETED", "b": "ERROR"}


def test_a_batch_is_fenced_only_when_every_item_is_the_held_executions(
    client: InternalAPIClient, proxy: FaultServer
) -> None:
    """Under a live lease on A, a batch of a create for A and an update of a file of B (by
    id) carries no epoch (the backend would fence B's file by B's lease and refuse it); one
    whose items all name A carries A's; ``for_execution=A`` with an item naming B is a
    ``ValueError`` before anything is sent."""
    from backend.workers.shared._fencing import holding_lease

    a, b = new_execution(client), new_execution(client)
    files = client.resource("file-executions", FileExecution)
    of_b = files.create(execution_id=b.id, file_name="b1")
    epoch = client.claim_execution(a.id, worker="w:a", lease_seconds=60).lease.epoch
    proxy.reset()
    with holding_lease(a.id, epoch):
        mixed = files.batch(
            [{"execution_id": a.id, "file_name": "a1"}, {"id": of_b.id, "status": "COMPLETED"}]
        )
        assert [f.file_name for f in mixed] == ["a1", "b1"]
        files.batch([{"execution_id": a.id, "file_name": "a2"}] * 2)
        with pytest.raises(ValueError, match="for_execution"):
            files.batch([{"execution_id": b.id, "file_name": "b2"}], for_execution=a.id)
    assert [r.headers.get("x-lease-epoch") for r in proxy.requests] == [None, str(epoch)]
    assert files.get(of_b.id).status == "COMPLETED"


NAME = uuid.uuid4()


@pytest.mark.parametrize(
    "write",
    [
        lambda files, eid, fid: files.create(execution_id=uuid.UUID(eid), file_name=NAME),
        lambda files, eid, fid: files.batch([{"execution_id": uuid.UUID(eid), "file_name": NAME}]),
        lambda files, eid, fid: files.update(fid, file_name=NAME),
        lambda files, eid, fid: files.batch([{"id": uuid.UUID(fid), "file_name": NAME}]),
    ],
)
def test_uuid_field_values_are_sent_as_their_text(
    client: InternalAPIClient, write: Callable[[Any, str, str], Any]
) -> None:
    """A ``UUID`` value of a field is sent as its text, as a filter's is."""
    execution = new_execution(client)
    files = client.resource("file-executions", FileExecution)
    made = files.create(execution_id=execution.id, file_name="f")
    write(files, execution.id, made.id)
    assert str(NAME) in {f.file_name for f in files.list(execution_id=execution.id)}
