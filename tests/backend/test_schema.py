"""schemathesis against the backend's own OpenAPI document, over real HTTP.

Bounded: 10 examples per operation and phase (a few hundred requests, seconds). Checks: no
5xx, every status code, content type, header and body conforms to the document, and the
document states what the server enforces: every request it calls valid is accepted
(``positive_data_acceptance``) and every request it calls invalid is refused
(``negative_data_rejection``, schemathesis' ST202/ST203 findings).

What no schema can state is given to schemathesis in its configuration (``CONFIG``): a ``cursor`` is
one this API returned (a made-up one is 400 ``invalid_cursor``), so the run sends none; 422 is this
API's answer to an ``Idempotency-Key`` reused with another body (the generator repeats keys), so it
counts as accepted; a delivery's ``execution_id`` must name an existing execution of the
organization (400 otherwise), so for ``POST webhook-deliveries/`` a 400 counts as accepted too, and
so for ``POST file-executions/`` and its ``batch/`` (an item's ``execution_id`` or ``id`` must name
an existing object). A generated ``If-Match`` is a stale version: 412 counts as accepted (and as a
refusal), in the POSTs' overrides too (schemathesis 4.32 applies them to the GET of the same path,
which honours ``If-Match``). The organization header is a fixed parameter, not a ``-H`` header:
schemathesis would otherwise generate a bad one, send ours instead and report the accepted request
as a schema violation. PATCH's ``result`` is any JSON without NUL in its strings and field names:
OpenAPI 3.0 has no ``propertyNames`` to say so (the document's description does), so the run
generates no NUL for PATCH. The stateful phase does not run the negative-data check: there
schemathesis (4.32) reports valid requests as "Schema-violating request accepted", its own message
saying "Invalid component: positive test case"; the coverage and fuzzing phases run it, where
gunicorn's 414 and 431 (a generated query too long for its request line) count as refusals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.backend.conftest import Api
from tests.live_backend import LiveBackend

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
    ]
)
STATEFUL_CHECKS = CHECKS.replace(",negative_data_rejection", "")
CONFIG = """
[parameters]
"query.cursor" = ""
"header.X-Organization-ID" = "{org_id}"

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "3XX", "401", "403", "404", "409", "412", "422", "429", "5XX"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "412", "413", "414", "415",
    "422", "428", "429", "431", "5XX"]

[[operations]]
include-method = "PATCH"
generation.allow-x00 = false

[[operations]]
include-path-regex = "/webhook-deliveries/$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2XX", "3XX", "400", "401", "403", "404", "409", "412", "422", "429", "5XX"
]

