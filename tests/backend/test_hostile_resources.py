"""Hostile and careless input for the declared resources, table-driven as ``test_hostile``
(whose value tables and answer invariants it reuses): every body field of a file execution's
create, update and batch items, the batch's ``items`` itself, every header (``If-Match`` and
``If-None-Match`` too), query parameter and path id.

Runs on SQLite here and on PostgreSQL through ``test_api_postgres.py``. Every case: no 5xx;
errors are ``{"error", "detail"}``; a refused request stored nothing; an accepted one left
the file, its execution and the lists readable.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from backend.internal_api.models import FileExecution, WorkflowExecution
from tests.backend.conftest import Api
from tests.backend.test_hostile import (
    HEADER_VALUES,
    MUST_REFUSE,
    QUERY_VALUES,
    VALUES,
    check_answer,
    parse,
    same_json,
)

pytestmark = pytest.mark.django_db

# (field, kind, bounds) of a file execution's body fields.
FILE_FIELDS: list[tuple[str, str, Any]] = [
    ("execution_id", "uuid", None),
    ("file_name", "name", 1024),
    ("file_hash", "str", 128),
    ("status", "choice", None),
    ("error_message", "str", 10_000),
    ("execution_time", "float", (0.0, 1e9)),
    ("result", "json", None),
]
NULLABLE = {"execution_time", "result"}
# Endpoint -> the fields it takes (an update never moves a file to another execution).
ENDPOINT_FIELDS = {
    "create": FILE_FIELDS,
    "patch": [f for f in FILE_FIELDS if f[0] != "execution_id"],
    "batch_create": FILE_FIELDS,
    "batch_update": [f for f in FILE_FIELDS if f[0] != "execution_id"] + [("id", "uuid", None)],
}
CASES = [(endpoint, *spec) for endpoint, fields in ENDPOINT_FIELDS.items() for spec in fields]


def must_be_refused(field: str, kind: str, bounds: Any, literal: str) -> bool:
    """True when the server has to answer 400 for this value in this field."""
    if literal in MUST_REFUSE:
        return True
    value = parse(literal)
    if value is None:
        return field not in NULLABLE
    if kind in ("uuid", "choice"):
        return True  # no value of the tables is a UUID or a file status
    if kind == "float":
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        return wrong or not bounds[0] <= value <= bounds[1]
    if kind in ("str", "name"):
        blank = kind == "name" and isinstance(value, str) and not value.strip()
        return not isinstance(value, str) or len(value) > bounds or blank
    return False


def snapshot(api: Api) -> Any:
    """The organization's files and executions as stored."""
    files = FileExecution.objects.filter(organization_id=api.org_id).order_by("pk").values()
    executions = WorkflowExecution.objects.filter(organization_id=api.org_id).order_by("pk")
    return list(files), list(executions.values())


@pytest.fixture
def ids(api: Api) -> dict[str, str]:
    """An execution of the organization and one PENDING file of it."""
    execution = api.call("POST", "workflow-executions/", {"workflow_id": "wf"}).json()
    body = {"execution_id": execution["id"], "file_name": "f.pdf"}
    file = api.call("POST", "file-executions/", body).json()
    return {"execution": execution["id"], "file": file["id"]}


def still_readable(api: Api, ids: dict[str, str]) -> None:
    for path in (
        f"file-executions/{ids['file']}/",
        f"workflow-executions/{ids['execution']}/",
        "file-executions/",
        f"file-executions/?execution_id={ids['execution']}",
    ):
        response = api.call("GET", path)
        assert response.status_code == 200, response.content[:300]
        check_answer(response, api)


def body_with(endpoint: str, ids: dict[str, str], field: str, literal: str) -> bytes:
    """The endpoint's minimal body with ``field`` set to the raw literal."""
    base: dict[str, Any] = {
        "create": {"execution_id": ids["execution"], "file_name": "n"},
        "patch": {},
        "batch_create": {"execution_id": ids["execution"], "file_name": "n"},
        "batch_update": {"id": ids["file"]},
    }[endpoint]
    inner = json.dumps({k: v for k, v in base.items() if k != field})[1:-1]
    item = "{" + (inner + ", " if inner else "") + f'"{field}": {literal}' + "}"
    return (f'{{"items": [{item}]}}' if endpoint.startswith("batch") else item).encode()


