"""The execution lifecycle endpoints through Django's test client: dispatch on create, claim,
heartbeat, release, fencing by ``X-Lease-Epoch``, the finish in one call, webhooks due and
recorded once, the event history. On SQLite here and on PostgreSQL through
``test_api_postgres.py``; every refusal is checked in the database too (nothing changed).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from kombu import Connection

import backend.settings as backend_settings
from backend.internal_api.models import (
    Dispatch,
    ExecutionEvent,
    WebhookDelivery,
    WorkflowExecution,
)
from backend.internal_api.publish import celery_app
from tests.backend.conftest import Api

pytestmark = pytest.mark.django_db
# Publishing runs after the commit: these tests commit for real (no wrapping transaction).
committing = pytest.mark.django_db(transaction=True)
HOOK = "https://receiver.example/hook"
WEBHOOK_ID = re.compile(r"msg_[0-9a-f]{32}")
TERMINAL = ("COMPLETED", "ERROR", "STOPPED")


def error_of(response: Any) -> tuple[int, str]:
    """Status and error code of an error answer, after checking the error shape."""
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    return response.status_code, body["error"]


def create(api: Api, **fields: Any) -> dict[str, Any]:
    response = api.call("POST", "workflow-executions/", {"workflow_id": "wf", **fields})
    assert response.status_code == 201, response.content
    return dict(response.json())


def claim(api: Api, execution_id: str, **body: Any) -> Any:
    body.setdefault("worker", "host-1:100")
    return api.call("POST", f"workflow-executions/{execution_id}/claim/", body)


def claimed(api: Api, **fields: Any) -> tuple[str, int]:
    """A new execution claimed by ``host-1:100``: its id and lease epoch."""
    execution_id = create(api, **fields)["id"]
    response = claim(api, execution_id)
    assert response.status_code == 200, response.content
    return execution_id, response.json()["lease"]["epoch"]


def status(api: Api, execution_id: str, epoch: int | None, target: str, **fields: Any) -> Any:
    headers = api.headers(**({"X-Lease-Epoch": str(epoch)} if epoch is not None else {}))
    return api.call(
        "POST",
        f"workflow-executions/{execution_id}/status/",
        {"status": target, **fields},
        headers=headers,
    )


def row(execution_id: str) -> dict[str, Any]:
    """The execution as stored."""
    return dict(WorkflowExecution.objects.filter(pk=execution_id).values().get())


def events(api: Api, execution_id: str) -> list[dict[str, Any]]:
    response = api.call("GET", f"workflow-executions/{execution_id}/events/")
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def expire_lease(execution_id: str) -> None:
    """Move the lease's expiry into the past (as if its holder had stopped heartbeating)."""
    WorkflowExecution.objects.filter(pk=execution_id).update(
        lease_expires_at=timezone.now() - timedelta(seconds=5)
    )


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def broker_messages(queue: str) -> list[Any]:
    """The Celery messages waiting in ``queue`` of the embedded broker (consumed)."""
    app = celery_app()
    out = []
    with Connection(
        app.conf.broker_url,
        transport=app.conf.broker_transport,
        transport_options=app.conf.broker_transport_options,
    ) as conn:
        simple = conn.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                break
            message.ack()
            out.append(message)
        simple.close()
    return out


def assert_legal(history: list[dict[str, Any]]) -> None:
    """Each change starts where the previous one ended, and is a move the rules allow."""
    allowed = {
        ("PENDING", "QUEUED"): {"dispatched", "status"},
        ("QUEUED", "IN_PROGRESS"): {"claimed", "status"},
        ("PENDING", "IN_PROGRESS"): {"claimed", "status"},
        ("IN_PROGRESS", "QUEUED"): {"released", "lease_expired", "unleased_timeout"},
    }
    previous = "PENDING"
    for event in history:
        assert event["from"] == previous, history
        assert event["from"] != event["to"], history
        if event["to"] in TERMINAL:
            assert event["reason"] in {"finished", "status", "lost", "unleased_timeout"}
        else:
            assert event["reason"] in allowed[event["from"], event["to"]], event
        previous = event["to"]


# --- create with dispatch and webhook_url --------------------------------------------------