[[operations]]
include-path-regex = "/file-executions/(batch/)?$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2XX", "3XX", "400", "401", "403", "404", "409", "412", "422", "429", "5XX"
]
"""


@pytest.mark.parametrize(
    "backend_fixture",
    ["live_backend", pytest.param("live_backend_pg", marks=pytest.mark.postgres)],
)
def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    backend_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    live_backend: LiveBackend = request.getfixturevalue(backend_fixture)
    org_id = live_backend.create_organization(f"org-st-{uuid.uuid4().hex[:8]}")
    log_start = len(live_backend.logs())
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(org_id=org_id))
    # The stateful phase runs apart, without the negative-data check (see the docstring):
    # schemathesis' per-phase switch in the configuration does not turn off a check that
    # --checks names.
    for phases, checks in (("examples,coverage,fuzzing", CHECKS), ("stateful", STATEFUL_CHECKS)):
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file", str(config),
                "run", f"{live_backend.url}/internal/v1/schema/",
                "-H", f"Authorization: Bearer {live_backend.api_key}",
                "--checks", checks,
                "--max-examples", "10",
                "--phases", phases,
                "--workers", "1",
                "--request-timeout", "30",
                "--no-color",
            ],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    lines = live_backend.logs()[log_start:].splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    statuses = [r["status"] for r in records if r.get("logger") == "backend.access"]
    # The run went past authentication and organization checks into the endpoints themselves.
    assert len(statuses) > 100
    assert statuses.count(200) > 10 and 201 in statuses
    assert all(status < 500 for status in statuses)


def _document(api: Api) -> dict[str, Any]:
    response = api.call("GET", "schema/?format=json", headers=api.headers())
    assert response.status_code == 200
    return dict(json.loads(response.content))


def _parameter(document: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    operation = document["paths"][f"/internal/v1/{path}"][method]
    return next(p["schema"] for p in operation["parameters"] if p["name"] == name)


def test_the_document_states_the_bounds_the_server_checks(api: Api) -> None:
    document = _document(api)
    for path in ("workflow-executions/", "webhook-deliveries/"):
        limit = _parameter(document, path, "get", "limit")
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 500, 100)
        organization = _parameter(document, path, "get", "X-Organization-ID")
        assert (organization["minLength"], organization["maxLength"]) == (1, 64)
    for path in ("workflow-executions/", "workflow-executions/{id}/status/", "webhook-deliveries/"):
        key = _parameter(document, path, "post", "Idempotency-Key")
        assert (key["minLength"], key["maxLength"]) == (1, 255)
    components = document["components"]["schemas"]
    requests = [name for name in components if name.endswith("Request")]
    # 4 of the contract's start, 4 of the lifecycle (dispatch too), 5 of file executions
    # (create, update, batch, a batch item: one of create or batch update).
    assert len(requests) == 13
    objects = [name for name in requests if "oneOf" not in components[name]]
    assert all(components[name]["additionalProperties"] is False for name in objects)
    url = components["WebhookDeliveryCreateRequest"]["properties"]["url"]
    assert (url["format"], url["maxLength"]) == ("uri", 2048)
    for path, method in [
        ("workflow-executions/{id}/status/", "post"),
        ("workflow-executions/{id}/", "patch"),
        ("webhook-deliveries/", "post"),
    ]:
        epoch = _parameter(document, path, method, "X-Lease-Epoch")
        assert (epoch["type"], epoch["minimum"], epoch["maximum"]) == ("integer", 1, 2**31)
    claim = components["ClaimRequest"]["properties"]["lease_seconds"]
    assert (claim["minimum"], claim["maximum"]) == (1, 3600)


URLS = [
    "http://receiver:8080/hook",
    "HTTPS://example.com",
    "https://user:pw@example.com:443/a?b=c#d",
    "http://x:65535",
    "http://x:",
    "http://x:65536",
    "http://x:8o",
    "ftp://example.com/",
    "http:///path",
    "http://exa mple.com/",
    "http://example.com/a\tb",
    "https://example.com/\u00e9",
    "example.com",
    "",
]


@pytest.mark.parametrize("url", URLS)
def test_a_url_the_pattern_allows_is_one_the_server_accepts(api: Api, url: str) -> None:
    """The webhook URL's pattern is no wider than the server's check (and agrees on these)."""
    pattern = _document(api)["components"]["schemas"]["WebhookDeliveryCreateRequest"]["properties"][
        "url"
    ]["pattern"]
    response = api.call("POST", "webhook-deliveries/", {"url": url, "outcome": "delivered"})
    assert (re.search(pattern, url) is not None) is (response.status_code == 201)


WEBHOOK_IDS = [
    "",
    "msg_" + "0123456789abcdef" * 2,
    "msg_" + "A" * 32,
    "msg_" + "0" * 31,
    "msg_" + "0" * 33,
    "msg_" + "0" * 32 + "\n",
    " msg_" + "0" * 32,
    "msg-" + "0" * 32,
    "msg_" + "\u0663" * 32,
]


@pytest.mark.parametrize("webhook_id", WEBHOOK_IDS)
def test_the_webhook_id_pattern_is_the_server_check(api: Api, webhook_id: str) -> None:
    schema = _document(api)["components"]["schemas"]["WebhookDeliveryCreateRequest"]
    # An ECMA-262 pattern's $ is the end of the text (Python's also matches before a "\n").
    stated = any(
        re.search(option["pattern"].replace("$", r"\Z"), webhook_id) is not None
        if "pattern" in option
        else len(webhook_id) <= option["maxLength"]
        for option in schema["properties"]["webhook_id"]["oneOf"]
    )
    body = {"url": "https://r.example/h", "outcome": "failed", "webhook_id": webhook_id}
    served = api.call("POST", "webhook-deliveries/", body).status_code == 201
    assert stated is served


@pytest.mark.parametrize("key", ["k", "a b", "é", "~" * 255, " k ", "\x7f", "\x85", "\xa0", "\xad"])
def test_the_idempotency_key_pattern_is_the_server_check(api: Api, key: str) -> None:
    document = _document(api)
    bounds = _parameter(document, "workflow-executions/", "post", "Idempotency-Key")
    stated = re.search(bounds["pattern"], key) is not None and len(key) <= bounds["maxLength"]
    served = key.strip(" \t").isprintable() and 1 <= len(key.strip(" \t")) <= 255
    assert stated is served
