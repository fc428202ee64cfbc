"""ExecutionTask's transient/permanent rule, run eagerly (``Task.apply``) against the live backend.

Faults come from a real misbehaving server in front of the backend (tests/fault_server.py)
and from a real circuit breaker; nothing of ours is mocked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from backend.workers.shared import (
    CircuitBreaker,
    ExecutionTask,
    InternalAPIClient,
    WorkerConfig,
)
from tests.fault_server import FaultServer, Forward, Respond

pytestmark = pytest.mark.timeout(120)
TASKS_LOGGER = "backend.workers.shared.tasks"


class Hiccup(Exception):
    """A failure of the task's own that may pass: transient by its class attribute."""

    transient = True


@pytest.fixture(scope="module")
def fault(live_backend: Any) -> Iterator[FaultServer]:
    with FaultServer(default=Forward(live_backend.url)) as server:
        yield server


@pytest.fixture(scope="module")
def config(live_backend: Any, fault: FaultServer) -> WorkerConfig:
    return WorkerConfig(
        _env_file=None, internal_service_api_key=live_backend.api_key,
        django_app_backend_url=fault.url, organization_id=live_backend.org_id,
        api_retry_attempts=0,
    )


@pytest.fixture(scope="module")
def client(config: WorkerConfig) -> Iterator[InternalAPIClient]:
    with InternalAPIClient(config) as api:
        yield api


@pytest.fixture(scope="module")
def tasks(config: WorkerConfig) -> dict[str, Any]:
    app = Celery("test_tasks")
    breaker = CircuitBreaker("test-tasks-engine", failure_threshold=1, recovery_timeout=30.0)

    @app.task(bind=True, base=ExecutionTask, worker_config=config, max_retries=2)
    def hiccup(self: ExecutionTask, execution_id: str) -> None:
        raise Hiccup("the input store is busy")

    @app.task(bind=True, base=ExecutionTask, worker_config=config, max_retries=1)
    def engine(self: ExecutionTask, execution_id: str) -> None:
        breaker.call(_engine_down)

    @app.task(bind=True, base=ExecutionTask, worker_config=config)
    def bug(self: ExecutionTask, execution_id: str, organization_id: str | None = None) -> None:
        raise ValueError(f"cannot parse {config.api_key()!r} as a document")

    return {"hiccup": hiccup, "engine": engine, "bug": bug}


def _engine_down() -> None:
    raise Hiccup("engine busy")


def requeues(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == TASKS_LOGGER and r.getMessage() == "transient failure, task re-queued"]


def test_transient_failures_requeue_until_max_retries_then_mark_error(
    tasks: dict[str, Any], client: InternalAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)
    execution_id = client.create_workflow_execution("wf-hiccup").id
    result = tasks["hiccup"].apply(args=[execution_id])
    assert isinstance(result.result, Hiccup)
    assert [r.retry for r in requeues(caplog)] == [1, 2]  # type: ignore[attr-defined]
    execution = client.get_workflow_execution(execution_id)
    assert execution.status == "ERROR"
    assert execution.error_message == "Hiccup: the input store is busy (after 2 re-queue(s))"
    assert execution.attempts == 3


def test_an_open_breaker_sets_the_countdown_to_its_remaining_time(
    tasks: dict[str, Any], client: InternalAPIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)
    execution_id = client.create_workflow_execution("wf-engine").id
    tasks["engine"].apply(args=[execution_id])  # opens the breaker, then meets it open
    (requeue,) = requeues(caplog)
    assert requeue.error_type == "Hiccup"  # type: ignore[attr-defined]
    assert client.get_workflow_execution(execution_id).status == "ERROR"
    caplog.clear()
    second = client.create_workflow_execution("wf-engine").id
    tasks["engine"].apply(args=[second])
    (requeue,) = requeues(caplog)
    assert requeue.error_type == "CircuitBreakerOpenError"  # type: ignore[attr-defined]
    # The breaker's remaining open time (up to 30 s, plus up to a quarter of jitter), not the
    # first backoff (at most 1 s).
    assert 1.0 < requeue.countdown <= 37.5  # type: ignore[attr-defined]


def test_a_permanent_failure_marks_error_without_the_secret(
    tasks: dict[str, Any], client: InternalAPIClient, config: WorkerConfig
) -> None:
    execution_id = client.create_workflow_execution("wf-bug").id
    result = tasks["bug"].apply(args=[execution_id])
    assert isinstance(result.result, ValueError)
    execution = client.get_workflow_execution(execution_id)
    assert execution.status == "ERROR"
    assert execution.error_message == "ValueError: cannot parse '**********' as a document"
    assert config.api_key() not in str(execution.model_dump())


def test_marking_error_that_fails_transiently_requeues_the_task(
    tasks: dict[str, Any], client: InternalAPIClient, fault: FaultServer,
    caplog: pytest.LogCaptureFixture, live_backend: Any,
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)
    execution_id = client.create_workflow_execution("wf-mark").id
    fault.push(Forward(live_backend.url),  # the claim
               Respond(503, {"error": "unavailable", "detail": "shedding load"},
                       headers={"Retry-After": "3"}))  # the ERROR mark
    tasks["bug"].apply(args=[execution_id])
    (requeue,) = requeues(caplog)
    assert requeue.error_type == "ServerError"  # type: ignore[attr-defined]
    assert 3.0 <= requeue.countdown <= 3.75  # type: ignore[attr-defined]
    execution = client.get_workflow_execution(execution_id)
    assert execution.status == "ERROR"
    assert str(execution.error_message).endswith("(after 1 re-queue(s))")
    assert execution.attempts == 2  # two claims


def test_a_plain_call_outside_a_worker_raises_and_marks_nothing(
    tasks: dict[str, Any], client: InternalAPIClient
) -> None:
    execution_id = client.create_workflow_execution("wf-direct").id
    with pytest.raises(ValueError, match="cannot parse"):
        tasks["bug"](execution_id)
    assert client.get_workflow_execution(execution_id).status == "PENDING"
