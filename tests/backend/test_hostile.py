"""Hostile and careless input, table-driven: every body field of every endpoint (the lifecycle
ones included: claim, heartbeat, release, the finish), every header (``X-Lease-Epoch`` too)
and query parameter, with unpaired surrogates, NUL and other control characters, non-ASCII
digits, huge numbers, wrong JSON types, overlong strings and invalid UTF-8.

Runs on SQLite here and on PostgreSQL through ``test_api_postgres.py`` (which runs this module
again against a database of its own). Every case asserts the same invariants: no 5xx; an
error is the JSON ``{"error", "detail"}``; no traceback and no API key in any answer; a refused
request stored nothing; an accepted one left the object and the organization's list readable.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from backend.internal_api.models import (
    Dispatch,
    ExecutionEvent,
    WebhookDelivery,
    WorkflowExecution,
)
from tests.backend.conftest import Api

pytestmark = pytest.mark.django_db

MAX_INT = 2**31 - 1

# Raw JSON literals, each a value of one JSON type (the text is sent as it is).
SURROGATES = ['"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"', '{"\\ud800": 1}', '["\\udbff"]']
NULS = ['"\\u0000"', '"a\\u0000b"', '{"k": "\\u0000"}', '{"\\u0000": 1}']
OVERFLOWING = ["1e309", "-1e309", "[1e400]", '{"x": -1e999}']
MUST_REFUSE = SURROGATES + NULS + OVERFLOWING
CONTROLS = ['"\\u0001"', '"\\u001b[31mred"', '"\\u007f"', '"line\\nbreak"', '"\\u202eevil"']
DIGITS = ['"\\u00b2"', '"\\u0663"', '"\\uff13"', '"\\u0969\\u0969"', '"12"', '"1e3"']
NUMBERS = ["0", "1", "-1", "1.5", "2147483648", "1" + "0" * 40, "1e308", "-0.0", "1e-320"]
WRONG_TYPES = ["[]", "{}", "true", "false", "null", '[1, "a"]', '{"a": {"b": []}}', '""', '" "']
OVERLONG = [json.dumps("x" * 256), json.dumps("y" * 10_001), json.dumps("é" * 3000)]
VALUES = MUST_REFUSE + CONTROLS + DIGITS + NUMBERS + WRONG_TYPES + OVERLONG

# (endpoint, field, kind, bounds): what each body field takes.
FIELDS: list[tuple[str, str, str, Any]] = [
    ("create", "workflow_id", "str", 255),
    ("create", "pipeline_id", "str", 255),
    ("create", "total_files", "int", (0, MAX_INT)),
    ("create", "task_id", "str", 255),
    ("patch", "result", "json", None),
    ("patch", "total_files", "int", (0, MAX_INT)),
    ("patch", "successful_files", "int", (0, MAX_INT)),
    ("patch", "failed_files", "int", (0, MAX_INT)),
    ("patch", "task_id", "str", 255),
    ("patch", "pipeline_id", "str", 255),
    ("status", "status", "choice", None),
    ("status", "error_message", "str", 10_000),
    ("status", "attempts", "int", (0, MAX_INT)),
    ("status", "execution_time", "float", (0.0, 1e9)),
    ("delivery", "url", "str", 2048),
    ("delivery", "execution_id", "uuid", None),
    ("delivery", "status_code", "int", (100, 599)),
    ("delivery", "attempts", "int", (0, MAX_INT)),
    ("delivery", "duration", "float", (0.0, 1e9)),
    ("delivery", "outcome", "choice", None),
    ("delivery", "error_message", "str", 10_000),
    ("delivery", "webhook_id", "str", 40),
    ("create", "webhook_url", "str", 2048),
    ("create", "dispatch", "object", None),
    ("claim", "worker", "str", 255),
    ("claim", "lease_seconds", "int", (1, 3600)),
    ("claim", "dispatch", "object", None),
    ("heartbeat", "epoch", "int", (1, MAX_INT)),
    ("heartbeat", "lease_seconds", "int", (1, 3600)),
    ("release", "epoch", "int", (1, MAX_INT)),
    ("release", "retry_in", "float", (0.0, 86400.0)),
    ("finish", "result", "json", None),
    ("finish", "total_files", "int", (0, MAX_INT)),
    ("finish", "successful_files", "int", (0, MAX_INT)),
    ("finish", "failed_files", "int", (0, MAX_INT)),
]
# The fixture's execution is claimed with this epoch (except for the claim endpoint's tests).
EPOCH = 1
BASE_BODY = {
    "create": {"workflow_id": "wf"},
    "patch": {},
    "status": {"status": "QUEUED"},
    "delivery": {"url": "https://receiver.example/hook", "outcome": "delivered"},
    "claim": {"worker": "w"},
    "heartbeat": {"epoch": EPOCH},
    "release": {"epoch": EPOCH},
    "finish": {"status": "COMPLETED"},
}
# Conflicts an endpoint may answer for a well-formed request (the state forbids it).
CONFLICTS = {"status": {"illegal_transition"}, "finish": {"illegal_transition"}}
NULLABLE = {"pipeline_id", "result", "error_message", "attempts", "execution_time"}
NULLABLE |= {"total_files", "successful_files", "failed_files"}  # of a finish: no change
NULLABLE_BY_ENDPOINT = {("delivery", "execution_id"), ("delivery", "status_code")}
NOT_NULLABLE_BY_ENDPOINT = {("create", "total_files"), ("patch", "total_files")}
NOT_NULLABLE_BY_ENDPOINT |= {("patch", "successful_files"), ("patch", "failed_files")}


def parse(literal: str) -> Any:
    """The Python value of a literal (Python's parser keeps surrogates and overflows)."""
    return json.loads(literal)


def must_be_refused(endpoint: str, field: str, kind: str, bounds: Any, literal: str) -> bool:
    """True when the server has to answer 400 for this value in this field."""
    if literal in MUST_REFUSE:
        return True
    value = parse(literal)
    if value is None:
        if (endpoint, field) in NOT_NULLABLE_BY_ENDPOINT:
            return True
        return field not in NULLABLE and (endpoint, field) not in NULLABLE_BY_ENDPOINT
    if kind == "object":
        return not isinstance(value, dict)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON's 1.0 is the integer 1
        return type(value) is not int or not bounds[0] <= value <= bounds[1]
    if kind == "float":
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        return wrong or not bounds[0] <= value <= bounds[1]
    if kind in ("str", "choice", "uuid"):
        return not isinstance(value, str) or (kind == "str" and len(value) > bounds)
    return False


def same_json(stored: Any, sent: Any) -> bool:
    """Equal as JSON values; a number may come back as another type of the same value
    (PostgreSQL's jsonb returns ``1e308`` as an integer of 309 digits)."""
    if isinstance(sent, float) and isinstance(stored, int | float):
        return float(stored) == sent
    if isinstance(sent, list) and isinstance(stored, list):
        return len(sent) == len(stored) and all(map(same_json, stored, sent))
    if isinstance(sent, dict) and isinstance(stored, dict):
        return sent.keys() == stored.keys() and all(same_json(stored[k], sent[k]) for k in sent)
    return bool(stored == sent and type(stored) is type(sent))


def check_answer(response: Any, api: Api) -> Any:
    """The invariants every answer keeps; returns the parsed body (None for a 204)."""
    assert response.status_code < 500, response.content[:500]
    text = response.content.decode("utf-8")  # the answer itself is always valid UTF-8
    assert "Traceback" not in text and 'File "' not in text
    assert api.api_key not in text and api.api_key[:12] not in text
    if response.status_code == 204:
        return None
    assert response["Content-Type"] == "application/json"
    body = json.loads(text)
    if response.status_code >= 400:
        assert set(body) == {"error", "detail"}, body
        assert isinstance(body["detail"], str) and len(body["detail"]) <= 2003
        assert body["detail"].isprintable(), body["detail"]
    return body


def snapshot(api: Api) -> Any:
    """Everything the organization has stored (to prove a refusal stored nothing)."""
    executions = list(
        WorkflowExecution.objects.filter(organization_id=api.org_id).order_by("pk").values()
    )
    deliveries = list(
        WebhookDelivery.objects.filter(organization_id=api.org_id).order_by("pk").values()
    )
    mine = {"execution__organization_id": api.org_id}
    events = list(ExecutionEvent.objects.filter(**mine).order_by("pk").values())
    dispatches = list(Dispatch.objects.filter(**mine).order_by("pk").values())
    return executions, deliveries, events, dispatches


def still_readable(api: Api, execution_id: str) -> None:
    """The execution, the organization's lists: all readable after an accepted request."""
    for path in (
        f"workflow-executions/{execution_id}/",
        f"workflow-executions/{execution_id}/events/",
        "workflow-executions/",
        "webhook-deliveries/",
    ):
        response = api.call("GET", path)
        assert response.status_code == 200, response.content[:300]
        check_answer(response, api)


def route(endpoint: str, execution_id: str) -> tuple[str, str]:
    """The method and path of one of the write endpoints under test."""
    return {
        "create": ("POST", "workflow-executions/"),
        "patch": ("PATCH", f"workflow-executions/{execution_id}/"),
        "status": ("POST", f"workflow-executions/{execution_id}/status/"),
        "delivery": ("POST", "webhook-deliveries/"),
        "claim": ("POST", f"workflow-executions/{execution_id}/claim/"),
        "heartbeat": ("POST", f"workflow-executions/{execution_id}/heartbeat/"),
        "release": ("POST", f"workflow-executions/{execution_id}/release/"),
        "finish": ("POST", f"workflow-executions/{execution_id}/status/"),
    }[endpoint]


def send(api: Api, endpoint: str, execution_id: str, raw: bytes) -> Any:
    """POST/PATCH one raw body to the endpoint."""
    method, path = route(endpoint, execution_id)
    return api.call(method, path, raw=raw)


def with_field(endpoint: str, field: str, literal: str) -> bytes:
    """The endpoint's minimal body with ``field`` set to the raw literal."""
    body = {k: v for k, v in BASE_BODY[endpoint].items() if k != field}
    text = json.dumps(body)
    inner = text[1:-1]
    return ("{" + (inner + ", " if inner else "") + f'"{field}": {literal}' + "}").encode()


@pytest.fixture
def execution_id(api: Api, request: pytest.FixtureRequest) -> str:
    """An execution of the organization, IN_PROGRESS (so that any status may follow): under
    lease ``EPOCH``, or, for the claim endpoint's tests, without a lease (claimable)."""
    created = api.call("POST", "workflow-executions/", {"workflow_id": "wf"}).json()
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("endpoint") == "claim":
        path = f"workflow-executions/{created['id']}/status/"
        assert api.call("POST", path, {"status": "IN_PROGRESS"}).status_code == 200
    else:
        path = f"workflow-executions/{created['id']}/claim/"
        claimed = api.call("POST", path, {"worker": "fixture", "lease_seconds": 600})
        assert claimed.json()["lease"]["epoch"] == EPOCH
    return str(created["id"])


@pytest.mark.parametrize("literal", VALUES)
@pytest.mark.parametrize(
    ("endpoint", "field", "kind", "bounds"),
    FIELDS,
    ids=[f"{endpoint}.{field}" for endpoint, field, _, _ in FIELDS],
)
def test_every_body_field_with_hostile_values(
    api: Api, execution_id: str, endpoint: str, field: str, kind: str, bounds: Any, literal: str
) -> None:
    before = snapshot(api)
    response = send(api, endpoint, execution_id, with_field(endpoint, field, literal))
    body = check_answer(response, api)
    if must_be_refused(endpoint, field, kind, bounds, literal):
        assert response.status_code == 400, (response.status_code, body)
    if response.status_code >= 400:
        conflict = response.status_code == 409 and body["error"] in CONFLICTS.get(endpoint, ())
        assert response.status_code == 400 or conflict, (response.status_code, body)
        assert snapshot(api) == before, "a refused request stored something"
        if response.status_code == 400 and body["error"] == "validation_error":
            assert field in body["detail"] or "body" in body["detail"], body
    else:
        still_readable(api, execution_id)
        if kind == "json":
            stored = api.call("GET", f"workflow-executions/{execution_id}/").json()[field]
            assert same_json(stored, parse(literal))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"workflow_id": "\xff"}',
        b'{"workflow_id": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 (CESU-8)
        b'{"workflow_id": "\xc0\xaf"}',  # overlong encoding of '/'
        b'{"workflow_id": "\xf4\x90\x80\x80"}',  # above U+10FFFF
        b'{"workflow_id": "w"}\xff',
        b"\xef\xbb\xbf{}",  # a byte order mark
        b"\x00",
        b'{"workflow_id": "w", "workflow_id": "\\ud800"}',  # duplicate key, the last wins
        b'{"result": ' + b"[" * 70 + b"]" * 70 + b"}",
        b'{"result": ' + b"[" * 100_000 + b"}",
        b'{"workflow_id": "w"} {"workflow_id": "w"}',
        b'{"workflow_id": NaN}',
        b'{"workflow_id": Infinity}',
        b'{"workflow_id": 1' + b"0" * 5000 + b"}",
    ],
)
@pytest.mark.parametrize("endpoint", list(BASE_BODY))
def test_invalid_bytes_and_json_in_every_body(
    api: Api, execution_id: str, endpoint: str, raw: bytes
) -> None:
    before = snapshot(api)
    response = send(api, endpoint, execution_id, raw)
    check_answer(response, api)
    assert response.status_code == 400, response.content
    assert snapshot(api) == before