@committing
def test_create_with_dispatch_publishes_and_queues(api: Api) -> None:
    broker_messages("lc-q")  # an empty queue to start from
    execution = create(api, webhook_url=HOOK, dispatch={"task": "process", "queue": "lc-q"})
    assert execution["status"] == "QUEUED" and execution["webhook_url"] == HOOK
    assert (execution["lease"], execution["webhook"], execution["lost_count"]) == (None, None, 0)
    stored = row(execution["id"])
    assert (stored["dispatch_task"], stored["dispatch_queue"]) == ("process", "lc-q")
    assert stored["queued_at"] is not None
    dispatch = Dispatch.objects.get(execution_id=execution["id"])
    assert (dispatch.task, dispatch.queue, dispatch.reason) == ("process", "lc-q", "created")
    assert dispatch.published_at is not None
    messages = broker_messages("lc-q")
    assert len(messages) == 1
    assert messages[0].headers["task"] == "process"
    args, kwargs, _ = messages[0].decode()
    assert args == [execution["id"]] and kwargs == {"organization_id": api.org_id}
    assert events(api, execution["id"]) == [
        {
            "from": "PENDING",
            "to": "QUEUED",
            "at": events(api, execution["id"])[0]["at"],
            "worker": "",
            "epoch": None,
            "reason": "dispatched",
        }
    ]


@committing
def test_create_with_dispatch_defaults_the_queue_to_celery(api: Api) -> None:
    broker_messages("celery")
    execution = create(api, dispatch={"task": "process"})
    assert row(execution["id"])["dispatch_queue"] == "celery"
    assert len(broker_messages("celery")) == 1


@committing
def test_a_broker_that_fails_leaves_the_dispatch_to_run_lifecycle(api: Api, settings: Any) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    execution = create(api, dispatch={"task": "process", "queue": "q"})
    assert execution["status"] == "PENDING"
    dispatch = Dispatch.objects.get(execution_id=execution["id"])
    assert dispatch.published_at is None and dispatch.reason == "created"
    assert events(api, execution["id"]) == []


@committing
def test_with_an_idempotency_key_the_publish_follows_the_key_s_commit(api: Api) -> None:
    broker_messages("idem-q")
    body = {"workflow_id": "wf", "dispatch": {"task": "process", "queue": "idem-q"}}
    headers = api.headers(**{"Idempotency-Key": "create-1"})
    first = api.call("POST", "workflow-executions/", body, headers=headers)
    assert first.status_code == 201
    # The answer was written inside the key's transaction, before the publish.
    assert first.json()["status"] == "PENDING"
    assert row(first.json()["id"])["status"] == "QUEUED"
    replay = api.call("POST", "workflow-executions/", body, headers=headers)
    assert replay.status_code == 201 and replay.json() == first.json()
    assert replay["Idempotent-Replayed"] == "true"
    assert len(broker_messages("idem-q")) == 1
    assert Dispatch.objects.filter(execution_id=first.json()["id"]).count() == 1


def test_create_without_dispatch_writes_no_dispatch(api: Api) -> None:
    execution = create(api, webhook_url=HOOK)
    assert execution["status"] == "PENDING"
    assert not Dispatch.objects.filter(execution_id=execution["id"]).exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"webhook_url": "ftp://receiver.example/hook"}, "webhook_url"),
        ({"webhook_url": "https:///nohost"}, "webhook_url"),
        ({"webhook_url": "https://receiver.example/a b"}, "webhook_url"),
        ({"webhook_url": "https://receiver.example:99999/"}, "webhook_url"),
        ({"webhook_url": "https://r.example/" + "x" * 2031}, "webhook_url"),
        ({"webhook_url": ""}, "webhook_url"),
        ({"webhook_url": 5}, "webhook_url"),
        ({"dispatch": "process"}, "dispatch"),
        ({"dispatch": []}, "dispatch"),
        ({"dispatch": None}, "dispatch"),
        ({"dispatch": {}}, "dispatch.task"),
        ({"dispatch": {"task": ""}}, "dispatch.task"),
        ({"dispatch": {"task": "t" * 256}}, "dispatch.task"),
        ({"dispatch": {"task": 5}}, "dispatch.task"),
        ({"dispatch": {"task": "t", "queue": ""}}, "dispatch.queue"),
        ({"dispatch": {"task": "t", "queue": "q" * 256}}, "dispatch.queue"),
        ({"dispatch": {"task": "t", "priority": 1}}, "dispatch.priority"),
    ],
)
def test_create_refuses_bad_lifecycle_fields(api: Api, fields: dict[str, Any], field: str) -> None:
    response = api.call("POST", "workflow-executions/", {"workflow_id": "wf", **fields})
    assert error_of(response) == (400, "validation_error")
    assert field in response.json()["detail"]
    assert not WorkflowExecution.objects.filter(organization_id=api.org_id).exists()
    assert not Dispatch.objects.exists()


