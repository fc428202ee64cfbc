"""The internal API through Django's test client, on SQLite (and on PostgreSQL: see
``test_api_postgres.py``, which runs this module again against a database of its own)."""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backend.internal_api.models import (
    ALLOWED_SOURCES,
    TERMINAL_STATUSES,
    IdempotencyRecord,
    WorkflowExecution,
)
from tests.backend.conftest import Api

pytestmark = pytest.mark.django_db
STATUSES = ["PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED", "ERROR", "STOPPED"]
# The shortest legal path to each status from PENDING.
PATH_TO = {
    "PENDING": [],
    "QUEUED": ["QUEUED"],
    "IN_PROGRESS": ["IN_PROGRESS"],
    "COMPLETED": ["IN_PROGRESS", "COMPLETED"],
    "ERROR": ["IN_PROGRESS", "ERROR"],
    "STOPPED": ["STOPPED"],
}


def error_of(response: Any) -> tuple[int, str]:
    """Status and error code of an error answer, after checking the error shape."""
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    return response.status_code, body["error"]


def create(api: Api, **fields: Any) -> dict[str, Any]:
    response = api.call("POST", "workflow-executions/", {"workflow_id": "wf-1", **fields})
    assert response.status_code == 201, response.content
    return dict(response.json())


def set_status(api: Api, execution_id: str, status: str, **fields: Any) -> Any:
    return api.call(
        "POST", f"workflow-executions/{execution_id}/status/", {"status": status, **fields}
    )


def test_runs_on_the_database_asked_for() -> None:
    url = os.environ.get("BACKEND_TEST_DATABASE_URL", "sqlite")
    assert connection.vendor == ("postgresql" if url.startswith("postgres") else "sqlite")


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "authentication_required"),
        ("", "authentication_required"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization"),
        ("Bearer", "invalid_authorization"),
        ("Bearer zq-one zq-two", "invalid_authorization"),
        ("Bearer wrong-key", "invalid_api_key"),
    ],
)
def test_bad_authorization_is_401_and_echoes_nothing(
    api: Api, authorization: str | None, code: str
) -> None:
    headers = {"X-Organization-ID": api.org_id}
    if authorization is not None:
        headers["Authorization"] = authorization
    for path in ("health/", "workflow-executions/", "no-such-endpoint/"):
        response = api.call("GET", path, headers=headers)
        assert error_of(response) == (401, code)
        assert response["WWW-Authenticate"] == "Bearer"
        credentials = (authorization or "").split()[1:]
        for part in credentials:
            assert part not in response.content.decode()


def test_a_near_miss_of_the_key_is_refused(api: Api) -> None:
    for key in (api.api_key + "x", api.api_key[:-1], api.api_key.upper()):
        response = api.call("GET", "health/", headers={"Authorization": f"Bearer {key}"})
        assert error_of(response) == (401, "invalid_api_key")


def test_every_configured_key_is_accepted(api: Api, settings: Any) -> None:
    old, new = "swi-test-key-7Q2xK9-old", "swi-test-key-7Q2xK9-new"
    settings.INTERNAL_API_KEYS = (new, old)
    for key in (new, old):
        response = api.call("GET", "health/", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    response = api.call("GET", "health/", headers={"Authorization": f"Bearer {api.api_key}"})
    assert error_of(response) == (401, "invalid_api_key")


def test_host_not_in_allowed_hosts_is_400(api: Api) -> None:
    response = api.client.get(
        "/internal/v1/health/", headers=api.headers(), HTTP_HOST="evil.example"
    )
    assert error_of(response) == (400, "bad_request")
    assert "evil.example" not in response.content.decode()


def test_health(api: Api) -> None:
    response = api.call("GET", "health/", headers={"Authorization": f"Bearer {api.api_key}"})
    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "healthy"
    assert body["version"]
    assert timezone.datetime.fromisoformat(body["timestamp"]).tzinfo is not None


# --- organization scoping --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "workflow-executions/"),
        ("POST", "workflow-executions/"),
        ("GET", "webhook-deliveries/"),
        ("POST", f"workflow-executions/{uuid.uuid4()}/status/"),
    ],
)
def test_organization_header_is_required(api: Api, method: str, path: str) -> None:
    headers = {"Authorization": f"Bearer {api.api_key}"}
    body = {"workflow_id": "w"} if method == "POST" else None
    response = api.call(method, path, body, headers=headers)
    assert error_of(response) == (400, "organization_required")
    headers["X-Organization-ID"] = "  "
    response = api.call(method, path, body, headers=headers)
    assert error_of(response) == (400, "organization_required")


