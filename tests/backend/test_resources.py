"""Declared resources (``backend.internal_api.resources``) through Django's test client: file
executions and their batches, the execution's file counts, versions (ETag, 304, 412) on
every declared resource and on workflow executions.

Runs on SQLite here and on PostgreSQL through ``test_api_postgres.py``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from backend.internal_api.models import FileExecution, WorkflowExecution
from tests.backend.conftest import Api

pytestmark = pytest.mark.django_db


def error_of(response: Any) -> tuple[int, str]:
    """Status and error code of an error answer, after checking the error shape."""
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    return response.status_code, body["error"]


def execution(api: Api, **fields: Any) -> str:
    response = api.call("POST", "workflow-executions/", {"workflow_id": "wf", **fields})
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def add_file(api: Api, execution_id: str, **fields: Any) -> dict[str, Any]:
    body = {"execution_id": execution_id, "file_name": "a.pdf", **fields}
    response = api.call("POST", "file-executions/", body)
    assert response.status_code == 201, response.content
    return dict(response.json())


def counts(api: Api, execution_id: str) -> tuple[int, int, int]:
    found = api.call("GET", f"workflow-executions/{execution_id}/").json()
    return found["total_files"], found["successful_files"], found["failed_files"]


def batch(api: Api, items: Any, **headers: str) -> Any:
    return batch_of(api, "file-executions", items, **headers)


def batch_of(api: Api, resource: str, items: Any, **headers: str) -> Any:
    return api.call(
        "POST", f"{resource}/batch/", {"items": items}, headers={**api.headers(), **headers}
    )


def stored(api: Api) -> Any:
    """The organization's files and executions as stored (to prove nothing was written)."""
    files = list(FileExecution.objects.filter(organization_id=api.org_id).order_by("pk").values())
    executions = WorkflowExecution.objects.filter(organization_id=api.org_id).order_by("pk")
    return files, list(executions.values())


# --- file executions, one at a time ----------------------------------------------------------


def test_create_read_update_delete_and_the_counts_follow(api: Api) -> None:
    eid = execution(api, total_files=9)
    created = add_file(api, eid, file_hash="h1", result={"pages": 3})
    assert created["status"] == "PENDING" and created["organization_id"] == api.org_id
    assert (created["execution_id"], created["file_hash"]) == (eid, "h1")
    assert counts(api, eid) == (1, 0, 0)  # total_files follows the files, whatever was declared
    other = add_file(api, eid, file_name="b.pdf", status="ERROR", error_message="bad")
    assert counts(api, eid) == (2, 0, 1)
    read = api.call("GET", f"file-executions/{created['id']}/")
    assert read.status_code == 200 and read.json() == created
    patched = api.call(
        "PATCH", f"file-executions/{created['id']}/", {"status": "COMPLETED", "execution_time": 1.5}
    )
    assert patched.status_code == 200, patched.content
    assert (patched.json()["status"], patched.json()["execution_time"]) == ("COMPLETED", 1.5)
    assert counts(api, eid) == (2, 1, 1)
    assert api.call("DELETE", f"file-executions/{other['id']}/").status_code == 204
    assert counts(api, eid) == (1, 1, 0)
    assert error_of(api.call("GET", f"file-executions/{other['id']}/")) == (404, "not_found")


def test_status_moves_forward_only(api: Api) -> None:
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    for status, code in [
        ("IN_PROGRESS", 200),
        ("IN_PROGRESS", 200),  # the status it has: a no-op
        ("PENDING", 409),
        ("SKIPPED", 200),
        ("COMPLETED", 409),
    ]:
        response = api.call("PATCH", f"file-executions/{file_id}/", {"status": status})
        assert response.status_code == code, (status, response.content)
        if code == 409:
            assert error_of(response) == (409, "illegal_transition")