# --- claim ---------------------------------------------------------------------------------


def test_claim_takes_the_lease(api: Api) -> None:
    execution_id = create(api)["id"]
    before = timezone.now()
    response = claim(
        api, execution_id, lease_seconds=120, dispatch={"task": "process", "queue": "w"}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"execution", "lease"}
    lease, execution = body["lease"], body["execution"]
    assert lease["epoch"] == 1
    expires = parse_time(lease["expires_at"])
    assert before + timedelta(seconds=119) <= expires <= timezone.now() + timedelta(seconds=121)
    assert execution["status"] == "IN_PROGRESS" and execution["attempts"] == 1
    assert execution["started_at"] is not None
    assert execution["lease"] == {
        "epoch": 1,
        "worker": "host-1:100",
        "expires_at": lease["expires_at"],
    }
    stored = row(execution_id)
    assert (stored["dispatch_task"], stored["dispatch_queue"]) == ("process", "w")
    assert (stored["lease_epoch"], stored["lease_seconds"]) == (1, 120)
    (event,) = events(api, execution_id)
    assert (event["from"], event["to"], event["reason"]) == ("PENDING", "IN_PROGRESS", "claimed")
    assert (event["worker"], event["epoch"]) == ("host-1:100", 1)


def test_a_live_lease_is_held(api: Api) -> None:
    execution_id, _ = claimed(api)
    before = row(execution_id)
    response = claim(api, execution_id, worker="host-2:200")
    assert error_of(response) == (409, "lease_held")
    assert 1 <= int(response["Retry-After"]) <= 30
    assert row(execution_id) == before


def test_a_claim_retried_by_its_worker_gets_its_lease_back_unchanged(api: Api) -> None:
    # The first claim applied and its answer was lost: the same worker asks again.
    execution_id, epoch = claimed(api)
    before = row(execution_id)
    response = claim(api, execution_id)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["lease"]["epoch"] == epoch and body["execution"]["attempts"] == 1
    assert body["execution"]["lease"]["worker"] == "host-1:100"
    assert parse_time(body["lease"]["expires_at"]) == before["lease_expires_at"]
    assert row(execution_id) == before
    assert len(events(api, execution_id)) == 1
    # Another worker's claim is still refused, and an expired lease is no one's to get back.
    assert error_of(claim(api, execution_id, worker="host-2:200")) == (409, "lease_held")
    expire_lease(execution_id)
    assert claim(api, execution_id).json()["lease"]["epoch"] == epoch + 1


def test_a_webhook_claim_retried_by_its_worker_gets_the_hand_out_back(api: Api) -> None:
    execution_id, epoch = claimed(api, webhook_url=HOOK)
    assert status(api, execution_id, epoch, "COMPLETED").status_code == 200
    before = row(execution_id)
    response = claim(api, execution_id)  # the finisher, to whom the webhook is handed
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["lease"]["epoch"] == epoch and body["execution"]["status"] == "COMPLETED"
    expected = before["webhook_handed_at"] + timedelta(seconds=settings.WEBHOOK_DUE_TIMEOUT)
    assert parse_time(body["lease"]["expires_at"]) == expected
    assert row(execution_id) == before
    assert error_of(claim(api, execution_id, worker="host-2:200")) == (409, "lease_held")


def test_an_expired_lease_is_claimed_again_with_a_new_epoch(api: Api) -> None:
    execution_id, epoch = claimed(api)
    expire_lease(execution_id)
    response = claim(api, execution_id, worker="host-2:200")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["lease"]["epoch"] == epoch + 1
    assert body["execution"]["attempts"] == 2
    assert body["execution"]["lease"]["worker"] == "host-2:200"
    # IN_PROGRESS -> IN_PROGRESS is a takeover: its event names the new holder.
    history = events(api, execution_id)
    assert [(e["from"], e["to"], e["reason"]) for e in history] == [
        ("PENDING", "IN_PROGRESS", "claimed"),
        ("IN_PROGRESS", "IN_PROGRESS", "claimed"),
    ]
    assert (history[1]["worker"], history[1]["epoch"]) == ("host-2:200", epoch + 1)


def test_a_plain_task_in_progress_without_lease_can_be_claimed(api: Api) -> None:
    execution_id = create(api)["id"]
    assert status(api, execution_id, None, "IN_PROGRESS").status_code == 200
    response = claim(api, execution_id)
    assert response.status_code == 200 and response.json()["lease"]["epoch"] == 1