def test_unknown_organization_is_404(api: Api) -> None:
    for org_id in ("no-such-org", "x" * 300):
        response = api.call("GET", "workflow-executions/", org_id=org_id)
        assert error_of(response) == (404, "organization_not_found")
    response = api.call("GET", "workflow-executions/", org_id="org\x00")
    assert error_of(response) == (400, "bad_request")
    assert "x-organization-id header must not contain nul" in response.json()["detail"].lower()


def test_another_organizations_objects_are_404(api: Api, make_org: Any) -> None:
    execution = create(api)
    other = make_org()
    delivery = api.call(
        "POST",
        "webhook-deliveries/",
        {"url": "https://example.com/h", "outcome": "delivered", "execution_id": execution["id"]},
    ).json()
    eid = execution["id"]
    for method, path, body in [
        ("GET", f"workflow-executions/{eid}/", None),
        ("PATCH", f"workflow-executions/{eid}/", {"total_files": 3}),
        ("POST", f"workflow-executions/{eid}/status/", {"status": "STOPPED"}),
        ("DELETE", f"workflow-executions/{eid}/", None),
        ("GET", f"webhook-deliveries/{delivery['id']}/", None),
    ]:
        assert error_of(api.call(method, path, body, org_id=other)) == (404, "not_found")
    listed = api.call("GET", "workflow-executions/", org_id=other).json()
    assert listed == {"results": [], "next_cursor": None}
    assert api.call("GET", f"webhook-deliveries/?execution_id={eid}", org_id=other).json() == {
        "results": [],
        "next_cursor": None,
    }
    response = api.call(
        "POST",
        "webhook-deliveries/",
        {"url": "https://example.com/h", "outcome": "failed", "execution_id": eid},
        org_id=other,
    )
    assert error_of(response) == (400, "validation_error")
    # Nothing changed for the owner.
    owned = api.call("GET", f"workflow-executions/{eid}/").json()
    assert owned["status"] == "PENDING" and owned["total_files"] == 0


# --- executions ------------------------------------------------------------------------------


def test_create_and_read(api: Api) -> None:
    execution = create(api, pipeline_id="p-1", total_files=4, task_id="t-1")
    assert execution["organization_id"] == api.org_id
    assert execution["status"] == "PENDING"
    assert (execution["workflow_id"], execution["pipeline_id"]) == ("wf-1", "p-1")
    assert (execution["total_files"], execution["task_id"]) == (4, "t-1")
    assert execution["started_at"] is None and execution["finished_at"] is None
    assert set(execution) == {
        "id", "organization_id", "workflow_id", "pipeline_id", "status", "error_message",
        "attempts", "execution_time", "total_files", "successful_files", "failed_files",
        "result", "task_id", "created_at", "modified_at", "started_at", "finished_at",
        "webhook_url", "lease", "lost_count", "webhook",
    }  # fmt: skip
    assert (execution["lease"], execution["webhook"], execution["lost_count"]) == (None, None, 0)
    read = api.call("GET", f"workflow-executions/{execution['id']}/")
    assert read.status_code == 200 and read.json() == execution


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "workflow_id"),
        ({"workflow_id": ""}, "workflow_id"),
        ({"workflow_id": 5, "total_files": "many"}, "total_files"),
        ({"workflow_id": "w", "total_files": -1}, "total_files"),
        ({"workflow_id": "w", "total_files": 2**40}, "total_files"),
        ({"workflow_id": "w" * 256}, "workflow_id"),
        ({"workflow_id": "w\x00"}, "workflow_id"),
        ({"workflow_id": "w", "colour": "red"}, "colour"),
    ],
)
def test_create_rejects_bad_fields_by_name(api: Api, body: dict[str, Any], field: str) -> None:
    response = api.call("POST", "workflow-executions/", body)
    assert error_of(response) == (400, "validation_error")
    assert (
        response.json()["detail"].startswith(f"{field}:")
        or f"; {field}:" in (response.json()["detail"])
    )


