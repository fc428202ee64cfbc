"""InternalAPIClient against a real misbehaving HTTP server on loopback (tests/fault_server.py).

Each retry rule, both Retry-After forms and the cap, the deadline, the retry budget, the
circuit breaker's open / half-open / closed cycle, error mapping, malformed bodies, headers,
organization scoping and request logging. Retry sleeps are skipped with
``retry_utils.set_testing`` (the delays are still computed and checked through the retry
listener); nothing here asserts on elapsed time.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.workers.shared import _metrics, retry_utils
from backend.workers.shared.api_client import (
    APICircuitOpenError,
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    APIValidationError,
    AuthenticationError,
    ConflictError,
    InternalAPIClient,
    InternalAPIError,
    NotFoundError,
    OrganizationRequiredError,
    RateLimitedError,
    ServerError,
)
from backend.workers.shared.config import WorkerConfig
from backend.workers.shared.logging_utils import log_context
from backend.workers.shared.retry_utils import CircuitBreakerOpenError, CircuitState, RetryEvent
from tests.fault_server import Drop, FaultServer, Reset, Respond, Stall, Truncate

REPO = Path(__file__).resolve().parents[2]
SECRET = "swi-test-key-7Q2xK9-faults-" + uuid.uuid4().hex[:8]
EXECUTION = {
    "id": "3f2b6c1e-0000-4000-8000-000000000001",
    "organization_id": "org-a",
    "workflow_id": "wf-1",
    "status": "PENDING",
    "a_field_added_later": {"nested": True},
}


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


@pytest.fixture
def retries() -> Iterator[list[RetryEvent]]:
    events: list[RetryEvent] = []
    retry_utils.add_retry_listener(events.append)
    yield events
    retry_utils.remove_retry_listener(events.append)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, EXECUTION)) as fault:
        yield fault


def make_config(server: FaultServer, **overrides: Any) -> WorkerConfig:
    """A configuration pointing at ``server`` (each test has its own server, so its own port
    and circuit breaker: breakers are registered per backend URL)."""
    values: dict[str, Any] = {
        "internal_service_api_key": SECRET,
        "django_app_backend_url": server.url,
        "organization_id": "org-a",
        "worker_name": "fault-worker",
        "worker_version": "9.8.7",
        "api_timeout": 2.0,
        "api_retry_attempts": 3,
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.5,
        "api_deadline": 30.0,
        "circuit_breaker_failure_threshold": 50,
        # The budget is process-wide: a large floor keeps the tests independent of each
        # other (test_retry_budget_exhaustion_stops_retries uses a budget of its own).
        "api_retry_budget_min_per_second": 1000.0,
        "circuit_breaker_recovery_timeout": 0.3,
        "_env_file": None,
    }
    values.update(overrides)
    return WorkerConfig(**values)


def paths(server: FaultServer) -> list[str]:
    return [f"{r.method} {r.path.split('/internal/v1/', 1)[1]}" for r in server.requests]


# --- retry rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        Respond(429, {"error": "throttled", "detail": "slow down"}),
        Respond(502, "bad gateway"),
        Respond(503, {"error": "unavailable", "detail": "shedding load"}),
        Respond(504, "gateway timeout"),
        Respond(500, {"error": "server_error", "detail": "boom"}),
        Drop(),
        Reset(),
        Truncate(),
    ],
    ids=["429", "502", "503", "504", "500-GET", "dropped", "reset", "truncated"],
)
def test_get_is_retried_on_transient_failures(
    server: FaultServer, retries: list[RetryEvent], failure: Any
) -> None:
    server.push(failure, failure)
    with InternalAPIClient(make_config(server)) as client:
        execution = client.get_workflow_execution(EXECUTION["id"])
    assert execution.id == EXECUTION["id"]
    assert len(server.requests) == 3
    assert len(retries) == 2
    # the same logical call: one request id for every attempt
    assert len({r.headers["x-request-id"] for r in server.requests}) == 1


def test_timeout_is_retried_then_succeeds(server: FaultServer) -> None:
    server.push(Stall(30))
    config = make_config(server, api_timeout=0.2)
    with InternalAPIClient(config) as client:
        assert client.get_workflow_execution("x").status == "PENDING"
    assert len(server.requests) == 2


def test_timeouts_exhaust_attempts_into_api_timeout_error(server: FaultServer) -> None:
    server.reset(default=Stall(30))
    config = make_config(server, api_timeout=0.1, api_retry_attempts=2)
    with InternalAPIClient(config) as client, pytest.raises(APITimeoutError) as info:
        client.get_workflow_execution("x")
    assert len(server.requests) == 3
    assert info.value.transient and info.value.status is None
    assert info.value.method == "GET" and info.value.path == "workflow-executions/x/"


def test_post_500_is_not_retried_but_post_503_is(server: FaultServer) -> None:
    server.push(Respond(500, {"error": "server_error", "detail": "boom"}))
    client = InternalAPIClient(make_config(server))
    with pytest.raises(ServerError) as info:
        client.create_workflow_execution("wf-1")
    assert info.value.status == 500
    assert len(server.requests) == 1

    server.reset()
    server.push(Respond(503, {"error": "unavailable", "detail": "later"}))
    assert client.create_workflow_execution("wf-1").id == EXECUTION["id"]
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_client_errors_are_not_retried(server: FaultServer, status: int) -> None:
    server.reset(default=Respond(status, {"error": "nope", "detail": "refused"}))
    with InternalAPIClient(make_config(server)) as client, pytest.raises(InternalAPIError):
        client.get_workflow_execution("x")
    assert len(server.requests) == 1


def test_post_retried_after_dropped_response_reuses_one_idempotency_key(
    server: FaultServer,
) -> None:
    server.push(Drop(), Reset())
    client = InternalAPIClient(make_config(server))
    client.create_workflow_execution("wf-1", total_files=3)
    keys = [r.headers.get("idempotency-key") for r in server.requests]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1
    assert len({r.body for r in server.requests}) == 1  # the very same body every time

    server.reset()
    client.create_workflow_execution("wf-1")
    assert server.requests[0].headers["idempotency-key"] != keys[0]  # a new logical call


def test_idempotency_in_flight_conflict_is_retried(server: FaultServer) -> None:
    server.push(Respond(409, {"error": "idempotency_in_flight", "detail": "still running"}))
    InternalAPIClient(make_config(server)).create_workflow_execution("wf-1")
    assert len(server.requests) == 2


def test_last_error_is_raised_after_all_attempts(server: FaultServer) -> None:
    server.reset(default=Respond(503, {"error": "unavailable", "detail": "down"}))
    config = make_config(server, api_retry_attempts=2)
    with pytest.raises(ServerError) as info:
        InternalAPIClient(config).get_workflow_execution("x")
    assert info.value.status == 503 and info.value.error_code == "unavailable"
    assert len(server.requests) == 3


def test_zero_retry_attempts_makes_one_attempt(server: FaultServer) -> None:
    server.push(Drop())
    with pytest.raises(APIConnectionError):
        InternalAPIClient(make_config(server, api_retry_attempts=0)).get_workflow_execution("x")
    assert len(server.requests) == 1


def test_connection_refused_is_a_connection_error() -> None:
    with FaultServer() as gone:
        config = make_config(gone, api_retry_attempts=1)
    with pytest.raises(APIConnectionError) as info:
        InternalAPIClient(config).get_workflow_execution("x")
    assert info.value.transient
    assert "cannot reach 127.0.0.1" in str(info.value)


# --- Retry-After ------------------------------------------------------------------------


def test_retry_after_seconds_sets_the_delay(server: FaultServer,
                                            retries: list[RetryEvent]) -> None:
    server.push(Respond(429, {"error": "throttled", "detail": "x"}, {"Retry-After": "0"}),
                Respond(503, {"error": "unavailable", "detail": "x"}, {"Retry-After": "1"}))
    config = make_config(server, api_retry_max_delay=5.0)
    InternalAPIClient(config).get_workflow_execution("x")
    assert [e.delay for e in retries] == [0.0, 1.0]
    assert isinstance(retries[0].exception, RateLimitedError)
    assert retries[0].exception.retry_after == 0.0


def test_retry_after_http_date_sets_the_delay(server: FaultServer,
                                              retries: list[RetryEvent]) -> None:
    when = formatdate(time.time() + 3, usegmt=True)
    server.push(Respond(503, {"error": "unavailable", "detail": "x"}, {"Retry-After": when}))
    config = make_config(server, api_retry_max_delay=10.0)
    InternalAPIClient(config).get_workflow_execution("x")
    assert len(retries) == 1
    assert 1.0 <= retries[0].delay <= 3.0  # the date is whole seconds, ~3 s from now


def test_retry_after_is_capped_at_max_delay(server: FaultServer,
                                            retries: list[RetryEvent]) -> None:
    far = formatdate(time.time() + 86400, usegmt=True)
    server.push(Respond(429, b"", {"Retry-After": "3600"}), Respond(503, b"", {"Retry-After": far}))
    config = make_config(server, api_retry_max_delay=0.25)
    InternalAPIClient(config).get_workflow_execution("x")
    assert [e.delay for e in retries] == [0.25, 0.25]


def test_garbage_retry_after_falls_back_to_backoff(server: FaultServer,
                                                   retries: list[RetryEvent]) -> None:
    server.push(Respond(503, b"", {"Retry-After": "soon-ish"}))
    config = make_config(server, api_retry_base_delay=0.2, api_retry_max_delay=0.2)
    InternalAPIClient(config).get_workflow_execution("x")
    assert len(retries) == 1 and 0.0 <= retries[0].delay <= 0.2


def test_no_retry_past_the_deadline(server: FaultServer) -> None:
    server.push(Respond(503, b"", {"Retry-After": "20"}))
    config = make_config(server, api_retry_max_delay=30.0, api_deadline=5.0)
    with pytest.raises(ServerError) as info:
        InternalAPIClient(config).get_workflow_execution("x")
    assert info.value.retry_after == 20.0
    assert len(server.requests) == 1


def test_attempt_timeout_never_runs_past_the_deadline(server: FaultServer) -> None:
    # API_TIMEOUT is 30 s, the deadline 0.5 s: the stalled attempt is cut at the deadline.
    server.reset(default=Stall(60))
    config = make_config(server, api_timeout=30.0, api_deadline=0.5, api_retry_attempts=5)
    # (what is left of the deadline when the attempt starts: a little under 0.5 s)
    with pytest.raises(APITimeoutError, match=r"no answer within 0\.\d+s"):
        InternalAPIClient(config).get_workflow_execution("x")
    assert len(server.requests) == 1  # and no retry starts once the deadline has passed


# --- retry budget -----------------------------------------------------------------------


def test_retry_budget_exhaustion_stops_retries(server: FaultServer) -> None:
    # ratio 0 and a floor of 0.2/s over the 10 s window: two retries in the whole process.
    server.reset(default=Respond(503, {"error": "unavailable", "detail": "outage"}))
    config = make_config(server, api_retry_budget_ratio=0.0,
                         api_retry_budget_min_per_second=0.2, api_retry_attempts=5)
    client = InternalAPIClient(config)
    with pytest.raises(ServerError):
        client.get_workflow_execution("x")
    first = len(server.requests)
    with pytest.raises(ServerError):
        client.get_workflow_execution("x")
    assert first == 3  # 1 attempt + the 2 retries the budget holds
    assert len(server.requests) == first + 1  # budget empty: no retry at all


# --- circuit breaker --------------------------------------------------------------------


def test_breaker_opens_probes_half_open_and_closes(server: FaultServer) -> None:
    states: list[tuple[str, str]] = []
    config = make_config(server, api_retry_attempts=0, circuit_breaker_failure_threshold=2,
                         circuit_breaker_recovery_timeout=0.3)
    client = InternalAPIClient(config)
    breaker = client.breaker
    breaker.add_listener(lambda b, old, new: states.append((old.value, new.value)))

    server.reset(default=Respond(503, {"error": "unavailable", "detail": "down"}))
    for _ in range(2):
        with pytest.raises(ServerError):
            client.get_workflow_execution("x")
    assert breaker.state is CircuitState.OPEN
    sent = len(server.requests)
    with pytest.raises(APICircuitOpenError) as info:
        client.get_workflow_execution("x")
    assert len(server.requests) == sent  # refused without sending
    assert isinstance(info.value, CircuitBreakerOpenError) and isinstance(info.value,
                                                                          InternalAPIError)
    assert info.value.transient and info.value.retry_after is not None

    time.sleep(0.4)  # past the recovery timeout: the next call is the half-open probe
    with pytest.raises(ServerError):
        client.get_workflow_execution("x")  # probe fails: open again
    assert breaker.state is CircuitState.OPEN

    time.sleep(0.4)
    server.reset(default=Respond(200, EXECUTION))
    assert client.get_workflow_execution("x").id == EXECUTION["id"]  # probe succeeds
    assert breaker.state is CircuitState.CLOSED
    assert states == [("closed", "open"), ("open", "half_open"), ("half_open", "open"),
                      ("open", "half_open"), ("half_open", "closed")]


def test_open_breaker_is_not_retried(server: FaultServer, retries: list[RetryEvent]) -> None:
    config = make_config(server, api_retry_attempts=4, circuit_breaker_failure_threshold=2,
                         circuit_breaker_recovery_timeout=60.0)
    server.reset(default=Respond(503, {"error": "unavailable", "detail": "down"}))
    with pytest.raises(APICircuitOpenError):
        InternalAPIClient(config).get_workflow_execution("x")
    assert len(server.requests) == 2  # two failures opened it; the third attempt was refused
    with pytest.raises(APICircuitOpenError):
        InternalAPIClient(config).get_workflow_execution("x")
    assert len(server.requests) == 2


def test_client_errors_do_not_open_the_breaker(server: FaultServer) -> None:
    config = make_config(server, circuit_breaker_failure_threshold=2)
    server.reset(default=Respond(404, {"error": "not_found", "detail": "no"}))
    client = InternalAPIClient(config)
    for _ in range(5):
        with pytest.raises(NotFoundError):
            client.get_workflow_execution("x")
    assert client.breaker.state is CircuitState.CLOSED


def test_only_backend_failures_count_for_the_breaker(server: FaultServer) -> None:
    config = make_config(server, api_retry_attempts=0, circuit_breaker_failure_threshold=2,
                         circuit_breaker_recovery_timeout=60.0)
    client = InternalAPIClient(config)
    server.push(Respond(200, "<html>not json</html>"), Respond(200, "<html>again</html>"))
    for _ in range(2):  # the backend answered, badly: not a sign it is down
        with pytest.raises(APIResponseError):
            client.get_workflow_execution("x")
    for _ in range(2):  # the caller's mistake, found before anything is sent
        with pytest.raises(Exception, match="non-printable"):
            client.get("bad\x00path/")
    assert client.breaker.state is CircuitState.CLOSED
    assert client.get_workflow_execution("x").id == EXECUTION["id"]

    server.push(Respond(429, b""), Respond(408, b""))  # shedding load, too slow: failures
    for kind in (RateLimitedError, APITimeoutError):
        with pytest.raises(kind):
            client.get_workflow_execution("x")
    assert client.breaker.state is CircuitState.OPEN


def test_breaker_settings_conflict_fails_at_construction(server: FaultServer) -> None:
    config = make_config(server, circuit_breaker_failure_threshold=5)
    InternalAPIClient(config)
    other = config.model_copy(update={"circuit_breaker_failure_threshold": 7})
    with pytest.raises(ValueError, match="failure_threshold"):
        InternalAPIClient(other)
    assert server.requests == []


# --- error mapping and bodies ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, APIValidationError), (401, AuthenticationError), (403, AuthenticationError),
     (404, NotFoundError), (409, ConflictError), (422, APIValidationError),
     (429, RateLimitedError), (500, ServerError), (503, ServerError), (418, APIResponseError),
     (408, APITimeoutError)],
)
def test_status_maps_to_exception(server: FaultServer, status: int,
                                  kind: type[InternalAPIError]) -> None:
    body = {"error": f"code_{status}", "detail": f"line one\nline two {SECRET}"}
    server.reset(default=Respond(status, body, {"X-Request-ID": "ignored"}))
    config = make_config(server, api_retry_attempts=0)
    with pytest.raises(InternalAPIError) as info:
        InternalAPIClient(config).get_workflow_execution("abc")
    error = info.value
    assert type(error) is kind
    assert error.status == status and error.error_code == f"code_{status}"
    assert error.method == "GET" and error.path == "workflow-executions/abc/"
    assert error.request_id == server.requests[0].headers["x-request-id"]
    text = str(error)
    assert "\n" not in text and SECRET not in text and SECRET not in repr(error)
    assert text.startswith(f"{status} code_{status}: line one line two")


def test_non_json_success_body_is_a_response_error_with_excerpt(server: FaultServer) -> None:
    server.push(Respond(200, "<html>" + "x" * 5000 + "</html>"))
    with pytest.raises(APIResponseError) as info:
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert info.value.status == 200 and "<html>xxx" in info.value.detail
    assert len(str(info.value)) < 400
    assert len(server.requests) == 1  # a bad body is not retried


def test_secret_at_the_excerpt_cut_is_hidden_whole(server: FaultServer) -> None:
    # The secret straddles the excerpt's end: not even its first characters may show.
    server.push(Respond(502, " " * 600 + "x" * 190 + SECRET + " tail"))
    with pytest.raises(ServerError) as info:
        InternalAPIClient(make_config(server, api_retry_attempts=0)).get_workflow_execution("x")
    assert SECRET[:10] not in str(info.value) and "xxx" in info.value.detail


@pytest.mark.parametrize(
    "answer",
    [Respond(200, b"\x00 not gzip at all", {"Content-Encoding": "gzip"}),
     Respond(200, b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"})],
    ids=["undecodable", "nested-too-deep"],
)
def test_unusable_success_bodies_are_response_errors(server: FaultServer, answer: Respond) -> None:
    server.push(answer)
    with pytest.raises(APIResponseError) as info:
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert len(str(info.value)) < 400
    assert len(server.requests) == 1  # not retried


def test_json_of_the_wrong_shape_is_a_response_error(server: FaultServer) -> None:
    server.push(Respond(200, {"id": "x"}), Respond(200, [1, 2]))
    client = InternalAPIClient(make_config(server))
    with pytest.raises(APIResponseError, match="not a valid WorkflowExecution"):
        client.get_workflow_execution("x")
    with pytest.raises(APIResponseError):
        client.get_workflow_execution("x")


@pytest.mark.parametrize(
    ("call", "method", "path"),
    [
        (lambda c: c.get_workflow_execution("x"), "GET", "workflow-executions/{id}/"),
        (lambda c: c.create_workflow_execution("wf"), "POST", "workflow-executions/"),
        (lambda c: c.update_workflow_execution("x", result={}), "PATCH",
         "workflow-executions/{id}/"),
        (lambda c: c.get_webhook_delivery("x"), "GET", "webhook-deliveries/{id}/"),
        (lambda c: next(c.list_webhook_deliveries()), "GET", "webhook-deliveries/"),
    ],
)
def test_a_wrong_shape_names_the_endpoint_that_answered_it(
    server: FaultServer, call: Any, method: str, path: str
) -> None:
    server.reset(default=Respond(200, {"id": "x", "results": [{"id": 5}]}))
    with pytest.raises(APIResponseError, match="not a valid") as info:
        call(InternalAPIClient(make_config(server)))
    assert (info.value.method, info.value.path) == (method, path)


def test_error_without_json_body_keeps_status_and_excerpt(server: FaultServer) -> None:
    server.push(Respond(404, "<h1>Not Found</h1>"))
    with pytest.raises(NotFoundError) as info:
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert info.value.error_code is None and "<h1>Not Found</h1>" in info.value.detail


def test_errors_survive_pickling_with_their_attributes(server: FaultServer) -> None:
    server.push(Respond(409, {"error": "illegal_transition", "detail": "final"}))
    with pytest.raises(ConflictError) as info:
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ConflictError and str(copy) == str(info.value)
    assert (copy.status, copy.error_code, copy.path) == (409, "illegal_transition",
                                                        "workflow-executions/x/")
    opened = APICircuitOpenError("b", 1.5, method="GET", path="p/", request_id="r")
    again = pickle.loads(pickle.dumps(opened))
    assert again.breaker_name == "b" and again.retry_after == 1.5


def test_unknown_fields_are_kept(server: FaultServer) -> None:
    execution = InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert execution.model_extra == {"a_field_added_later": {"nested": True}}


# --- headers, organization, safety ------------------------------------------------------


def test_every_request_carries_auth_user_agent_and_request_id(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server))
    with log_context(task_id="task-42"):
        client.get_workflow_execution("x")
    client.get_workflow_execution("x")
    first, second = server.requests
    assert first.headers["authorization"] == f"Bearer {SECRET}"
    assert first.headers["user-agent"] == "fault-worker/9.8.7"
    assert first.headers["x-request-id"] == "task-42"
    assert second.headers["x-request-id"] and second.headers["x-request-id"] != "task-42"
    assert "idempotency-key" not in first.headers


def test_header_values_are_checked_or_made_safe(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server))
    with log_context(request_id="tâche 7\r\nX-Evil: 1"):
        client.get_workflow_execution("x")
    assert server.requests[0].headers["x-request-id"] == "t_che_7__X-Evil:_1"
    assert "x-evil" not in server.requests[0].headers
    with pytest.raises(ValueError, match="WORKER_NAME"):
        InternalAPIClient(make_config(server, worker_name="travailleur-é"))
    with pytest.raises(ValueError, match="organization_id"):
        client.set_organization_context("org\nb")
    with pytest.raises(ValueError, match="organization_id"):
        client.get_workflow_execution("x", organization_id="orgé")
    with pytest.raises(ValueError, match="idempotency_key"):
        client.create_workflow_execution("wf-1", idempotency_key="clé-1")
    with pytest.raises(ValueError, match="JSON compliant"):
        client.update_workflow_execution("x", result={"score": float("nan")})
    assert len(server.requests) == 1


def test_request_id_prefers_execution_context(server: FaultServer) -> None:
    with log_context(execution_id="exec-7"):
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert server.requests[0].headers["x-request-id"] == "exec-7"


def test_organization_header_default_context_and_per_call(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server))
    other = InternalAPIClient(make_config(server))
    client.get_workflow_execution("x")
    client.set_organization_context("org-b")
    client.get_workflow_execution("x")
    other.get_workflow_execution("x")  # another client is not affected
    client.get_workflow_execution("x", organization_id="org-c")
    client.get_workflow_execution("x")
    assert [r.headers["x-organization-id"] for r in server.requests] == [
        "org-a", "org-b", "org-a", "org-c", "org-b"]


def test_org_scoped_call_without_organization_sends_nothing(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server, organization_id=None))
    with pytest.raises(OrganizationRequiredError, match="ORGANIZATION_ID"):
        client.get_workflow_execution("x")
    with pytest.raises(OrganizationRequiredError):
        client.list_workflow_executions()
    with pytest.raises(OrganizationRequiredError):
        client.send_webhook("https://example.com/hook", {"a": 1})
    with pytest.raises(OrganizationRequiredError):
        client.update_workflow_execution_status("x", "COMPLETED", organization_id=None)
    assert server.requests == []
    client.health_check()  # not org-scoped: sent without the header
    assert "x-organization-id" not in server.requests[0].headers


def test_ids_that_could_reach_another_path_are_refused(server: FaultServer) -> None:
    with pytest.raises(ValueError, match="execution_id must be letters"):
        InternalAPIClient(make_config(server)).get_workflow_execution("../../admin?x=1")
    assert server.requests == []


def test_generic_calls_refuse_absolute_urls(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server))
    for bad in ("http://evil.example/steal", "//evil.example/x"):
        with pytest.raises(ValueError, match="relative"):
            client.get(bad)
    assert server.requests == []


def test_generic_methods(server: FaultServer) -> None:
    server.reset(default=Respond(200, {"ok": True}))
    client = InternalAPIClient(make_config(server))
    assert client.get("custom/thing/", params={"q": "1"}) == {"ok": True}
    client.post("/custom/thing/", {"a": 1}, idempotency_key="my-key")
    client.patch("custom/thing/", {"b": 2})
    client.put("custom/thing/", {"c": 3})
    server.push(Respond(204))
    assert client.delete("custom/thing/") is None
    assert paths(server) == ["GET custom/thing/?q=1", "POST custom/thing/",
                             "PATCH custom/thing/", "PUT custom/thing/", "DELETE custom/thing/"]
    assert server.requests[1].headers["idempotency-key"] == "my-key"
    assert server.requests[2].json() == {"b": 2}


def test_list_is_lazy_and_checks_arguments_first(server: FaultServer) -> None:
    server.reset(default=Respond(200, {"results": [EXECUTION], "next_cursor": None}))
    client = InternalAPIClient(make_config(server))
    items = client.list_workflow_executions(status="PENDING")
    assert server.requests == []
    assert [e.id for e in items] == [EXECUTION["id"]]
    assert paths(server) == ["GET workflow-executions/?status=PENDING&limit=100"]
    with pytest.raises(ValueError, match="page_size"):
        client.list_workflow_executions(page_size=501)
    with pytest.raises(ValueError, match="limit"):
        client.list_workflow_executions(limit=-1)


def test_list_with_a_cursor_that_does_not_move_stops_with_an_error(server: FaultServer) -> None:
    stuck = {"results": [EXECUTION], "next_cursor": "same"}
    server.reset(default=Respond(200, stuck))
    items = InternalAPIClient(make_config(server)).list_workflow_executions()
    seen = []
    with pytest.raises(APIResponseError, match="next_cursor"):
        for item in items:
            seen.append(item)
            assert len(seen) < 10, "endless iteration over the same page"
    assert len(seen) == 2 and len(server.requests) == 2


def test_delete_whose_answer_was_lost_is_done(server: FaultServer) -> None:
    gone = {"error": "not_found", "detail": "no such workflow execution"}
    server.push(Drop(), Respond(404, gone))
    client = InternalAPIClient(make_config(server))
    assert client.delete_workflow_execution("x") is None  # the dropped attempt deleted it
    server.reset(default=Respond(503, b""))
    server.push(Respond(503, b""), Respond(404, gone))
    with pytest.raises(NotFoundError):  # answered 503: nothing deleted, so 404 is real
        client.delete_workflow_execution("x")
    server.reset(default=Respond(404, gone))
    with pytest.raises(NotFoundError):
        client.delete_workflow_execution("x")


def test_closed_client_refuses_calls_but_pool_stays(server: FaultServer) -> None:
    config = make_config(server)
    with InternalAPIClient(config) as client:
        client.get_workflow_execution("x")
    with pytest.raises(RuntimeError, match="closed"):
        client.get_workflow_execution("x")
    with InternalAPIClient(config) as again:
        again.get_workflow_execution("x")
    assert server.connections_accepted == 1  # the second block reused the pooled connection


def test_logging_never_shows_the_key_and_levels_match(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.push(Respond(503, {"error": "unavailable", "detail": f"echo {SECRET}"}))
    with (
        caplog.at_level(logging.DEBUG),
        caplog.at_level(logging.DEBUG, logger="httpx2"),
        caplog.at_level(logging.DEBUG, logger="httpcore2"),
    ):
        InternalAPIClient(make_config(server)).get_workflow_execution("x")
    assert any(r.name.startswith("httpcore2") for r in caplog.records)  # all loggers seen
    api_records = [r for r in caplog.records if r.name == "backend.workers.shared.api_client"]
    assert [r.levelno for r in api_records] == [logging.INFO, logging.DEBUG]
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in str(record.__dict__)
        assert "authorization" not in str(record.__dict__).lower()
    success = api_records[1].__dict__
    assert (success["method"], success["status"], success["attempt"]) == ("GET", 200, 2)
    assert success["path"] == "workflow-executions/x/" and success["request_id"]
    assert isinstance(success["duration_ms"], float)


def test_metrics_count_requests_by_template_and_retries(server: FaultServer) -> None:
    server.push(Respond(502, b""))
    InternalAPIClient(make_config(server)).get_workflow_execution("some-id")
    text = _metrics.render()[0].decode()
    ok = ('worker_api_requests_total{endpoint="workflow-executions/{id}/",method="GET",'
          'status="200"}')
    assert ok in text
    assert 'status="502"' in text
    assert ('worker_api_retries_total{endpoint="workflow-executions/{id}/",method="GET",'
            'reason="502"}') in text
    assert "worker_api_request_duration_seconds_bucket" in text


@pytest.mark.redis
def test_breaker_state_is_shared_through_redis(server: FaultServer, tmp_path: Path) -> None:
    # Another process with the same backend URL and Redis sees the breaker this one opened:
    # it refuses at once, without sending anything.

    config = make_config(server, api_retry_attempts=0, circuit_breaker_failure_threshold=2,
                         circuit_breaker_recovery_timeout=60.0,
                         circuit_breaker_initial_recovery_timeout=60.0,  # open all along
                         circuit_breaker_redis_url="redis://127.0.0.1:6379/13")
    server.reset(default=Respond(503, {"error": "unavailable", "detail": "down"}))
    client = InternalAPIClient(config)
    for _ in range(2):
        with pytest.raises(ServerError):
            client.get_workflow_execution("x")
    assert client.breaker.state is CircuitState.OPEN
    sent = len(server.requests)
    settings = config.model_dump(mode="json", exclude={
        "worker_data_dir", "internal_service_api_key", "webhook_signing_secret"})
    script = (
        "import sys\n"
        "from backend.workers.shared.api_client import InternalAPIClient, APICircuitOpenError\n"
        "from backend.workers.shared.config import WorkerConfig\n"
        f"config = WorkerConfig(**{settings!r},"
        f" internal_service_api_key={SECRET!r}, _env_file=None)\n"
        "try:\n"
        "    InternalAPIClient(config).get_workflow_execution('x')\n"
        "except APICircuitOpenError as exc:\n"
        "    print('refused', exc.breaker_name)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(server.requests) == sent
    redis.Redis.from_url("redis://127.0.0.1:6379/13").delete(
        f"worker:breaker:internal-api {config.internal_api_base_url}")


def test_threads_sharing_the_pool_keep_their_own_organization(server: FaultServer) -> None:
    config = make_config(server)
    errors: list[BaseException] = []

    def work(org: str) -> None:
        try:
            with InternalAPIClient(config) as client:
                client.set_organization_context(org)
                for _ in range(10):
                    client.get_workflow_execution(org)  # the id names the organization
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"org-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(server.requests) == 60
    for request in server.requests:
        org = request.headers["x-organization-id"]
        assert request.path.endswith(f"/workflow-executions/{org}/")
    assert server.connections_accepted <= 6  # one pool, at most one connection per thread


def test_no_info_line_per_request(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with InternalAPIClient(make_config(server)) as client:
                client.get_workflow_execution("x")
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


# --- issue 9: logging levels, secrets in error texts, pool size ----------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, AuthenticationError), (404, NotFoundError), (422, APIValidationError),
     (409, ConflictError), (503, ServerError)],
)
def test_a_failed_call_is_raised_not_logged_loudly(
    server: FaultServer, caplog: pytest.LogCaptureFixture, status: int, kind: type[Exception]
) -> None:
    server.reset(default=Respond(status, {"error": "refused", "detail": "no"}))
    with caplog.at_level(logging.DEBUG), pytest.raises(kind):
        InternalAPIClient(make_config(server, api_retry_attempts=0)).get_workflow_execution("x")
    api_records = [r for r in caplog.records if r.name == "backend.workers.shared.api_client"]
    assert [r.levelno for r in api_records] == [logging.INFO]  # one line for the one attempt
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_no_part_of_the_key_survives_a_cut_error_text(server: FaultServer) -> None:
    config = make_config(server, api_retry_attempts=0)
    for body in (
        {"error": "bad", "detail": "x" * 290 + SECRET},  # the detail is cut at 300
        ("y" * 190 + SECRET + "z" * 50).encode(),  # a non-JSON body is quoted up to 200
    ):
        server.reset(default=Respond(400, body))
        with pytest.raises(InternalAPIError) as info:
            InternalAPIClient(config).get_workflow_execution("x")
        shown = str(info.value) + repr(info.value)
        assert not [f for f in (SECRET[i:i + 6] for i in range(len(SECRET) - 5)) if f in shown]
    assert SECRET not in str(APIConnectionError(f"protocol error: b'Bearer {SECRET}'"))


def _concurrent_reads(config: WorkerConfig, count: int) -> None:
    client = InternalAPIClient(config)
    threads = [threading.Thread(target=client.get_workflow_execution, args=("x",))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_api_max_connections_bounds_the_pool() -> None:
    with FaultServer(default=Respond(200, EXECUTION, delay=0.5)) as small:
        _concurrent_reads(make_config(small, api_max_connections=2), 6)
        assert small.connections_accepted == 2 and len(small.requests) == 6
    with FaultServer(default=Respond(200, EXECUTION, delay=0.5)) as default:
        _concurrent_reads(make_config(default), 6)
        assert default.connections_accepted > 2


def test_api_max_keepalive_connections_zero_keeps_none(server: FaultServer) -> None:
    client = InternalAPIClient(make_config(server, api_max_keepalive_connections=0))
    for _ in range(3):
        client.get_workflow_execution("x")
    assert server.connections_accepted == 3
