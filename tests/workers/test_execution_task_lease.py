"""ExecutionTask's lease, run eagerly (``Task.apply``) against a real HTTP server on loopback that
answers as the lifecycle contract says (tests/fault_server.py): what it sends, in which order,
and what it does with each answer (``lease_held``, ``lease_lost``, a webhook due). The same
behaviours against the real backend are in test_lifecycle_live.py."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery import Celery
from kombu import Exchange, Queue

from backend.workers.shared import (
    ExecutionTask,
    InternalAPIClient,
    LeaseLostError,
    WorkerConfig,
    WorkflowExecution,
    _celery,
    _lease,
)
from tests.fault_server import FaultServer, Respond, Stall, Truncate

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_sleep")]

TASKS_LOGGER = "backend.workers.shared.tasks"
EXECUTION_ID = "3f2b6c1e-0000-4000-8000-0000000000c1"
WEBHOOK_ID = "msg_" + "cd" * 16


def execution(status: str = "IN_PROGRESS", **fields: Any) -> dict[str, Any]:
    return {"id": EXECUTION_ID, "workflow_id": "wf", "status": status, "lost_count": 0,
            "webhook": None, "lease": None, **fields}


def claim(epoch: int = 7, **fields: Any) -> Respond:
    lease = {"epoch": epoch, "worker": "w", "expires_at": "2026-01-01T00:00:30Z"}
    return Respond(200, {"execution": execution(lease=lease, **fields), "lease": lease})


def refused(code: str, **headers: str) -> Respond:
    return Respond(409, {"error": code, "detail": f"refused: {code}"}, headers)


def due(receiver: FaultServer) -> dict[str, Any]:
    return {"id": WEBHOOK_ID, "url": f"http://localhost:{receiver.port}/hook", "delivered": False}


RECORDED = Respond(201, {"id": "delivery-1", "url": "x", "outcome": "delivered"})


@pytest.fixture
def backend() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(500, {"error": "unscripted", "detail": "no answer"})) as s:
        yield s


@pytest.fixture
def receiver() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, b"ok")) as server:
        yield server


def make_config(backend: FaultServer, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "_env_file": None,
        "internal_service_api_key": "swi-test-key-7Q2xK9-lease-unit",
        "django_app_backend_url": backend.url,
        "organization_id": "org-a",
        "api_retry_attempts": 0,
        "webhook_allowed_hosts": "localhost",
        "execution_lease_seconds": 3,  # a heartbeat each second
        "circuit_breaker_failure_threshold": 100,
    }
    values.update(overrides)
    return WorkerConfig(**values)


def sent(server: FaultServer) -> list[str]:
    """``METHOD last-path-segment`` of each request the backend got."""
    return [f"{r.method} {r.path.rstrip('/').rsplit('/', 1)[1]}" for r in server.requests]


def wait_for(server: FaultServer, entry: str) -> None:
    """Until the server got a request ``entry`` (as :func:`sent` spells it); at most 20 s."""
    deadline = time.monotonic() + 20
    while entry not in sent(server):
        assert time.monotonic() < deadline, sent(server)
        time.sleep(0.02)


def make_task(config: WorkerConfig, body: Any, **options: Any) -> Any:
    app = Celery(f"lease-unit-{id(body)}")
    # shared=False: a later test's app must not be handed this body under the same name.
    return app.task(bind=True, base=ExecutionTask, worker_config=config, shared=False,
                    **options)(body)  # fmt: skip


def test_the_worker_name_is_one_per_process_and_thread(backend: FaultServer) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        return None

    task = make_task(make_config(backend), body)
    here = {task._worker_name() for _ in range(3)}
    with ThreadPoolExecutor(2) as pool:
        barrier = threading.Barrier(2)

        def name(_: int) -> str:
            barrier.wait(5)  # both pool threads run one each
            return str(task._worker_name())

        threads = set(pool.map(name, range(2)))
    assert len(here) == 1 and len(threads) == 2 and here.isdisjoint(threads)


def test_a_fault_free_run_is_three_requests_claim_finish_record(
    backend: FaultServer, receiver: FaultServer
) -> None:
    seen: list[Any] = []

    def body(self: ExecutionTask, execution_id: str) -> dict[str, Any]:
        seen.append(self.execution)
        return {"pages": 3}

    task = make_task(make_config(backend), body)
    backend.push(
        claim(), Respond(200, execution("COMPLETED", webhook=due(receiver))), RECORDED
    )
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.successful() and outcome.result == {"pages": 3}
    assert sent(backend) == ["POST claim", "POST status", "POST webhook-deliveries"]
    claim_body, finish, record = (r.json() for r in backend.requests)
    host, pid, token = claim_body["worker"].rsplit(":", 2)
    assert claim_body["lease_seconds"] == 3 and pid == str(os.getpid()) and host
    assert len(token) == 8 and int(token, 16) >= 0
    assert claim_body["dispatch"] == {"task": task.name, "queue": "celery"}
    assert finish == {"status": "COMPLETED", "result": {"pages": 3}}
    assert record["webhook_id"] == WEBHOOK_ID and record["outcome"] == "delivered"
    assert [r.headers.get("x-lease-epoch") for r in backend.requests] == [None, "7", "7"]
    # The claim and the fenced finish are idempotent by themselves (a claim retried by its
    # worker gets its lease back; a finish retried is already applied): no Idempotency-Key,
    # which would cost the backend a look-up and an insert. The record keeps its key.
    keys = [r.headers.get("idempotency-key") for r in backend.requests]
    assert keys[:2] == [None, None] and keys[2]
    (hook,) = receiver.requests
    assert hook.headers["webhook-id"] == WEBHOOK_ID
    assert hook.json()["status"] == "COMPLETED" and hook.json()["execution_id"] == EXECUTION_ID
    assert seen[0].id == EXECUTION_ID and seen[0].lease.epoch == 7  # the claim's answer


ORDERS = Exchange("orders", type="direct")


@pytest.mark.parametrize(
    ("settings", "delivery", "dispatch"),
    [
        ({}, {}, {"queue": "celery"}),  # run eagerly: the default queue
        ({"default_queue": "reports"}, {}, {"queue": "reports"}),
        # a routing key is not the queue's name: the consumed queue bound with it is
        ({}, {"exchange": "orders", "routing_key": "orders.eu"}, {"queue": "eu_orders"}),
        ({}, {"exchange": "", "routing_key": "eu_orders"}, {"queue": "eu_orders"}),
        # names the backend refuses, or a queue this worker cannot name: no dispatch sent
        ({}, {"exchange": "orders", "routing_key": "orders.*.late"}, None),
        ({"default_queue": "no/such folder"}, {}, None),
        ({"default_queue": "q" * 129}, {}, None),
        ({"default_queue": "amq.gen-x"}, {}, None),
        ({"default_queue": "ünicode"}, {}, None),
        ({"name": "tasks:<lambda>"}, {}, None),
    ],
    ids=["eager", "default-queue", "bound", "routing-key-is-a-queue", "unbound", "slash",
         "long", "amq", "non-ascii", "bad-task-name"],
)
def test_the_claim_names_the_queue_the_message_came_from(
    backend: FaultServer, settings: dict[str, str], delivery: dict[str, str],
    dispatch: dict[str, str] | None,
) -> None:  # fmt: skip
    app = Celery("lease-unit-queues")
    app.conf.task_queues = [Queue("celery"), Queue("eu_orders", ORDERS, routing_key="orders.eu")]
    app.conf.task_default_queue = settings.get("default_queue", "celery")

    def body(self: ExecutionTask, execution_id: str) -> None:
        return None

    options = {"name": settings["name"]} if "name" in settings else {}
    task = app.task(bind=True, base=ExecutionTask, worker_config=make_config(backend), shared=False,
                    **options)(body)  # fmt: skip
    backend.push(claim(), Respond(200, execution("COMPLETED")))
    assert task.apply(args=[EXECUTION_ID], **delivery).successful()
    sent_dispatch = backend.requests[0].json().get("dispatch")
    assert sent_dispatch == (None if dispatch is None else {"task": task.name, **dispatch})


@pytest.mark.parametrize("answer", [refused("lease_held", **{"Retry-After": "9"}),
                                    refused("illegal_transition")])
def test_a_refused_claim_ends_quietly_without_running_the_body(
    backend: FaultServer, answer: Respond, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)
    ran: list[str] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        ran.append(execution_id)

    task = make_task(make_config(backend), body)
    backend.push(answer)
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.successful() and outcome.result is None and ran == []
    assert sent(backend) == ["POST claim"]
    levels = {r.levelno for r in caplog.records if r.name == TASKS_LOGGER}
    assert levels == {logging.INFO}


@pytest.mark.parametrize(
    "answer",
    [
        Respond(200, b"<html>bad gateway</html>"),  # applied, maybe: its answer is unusable
        Respond(200, {"execution": {"id": EXECUTION_ID}}),  # not a claim's answer
        Truncate(200, b'{"execution": {"id": "3f2b'),  # cut short on its way back
        refused("idempotency_in_flight"),  # the first attempt still being applied
        Respond(503, {"error": "unavailable", "detail": "restarting"}),
    ],
    ids=["not-json", "not-a-claim", "truncated", "in-flight", "503"],
)
def test_a_claim_whose_outcome_is_unknown_is_tried_again_and_marks_nothing(
    backend: FaultServer, answer: Any
) -> None:
    ran: list[str] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        ran.append(execution_id)

    task = make_task(make_config(backend), body)
    # The second claim finds the first one's lease (it was applied after all): the run ends.
    backend.push(answer, refused("lease_held", **{"Retry-After": "30"}))
    outcome = task.apply(args=[EXECUTION_ID])  # eager: the re-queued run follows at once
    assert outcome.successful() and ran == []
    assert sent(backend) == ["POST claim", "POST claim"]  # no ERROR mark, nothing released


@pytest.mark.parametrize(
    "answer",
    [
        Respond(400, {"error": "validation_error", "detail": "worker: too long"}),
        Respond(403, {"error": "permission_denied", "detail": "not this organization's"}),
        Respond(404, {"error": "not_found", "detail": "no such execution"}),
        refused("conflict"),  # a 409 this worker does not know
        Respond(418, {"error": "teapot", "detail": "unexpected status"}),
    ],
    ids=["400", "403", "404", "409-other", "418"],
)
def test_a_claim_refused_for_good_is_raised_and_marks_nothing(
    backend: FaultServer, answer: Respond, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)

    def body(self: ExecutionTask, execution_id: str) -> None:
        raise AssertionError("the body runs only under a lease")

    task = make_task(make_config(backend), body, max_retries=0)
    backend.push(answer)
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.failed() and not isinstance(outcome.result, AssertionError)
    assert sent(backend) == ["POST claim"]  # no unfenced ERROR mark
    assert any("claim failed" in r.getMessage() and "not marked" in r.getMessage()
               for r in caplog.records if r.name == TASKS_LOGGER)


def test_heartbeats_run_while_the_body_runs(backend: FaultServer) -> None:
    heartbeat = Respond(200, {"lease": {"epoch": 7, "expires_at": "2026-01-01T00:01:00Z"}})

    def body(self: ExecutionTask, execution_id: str) -> None:
        backend.push(heartbeat, heartbeat)
        wait_for(backend, "POST heartbeat")
        while sent(backend).count("POST heartbeat") < 2:
            time.sleep(0.02)
        backend.push(Respond(200, execution("COMPLETED")))

    task = make_task(make_config(backend), body)
    backend.push(claim())
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert sent(backend) == ["POST claim", "POST heartbeat", "POST heartbeat", "POST status"]
    assert [r.json() for r in backend.requests[1:3]] == [{"epoch": 7}, {"epoch": 7}]


def lease_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == f"lease-{EXECUTION_ID}"]


def test_a_run_shorter_than_a_third_of_its_lease_starts_no_heartbeat_thread(
    backend: FaultServer,
) -> None:
    seen: list[list[str]] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        seen.append(lease_threads())
        backend.push(Respond(200, execution("COMPLETED")))

    task = make_task(make_config(backend, execution_lease_seconds=30), body)
    backend.push(claim())
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert seen == [[]] and lease_threads() == []
    assert sent(backend) == ["POST claim", "POST status"]


def test_a_run_past_a_third_of_its_lease_gets_its_thread_and_it_ends_with_the_run(
    backend: FaultServer,
) -> None:
    seen: list[list[str]] = []
    heartbeat = Respond(200, {"lease": {"epoch": 7, "expires_at": "2026-01-01T00:01:00Z"}})

    def body(self: ExecutionTask, execution_id: str) -> None:
        backend.push(heartbeat)
        wait_for(backend, "POST heartbeat")
        seen.append(lease_threads())
        backend.push(Respond(200, execution("COMPLETED")))

    task = make_task(make_config(backend), body)
    backend.push(claim())
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert seen == [[f"lease-{EXECUTION_ID}"]] and lease_threads() == []


@pytest.mark.parametrize(("runs_for", "noted"), [(0.0, False), (1.0, True)])
def test_the_lease_note_is_written_once_a_run_outlives_half_its_hard_limit(
    tmp_path: Any, backend: FaultServer, runs_for: float, noted: bool
) -> None:
    config = make_config(backend, worker_data_dir=tmp_path)
    run = _lease.Run(WorkflowExecution.model_validate(execution()), 7, "org-a")
    note = _lease.LeaseNote(config, "task-1")
    keeper = _lease.LeaseKeeper(config, run, lease_seconds=60, note_for="task-1", note_within=0.4)
    keeper.start()
    deadline = time.monotonic() + runs_for
    while time.monotonic() < deadline and not note.path.exists():
        time.sleep(0.01)
    assert note.path.exists() == noted
    if noted:
        assert note.path.read_text().split() == [EXECUTION_ID, "7"]
    keeper.stop()  # the body ended: the note still covers the finish and the webhook
    assert note.path.exists() == noted
    keeper.close()
    assert not note.path.exists()  # forgotten when the run ends
    time.sleep(0.3)  # past the note's time: a stopped run is never noted
    assert not note.path.exists()


def test_a_lease_lost_at_heartbeat_stops_every_further_write(
    backend: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)

    def body(self: ExecutionTask, execution_id: str) -> dict[str, Any]:
        backend.push(refused("lease_lost"))
        wait_for(backend, "POST heartbeat")
        return {"late": True}

    task = make_task(make_config(backend), body)
    backend.push(claim())
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.successful() and outcome.result is None
    assert sent(backend) == ["POST claim", "POST heartbeat"]  # no finish, no ERROR mark
    assert any(r.levelno == logging.WARNING and "lease lost" in r.getMessage()
               for r in caplog.records if r.name == TASKS_LOGGER)


def test_after_a_heartbeat_refused_with_lease_lost_the_body_s_writes_are_not_sent(
    backend: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)
    config = make_config(backend)
    refusals: list[str] = []

    def lost() -> bool:
        return any("lease is lost" in r.getMessage() for r in caplog.records)

    def body(self: ExecutionTask, execution_id: str) -> None:
        backend.push(refused("lease_lost"))
        deadline = time.monotonic() + 20
        while not lost():  # the heartbeat thread has the answer
            assert time.monotonic() < deadline
            time.sleep(0.02)
        def write(reraise: bool) -> None:
            with InternalAPIClient(config) as client:
                try:
                    client.update_workflow_execution(execution_id, result={"late": True})
                except LeaseLostError as exc:
                    refusals.append(str(exc))
                    if reraise:
                        raise

        thread = threading.Thread(target=contextvars.copy_context().run, args=(write, False))
        thread.start()  # a thread the body started, in a copy of its context
        thread.join()
        write(True)

    task = make_task(config, body)
    backend.push(claim())
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.successful() and outcome.result is None  # ended quietly
    assert sent(backend) == ["POST claim", "POST heartbeat"]  # the PATCH never left
    assert len(refusals) == 2 and all("not sent" in text for text in refusals)


def test_a_heartbeat_has_bounds_of_its_own_within_the_lease(backend: FaultServer) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        backend.push(Stall(), refused("lease_lost"))  # one stalled, the next one refused
        deadline = time.monotonic() + 20
        while sent(backend).count("POST heartbeat") < 2:
            assert time.monotonic() < deadline  # API_TIMEOUT is 30 s: not what bounds it
            time.sleep(0.02)

    task = make_task(make_config(backend, api_timeout=30.0), body)
    backend.push(claim())
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert sent(backend) == ["POST claim", "POST heartbeat", "POST heartbeat"]


def test_a_write_refused_with_lease_lost_ends_the_task_quietly(backend: FaultServer) -> None:
    config = make_config(backend)

    def body(self: ExecutionTask, execution_id: str) -> None:
        with InternalAPIClient(config) as client:
            client.update_workflow_execution(execution_id, result={"partial": True})

    task = make_task(config, body)
    backend.push(claim(), refused("lease_lost"))
    outcome = task.apply(args=[EXECUTION_ID])
    assert outcome.successful() and outcome.result is None
    assert sent(backend) == ["POST claim", f"PATCH {EXECUTION_ID}"]
    assert backend.requests[1].headers["x-lease-epoch"] == "7"


def test_a_thread_the_body_starts_writes_under_the_lease_only_in_a_copy_of_its_context(
    backend: FaultServer,
) -> None:
    config = make_config(backend)

    def patch(source: str) -> None:
        with InternalAPIClient(config) as client:
            client.update_workflow_execution(EXECUTION_ID, result={"from": source})

    def finish() -> None:
        with InternalAPIClient(config) as client:
            client.finish_execution(EXECUTION_ID, "COMPLETED", result={"from": "thread"})

    def body(self: ExecutionTask, execution_id: str) -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            pool.submit(contextvars.copy_context().run, patch, "copied").result()
            pool.submit(patch, "plain").result()  # a new thread's context is empty
        thread = threading.Thread(target=contextvars.copy_context().run, args=(finish,))
        thread.start()
        thread.join()

    task = make_task(config, body)
    backend.push(claim(), Respond(200, execution()), Respond(200, execution()),
                 Respond(200, execution("COMPLETED")))  # fmt: skip
    assert task.apply(args=[EXECUTION_ID]).successful()
    # The thread's finish counts as the run's (shared lease): the task does not finish again.
    assert sent(backend) == ["POST claim", f"PATCH {EXECUTION_ID}", f"PATCH {EXECUTION_ID}",
                             "POST status"]  # fmt: skip
    epochs = {
        str(r.json().get("result", {}).get("from")): r.headers.get("x-lease-epoch")
        for r in backend.requests[1:]
    }
    assert epochs == {"copied": "7", "plain": None, "thread": "7"}


class Hiccup(Exception):
    transient = True


def test_a_transient_failure_gives_the_lease_back_before_the_requeue(
    backend: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, TASKS_LOGGER)

    def body(self: ExecutionTask, execution_id: str) -> None:
        raise Hiccup("input store busy")

    task = make_task(make_config(backend), body, max_retries=1)
    released = Respond(200, execution("QUEUED"))
    backend.push(claim(7), released, claim(8), Respond(200, execution("ERROR")))
    outcome = task.apply(args=[EXECUTION_ID])  # eager: the re-queued run follows at once
    assert isinstance(outcome.result, Hiccup)
    assert sent(backend) == ["POST claim", "POST release", "POST claim", "POST status"]
    release = backend.requests[1].json()
    (requeue,) = [r for r in caplog.records
                  if r.getMessage() == "transient failure, task re-queued"]
    countdown = round(requeue.countdown, 3)  # type: ignore[attr-defined]
    assert release == {"epoch": 7, "retry_in": countdown}
    mark = backend.requests[3]
    assert mark.json()["status"] == "ERROR" and "attempts" not in mark.json()  # claims count
    assert mark.headers["x-lease-epoch"] == "8"


def test_a_permanent_failure_marks_error_under_the_lease_and_delivers_its_webhook(
    backend: FaultServer, receiver: FaultServer
) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        raise ValueError("not a document")

    task = make_task(make_config(backend), body)
    backend.push(claim(), Respond(200, execution("ERROR", webhook=due(receiver))), RECORDED)
    outcome = task.apply(args=[EXECUTION_ID])
    assert isinstance(outcome.result, ValueError)
    assert sent(backend) == ["POST claim", "POST status", "POST webhook-deliveries"]
    assert backend.requests[1].json()["error_message"] == "ValueError: not a document"
    assert receiver.requests[0].json()["status"] == "ERROR"


def test_a_final_execution_handed_out_gets_its_webhook_only(
    backend: FaultServer, receiver: FaultServer
) -> None:
    ran: list[str] = []

    def body(self: ExecutionTask, execution_id: str) -> None:
        ran.append(execution_id)

    task = make_task(make_config(backend), body)
    backend.push(claim(9, status="COMPLETED", webhook=due(receiver)), RECORDED)
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert ran == []
    assert sent(backend) == ["POST claim", "POST webhook-deliveries"]
    assert backend.requests[1].headers["x-lease-epoch"] == "9"
    assert receiver.requests[0].headers["webhook-id"] == WEBHOOK_ID


def test_a_webhook_the_backend_gave_up_is_not_delivered(
    backend: FaultServer, receiver: FaultServer
) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        return None

    given_up = {**due(receiver), "failed": True}
    task = make_task(make_config(backend), body)
    backend.push(claim(9, status="COMPLETED", webhook=given_up))
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert sent(backend) == ["POST claim"] and receiver.requests == []


def test_a_body_that_finishes_itself_is_not_finished_twice(
    backend: FaultServer, receiver: FaultServer
) -> None:
    config = make_config(backend)

    def body(self: ExecutionTask, execution_id: str) -> dict[str, str]:
        with InternalAPIClient(config) as client:  # the Quick Start's way, under the lease
            client.update_workflow_execution_status(execution_id, "IN_PROGRESS")
            client.update_workflow_execution_status(execution_id, "COMPLETED")
        return {"status": "success"}

    task = make_task(config, body)
    backend.push(
        claim(),
        Respond(200, execution("IN_PROGRESS")),
        Respond(200, execution("COMPLETED", webhook=due(receiver))),
        RECORDED,
    )
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert sent(backend) == [
        "POST claim", "POST status", "POST status", "POST webhook-deliveries"
    ]
    assert {r.headers.get("x-lease-epoch") for r in backend.requests[1:]} == {"7"}


def test_a_body_that_requeues_itself_gives_the_lease_back_first(backend: FaultServer) -> None:
    def body(self: ExecutionTask, execution_id: str) -> None:
        if self.request.retries == 0:
            raise self.retry(countdown=4)

    task = make_task(make_config(backend), body)
    backend.push(claim(7), Respond(200, execution("QUEUED")), claim(8),
                 Respond(200, execution("COMPLETED")))
    assert task.apply(args=[EXECUTION_ID]).successful()
    assert sent(backend) == ["POST claim", "POST release", "POST claim", "POST status"]
    assert backend.requests[1].json() == {"epoch": 7, "retry_in": 4.0}


def test_claim_execution_false_keeps_the_plain_task(backend: FaultServer) -> None:
    seen: list[Any] = []

    def body(self: ExecutionTask, execution_id: str) -> str:
        seen.append(self.execution)
        return "done"

    task = make_task(make_config(backend), body, claim_execution=False)
    assert task.apply(args=[EXECUTION_ID]).result == "done"
    assert seen == [None] and backend.requests == []


def test_a_task_without_organization_id_gets_none_from_the_dispatch(
    backend: FaultServer,
) -> None:
    _celery.install()
    app = Celery("lease-unit-org")
    got: list[tuple[Any, ...]] = []

    @app.task(bind=True)
    def plain(self: Any, execution_id: str) -> str:  # the Quick Start's signature
        got.append((execution_id,))
        return "ok"

    @app.task(bind=True)
    def scoped(self: Any, execution_id: str, organization_id: str | None = None) -> str:
        got.append((execution_id, organization_id))
        return "ok"

    kwargs = {"organization_id": "org-a"}  # what the backend's dispatch sends
    assert plain.apply(args=[EXECUTION_ID], kwargs=dict(kwargs)).result == "ok"
    assert scoped.apply(args=[EXECUTION_ID], kwargs=dict(kwargs)).result == "ok"
    assert got == [(EXECUTION_ID,), (EXECUTION_ID, "org-a")]