@pytest.mark.parametrize("raw", ["{", "[1, 2]", "null", '"text"', "NaN", "[" * 100000])
def test_malformed_or_non_object_json_is_400(api: Api, raw: str) -> None:
    response = api.call("POST", "workflow-executions/", raw=raw)
    status, code = error_of(response)
    assert status == 400 and code in ("malformed_json", "validation_error")


def test_unsupported_content_type_is_415(api: Api) -> None:
    response = api.call(
        "POST", "workflow-executions/", raw="workflow_id=w", content_type="text/plain"
    )
    assert error_of(response) == (415, "unsupported_media_type")


def test_body_over_one_mebibyte_is_413(api: Api) -> None:
    raw = json.dumps({"workflow_id": "w", "task_id": "x" * (1024 * 1024)})
    assert error_of(api.call("POST", "workflow-executions/", raw=raw)) == (413, "payload_too_large")


def test_content_length_that_is_not_ascii_digits_is_400(api: Api) -> None:
    for length in ("²", "-1", "1e3"):
        response = api.client.post(
            "/internal/v1/workflow-executions/",
            data="{}",
            content_type="application/json",
            headers=api.headers(),
            CONTENT_LENGTH=length,
        )
        assert error_of(response) == (400, "bad_request")
        assert "Content-Length" in response.json()["detail"]


def test_bad_uuid_unknown_path_and_method(api: Api) -> None:
    assert error_of(api.call("GET", "workflow-executions/not-a-uuid/")) == (404, "not_found")
    assert error_of(api.call("GET", f"workflow-executions/{uuid.uuid4()}/")) == (404, "not_found")
    assert error_of(api.call("GET", "nothing-here/")) == (404, "not_found")
    assert error_of(api.call("GET", "health")) == (404, "not_found")
    response = api.call("PUT", "workflow-executions/", {"workflow_id": "w"})
    assert error_of(response) == (405, "method_not_allowed")
    response = api.call("DELETE", "workflow-executions/")
    assert error_of(response) == (405, "method_not_allowed")


def test_patch_updates_non_status_fields(api: Api) -> None:
    execution = create(api)
    result = {"files": [{"name": "a.pdf", "pages": 3}], "score": 0.5, "ok": True}
    response = api.call(
        "PATCH",
        f"workflow-executions/{execution['id']}/",
        {"result": result, "successful_files": 2, "failed_files": 1, "task_id": "t-9"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["result"] == result
    assert (body["successful_files"], body["failed_files"], body["task_id"]) == (2, 1, "t-9")
    assert body["status"] == "PENDING"
    assert body["modified_at"] >= execution["modified_at"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "COMPLETED"}, "status"),
        ({"result": {"text": "nul\x00"}}, "result"),
        ({"result": json.loads("[" * 80 + "]" * 80)}, "result"),
        ({"failed_files": "x"}, "failed_files"),
        ({"id": str(uuid.uuid4())}, "id"),
    ],
)
def test_patch_rejects_bad_fields_by_name(api: Api, body: dict[str, Any], field: str) -> None:
    execution = create(api)
    response = api.call("PATCH", f"workflow-executions/{execution['id']}/", body)
    assert error_of(response) == (400, "validation_error")
    assert response.json()["detail"].startswith(f"{field}")


def test_delete(api: Api) -> None:
    execution = create(api)
    assert api.call("DELETE", f"workflow-executions/{execution['id']}/").status_code == 204
    response = api.call("GET", f"workflow-executions/{execution['id']}/")
    assert error_of(response) == (404, "not_found")
    response = api.call("DELETE", f"workflow-executions/{execution['id']}/")
    assert error_of(response) == (404, "not_found")