HEADER_VALUES = [
    "\ud800",
    "org\udfff",
    "\x00",
    "a\x00b",
    "\x01",
    "\x1b[2J",
    "\x7f",
    "²",
    "٣",
    "\uff13",  # fullwidth 3
    "é",
    "x" * 300,
    "",
    " ",
    "1e309",
    "-1",
    "null",
]
# The headers are checked before any view runs, and every view checks the organization the
# same way: the lifecycle endpoints are represented by a claim and a release (the finish and
# the fenced writes get X-Lease-Epoch's own table below).
HEADER_ENDPOINTS = ["create", "patch", "status", "delivery", "claim", "release"]
HEADERS = [
    "X-Organization-ID",
    "Idempotency-Key",
    "X-Request-ID",
    "Content-Type",
    "X-Other",
]


@pytest.mark.parametrize("value", HEADER_VALUES)
@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("endpoint", HEADER_ENDPOINTS)
def test_every_header_with_hostile_values(
    api: Api, execution_id: str, endpoint: str, header: str, value: str
) -> None:
    before = snapshot(api)
    raw = json.dumps(BASE_BODY[endpoint]).encode()
    method, path = route(endpoint, execution_id)
    headers = api.headers()
    content_type = "application/json"
    if header == "Content-Type":
        content_type = value
    else:
        headers[header] = value
    response = getattr(api.client, method.lower())(
        f"/internal/v1/{path}", data=raw, content_type=content_type, headers=headers
    )
    body = check_answer(response, api)
    echoed = response.get("X-Request-ID", "")
    assert echoed and echoed.isascii() and echoed.isprintable() and "\x00" not in echoed
    unstorable = "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if unstorable and header != "Content-Type" and header != "X-Request-ID":
        assert response.status_code == 400 and header.lower() in body["detail"].lower(), body
    if response.status_code >= 400:
        assert snapshot(api) == before
    else:
        still_readable(api, execution_id)