def test_list_filters_and_cursor_pages(api: Api) -> None:
    first, second = execution(api), execution(api)
    ids = [add_file(api, first, file_name=f"f{i}")["id"] for i in range(5)]
    add_file(api, second, status="COMPLETED")
    page = api.call("GET", f"file-executions/?execution_id={first}&limit=2").json()
    seen = [row["id"] for row in page["results"]]
    while page["next_cursor"]:
        cursor = page["next_cursor"]
        page = api.call("GET", f"file-executions/?execution_id={first}&limit=2&cursor={cursor}")
        page = page.json()
        seen += [row["id"] for row in page["results"]]
    assert seen == ids[::-1]
    completed = api.call("GET", "file-executions/?status=COMPLETED").json()["results"]
    assert [row["execution_id"] for row in completed] == [second]
    for query in ("status=DONE", "execution_id=nope", "limit=501", "cursor=xyz"):
        response = api.call("GET", f"file-executions/?{query}")
        assert response.status_code == 400, query
        assert response.json()["detail"].startswith(query.split("=")[0]), response.json()


def test_scoping_fails_closed(api: Api, make_org: Any) -> None:
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    other = make_org()
    before = stored(api)
    for method, path, body in [
        ("GET", f"file-executions/{file_id}/", None),
        ("PATCH", f"file-executions/{file_id}/", {"status": "ERROR"}),
        ("DELETE", f"file-executions/{file_id}/", None),
    ]:
        assert error_of(api.call(method, path, body, org_id=other)) == (404, "not_found")
    assert api.call("GET", "file-executions/", org_id=other).json()["results"] == []
    # Another organization's execution named in a create or a batch item: 400, nothing written.
    response = api.call(
        "POST", "file-executions/", {"execution_id": eid, "file_name": "x"}, org_id=other
    )
    assert error_of(response) == (400, "validation_error")
    assert response.json()["detail"] == "execution_id: no such workflow execution"
    response = api.call(
        "POST",
        "file-executions/batch/",
        {"items": [{"id": file_id, "status": "ERROR"}]},
        org_id=other,
    )
    assert error_of(response) == (400, "validation_error")
    assert response.json()["detail"] == "items[0].id: no such file execution"
    assert stored(api) == before
    headers = {"Authorization": f"Bearer {api.api_key}"}
    for method, path, body in [
        ("GET", "file-executions/", None),
        ("POST", "file-executions/batch/", {"items": []}),
    ]:
        response = api.call(method, path, body, headers=headers)
        assert error_of(response) == (400, "organization_required")


# --- batches ---------------------------------------------------------------------------------


def test_a_batch_creates_and_updates_in_item_order_and_the_counts_follow(api: Api) -> None:
    eid = execution(api)
    items = [{"execution_id": eid, "file_name": f"f{i}"} for i in range(4)]
    created = batch(api, items)
    assert created.status_code == 200, created.content
    files = created.json()["results"]
    assert [f["file_name"] for f in files] == ["f0", "f1", "f2", "f3"]
    assert counts(api, eid) == (4, 0, 0)
    updates = [
        {"id": files[0]["id"], "status": "COMPLETED", "result": {"ok": True}},
        {"id": files[1]["id"], "status": "ERROR", "error_message": "boom"},
        {"id": files[2]["id"], "status": "SKIPPED"},
        {"execution_id": eid, "file_name": "late", "status": "COMPLETED"},
    ]
    answer = batch(api, updates).json()["results"]
    assert [f["status"] for f in answer] == ["COMPLETED", "ERROR", "SKIPPED", "COMPLETED"]
    assert answer[0]["result"] == {"ok": True} and answer[1]["error_message"] == "boom"
    assert answer[0]["modified_at"] > files[0]["modified_at"]
    assert counts(api, eid) == (5, 2, 1)
    for row in answer:
        again = api.call("GET", f"file-executions/{row['id']}/").json()
        assert json.dumps(again, sort_keys=True) == json.dumps(row, sort_keys=True)