def test_list_pages_newest_first_with_filters(api: Api) -> None:
    made = [create(api, workflow_id=f"wf-{i % 2}")["id"] for i in range(7)]
    set_status(api, made[0], "QUEUED")
    seen: list[str] = []
    cursor = None
    while True:
        query = "workflow-executions/?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("GET", query).json()
        assert len(page["results"]) <= 3
        seen.extend(row["id"] for row in page["results"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    by_workflow = api.call("GET", "workflow-executions/?workflow_id=wf-1").json()["results"]
    assert [row["id"] for row in by_workflow] == [made[5], made[3], made[1]]
    queued = api.call("GET", "workflow-executions/?status=QUEUED").json()["results"]
    assert [row["id"] for row in queued] == [made[0]]


@pytest.mark.parametrize(
    ("query", "code", "needle"),
    [
        ("status=DONE", "validation_error", "PENDING, QUEUED, IN_PROGRESS, COMPLETED"),
        ("limit=0", "validation_error", "limit"),
        ("limit=501", "validation_error", "limit"),
        ("limit=ten", "validation_error", "limit"),
        ("limit=%C2%B2", "validation_error", "limit"),  # '²' is a digit to str.isdigit()
        ("workflow_id=a%00b", "validation_error", "workflow_id"),
        ("cursor=%%%", "invalid_cursor", "cursor"),
        ("cursor=bm90LWEtY3Vyc29y", "invalid_cursor", "cursor"),
    ],
)
def test_list_rejects_bad_parameters(api: Api, query: str, code: str, needle: str) -> None:
    response = api.call("GET", f"workflow-executions/?{query}")
    assert error_of(response) == (400, code)
    assert needle in response.json()["detail"]


# --- status transitions ----------------------------------------------------------------------


def at_status(api: Api, status: str) -> dict[str, Any]:
    execution = create(api)
    for step in PATH_TO[status]:
        response = set_status(api, execution["id"], step)
        assert response.status_code == 200, response.content
        execution = response.json()
    assert execution["status"] == status
    return execution


@pytest.mark.parametrize("source", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
def test_transition_table(api: Api, source: str, target: str) -> None:
    before = at_status(api, source)
    response = set_status(api, before["id"], target)
    if source == target:
        assert response.status_code == 200
        after = response.json()
        for field in ("status", "started_at", "finished_at", "error_message"):
            assert after[field] == before[field]
    elif source in ALLOWED_SOURCES[target]:
        assert response.status_code == 200
        after = response.json()
        assert after["status"] == target
        if target == "IN_PROGRESS":
            assert after["started_at"] is not None
        if target in TERMINAL_STATUSES:
            assert after["finished_at"] is not None
            assert after["started_at"] == before["started_at"]
    else:
        assert error_of(response) == (409, "illegal_transition")
        assert source in response.json()["detail"] and target in response.json()["detail"]
        stored = api.call("GET", f"workflow-executions/{before['id']}/").json()
        assert stored == before


def test_transitions_move_forward_only_and_terminal_never_changes() -> None:
    order = {s: i for i, s in enumerate(STATUSES[:3])}
    for target, sources in ALLOWED_SOURCES.items():
        assert not set(sources) & TERMINAL_STATUSES
        if target in order:
            assert all(order[s] < order[target] for s in sources)


def test_status_fields_are_recorded(api: Api) -> None:
    execution = at_status(api, "IN_PROGRESS")
    started = execution["started_at"]
    retried = set_status(api, execution["id"], "IN_PROGRESS", attempts=2).json()
    nulls = set_status(api, execution["id"], "IN_PROGRESS", attempts=None, error_message=None)
    assert nulls.json()["attempts"] == 2
    assert (retried["attempts"], retried["started_at"]) == (2, started)
    done = set_status(
        api, execution["id"], "ERROR", error_message="boom", attempts=3, execution_time=1.5
    ).json()
    assert (done["status"], done["error_message"], done["attempts"]) == ("ERROR", "boom", 3)
    assert done["execution_time"] == 1.5 and done["finished_at"] is not None
    again = set_status(api, execution["id"], "ERROR", error_message="other", attempts=9).json()
    assert again == done


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "status"),
        ({"status": "DONE"}, "status"),
        ({"status": None}, "status"),
        ({"status": "COMPLETED", "attempts": -1}, "attempts"),
        ({"status": "COMPLETED", "attempts": "two"}, "attempts"),
        ({"status": "COMPLETED", "execution_time": "slow"}, "execution_time"),
        ({"status": "COMPLETED", "execution_time": 1e300}, "execution_time"),
        ({"status": "COMPLETED", "result": {"a": "\u0000"}}, "result.a"),
    ],
)
def test_status_body_errors_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    execution = create(api)
    response = api.call("POST", f"workflow-executions/{execution['id']}/status/", body)
    assert error_of(response) == (400, "validation_error")
    assert response.json()["detail"].startswith(f"{field}:")


def test_unknown_status_lists_the_allowed_values(api: Api) -> None:
    execution = create(api)
    detail = set_status(api, execution["id"], "FINISHED").json()["detail"]
    for status in STATUSES:
        assert status in detail