@pytest.mark.parametrize("terminal", TERMINAL)
def test_a_terminal_execution_without_webhook_is_not_claimed(api: Api, terminal: str) -> None:
    execution_id = create(api)["id"]
    assert status(api, execution_id, None, terminal).status_code == 200
    before = row(execution_id)
    assert error_of(claim(api, execution_id)) == (409, "illegal_transition")
    assert row(execution_id) == before


def test_a_due_webhook_is_handed_out_once_per_timeout(api: Api) -> None:
    execution_id, epoch = claimed(api, webhook_url=HOOK)
    finished = status(api, execution_id, epoch, "COMPLETED").json()
    webhook_id = finished["webhook"]["id"]
    # Handed to the finishing worker just now: another claim waits.
    before = row(execution_id)
    response = claim(api, execution_id, worker="host-2:200")
    assert error_of(response) == (409, "lease_held")
    assert 1 <= int(response["Retry-After"]) <= settings.WEBHOOK_DUE_TIMEOUT
    assert row(execution_id) == before
    # Not recorded within the timeout: handed out again, with a new epoch, status unchanged.
    WorkflowExecution.objects.filter(pk=execution_id).update(
        webhook_handed_at=timezone.now() - timedelta(seconds=settings.WEBHOOK_DUE_TIMEOUT + 1)
    )
    response = claim(api, execution_id, worker="host-2:200")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["lease"]["epoch"] == epoch + 1
    assert body["execution"]["status"] == "COMPLETED" and body["execution"]["attempts"] == 1
    assert body["execution"]["webhook"] == {
        "id": webhook_id, "url": HOOK, "delivered": False, "failed": False
    }
    stored = row(execution_id)
    assert stored["webhook_handed_at"] > before["webhook_handed_at"]
    assert stored["webhook_id"] == webhook_id  # the same webhook-id on every attempt
    # Recorded delivered: nothing left to claim.
    record(api, execution_id, webhook_id, epoch=epoch + 1)
    assert error_of(claim(api, execution_id)) == (409, "illegal_transition")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "worker"),
        ({"worker": ""}, "worker"),
        ({"worker": "w" * 256}, "worker"),
        ({"worker": 5}, "worker"),
        ({"worker": "w", "lease_seconds": 0}, "lease_seconds"),
        ({"worker": "w", "lease_seconds": 3601}, "lease_seconds"),
        ({"worker": "w", "lease_seconds": "30"}, "lease_seconds"),
        ({"worker": "w", "lease_seconds": 1.5}, "lease_seconds"),
        ({"worker": "w", "lease_seconds": True}, "lease_seconds"),
        ({"worker": "w", "dispatch": {"queue": "q"}}, "dispatch.task"),
        ({"worker": "w", "epoch": 1}, "epoch"),
    ],
)
def test_claim_refuses_bad_bodies(api: Api, body: dict[str, Any], field: str) -> None:
    execution_id = create(api)["id"]
    before = row(execution_id)
    response = api.call("POST", f"workflow-executions/{execution_id}/claim/", body)
    assert error_of(response) == (400, "validation_error")
    assert field in response.json()["detail"]
    assert row(execution_id) == before


def test_lifecycle_endpoints_of_unknown_or_other_executions_are_404(
    api: Api, make_org: Any
) -> None:
    other = make_org()
    execution_id, epoch = claimed(api)
    unknown = "00000000-0000-4000-8000-000000000000"
    for target, org in ((unknown, None), (execution_id, other)):
        for method, path, body in (
            ("POST", f"workflow-executions/{target}/claim/", {"worker": "w"}),
            ("POST", f"workflow-executions/{target}/heartbeat/", {"epoch": epoch}),
            ("POST", f"workflow-executions/{target}/release/", {"epoch": epoch}),
            ("GET", f"workflow-executions/{target}/events/", None),
        ):
            assert error_of(api.call(method, path, body, org_id=org)) == (404, "not_found")
    assert row(execution_id)["lease_epoch"] == epoch


# --- heartbeat and release -----------------------------------------------------------------