def route(endpoint: str, ids: dict[str, str]) -> tuple[str, str]:
    return {
        "create": ("POST", "file-executions/"),
        "patch": ("PATCH", f"file-executions/{ids['file']}/"),
        "batch_create": ("POST", "file-executions/batch/"),
        "batch_update": ("POST", "file-executions/batch/"),
    }[endpoint]


@pytest.mark.parametrize("literal", VALUES)
@pytest.mark.parametrize(
    ("endpoint", "field", "kind", "bounds"), CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES]
)
def test_every_body_field_with_hostile_values(
    api: Api, ids: dict[str, str], endpoint: str, field: str, kind: str, bounds: Any, literal: str
) -> None:
    before = snapshot(api)
    method, path = route(endpoint, ids)
    response = api.call(method, path, raw=body_with(endpoint, ids, field, literal))
    body = check_answer(response, api)
    if must_be_refused(field, kind, bounds, literal):
        assert response.status_code == 400, (response.status_code, body)
    if response.status_code >= 400:
        assert response.status_code == 400, body
        assert snapshot(api) == before, "a refused request stored something"
        if body["error"] == "validation_error":
            assert field in body["detail"] or "body" in body["detail"], body
    else:
        still_readable(api, ids)
        if kind == "json" and endpoint in ("patch", "batch_update"):
            stored = api.call("GET", f"file-executions/{ids['file']}/").json()[field]
            assert same_json(stored, parse(literal))


@pytest.mark.parametrize(
    "items",
    [
        *VALUES,
        *(f"[{literal}]" for literal in VALUES),
        "[" + ", ".join(['{"id": null}'] * 2) + "]",
        "[" + ", ".join(["{}"] * 501) + "]",
        "[" + ", ".join(['{"execution_id": "{eid}", "file_name": "n"}'] * 501) + "]",
        "[" + ", ".join(["1"] * 100_000) + "]",
        "[[" * 40 + "]]" * 40,
    ],
)
def test_the_batch_items_with_hostile_values(api: Api, ids: dict[str, str], items: str) -> None:
    """Anything but a list of 1 to 500 good items (an empty one too) is a 400 (413 past the
    body limit) that writes nothing."""
    before = snapshot(api)
    raw = '{"items": ' + items.replace("{eid}", ids["execution"]) + "}"
    response = api.call("POST", "file-executions/batch/", raw=raw.encode())
    body = check_answer(response, api)
    assert response.status_code in (400, 413), body
    assert snapshot(api) == before
    if response.status_code == 400 and body["error"] == "validation_error":
        assert body["detail"].startswith("items"), body


HEADERS = [
    "X-Organization-ID",
    "Idempotency-Key",
    "If-Match",
    "If-None-Match",
    "X-Request-ID",
    "Content-Type",
]
HEADER_ENDPOINTS = ["create", "patch", "batch", "read", "delete"]