def test_one_bad_item_writes_nothing_and_is_named(api: Api, make_org: Any) -> None:
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    theirs = make_org()
    their_execution = Api(api.client, api.api_key, theirs)
    foreign = execution(their_execution)
    good = {"execution_id": eid, "file_name": "ok"}
    cases: list[tuple[Any, int, str]] = [
        ([good, {"execution_id": eid}], 400, "items[1].file_name: "),
        ([good, {"execution_id": eid, "file_name": "x", "status": "DONE"}], 400, "items[1].status"),
        ([good, good, {"id": file_id, "execution_id": eid}], 400, "items[2].execution_id: "),
        ([good, {"id": "nope", "status": "ERROR"}], 400, "items[1].id: must be a UUID"),
        # A null id is a bad id (its look-up failed), never a create of a new object.
        ([good, {"id": None, **good}], 400, "items[1].id: must be a UUID"),
        ([good, {"id": 7, "status": "ERROR"}], 400, "items[1].id: must be a UUID"),
        ([good, {"id": str(uuid.uuid4())}], 400, "items[1].id: no such file execution"),
        (
            [good, {"execution_id": foreign, "file_name": "x"}],
            400,
            "items[1].execution_id: no such",
        ),
        ([good, "x"], 400, "items[1]: must be an object"),
        ([good, {"execution_id": eid, "file_name": "x", "size": 1}], 400, "items[1].size: "),
        (
            [{"id": file_id, "status": "COMPLETED"}, {"id": file_id, "status": "PENDING"}],
            409,
            "items[1].status: cannot change status from COMPLETED to PENDING",
        ),
        ([good] * 501, 400, "items: "),
        ("not a list", 400, "items: "),
        ({"0": good}, 400, "items: "),
        (None, 400, "items: "),
    ]
    before = stored(api)
    for items, code, detail in cases:
        response = batch(api, items)
        assert response.status_code == code, (items, response.content)
        assert response.json()["detail"].startswith(detail), response.json()
        assert stored(api) == before, detail
    for body in ({}, {"items": [], "more": 1}, [good]):
        response = api.call("POST", "file-executions/batch/", body)
        assert error_of(response) == (400, "validation_error"), body
    assert stored(api) == before
    assert counts(api, eid) == (1, 0, 0)


def test_a_batch_of_500_is_one_transaction(api: Api) -> None:
    eid = execution(api)
    items = [{"execution_id": eid, "file_name": f"f{i}", "file_hash": "h" * 64} for i in range(500)]
    response = batch(api, items)
    assert response.status_code == 200 and len(response.json()["results"]) == 500
    ids = [row["id"] for row in response.json()["results"]]
    updates = [{"id": i, "status": "COMPLETED" if n % 2 else "ERROR"} for n, i in enumerate(ids)]
    assert batch(api, updates).status_code == 200
    assert counts(api, eid) == (500, 250, 250)


