"""send_webhook end to end: a local receiver on the allow-list, deliveries recorded on the real
backend, Standard Webhooks signatures checked with the ``standardwebhooks`` package's own
verifier, retries on 5xx/429/timeouts, 410 and other 4xx final, bounded response reads."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from backend.workers.shared import retry_utils
from backend.workers.shared.api_client import (
    InternalAPIClient,
    InternalAPIError,
    NotFoundError,
    WebhookError,
    WebhookNotRecordedError,
    WebhookResult,
    WebhookURLRefusedError,
)
from backend.workers.shared.config import ConfigurationError, WorkerConfig
from backend.workers.shared.retry_utils import RetryEvent
from tests.fault_server import FaultServer, Respond, Stall
from tests.live_backend import LiveBackend

SIGNING_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


@pytest.fixture
def receiver() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, {"received": True})) as server:
        yield server


def make_client(backend: LiveBackend, **overrides: Any) -> InternalAPIClient:
    values: dict[str, Any] = {
        "internal_service_api_key": backend.api_key,
        "django_app_backend_url": backend.url,
        "organization_id": backend.org_id,
        "webhook_allowed_hosts": "localhost",
        "webhook_signing_secret": SIGNING_SECRET,
        "api_retry_attempts": 3,
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.1,
        "api_retry_budget_min_per_second": 1000.0,
        "_env_file": None,
    }
    values.update(overrides)
    return InternalAPIClient(WorkerConfig(**values))


def hook_url(receiver: FaultServer) -> str:
    return f"http://localhost:{receiver.port}/hooks/{uuid.uuid4().hex[:6]}"


def test_signed_delivery_verified_by_standardwebhooks(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    client = make_client(live_backend)
    payload = {"data": "test", "unicode": "héllo ✓", "n": [1, 2.5, None]}
    result = client.send_webhook(hook_url(receiver), payload, headers={"X-Custom": "yes"})
    assert isinstance(result, WebhookResult) and result.ok
    assert (result.status_code, result.attempts, result.outcome) == (200, 1, "delivered")
    assert result.response_body == b'{"received": true}'

    request = receiver.requests[0]
    verified = Webhook(SIGNING_SECRET).verify(request.body, request.headers)
    assert verified == payload
    assert request.headers["webhook-id"] == result.message_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-custom"] == "yes"
    assert request.headers["host"] == f"localhost:{receiver.port}"
    assert "authorization" not in request.headers  # the backend key never goes to a receiver

    record = client.get_webhook_delivery(result.delivery_id)
    assert record.outcome == "delivered" and record.url == result.url


def test_tampered_body_fails_verification(live_backend: LiveBackend,
                                          receiver: FaultServer) -> None:
    make_client(live_backend).send_webhook(hook_url(receiver), {"amount": 10})
    request = receiver.requests[0]
    with pytest.raises(Exception, match="signature"):
        Webhook(SIGNING_SECRET).verify(request.body.replace(b"10", b"99"), request.headers)


def test_unsigned_without_secret(live_backend: LiveBackend, receiver: FaultServer) -> None:
    client = make_client(live_backend, webhook_signing_secret="")
    assert client.send_webhook(hook_url(receiver), {"a": 1}).ok
    assert "webhook-signature" not in receiver.requests[0].headers


def test_5xx_429_and_timeouts_are_retried_with_one_message_id(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    events: list[RetryEvent] = []
    retry_utils.add_retry_listener(events.append)
    try:
        receiver.push(Respond(503, "busy"), Respond(429, "slow", {"Retry-After": "0"}),
                      Stall(30))
        client = make_client(live_backend)
        result = client.send_webhook(hook_url(receiver), {"try": "again"}, timeout=0.3)
    finally:
        retry_utils.remove_retry_listener(events.append)
    assert result.ok and result.attempts == 4
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    for request in receiver.requests:
        Webhook(SIGNING_SECRET).verify(request.body, request.headers)
    assert events[1].delay == 0.0  # the 429's Retry-After
    assert client.get_webhook_delivery(result.delivery_id).attempts == 4


def test_410_stops_and_is_recorded_as_failed(live_backend: LiveBackend,
                                             receiver: FaultServer) -> None:
    receiver.reset(default=Respond(410, "gone"))
    client = make_client(live_backend)
    result = client.send_webhook(hook_url(receiver), {"a": 1})
    assert (result.outcome, result.status_code, result.attempts) == ("failed", 410, 1)
    assert "410" in (result.error or "")
    record = client.get_webhook_delivery(result.delivery_id)
    assert record.outcome == "failed" and record.status_code == 410
    assert "410" in record.error_message


def test_other_4xx_is_not_retried(live_backend: LiveBackend, receiver: FaultServer) -> None:
    receiver.reset(default=Respond(400, "bad"))
    result = make_client(live_backend).send_webhook(hook_url(receiver), {"a": 1})
    assert (result.outcome, result.attempts) == ("failed", 1)


def test_receiver_failing_every_time(live_backend: LiveBackend, receiver: FaultServer) -> None:
    receiver.reset(default=Respond(500, "down"))
    client = make_client(live_backend, api_retry_attempts=2)
    result = client.send_webhook(hook_url(receiver), {"a": 1})
    assert (result.outcome, result.status_code, result.attempts) == ("failed", 500, 3)
    assert len(receiver.requests) == 3


def test_unreachable_receiver(live_backend: LiveBackend) -> None:
    with FaultServer() as closed:
        url = hook_url(closed)
    result = make_client(live_backend, api_retry_attempts=1).send_webhook(url, {"a": 1})
    assert result.outcome == "failed" and result.status_code is None and result.attempts == 2
    assert "connection failed" in (result.error or "")


def test_response_body_read_is_bounded(live_backend: LiveBackend,
                                       receiver: FaultServer) -> None:
    receiver.reset(default=Respond(200, b"x" * (1024 * 1024)))
    result = make_client(live_backend).send_webhook(hook_url(receiver), {"a": 1})
    assert result.ok and len(result.response_body) == 64 * 1024


def test_compressed_answer_is_read_raw_and_bounded(live_backend: LiveBackend,
                                                   receiver: FaultServer) -> None:
    # An answer claiming gzip is neither decoded (no decompression bomb, no decoding error)
    # nor asked for: the bound applies to the bytes received.
    receiver.reset(default=Respond(200, b"\x00 not gzip" * 10_000, {"Content-Encoding": "gzip"}))
    result = make_client(live_backend).send_webhook(hook_url(receiver), {"a": 1})
    assert result.ok and result.response_body.startswith(b"\x00 not gzip")
    assert len(result.response_body) == 64 * 1024
    assert receiver.requests[0].headers["accept-encoding"] == "identity"


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    client = make_client(live_backend, webhook_allowed_hosts="localhost,127.0.0.1")
    with FaultServer(default=Respond(200, b"")) as hop:
        hop.push(Respond(307, b"", {"Location": "/same-origin"}),
                 Respond(307, b"", {"Location": f"http://127.0.0.1:{receiver.port}/other"}))
        result = client.send_webhook(
            f"http://localhost:{hop.port}/start", {"a": 1},
            headers={"Authorization": "Bearer receiver-token", "Cookie": "s=1", "X-Keep": "1"})
        assert result.ok
        assert [r.headers.get("authorization") for r in hop.requests] == [
            "Bearer receiver-token", "Bearer receiver-token"]
    moved = receiver.requests[0]
    assert "authorization" not in moved.headers and "cookie" not in moved.headers
    assert moved.headers["x-keep"] == "1"
    Webhook(SIGNING_SECRET).verify(moved.body, moved.headers)  # still signed


def test_password_in_the_url_is_neither_recorded_nor_shown(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    client = make_client(live_backend)
    url = f"http://hook-user:s3cr3t-pw@localhost:{receiver.port}/h"
    result = client.send_webhook(url, {"a": 1})
    assert result.ok and receiver.requests[0].headers["authorization"].startswith("Basic ")
    assert "s3cr3t-pw" not in result.url and "s3cr3t-pw" not in repr(result)
    assert client.get_webhook_delivery(result.delivery_id).url == (
        f"http://**********@localhost:{receiver.port}/h")


def test_bad_payload_and_secret_are_clear_errors(live_backend: LiveBackend,
                                                 receiver: FaultServer) -> None:
    with pytest.raises(WebhookError, match="not JSON-serialisable"):
        make_client(live_backend).send_webhook(hook_url(receiver), {"when": object()})
    with pytest.raises(WebhookError, match="not JSON-serialisable"):  # Infinity is not JSON
        make_client(live_backend).send_webhook(hook_url(receiver), {"n": float("inf")})
    with pytest.raises(ConfigurationError, match="WEBHOOK_SIGNING_SECRET") as refused:
        make_client(live_backend, webhook_signing_secret="!!!!")  # refused when read
    assert "!!!!" not in str(refused.value)
    assert receiver.requests == []


def test_delivery_for_an_execution(live_backend: LiveBackend, receiver: FaultServer) -> None:
    client = make_client(live_backend)
    execution = client.create_workflow_execution(f"wf-{uuid.uuid4().hex[:8]}")
    first = client.send_webhook(hook_url(receiver), {"step": 1}, execution_id=execution.id)
    second = client.send_webhook(hook_url(receiver), {"step": 2}, execution_id=execution.id)
    listed = [d.id for d in client.list_webhook_deliveries(execution_id=execution.id)]
    assert listed == [second.delivery_id, first.delivery_id]


def test_unknown_execution_is_refused_before_sending(live_backend: LiveBackend,
                                                     receiver: FaultServer) -> None:
    client = make_client(live_backend)
    with pytest.raises(NotFoundError):
        client.send_webhook(hook_url(receiver), {"a": 1}, execution_id=str(uuid.uuid4()))
    assert receiver.requests == []  # nothing went out, so nothing is left unrecorded


def test_delivery_that_cannot_be_recorded_says_so_and_is_not_transient(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    # The execution exists when checked, and the recording is then refused (a backend that
    # lost it meanwhile): the webhook went out once, and the error says so.
    execution = {"id": str(uuid.uuid4()), "workflow_id": "wf", "status": "COMPLETED"}
    refused = {"error": "validation_error", "detail": "execution_id: no such workflow execution"}
    with FaultServer(default=Respond(400, refused)) as backend:
        backend.push(Respond(200, execution))
        values: dict[str, Any] = {"internal_service_api_key": "swi-test-key-7Q2xK9-record",
                                  "django_app_backend_url": backend.url}
        client = make_client(live_backend, **values)
        with pytest.raises(WebhookNotRecordedError) as info:
            client.send_webhook(hook_url(receiver), {"a": 1}, execution_id=execution["id"])
        assert [r.method for r in backend.requests] == ["GET", "POST"]
    error = info.value
    assert isinstance(error, InternalAPIError) and isinstance(error, WebhookError)
    assert not error.transient and error.status == 400
    assert "delivered" in str(error) and "do not send it again" in str(error)
    assert len(receiver.requests) == 1
    assert error.result.ok and error.result.delivery_id == ""
    assert error.result.message_id == receiver.requests[0].headers["webhook-id"]
    assert error.record["execution_id"] == execution["id"]
    assert error.record["outcome"] == "delivered"

    # The record can be made later, once, with the delivery's message id as the key.
    real = make_client(live_backend)
    target = real.create_workflow_execution(f"wf-{uuid.uuid4().hex[:8]}")
    record = {**error.record, "execution_id": target.id}
    first = real.post("webhook-deliveries/", record, idempotency_key=error.result.message_id)
    again = real.post("webhook-deliveries/", record, idempotency_key=error.result.message_id)
    assert first["id"] == again["id"]


def test_a_refused_redirect_is_recorded_as_blocked_on_the_backend(
    live_backend: LiveBackend, receiver: FaultServer
) -> None:
    receiver.reset(default=Respond(302, b"", {"Location": "http://0177.0.0.1/"}))
    client = make_client(live_backend)
    execution = client.create_workflow_execution(f"wf-{uuid.uuid4().hex[:8]}")
    with pytest.raises(WebhookURLRefusedError, match="not a valid URL") as info:
        client.send_webhook(hook_url(receiver), {"a": 1}, execution_id=execution.id)
    assert isinstance(info.value, WebhookError) and isinstance(info.value, ValueError)
    assert len(receiver.requests) == 1
    result = info.value.result
    assert result is not None and result.outcome == "blocked" and not result.ok
    record = client.get_webhook_delivery(result.delivery_id)
    assert (record.outcome, record.status_code, record.attempts) == ("blocked", 302, 1)
    assert record.error_message == str(info.value)
    listed = [d.id for d in client.list_webhook_deliveries(execution_id=execution.id)]
    assert listed == [result.delivery_id]