QUERY_VALUES = [
    "%00",
    "a%00b",
    "%ED%A0%80",  # a surrogate in CESU-8: not UTF-8
    "%FF",
    "%01",
    "%C2%B2",  # '²'
    "%D9%A3",  # '٣'
    "%EF%BC%93",  # fullwidth 3
    "1e309",
    "-1",
    "0",
    "501",
    "1" + "0" * 40,
    "",
    "%20",
    "x" * 3000,
    "[]",
    "null",
    "true",
    "00000000-0000-0000-0000-000000000000",
    "%D9%A3" * 32,  # 32 Arabic-Indic digits: uuid.UUID would take them
    "{00000000-0000-0000-0000-000000000000}",
    "MjAyNnxub3Q",  # base64 of a half cursor
]
QUERIES = [
    ("workflow-executions/", "status"),
    ("workflow-executions/", "workflow_id"),
    ("workflow-executions/", "limit"),
    ("workflow-executions/", "cursor"),
    ("webhook-deliveries/", "execution_id"),
    ("webhook-deliveries/", "limit"),
    ("webhook-deliveries/", "cursor"),
    ("workflow-executions/", "format"),
    ("workflow-executions/", "%00"),
]


@pytest.mark.parametrize("value", QUERY_VALUES)
@pytest.mark.parametrize(("path", "name"), QUERIES)
def test_every_query_parameter_with_hostile_values(
    api: Api, execution_id: str, path: str, name: str, value: str
) -> None:
    response = api.client.get(
        f"/internal/v1/{path}", QUERY_STRING=f"{name}={value}", headers=api.headers()
    )
    body = check_answer(response, api)
    assert response.status_code in (200, 400, 406), body
    if response.status_code == 400:
        assert name.replace("%00", "\\x00") in body["detail"], body
    if name == "limit" and response.status_code == 200:
        assert value.isascii() and value.isdigit() and 1 <= int(value) <= 500
    if name == "execution_id" and response.status_code == 200:
        assert str(uuid.UUID(value)) == value
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
        "%2e%2e",
        "00000000000000000000000000000000",
        "-1",
        "1e309",
    ],
)
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("GET", "workflow-executions/{}/"),
        ("PATCH", "workflow-executions/{}/"),
        ("DELETE", "workflow-executions/{}/"),
        ("POST", "workflow-executions/{}/status/"),
        ("POST", "workflow-executions/{}/claim/"),
        ("POST", "workflow-executions/{}/heartbeat/"),
        ("POST", "workflow-executions/{}/release/"),
        ("GET", "workflow-executions/{}/events/"),
        ("GET", "webhook-deliveries/{}/"),
    ],
)
def test_every_path_id_with_hostile_values(
    api: Api, execution_id: str, method: str, template: str, segment: str
) -> None:
    before = snapshot(api)
    response = api.client.generic(
        method,
        "/internal/v1/" + template.format(segment),
        data=b'{"status": "QUEUED"}' if method != "GET" else b"",
        content_type="application/json",
        headers=api.headers(),
    )
    body = check_answer(response, api)
    assert response.status_code == 404, body
    assert snapshot(api) == before