def test_a_batch_is_idempotent_with_its_key(api: Api) -> None:
    eid = execution(api)
    items = [{"execution_id": eid, "file_name": "once"}]
    first = batch(api, items, **{"Idempotency-Key": "batch-1"})
    again = batch(api, items, **{"Idempotency-Key": "batch-1"})
    assert first.status_code == again.status_code == 200
    assert again["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert counts(api, eid) == (1, 0, 0)
    other = batch(api, [*items, *items], **{"Idempotency-Key": "batch-1"})
    assert error_of(other) == (422, "idempotency_key_reused")


@pytest.mark.parametrize("write", ["file", "batch", "execution", "delivery", "status"])
def test_a_replayed_post_answers_the_headers_of_the_first(api: Api, write: str) -> None:
    eid = execution(api)
    path, body = {
        "file": ("file-executions/", {"execution_id": eid, "file_name": "a"}),
        "batch": ("file-executions/batch/", {"items": [{"execution_id": eid, "file_name": "a"}]}),
        "execution": ("workflow-executions/", {"workflow_id": "wf"}),
        "delivery": ("webhook-deliveries/", {"url": "https://r.example/h", "outcome": "failed"}),
        "status": (f"workflow-executions/{eid}/status/", {"status": "IN_PROGRESS"}),
    }[write]
    headers = {**api.headers(), "Idempotency-Key": f"replay-{write}"}
    first = api.call("POST", path, body, headers=headers)
    assert first.status_code in (200, 201), first.content
    # The object moves on meanwhile: the replay is still the first answer, headers included.
    api.call("POST", f"workflow-executions/{eid}/status/", {"status": "COMPLETED"})
    again = api.call("POST", path, body, headers=headers)
    assert again["Idempotent-Replayed"] == "true"
    assert (again.status_code, again.content) == (first.status_code, first.content)
    for name in ("ETag", "Content-Type"):
        assert again.get(name) == first.get(name), name
    assert first.has_header("ETag") == (write != "status")
    # A precondition on the repeat is refused as on any POST, not replayed past.
    for header, value in (("If-Match", '"x"'), ("If-Match", "*"), ("If-None-Match", "*")):
        refused = api.call("POST", path, body, headers={**headers, header: value})
        assert error_of(refused) == (400, "validation_error"), (header, refused.content)
        assert refused.json()["detail"].startswith(f"{header}: POST "), refused.content
        assert not refused.has_header("Idempotent-Replayed")
    assert api.call("POST", path, body, headers=headers)["Idempotent-Replayed"] == "true"


# --- versions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "file-executions/{file}/",
        "file-executions/",
        "file-executions/?execution_id={execution}",
        "workflow-executions/{execution}/",
        "webhook-deliveries/{delivery}/",
        "webhook-deliveries/",
    ],
)
def test_every_read_has_an_etag_and_a_current_copy_costs_a_304(api: Api, path: str) -> None:
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    delivery = api.call(
        "POST", "webhook-deliveries/", {"url": "https://r.example/h", "outcome": "failed"}
    ).json()
    url = path.format(file=file_id, execution=eid, delivery=delivery["id"])
    first = api.call("GET", url)
    etag = first["ETag"]
    assert first.status_code == 200 and etag.startswith('"') and etag.endswith('"')
    for presented in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        cached = api.call("GET", url, headers={**api.headers(), "If-None-Match": presented})
        assert (cached.status_code, cached.content, cached["ETag"]) == (304, b"", etag)
    stale = api.call("GET", url, headers={**api.headers(), "If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.json() == first.json()
    if "file-executions" in url:
        api.call("PATCH", f"file-executions/{file_id}/", {"status": "IN_PROGRESS"})
        changed = api.call("GET", url, headers={**api.headers(), "If-None-Match": etag})
        assert changed.status_code == 200 and changed["ETag"] != etag


@pytest.mark.parametrize("path", [
    "file-executions/{file}/", "file-executions/", "file-executions/?execution_id={execution}",
    "workflow-executions/{execution}/", "workflow-executions/", "webhook-deliveries/{delivery}/",
    "webhook-deliveries/"])
def test_head_and_get_agree_on_the_etag_and_the_304(api: Api, path: str) -> None:
    eid = execution(api)
    delivery = api.call(
        "POST", "webhook-deliveries/", {"url": "https://r.example/h", "outcome": "failed"}
    ).json()
    url = path.format(file=add_file(api, eid)["id"], execution=eid, delivery=delivery["id"])
    got, head = api.call("GET", url), api.call("HEAD", url)
    assert (head.status_code, head.content) == (200, b"")
    for name in ("ETag", "Content-Type", "Content-Length"):
        assert head[name] == got[name], name
    for presented, code in [(got["ETag"], 304), ("*", 304), ('"other"', 200)]:
        conditional = {**api.headers(), "If-None-Match": presented}
        answers = [api.call(method, url, headers=conditional) for method in ("GET", "HEAD")]
        assert [answer.status_code for answer in answers] == [code, code], presented
        assert answers[0]["ETag"] == answers[1]["ETag"] == got["ETag"]
        assert not answers[1].content


def test_a_stale_if_match_is_412_and_changes_nothing(api: Api) -> None:
    eid = execution(api)
    created = api.call("POST", "file-executions/", {"execution_id": eid, "file_name": "a"})
    path = f"file-executions/{created.json()['id']}/"
    etag = created["ETag"]
    assert api.call("GET", path)["ETag"] == etag  # a create's ETag is the object's version
    first = api.call(
        "PATCH", path, {"status": "IN_PROGRESS"}, headers={**api.headers(), "If-Match": etag}
    )
    assert first.status_code == 200 and first["ETag"] != etag
    before = stored(api)
    for method, body in (("PATCH", {"status": "ERROR"}), ("DELETE", None)):
        for presented in (etag, "", '"nope"', f"W/{first['ETag']}"):
            stale = api.call(method, path, body, headers={**api.headers(), "If-Match": presented})
            assert error_of(stale) == (412, "precondition_failed"), presented
    assert stored(api) == before
    fresh = {**api.headers(), "If-Match": f'"x", {first["ETag"]}'}
    assert api.call("PATCH", path, {"status": "ERROR"}, headers=fresh).status_code == 200
    anything = {**api.headers(), "If-Match": "*"}
    assert api.call("DELETE", path, headers=anything).status_code == 204


# A JSON value as PostgreSQL's jsonb stores it differs from the one sent: keys reordered,
# -0.0 written 0.0, a float of 1e16 or more written as an integer.
UNORDERED = {"zeta": 1, "alpha": {"y": [1, {"b": 2, "a": 1}], "x": -0.0}, "big": 1e16, "mid": 2}


@pytest.mark.urls("tests.backend.body_hashed_urls")
@pytest.mark.parametrize("resource", ["file-executions", "files-by-body", "workflow-executions"])
def test_the_etag_of_a_write_is_the_one_a_read_gives(api: Api, resource: str) -> None:
    eid = execution(api)
    if resource == "workflow-executions":
        path = f"workflow-executions/{eid}/"
        written = api.call("PATCH", path, {"result": UNORDERED})
    else:
        written = api.call("POST", f"{resource}/", {
            "execution_id": eid, "file_name": "a", "result": UNORDERED})
        path = f"{resource}/{written.json()['id']}/"
        # A batch answers its objects as stored too.
        listed = batch_of(api, resource, [
            {"execution_id": eid, "file_name": "b", "result": UNORDERED}])
        (row,) = listed.json()["results"]
        again = api.call("GET", f"{resource}/{row['id']}/").json()
        assert json.dumps(again, sort_keys=True) == json.dumps(row, sort_keys=True)
    assert written.status_code in (200, 201), written.content
    read = api.call("GET", path)
    assert read["ETag"] == written["ETag"] and read.content == written.content
    cached = api.call("GET", path, headers={**api.headers(), "If-None-Match": written["ETag"]})
    assert cached.status_code == 304
    again = api.call("PATCH", path, {"result": UNORDERED},
                     headers={**api.headers(), "If-Match": written["ETag"]})
    assert again.status_code == 200, again.content
    final = api.call("PATCH", path, {"result": None},
                     headers={**api.headers(), "If-Match": again["ETag"]})
    assert final.status_code == 200, final.content


def test_workflow_executions_are_a_declared_resource_with_versions(api: Api) -> None:
    eid = execution(api)
    path = f"workflow-executions/{eid}/"
    etag = api.call("GET", path)["ETag"]
    listed = api.call("GET", "workflow-executions/?status=PENDING")
    assert listed.status_code == 200 and [row["id"] for row in listed.json()["results"]] == [eid]
    cached = api.call(
        "GET", "workflow-executions/", headers={**api.headers(), "If-None-Match": listed["ETag"]}
    )
    assert cached.status_code == 304
    first = api.call("PATCH", path, {"total_files": 2}, headers={**api.headers(), "If-Match": etag})
    assert first.status_code == 200 and first["ETag"] != etag
    assert first["ETag"] == api.call("GET", path)["ETag"]
    stale = api.call("PATCH", path, {"total_files": 3}, headers={**api.headers(), "If-Match": etag})
    assert error_of(stale) == (412, "precondition_failed")
    assert error_of(api.call("DELETE", path, headers={**api.headers(), "If-Match": etag})) == (
        412,
        "precondition_failed",
    )
    assert counts(api, eid) == (2, 0, 0)
    # The lease fence still applies under If-Match: a superseded epoch is 409, nothing changed.
    claimed = api.call("POST", f"{path}claim/", {"worker": "w"}).json()
    current = api.call("GET", path)["ETag"]
    fenced = {
        **api.headers(),
        "If-Match": current,
        "X-Lease-Epoch": str(claimed["lease"]["epoch"] + 1),
    }
    assert error_of(api.call("PATCH", path, {"total_files": 5}, headers=fenced)) == (
        409,
        "lease_lost",
    )
    assert (
        api.call("DELETE", path, headers={**api.headers(), "If-Match": current}).status_code == 204
    )


def refusing_if_match(eid: str, file_id: str) -> list[tuple[str, str, Any]]:
    """Every endpoint that cannot honour an ``If-Match``: its method, path and a body."""
    execution_path = f"workflow-executions/{eid}/"
    return [
        ("POST", "file-executions/", {"execution_id": eid, "file_name": "x"}),
        ("POST", "file-executions/batch/", {"items": [{"id": file_id, "status": "ERROR"}]}),
        ("POST", "workflow-executions/", {"workflow_id": "wf"}),
        ("POST", "webhook-deliveries/", {"url": "https://r.example/h", "outcome": "failed"}),
        ("POST", f"{execution_path}status/", {"status": "COMPLETED"}),
        ("POST", f"{execution_path}claim/", {"worker": "w"}),
        ("POST", f"{execution_path}heartbeat/", {"epoch": 1}),
        ("POST", f"{execution_path}release/", {"epoch": 1}),
        ("GET", f"{execution_path}events/", None),
        ("GET", "health/", None),
        ("GET", "metrics/", None),
        ("OPTIONS", "file-executions/", None),
    ]


def refusing_if_none_match(eid: str, file_id: str) -> list[tuple[str, str, Any]]:
    """Every method but GET and HEAD, on each kind of endpoint: its method, path and a body."""
    writes = [entry for entry in refusing_if_match(eid, file_id) if entry[0] != "GET"]
    return [
        *writes,
        ("PATCH", f"file-executions/{file_id}/", {"status": "ERROR"}),
        ("DELETE", f"file-executions/{file_id}/", None),
        ("PATCH", f"workflow-executions/{eid}/", {"total_files": 3}),
        ("DELETE", f"workflow-executions/{eid}/", None),
        ("OPTIONS", f"workflow-executions/{eid}/events/", None),
    ]


REFUSING = {"If-Match": refusing_if_match, "If-None-Match": refusing_if_none_match}


@pytest.mark.parametrize(("header", "endpoint"), [
    *(("If-Match", n) for n in range(12)), *(("If-None-Match", n) for n in range(14))])
@pytest.mark.parametrize("presented", ["*", "current", '"stale"'])
def test_a_precondition_an_endpoint_cannot_honour_is_a_400_and_changes_nothing(
    api: Api, header: str, endpoint: int, presented: str
) -> None:
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    method, path, body = REFUSING[header](eid, file_id)[endpoint]
    tag = api.call("GET", f"workflow-executions/{eid}/")["ETag"] if presented == "current" else (
        presented)
    before = stored(api)
    answer = api.call(method, path, body, headers={**api.headers(), header: tag,
                                                   "Idempotency-Key": f"k-{endpoint}"})
    assert error_of(answer) == (400, "validation_error"), (method, path)
    assert answer.json()["detail"].startswith(f"{header}: {method} /internal/v1/{path} ")
    assert stored(api) == before


@pytest.mark.parametrize("path", [
    "file-executions/{file}/", "file-executions/?execution_id={execution}",
    "workflow-executions/{execution}/", "workflow-executions/", "webhook-deliveries/"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_read_honours_if_match(api: Api, path: str, method: str) -> None:
    eid = execution(api)
    url = path.format(file=add_file(api, eid)["id"], execution=eid)
    etag = api.call("GET", url)["ETag"]
    for presented, code in [(etag, 200), ("*", 200), (f'"x", {etag}', 200), ('"stale"', 412),
                            (f"W/{etag}", 412), ("", 412)]:
        answer = api.call(method, url, headers={**api.headers(), "If-Match": presented})
        assert answer.status_code == code, (presented, answer.content)
        if code == 200:
            assert answer["ETag"] == etag
        elif method == "GET":
            assert error_of(answer) == (412, "precondition_failed")
    # If-Match is checked first: a stale one is 412 even when If-None-Match names the copy.
    both = {**api.headers(), "If-Match": '"stale"', "If-None-Match": etag}
    assert api.call(method, url, headers=both).status_code == 412


def test_the_schema_lists_the_versions_headers(api: Api) -> None:
    document = json.loads(api.call("GET", "schema/?format=json").content)
    paths = document["paths"]

    def names(path: str, method: str) -> set[str]:
        return {p["name"] for p in paths[f"/internal/v1/{path}"][method]["parameters"]}

    assert "If-Match" in names("file-executions/{id}/", "patch")
    assert "If-None-Match" in names("file-executions/{id}/", "get")
    assert "If-None-Match" in names("workflow-executions/{id}/", "get")
    assert "412" in paths["/internal/v1/file-executions/{id}/"]["patch"]["responses"]
    assert "304" in paths["/internal/v1/file-executions/"]["get"]["responses"]
    batch_body = document["components"]["schemas"]["FileExecutionBatchRequest"]
    assert batch_body["properties"]["items"]["maxItems"] == 500


def test_a_write_with_if_none_match_is_refused_not_answered_304(api: Api) -> None:
    body = {
        "url": "https://r.example/h",
        "outcome": "delivered",
        "webhook_id": "msg_" + "0" * 32,
    }
    first = api.call("POST", "webhook-deliveries/", body)
    again = api.call("POST", "webhook-deliveries/", body)  # already recorded
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json() and again["ETag"] == first["ETag"]
    for presented in ("*", first["ETag"]):
        conditional = {**api.headers(), "If-None-Match": presented}
        refused = api.call("POST", "webhook-deliveries/", body, headers=conditional)
        assert refused.status_code == 400, refused.content
        assert refused.json()["detail"].startswith("If-None-Match: POST /internal/v1/")


# --- found in review ---------------------------------------------------------------------------


def test_a_delivery_whose_execution_is_deleted_gets_a_new_etag(api: Api) -> None:
    eid = execution(api)
    delivery = api.call("POST", "webhook-deliveries/", {
        "url": "https://r.example/h", "outcome": "failed", "execution_id": eid}).json()
    url = f"webhook-deliveries/{delivery['id']}/"
    before = api.call("GET", url)
    assert api.call("DELETE", f"workflow-executions/{eid}/").status_code == 204
    after = api.call("GET", url, headers={**api.headers(), "If-None-Match": before["ETag"]})
    assert after.status_code == 200 and after.json()["execution_id"] is None
    assert after["ETag"] != before["ETag"]


def test_bodiless_answers_state_no_type_and_no_length(api: Api) -> None:
    eid = execution(api)
    first = api.call("GET", f"workflow-executions/{eid}/")
    cached = api.call("GET", f"workflow-executions/{eid}/",
                      headers={**api.headers(), "If-None-Match": first["ETag"]})
    deleted = api.call("DELETE", f"workflow-executions/{eid}/")
    for response, status in ((cached, 304), (deleted, 204)):
        assert response.status_code == status
        assert not response.has_header("Content-Type") and not response.has_header(
            "Content-Length")


@pytest.mark.parametrize("stamp", [
    "9999-12-31T23:59:59-14:00",  # after the last date a database holds, in UTC
    "0001-01-01T00:00:00+14:00",  # before the first
])
@pytest.mark.parametrize("path", ["file-executions/", "workflow-executions/",
                                  "webhook-deliveries/"])
def test_a_cursor_past_the_calendar_is_refused(api: Api, stamp: str, path: str) -> None:
    import base64

    cursor = base64.urlsafe_b64encode(f"{stamp}|{uuid.uuid4()}".encode()).decode().rstrip("=")
    assert error_of(api.call("GET", f"{path}?cursor={cursor}")) == (400, "invalid_cursor")


@pytest.mark.parametrize("limit", ["1" * 5000, "0" * 4000 + "1", "٣"])
def test_a_limit_of_many_digits_is_refused(api: Api, limit: str) -> None:
    assert error_of(api.call("GET", f"file-executions/?limit={limit}")) == (400,
                                                                            "validation_error")


def test_a_reference_an_update_could_change_is_refused_at_declaration() -> None:
    from rest_framework import serializers

    from backend.internal_api.models import WorkflowExecution as Execution
    from backend.internal_api.resources import Reference, Resource
    from backend.internal_api.serializers import FileExecutionSerializer, StrictSerializer

    class Repoint(StrictSerializer):
        execution_id = serializers.UUIDField()

    with pytest.raises(ValueError, match=r"must not change the reference.*execution_id"):
        Resource(name="files-again", model=FileExecution, serializer=FileExecutionSerializer,
                 label="file", update_serializer=Repoint,
                 references={"execution_id": Reference(Execution, "workflow execution")})


# --- lease fencing of file writes --------------------------------------------------------------


def claimed_twice(api: Api) -> tuple[str, int, str]:
    """An execution claimed, released and claimed again (epoch 2), with one file: its id, the
    lost epoch (1) and the file's id."""
    eid = execution(api)
    file_id = add_file(api, eid)["id"]
    epochs = []
    for _ in range(2):
        claimed = api.call("POST", f"workflow-executions/{eid}/claim/", {"worker": "host:1"})
        assert claimed.status_code == 200, claimed.content
        epochs.append(claimed.json()["lease"]["epoch"])
        if len(epochs) == 1:
            released = api.call("POST", f"workflow-executions/{eid}/release/",
                                {"epoch": epochs[0]})
            assert released.status_code == 200, released.content
    assert epochs[1] > epochs[0]
    return eid, epochs[0], file_id


def file_writes(eid: str, file_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "file-executions/", {"execution_id": eid, "file_name": "late.pdf"}),
        ("PATCH", f"file-executions/{file_id}/", {"status": "ERROR"}),
        ("DELETE", f"file-executions/{file_id}/", None),
        ("POST", "file-executions/batch/", {"items": [
            {"execution_id": eid, "file_name": "late.pdf"}, {"id": file_id, "status": "ERROR"}]}),
    ]


@pytest.mark.parametrize("write", range(4), ids=["create", "patch", "delete", "batch"])
def test_a_file_write_under_a_lost_lease_is_refused_and_writes_nothing(api: Api,
                                                                       write: int) -> None:
    eid, lost, file_id = claimed_twice(api)
    before = stored(api)
    method, path, body = file_writes(eid, file_id)[write]
    answer = api.call(method, path, body, headers={**api.headers(), "X-Lease-Epoch": str(lost)})
    assert error_of(answer) == (409, "lease_lost")
    assert stored(api) == before


@pytest.mark.parametrize("epoch", ["garbage", "0", "-1", "2" * 40, "٣", "1.5", ""])
@pytest.mark.parametrize("write", range(4), ids=["create", "patch", "delete", "batch"])
def test_a_malformed_lease_epoch_on_a_file_write_is_a_400(api: Api, write: int,
                                                          epoch: str) -> None:
    eid, _lost, file_id = claimed_twice(api)
    before = stored(api)
    method, path, body = file_writes(eid, file_id)[write]
    answer = api.call(method, path, body, headers={**api.headers(), "X-Lease-Epoch": epoch})
    assert error_of(answer)[0] == 400
    assert stored(api) == before


@pytest.mark.parametrize("write", range(4), ids=["create", "patch", "delete", "batch"])
def test_a_file_write_under_the_current_lease_applies(api: Api, write: int) -> None:
    eid, lost, file_id = claimed_twice(api)
    method, path, body = file_writes(eid, file_id)[write]
    answer = api.call(method, path, body,
                      headers={**api.headers(), "X-Lease-Epoch": str(lost + 1)})
    assert answer.status_code in (200, 201, 204), answer.content