def test_status_of_unknown_execution_is_404(api: Api) -> None:
    assert error_of(set_status(api, str(uuid.uuid4()), "QUEUED")) == (404, "not_found")


def test_sql_statements_per_status_update(api: Api) -> None:
    executions = [create(api)["id"] for _ in range(3)]
    set_status(api, executions[2], "STOPPED")
    key = {"Idempotency-Key": "count-1"}
    warm = f"workflow-executions/{executions[2]}/status/"
    post_with_key(api, warm, {"status": "STOPPED"}, "warm-up")  # org cached, purge done

    def statements(execution_id: str, status: str, headers: dict[str, str]) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            response = api.call(
                "POST",
                f"workflow-executions/{execution_id}/status/",
                {"status": status},
                headers=api.headers(**headers),
            )
        assert response.status_code in (200, 409)
        # The test runs inside a transaction, so the key's transaction is a SAVEPOINT here.
        kinds = [q["sql"].split()[0] for q in queries.captured_queries]
        return [kind for kind in kinds if kind not in ("SAVEPOINT", "RELEASE")]

    # Applied: PostgreSQL, one WITH statement that locks, updates and inserts the event;
    # SQLite (under its write lock), the SELECT of the status before, the UPDATE ... RETURNING
    # and the INSERT of the event. Refused or no-op: that, then a SELECT.
    change = ["WITH"] if connection.vendor == "postgresql" else ["SELECT", "UPDATE", "INSERT"]
    refused = ["WITH"] if connection.vendor == "postgresql" else ["SELECT", "UPDATE"]
    assert statements(executions[0], "IN_PROGRESS", {}) == change
    assert statements(executions[2], "ERROR", {}) == [*refused, "SELECT"]
    # With a key: the lock-and-look-up SELECT, the change, the INSERT of the record.
    assert statements(executions[1], "IN_PROGRESS", key) == ["SELECT", *change, "INSERT"]
    assert statements(executions[1], "IN_PROGRESS", key) == ["SELECT"]  # the replay


# --- idempotency -----------------------------------------------------------------------------


def post_with_key(api: Api, path: str, body: Any, key: str, org_id: str | None = None) -> Any:
    return api.call("POST", path, body, headers=api.headers(org_id, **{"Idempotency-Key": key}))


def test_idempotent_create_replays(api: Api) -> None:
    first = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-1")
    again = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert not first.has_header("Idempotent-Replayed")
    assert WorkflowExecution.objects.filter(organization_id=api.org_id).count() == 1


def test_idempotency_key_with_another_request_is_422(api: Api) -> None:
    post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-2")
    other_body = post_with_key(api, "workflow-executions/", {"workflow_id": "v"}, "k-2")
    assert error_of(other_body) == (422, "idempotency_key_reused")
    execution = create(api)
    other_path = post_with_key(
        api, f"workflow-executions/{execution['id']}/status/", {"workflow_id": "w"}, "k-2"
    )
    assert error_of(other_path) == (422, "idempotency_key_reused")


def test_idempotency_keys_are_scoped_by_organization(api: Api, make_org: Any) -> None:
    other = make_org()
    first = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-3")
    second = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-3", other)
    assert second.status_code == 201 and not second.has_header("Idempotent-Replayed")
    assert second.json()["id"] != first.json()["id"]


def test_idempotent_status_update_replays_even_after_the_state_moved(api: Api) -> None:
    execution = at_status(api, "IN_PROGRESS")
    path = f"workflow-executions/{execution['id']}/status/"
    done = post_with_key(api, path, {"status": "COMPLETED"}, "k-4")
    assert done.status_code == 200
    replay = post_with_key(api, path, {"status": "COMPLETED"}, "k-4")
    assert replay.json() == done.json() and replay["Idempotent-Replayed"] == "true"


def test_refusals_are_not_stored_so_a_retry_runs_again(api: Api) -> None:
    execution = at_status(api, "COMPLETED")
    path = f"workflow-executions/{execution['id']}/status/"
    first = post_with_key(api, path, {"status": "ERROR"}, "k-5")
    again = post_with_key(api, path, {"status": "ERROR"}, "k-5")
    assert error_of(first) == error_of(again) == (409, "illegal_transition")
    assert not again.has_header("Idempotent-Replayed")
    org_id = f"org-late-{uuid.uuid4().hex[:8]}"
    body = {"workflow_id": "w"}
    early = post_with_key(api, "workflow-executions/", body, "k-5b", org_id)
    assert error_of(early) == (404, "organization_not_found")
    from backend.internal_api.models import Organization

    Organization.objects.create(pk=org_id)
    late = post_with_key(api, "workflow-executions/", body, "k-5b", org_id)
    assert late.status_code == 201 and late.json()["organization_id"] == org_id
    assert IdempotencyRecord.objects.count() == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_invalid_idempotency_key_is_400(api: Api, key: str) -> None:
    response = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, key)
    assert error_of(response) == (400, "invalid_idempotency_key")