def test_heartbeat_extends_the_lease_by_the_claimed_length(api: Api) -> None:
    execution_id = create(api)["id"]
    epoch = claim(api, execution_id, lease_seconds=600).json()["lease"]["epoch"]
    WorkflowExecution.objects.filter(pk=execution_id).update(
        lease_expires_at=timezone.now() + timedelta(seconds=10)
    )
    before = timezone.now()
    response = api.call("POST", f"workflow-executions/{execution_id}/heartbeat/", {"epoch": epoch})
    assert response.status_code == 200, response.content
    lease = response.json()["lease"]
    assert (lease["epoch"], lease["worker"]) == (epoch, "host-1:100")
    expires = parse_time(lease["expires_at"])
    assert before + timedelta(seconds=599) <= expires <= timezone.now() + timedelta(seconds=601)
    assert abs(row(execution_id)["lease_expires_at"] - expires) < timedelta(milliseconds=2)
    response = api.call(
        "POST",
        f"workflow-executions/{execution_id}/heartbeat/",
        {"epoch": epoch, "lease_seconds": 5},
    )
    expires = parse_time(response.json()["lease"]["expires_at"])
    assert expires <= timezone.now() + timedelta(seconds=5)
    assert row(execution_id)["lease_seconds"] == 5


@pytest.mark.parametrize("why", ["superseded", "expired", "finished", "released"])
def test_heartbeat_of_a_lease_no_longer_held_is_lease_lost(api: Api, why: str) -> None:
    execution_id, epoch = claimed(api)
    if why == "superseded":
        expire_lease(execution_id)
        claim(api, execution_id, worker="host-2:200")
    elif why == "expired":
        expire_lease(execution_id)
    elif why == "finished":
        status(api, execution_id, epoch, "COMPLETED")
    else:
        api.call("POST", f"workflow-executions/{execution_id}/release/", {"epoch": epoch})
    before = row(execution_id)
    response = api.call("POST", f"workflow-executions/{execution_id}/heartbeat/", {"epoch": epoch})
    assert error_of(response) == (409, "lease_lost")
    assert row(execution_id) == before