EPOCH_VALUES = [
    *HEADER_VALUES,
    "0",
    "00",
    "+1",
    " 1",
    "1 ",
    "1.0",
    "1e0",
    "0x1",
    "\u0661",  # Arabic-Indic 1
    "\uff11",  # fullwidth 1
    "1\u0660",
    "2147483649",
    "9" * 11,
    "1" + "0" * 5000,
    "true",
    "[1]",
]
FENCED = ["status", "patch", "delivery", "finish"]


@pytest.mark.parametrize("value", [*EPOCH_VALUES, str(EPOCH), f"0{EPOCH}", "2147483648"])
@pytest.mark.parametrize("endpoint", FENCED)
def test_lease_epoch_header_with_hostile_values(
    api: Api, execution_id: str, endpoint: str, value: str
) -> None:
    """ASCII digits from 1 to 2**31 or a 400 naming the header; a well-formed epoch that is
    not the current one is 409 lease_lost; refusals store nothing."""
    before = snapshot(api)
    body = dict(BASE_BODY[endpoint])
    if endpoint == "status":
        body["status"] = "IN_PROGRESS"  # the holder's no-op (QUEUED would be illegal)
    if endpoint == "delivery":
        body["execution_id"] = execution_id
    method, path = route(endpoint, execution_id)
    headers = {**api.headers(), "X-Lease-Epoch": value}
    response = api.call(method, path, body, headers=headers)
    answer = check_answer(response, api)
    digits = value.isascii() and value.isdigit() and len(value) <= 10
    well_formed = digits and 1 <= int(value) <= 2**31
    if not well_formed:
        assert response.status_code == 400, answer
        assert "x-lease-epoch" in answer["detail"].lower(), answer
    elif int(value) != EPOCH:
        assert (response.status_code, answer["error"]) == (409, "lease_lost"), answer
    else:
        assert response.status_code in (200, 201), answer
    if response.status_code >= 400:
        assert snapshot(api) == before
    else:
        still_readable(api, execution_id)


@pytest.mark.parametrize("value", [*HEADER_VALUES, "Bearer \ud800", "Bearer \x00", "Bearer"])
def test_authorization_with_hostile_values(api: Api, value: str) -> None:
    response = api.client.get(
        "/internal/v1/health/", headers={"Authorization": value, "X-Organization-ID": api.org_id}
    )
    body = check_answer(response, api)
    assert response.status_code == 401, body


def test_value_tables_are_what_they_claim() -> None:
    """The table's own premises: the literals parse as intended."""
    assert all(math.isinf(parse(v)) for v in ("1e309", "-1e309"))
    assert all("\x00" in json.dumps(parse(v)).encode().decode("unicode_escape") for v in NULS)
    for literal in SURROGATES:
        with pytest.raises(UnicodeEncodeError):
            json.dumps(parse(literal), ensure_ascii=False).encode()
    assert uuid.UUID("\u0663" * 32)  # why execution_id needs its own ASCII check