def test_expired_key_runs_again_and_purge_deletes_expired(api: Api) -> None:
    from django.core.management import call_command

    first = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-6")
    post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-7")
    past = timezone.now() - timedelta(seconds=1)
    IdempotencyRecord.objects.exclude(
        pk__in=IdempotencyRecord.objects.order_by("created_at").values("pk")[1:]
    ).update(expires_at=past)  # the clock passes k-6's 24 hours
    later = post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "k-6")
    assert later.status_code == 201 and later.json()["id"] != first.json()["id"]
    assert not later.has_header("Idempotent-Replayed")
    IdempotencyRecord.objects.filter(created_at__lt=timezone.now()).update(expires_at=past)
    post_with_key(api, "workflow-executions/", {"workflow_id": "z"}, "k-8")
    from io import StringIO

    out = StringIO()
    call_command("purge_idempotency_records", stdout=out)
    assert out.getvalue().startswith("2 expired")
    assert IdempotencyRecord.objects.count() == 1


# --- request ids -----------------------------------------------------------------------------


def test_request_id_is_echoed_or_generated(api: Api) -> None:
    response = api.call(
        "GET", "workflow-executions/", headers=api.headers(**{"X-Request-ID": "req-42"})
    )
    assert response["X-Request-ID"] == "req-42"
    generated = api.call("GET", "workflow-executions/")["X-Request-ID"]
    assert len(generated) == 32 and generated != "req-42"
    unsafe = api.call("GET", "health/", headers=api.headers(**{"X-Request-ID": "a b\x7f" * 60}))
    assert unsafe["X-Request-ID"] != "a b\x7f" * 60
    denied = api.call("GET", "health/", headers={"X-Request-ID": "req-43"})
    assert denied.status_code == 401 and denied["X-Request-ID"] == "req-43"


# --- webhook deliveries ----------------------------------------------------------------------


def test_webhook_deliveries(api: Api) -> None:
    execution = create(api)
    body = {
        "url": "https://hooks.example.com/a",
        "execution_id": execution["id"],
        "status_code": 200,
        "attempts": 2,
        "duration": 0.25,
        "outcome": "delivered",
    }
    created = api.call("POST", "webhook-deliveries/", body)
    assert created.status_code == 201
    delivery = created.json()
    assert {k: delivery[k] for k in body} == body
    assert delivery["organization_id"] == api.org_id and delivery["error_message"] == ""
    unlinked = api.call(
        "POST", "webhook-deliveries/", {"url": "http://receiver:8080/hook", "outcome": "blocked"}
    ).json()
    assert unlinked["execution_id"] is None and unlinked["attempts"] == 1
    by_execution = api.call("GET", f"webhook-deliveries/?execution_id={execution['id']}").json()
    assert [d["id"] for d in by_execution["results"]] == [delivery["id"]]
    everything = api.call("GET", "webhook-deliveries/").json()["results"]
    assert [d["id"] for d in everything] == [unlinked["id"], delivery["id"]]
    assert api.call("GET", f"webhook-deliveries/{delivery['id']}/").json() == delivery
    assert error_of(api.call("GET", f"webhook-deliveries/{uuid.uuid4()}/")) == (404, "not_found")
    response = api.call("GET", "webhook-deliveries/?execution_id=nope")
    assert error_of(response) == (400, "validation_error")
    api.call("DELETE", f"workflow-executions/{execution['id']}/")
    assert api.call("GET", f"webhook-deliveries/{delivery['id']}/").json()["execution_id"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "https://x.example/", "outcome": "lost"}, "outcome"),
        ({"url": "not a url", "outcome": "failed"}, "url"),
        ({"url": "ftp://x.example/", "outcome": "failed"}, "url"),
        ({"url": "http://:80/", "outcome": "failed"}, "url"),
        ({"url": "http://x.example:99999/", "outcome": "failed"}, "url"),
        ({"outcome": "failed"}, "url"),
        ({"url": "https://x.example/", "outcome": "failed", "status_code": 99}, "status_code"),
        ({"url": "https://x.example/", "outcome": "failed", "duration": -1}, "duration"),
        ({"url": "https://x.example/", "outcome": "failed", "execution_id": "x"}, "execution_id"),
    ],
)
def test_webhook_delivery_errors_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    response = api.call("POST", "webhook-deliveries/", body)
    assert error_of(response) == (400, "validation_error")
    assert response.json()["detail"].startswith(f"{field}:")
    if field == "outcome":
        assert "delivered, failed, blocked" in response.json()["detail"]


