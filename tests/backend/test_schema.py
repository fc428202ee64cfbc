"""schemathesis against the backend's own OpenAPI document, over real HTTP.

Bounded: 10 examples per operation and phase (a few hundred requests, seconds). Checks: no
5xx, every status code, content type, header and body conforms to the document.
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
    ]
)


@pytest.mark.parametrize(
    "backend_fixture",
    ["live_backend", pytest.param("live_backend_pg", marks=pytest.mark.postgres)],
)
def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    live_backend: LiveBackend = request.getfixturevalue(backend_fixture)
    org_id = live_backend.create_organization(f"org-st-{uuid.uuid4().hex[:8]}")
    log_start = len(live_backend.logs())
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run", f"{live_backend.url}/internal/v1/schema/",
            "-H", f"Authorization: Bearer {live_backend.api_key}",
            "-H", f"X-Organization-ID: {org_id}",
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