@pytest.mark.parametrize("value", HEADER_VALUES)
@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("endpoint", HEADER_ENDPOINTS)
def test_every_header_with_hostile_values(
    api: Api, ids: dict[str, str], endpoint: str, header: str, value: str
) -> None:
    before = snapshot(api)
    file_path = f"file-executions/{ids['file']}/"
    method, path, payload = {
        "create": (
            "POST",
            "file-executions/",
            {"execution_id": ids["execution"], "file_name": "n"},
        ),
        "patch": ("PATCH", file_path, {"status": "IN_PROGRESS"}),
        "batch": ("POST", "file-executions/batch/", {"items": [{"id": ids["file"]}]}),
        "read": ("GET", file_path, None),
        "delete": ("DELETE", file_path, None),
    }[endpoint]
    headers = api.headers()
    content_type = "application/json"
    if header == "Content-Type":
        content_type = value
    else:
        headers[header] = value
    response = api.client.generic(
        method,
        f"/internal/v1/{path}",
        data=json.dumps(payload).encode() if payload is not None else b"",
        content_type=content_type,
        headers=headers,
    )
    body = check_answer(response, api)
    unstorable = "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if unstorable and header not in ("Content-Type", "X-Request-ID"):
        assert response.status_code == 400 and header.lower() in body["detail"].lower(), body
    if header == "If-Match" and endpoint in ("patch", "delete", "read") and not unstorable:
        assert (response.status_code, body["error"]) == (412, "precondition_failed"), body
    if header == "If-Match" and endpoint in ("create", "batch") and not unstorable:
        assert (response.status_code, body["error"]) == (400, "validation_error"), body
        assert body["detail"].startswith("If-Match: POST "), body
    if header == "If-None-Match" and endpoint == "read" and response.status_code == 200:
        assert value.strip() != "*"
    if header == "If-None-Match" and endpoint != "read" and not unstorable:
        assert (response.status_code, body["error"]) == (400, "validation_error"), body
        assert body["detail"].startswith(f"If-None-Match: {method} "), body
    if response.status_code >= 400:
        assert snapshot(api) == before
    elif endpoint != "delete":
        still_readable(api, ids)


@pytest.mark.parametrize("value", HEADER_VALUES)
@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_version_headers_of_workflow_executions_with_hostile_values(
    api: Api, ids: dict[str, str], method: str, header: str, value: str
) -> None:
    """``If-Match`` that is not the current ETag: 412 (a GET too), nothing changed;
    ``If-None-Match`` that is not it: a full answer to a GET, a 400 to a write (NUL and
    surrogates: 400 naming the header)."""
    before = snapshot(api)
    path = f"/internal/v1/workflow-executions/{ids['execution']}/"
    response = api.client.generic(
        method,
        path,
        data=b'{"total_files": 1}' if method == "PATCH" else b"",
        content_type="application/json",
        headers={**api.headers(), header: value},
    )
    body = check_answer(response, api)
    unstorable = "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if unstorable:
        assert response.status_code == 400 and header.lower() in body["detail"].lower(), body
    elif header == "If-Match":
        assert (response.status_code, body["error"]) == (412, "precondition_failed"), body
    elif method == "GET":
        assert response.status_code == 200, body
    else:  # If-None-Match on a write: refused, never ignored
        assert (response.status_code, body["error"]) == (400, "validation_error"), body
    if response.status_code >= 400:
        assert snapshot(api) == before


QUERIES = ["execution_id", "status", "limit", "cursor", "format", "%00"]


@pytest.mark.parametrize("value", QUERY_VALUES)
@pytest.mark.parametrize("name", QUERIES)
def test_every_query_parameter_with_hostile_values(
    api: Api, ids: dict[str, str], name: str, value: str
) -> None:
    response = api.client.get(
        "/internal/v1/file-executions/", QUERY_STRING=f"{name}={value}", headers=api.headers()
    )
    body = check_answer(response, api)
    assert response.status_code in (200, 400, 406), body
    if response.status_code == 400:
        assert name.replace("%00", "\\x00") in body["detail"], body
    if name == "status" and response.status_code == 200:
        pytest.fail(f"status={value} is no file status")
    if "%00" in value or name == "%00":
        assert response.status_code == 400, body


@pytest.mark.parametrize(
    "segment",
    [
        "%00",
        "%ED%A0%80",
        "%FF",
        "%C2%B2" * 32,
        "00000000-0000-0000-0000-00000000000%D9%A3",
        "x" * 5000,
        "..",
        "00000000000000000000000000000000",
        "00000000-0000-0000-0000-000000000000",
        "-1",
        "1e309",
    ],
)
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_every_path_id_with_hostile_values(
    api: Api, ids: dict[str, str], method: str, segment: str
) -> None:
    before = snapshot(api)
    response = api.client.generic(
        method,
        f"/internal/v1/file-executions/{segment}/",
        data=b'{"status": "ERROR"}' if method == "PATCH" else b"",
        content_type="application/json",
        headers=api.headers(),
    )
    body = check_answer(response, api)
    assert response.status_code == 404, body
    assert snapshot(api) == before