# --- schema and admin ------------------------------------------------------------------------


def test_schema_describes_every_endpoint(api: Api) -> None:
    response = api.call("GET", "schema/?format=json", headers=api.headers())
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    assert set(paths) == {
        "/internal/v1/health/",
        "/internal/v1/metrics/",
        "/internal/v1/workflow-executions/",
        "/internal/v1/workflow-executions/{id}/",
        "/internal/v1/workflow-executions/{id}/status/",
        "/internal/v1/workflow-executions/{id}/claim/",
        "/internal/v1/workflow-executions/{id}/heartbeat/",
        "/internal/v1/workflow-executions/{id}/release/",
        "/internal/v1/workflow-executions/{id}/events/",
        "/internal/v1/webhook-deliveries/",
        "/internal/v1/webhook-deliveries/{id}/",
        "/internal/v1/file-executions/",
        "/internal/v1/file-executions/batch/",
        "/internal/v1/file-executions/{id}/",
    }
    assert error_of(api.call("GET", "schema/", headers={})) == (401, "authentication_required")


def test_admin_is_read_only(admin_client: Any, api: Api) -> None:
    execution = create(api)
    page = admin_client.get("/admin/internal_api/workflowexecution/")
    assert page.status_code == 200 and execution["id"] in page.content.decode()
    assert admin_client.get("/admin/internal_api/workflowexecution/add/").status_code == 403
    change = f"/admin/internal_api/workflowexecution/{execution['id']}/change/"
    assert admin_client.get(change).status_code == 200  # viewable
    response = admin_client.post(change, {"status": "COMPLETED"})
    assert response.status_code == 403
    assert WorkflowExecution.objects.get(pk=execution["id"]).status == "PENDING"


# --- rendering and secrecy -------------------------------------------------------------------


def test_direct_execution_rendering_equals_drf_generic_rendering(api: Api) -> None:
    from rest_framework import serializers
    from rest_framework.renderers import JSONRenderer

    from backend.internal_api.serializers import ExecutionSerializer

    # The lease and the webhook are not model fields: test_lifecycle_api checks them.
    computed = {"lease", "webhook"}

    class Generic(serializers.ModelSerializer):
        organization_id = serializers.CharField()
        result = serializers.JSONField()

        class Meta:
            model = WorkflowExecution
            fields = [name for name in ExecutionSerializer().fields if name not in computed]

    execution = at_status(api, "COMPLETED")
    api.call(
        "PATCH",
        f"workflow-executions/{execution['id']}/",
        {"result": {"a": [1, 2.5, None, "é"]}, "total_files": 3},
    )
    create(api, pipeline_id="p")
    for row in WorkflowExecution.objects.filter(organization_id=api.org_id):
        direct = json.loads(JSONRenderer().render(ExecutionSerializer(row).data))
        generic = json.loads(JSONRenderer().render(Generic(row).data))
        assert {k: v for k, v in direct.items() if k not in computed} == generic


def test_the_key_never_reaches_a_log_line(
    api: Api, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    key = api.api_key
    for authorization in (f"Bearer {key}x", key, f"Bearer {key[:8]}", f"Basic {key}"):
        api.call("GET", "health/", headers={"Authorization": authorization})
    execution = create(api)
    set_status(api, execution["id"], "NOPE")
    post_with_key(api, "workflow-executions/", {"workflow_id": "w"}, "secret-test")
    api.call("POST", "workflow-executions/", raw="{")
    out, err = capfd.readouterr()
    captured = caplog.text + out + err + repr([r.__dict__ for r in caplog.records])
    assert "authentication failed" in captured  # the lines were captured
    assert key not in captured and key[:8] not in captured
