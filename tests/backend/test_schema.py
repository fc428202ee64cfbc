"""schemathesis against the backend's own OpenAPI document, over real HTTP.

Bounded: 10 examples per operation and phase (a few hundred requests, seconds). Checks: no
5xx, every status code, content type, header and body conforms to the document, and the
document states what the server enforces: every request it calls valid is accepted
(``positive_data_acceptance``) and every request it calls invalid is refused
(``negative_data_rejection``, schemathesis' ST202/ST203 findings).

What no schema can state is given to schemathesis in its configuration (``CONFIG``): a
``cursor`` is one this API returned (a made-up one is 400 ``invalid_cursor``), so the run sends
none; 422 is this API's answer to an ``Idempotency-Key`` reused with another body (the
generator repeats keys), so it counts as accepted; a delivery's ``execution_id`` must name an
existing execution of the organization (400 otherwise), so for ``POST webhook-deliveries/``
a 400 counts as accepted too. The organization header is a fixed parameter, not a ``-H``
header: schemathesis would otherwise generate a bad one, send ours instead and report the
accepted request as a schema violation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

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
CONFIG = """
[parameters]
"query.cursor" = ""
"header.X-Organization-ID" = "{org_id}"

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "3XX", "401", "403", "404", "409", "422", "429", "5XX"]

[[operations]]
include-path-regex = "/webhook-deliveries/$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2XX", "3XX", "400", "401", "403", "404", "409", "422", "429", "5XX"
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
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file", str(config),
            "run", f"{live_backend.url}/internal/v1/schema/",
            "-H", f"Authorization: Bearer {live_backend.api_key}",
            "--checks", CHECKS,
            "--max-examples", "10",
            "--phases", "examples,coverage,fuzzing,stateful",
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