def test_release_queues_it_again_after_retry_in(api: Api) -> None:
    execution_id, epoch = claimed(api)
    before = timezone.now()
    response = api.call(
        "POST", f"workflow-executions/{execution_id}/release/", {"epoch": epoch, "retry_in": 90}
    )
    assert response.status_code == 200, response.content
    execution = response.json()
    assert execution["status"] == "QUEUED" and execution["lease"] is None
    stored = row(execution_id)
    assert stored["lease_expires_at"] is None and stored["lease_epoch"] == epoch
    assert (
        before + timedelta(seconds=89)
        <= stored["queued_at"]
        <= timezone.now() + timedelta(seconds=91)
    )
    last = events(api, execution_id)[-1]
    assert (last["from"], last["to"], last["reason"]) == ("IN_PROGRESS", "QUEUED", "released")
    assert (last["worker"], last["epoch"]) == ("host-1:100", epoch)
    # The released lease is gone: a second release, a heartbeat, a fenced write all refused.
    before_row = row(execution_id)
    again = api.call("POST", f"workflow-executions/{execution_id}/release/", {"epoch": epoch})
    assert error_of(again) == (409, "lease_lost")
    assert error_of(status(api, execution_id, epoch, "IN_PROGRESS")) == (409, "lease_lost")
    assert row(execution_id) == before_row
    # And anyone may claim it.
    assert claim(api, execution_id, worker="host-2:200").json()["lease"]["epoch"] == epoch + 1


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("heartbeat", {}, "epoch"),
        ("heartbeat", {"epoch": 0}, "epoch"),
        ("heartbeat", {"epoch": "1"}, "epoch"),
        ("heartbeat", {"epoch": 2**31}, "epoch"),
        ("heartbeat", {"epoch": 1, "lease_seconds": 0}, "lease_seconds"),
        ("heartbeat", {"epoch": 1, "lease_seconds": 3601}, "lease_seconds"),
        ("heartbeat", {"epoch": 1, "worker": "w"}, "worker"),
        ("release", {}, "epoch"),
        ("release", {"epoch": None}, "epoch"),
        ("release", {"epoch": 1, "retry_in": -1}, "retry_in"),
        ("release", {"epoch": 1, "retry_in": 86401}, "retry_in"),
        ("release", {"epoch": 1, "retry_in": "5"}, "retry_in"),
    ],
)
def test_heartbeat_and_release_refuse_bad_bodies(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    execution_id, _ = claimed(api)
    before = row(execution_id)
    response = api.call("POST", f"workflow-executions/{execution_id}/{path}/", body)
    assert error_of(response) == (400, "validation_error")
    assert field in response.json()["detail"]
    assert row(execution_id) == before


# --- fencing ---------------------------------------------------------------------------------


def fenced_writes(api: Api, execution_id: str, epoch: int) -> list[Any]:
    """A status update, a PATCH and a webhook record, each carrying ``epoch``."""
    headers = api.headers(**{"X-Lease-Epoch": str(epoch)})
    return [
        api.call(
            "POST", f"workflow-executions/{execution_id}/status/", {"status": "COMPLETED"},
            headers=headers,
        ),
        api.call(
            "PATCH", f"workflow-executions/{execution_id}/", {"result": {"x": 1}},
            headers=headers,
        ),
        api.call(
            "POST", "webhook-deliveries/",
            {"url": HOOK, "outcome": "failed", "execution_id": execution_id},
            headers=headers,
        ),
    ]  # fmt: skip


def stored_state(execution_id: str) -> Any:
    return (
        row(execution_id),
        list(WebhookDelivery.objects.filter(execution_id=execution_id).values()),
        list(ExecutionEvent.objects.filter(execution_id=execution_id).values()),
    )


def test_a_superseded_epoch_is_lease_lost_and_changes_nothing(api: Api) -> None:
    execution_id, stale = claimed(api)
    expire_lease(execution_id)
    assert claim(api, execution_id, worker="host-2:200").status_code == 200
    before = stored_state(execution_id)
    for response in fenced_writes(api, execution_id, stale):
        assert error_of(response) == (409, "lease_lost")
    assert stored_state(execution_id) == before


def test_an_expired_lease_is_lease_lost_for_status_and_patch(api: Api) -> None:
    execution_id, epoch = claimed(api)
    expire_lease(execution_id)
    before = stored_state(execution_id)
    status_answer, patch_answer, record_answer = fenced_writes(api, execution_id, epoch)
    assert error_of(status_answer) == (409, "lease_lost")
    assert error_of(patch_answer) == (409, "lease_lost")
    # The epoch is still the current one: its webhook record is accepted.
    assert record_answer.status_code == 201
    assert stored_state(execution_id)[0] == before[0]


def test_the_current_epoch_writes_and_no_header_writes_as_before(api: Api) -> None:
    execution_id, epoch = claimed(api)
    headers = api.headers(**{"X-Lease-Epoch": str(epoch)})
    patched = api.call(
        "PATCH", f"workflow-executions/{execution_id}/", {"total_files": 3}, headers=headers
    )
    assert patched.status_code == 200 and patched.json()["total_files"] == 3
    plain = api.call("PATCH", f"workflow-executions/{execution_id}/", {"failed_files": 1})
    assert plain.status_code == 200 and plain.json()["failed_files"] == 1
    # A plain status update on a leased execution is accepted as before (the module README's
    # plain tasks).
    assert status(api, execution_id, None, "IN_PROGRESS").status_code == 200


# --- the finish in one call ------------------------------------------------------------------


def test_finish_applies_status_result_and_counts_at_once(api: Api) -> None:
    execution_id, epoch = claimed(api, webhook_url=HOOK)
    with CaptureQueriesContext(connection) as queries:
        response = status(
            api, execution_id, epoch, "COMPLETED",
            result={"rows": [1, 2]}, total_files=3, successful_files=2, failed_files=1,
            execution_time=1.5, attempts=1,
        )  # fmt: skip
    assert response.status_code == 200, response.content
    if connection.vendor == "postgresql":
        assert [q["sql"].split()[0] for q in queries.captured_queries] == ["WITH"]
    done = response.json()
    assert done["status"] == "COMPLETED" and done["result"] == {"rows": [1, 2]}
    assert (done["total_files"], done["successful_files"], done["failed_files"]) == (3, 2, 1)
    assert done["execution_time"] == 1.5 and done["finished_at"] is not None
    assert done["lease"] is None
    assert WEBHOOK_ID.fullmatch(done["webhook"]["id"])
    assert done["webhook"] == {
        "id": done["webhook"]["id"], "url": HOOK, "delivered": False, "failed": False
    }
    stored = row(execution_id)
    assert stored["lease_epoch"] == epoch and stored["lease_expires_at"] is None
    assert stored["webhook_handed_at"] is not None
    last = events(api, execution_id)[-1]
    assert (last["from"], last["to"], last["reason"]) == ("IN_PROGRESS", "COMPLETED", "finished")
    assert (last["worker"], last["epoch"]) == ("host-1:100", epoch)
    # A retried finish (its answer was lost) is a harmless no-op with the same answer.
    again = status(api, execution_id, epoch, "COMPLETED", result={"other": True})
    assert again.status_code == 200 and again.json() == done
    assert len(events(api, execution_id)) == 2


def test_a_refused_finish_applies_nothing(api: Api) -> None:
    execution_id, epoch = claimed(api)
    assert status(api, execution_id, epoch, "STOPPED").status_code == 200
    before = stored_state(execution_id)
    response = status(api, execution_id, epoch, "COMPLETED", result={"late": 1}, total_files=9)
    assert error_of(response) == (409, "illegal_transition")
    assert stored_state(execution_id) == before


def test_a_plain_finish_writes_a_status_event_and_makes_the_webhook_due(api: Api) -> None:
    execution_id = create(api, webhook_url=HOOK)["id"]
    done = status(api, execution_id, None, "ERROR", error_message="boom").json()
    assert done["webhook"]["delivered"] is False
    (event,) = events(api, execution_id)
    assert (event["from"], event["to"], event["reason"]) == ("PENDING", "ERROR", "status")
    assert (event["worker"], event["epoch"]) == ("", None)


def test_no_webhook_without_webhook_url(api: Api) -> None:
    execution_id, epoch = claimed(api)
    assert status(api, execution_id, epoch, "COMPLETED").json()["webhook"] is None
    assert row(execution_id)["webhook_id"] == ""


def test_result_and_counts_with_a_non_terminal_status_are_recorded_with_it(api: Api) -> None:
    execution_id, epoch = claimed(api)
    response = status(api, execution_id, epoch, "IN_PROGRESS", result=[1], total_files=4)
    assert response.status_code == 200, response.content
    assert (response.json()["result"], response.json()["total_files"]) == ([1], 4)
    assert len(events(api, execution_id)) == 1  # a no-op status: no event


# --- webhook records -------------------------------------------------------------------------


def record(
    api: Api,
    execution_id: str | None,
    webhook_id: str,
    *,
    epoch: int | None = None,
    outcome: str = "delivered",
) -> Any:
    headers = api.headers(**({"X-Lease-Epoch": str(epoch)} if epoch is not None else {}))
    body: dict[str, Any] = {"url": HOOK, "outcome": outcome, "webhook_id": webhook_id}
    if execution_id is not None:
        body["execution_id"] = execution_id
    return api.call("POST", "webhook-deliveries/", body, headers=headers)  # fmt: skip


def test_a_delivered_webhook_is_recorded_once(api: Api) -> None:
    execution_id, epoch = claimed(api, webhook_url=HOOK)
    webhook_id = status(api, execution_id, epoch, "COMPLETED").json()["webhook"]["id"]
    for _ in range(2):
        failed = record(api, execution_id, webhook_id, epoch=epoch, outcome="failed")
        assert failed.status_code == 201 and failed.json()["webhook_id"] == webhook_id
    execution = api.call("GET", f"workflow-executions/{execution_id}/").json()
    assert execution["webhook"]["delivered"] is False  # failures leave it due
    first = record(api, execution_id, webhook_id, epoch=epoch)
    assert first.status_code == 201
    second = record(api, execution_id, webhook_id, epoch=epoch)
    assert second.status_code == 200 and second.json() == first.json()
    third = record(api, None, webhook_id)
    assert third.status_code == 200 and third.json() == first.json()
    delivered = WebhookDelivery.objects.filter(webhook_id=webhook_id, outcome="delivered")
    assert delivered.count() == 1
    assert WebhookDelivery.objects.filter(webhook_id=webhook_id).count() == 3
    execution = api.call("GET", f"workflow-executions/{execution_id}/").json()
    assert execution["webhook"] == {
        "id": webhook_id, "url": HOOK, "delivered": True, "failed": False
    }
    assert row(execution_id)["webhook_delivered_at"] is not None


def test_a_record_of_another_webhook_id_leaves_the_webhook_due(api: Api) -> None:
    execution_id, epoch = claimed(api, webhook_url=HOOK)
    status(api, execution_id, epoch, "COMPLETED")
    assert record(api, execution_id, "msg_" + "0" * 32, epoch=epoch).status_code == 201
    assert row(execution_id)["webhook_delivered_at"] is None


@pytest.mark.parametrize(
    "webhook_id",
    ["msg_", "msg_" + "A" * 32, "msg_" + "0" * 31, "msg_" + "0" * 33, "0" * 36, "msg-" + "0" * 32,
     "msg_" + "\u0663" * 32, 5, ["msg_"]],
)  # fmt: skip
def test_webhook_id_must_be_msg_and_32_hex(api: Api, webhook_id: Any) -> None:
    execution_id, _ = claimed(api)
    response = record(api, execution_id, webhook_id)
    assert error_of(response) == (400, "validation_error")
    assert "webhook_id" in response.json()["detail"]
    assert not WebhookDelivery.objects.exists()


def test_an_epoch_header_needs_an_execution_id(api: Api) -> None:
    response = record(api, None, "msg_" + "0" * 32, epoch=1)
    assert error_of(response) == (400, "validation_error")
    assert "X-Lease-Epoch" in response.json()["detail"]
    assert not WebhookDelivery.objects.exists()


# --- events ----------------------------------------------------------------------------------


@committing
def test_the_event_history_is_every_status_change_in_order(api: Api) -> None:
    broker_messages("hist")
    execution_id = create(api, dispatch={"task": "process", "queue": "hist"})["id"]
    first = claim(api, execution_id).json()["lease"]["epoch"]
    api.call("POST", f"workflow-executions/{execution_id}/release/", {"epoch": first})
    second = claim(api, execution_id, worker="host-2:200").json()["lease"]["epoch"]
    status(api, execution_id, second, "IN_PROGRESS")  # a no-op: no event
    status(api, execution_id, second, "COMPLETED")
    status(api, execution_id, second, "COMPLETED")  # a retried finish: no event
    history = events(api, execution_id)
    assert [(e["from"], e["to"], e["reason"], e["epoch"]) for e in history] == [
        ("PENDING", "QUEUED", "dispatched", None),
        ("QUEUED", "IN_PROGRESS", "claimed", first),
        ("IN_PROGRESS", "QUEUED", "released", first),
        ("QUEUED", "IN_PROGRESS", "claimed", second),
        ("IN_PROGRESS", "COMPLETED", "finished", second),
    ]
    assert_legal(history)
    stamps = [parse_time(e["at"]) for e in history]
    assert stamps == sorted(stamps)
    assert len(broker_messages("hist")) == 1


def test_events_of_a_new_execution_are_empty(api: Api) -> None:
    assert events(api, create(api)["id"]) == []


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("DISPATCH_TIMEOUT", "", 30.0),
        ("DISPATCH_TIMEOUT", "2.5", 2.5),
        ("DISPATCH_TIMEOUT", " 7 ", 7.0),
        ("DISPATCH_TIMEOUT", "0", None),
        ("DISPATCH_TIMEOUT", "-1", None),
        ("DISPATCH_TIMEOUT", "nan", None),
        ("DISPATCH_TIMEOUT", "inf", None),
        ("DISPATCH_TIMEOUT", "1e309", None),
        ("DISPATCH_TIMEOUT", "\u0663", None),
        ("DISPATCH_TIMEOUT", "thirty", None),
        ("WEBHOOK_DUE_TIMEOUT", "86401", None),
        ("UNLEASED_TIMEOUT", "0.5", None),
        ("LIFECYCLE_INTERVAL", "0.01", None),
    ],
)
def test_lifecycle_durations_are_read_and_checked(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: float | None
) -> None:
    defaults = {"DISPATCH_TIMEOUT": 30.0, "WEBHOOK_DUE_TIMEOUT": 60.0}
    defaults |= {"UNLEASED_TIMEOUT": 3600.0, "LIFECYCLE_INTERVAL": 2.0}
    bounds = {"DISPATCH_TIMEOUT": (0.1, 86400.0), "WEBHOOK_DUE_TIMEOUT": (0.1, 86400.0)}
    bounds |= {"UNLEASED_TIMEOUT": (1.0, 30 * 86400.0), "LIFECYCLE_INTERVAL": (0.05, 3600.0)}
    monkeypatch.setenv(name, raw)
    read = lambda: backend_settings._number(name, defaults[name], *bounds[name])  # noqa: E731
    if expected is None:
        with pytest.raises(ImproperlyConfigured, match=name):
            read()
    else:
        assert read() == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 5), ("1", 1), ("1000", 1000), ("0", None), ("1001", None), ("2.5", None),
     ("-3", None), ("\u0663", None), ("1" * 5000, None), ("five", None)],
)  # fmt: skip
def test_execution_max_attempts_is_a_whole_number(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: int | None
) -> None:
    monkeypatch.setenv("EXECUTION_MAX_ATTEMPTS", raw)
    if expected is None:
        with pytest.raises(ImproperlyConfigured, match="EXECUTION_MAX_ATTEMPTS"):
            backend_settings._integer("EXECUTION_MAX_ATTEMPTS", 5, 1, 1000)
    else:
        assert backend_settings._integer("EXECUTION_MAX_ATTEMPTS", 5, 1, 1000) == expected
