"""The lifecycle's limits, on a real gunicorn backend and real ``run_lifecycle`` processes:
names every broker takes, outbox rows the broker refuses, dispatches nobody claims, webhooks
nobody can deliver, the reaper fencing a lost holder out, takeover claims in the history, and
a row published once when the request and ``run_lifecycle`` race for it.

The state a limit needs (an execution dispatched nine times, a webhook handed out five times)
is written to the database directly, as ``test_run_lifecycle`` does; nothing is timed.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.backend import test_run_lifecycle as base
from tests.backend.test_run_lifecycle import LONG, PAST, Scene, lease_expired, queue_name, wait_for

# The same fixtures as test_run_lifecycle (a backend per database for this module).
sqlite_backend = base.sqlite_backend
pg_backend = base.pg_backend
scene = base.scene

# --- item 1: names every transport takes --------------------------------------------------------

BAD_QUEUES = [
    "",
    "q" * 129,  # the embedded broker's file name would pass 255 bytes near 200
    "no/such/folder",  # a path on the embedded broker
    "../escape",
    "a b",
    "tab\there",
    "star*",
    "hash#",
    "ümlaut",
    "emoji-\U0001f600",
    ".hidden",
    "-dash-first",
    "amq.reserved",  # RabbitMQ refuses to declare these
    "AMQ.gen-x",
]
BAD_TASKS = ["", "t" * 256, "a/b", "a b", "tâche", "semi;colon", "new\nline", ".dot"]
GOOD = ["celery", "q" * 128, "a.b:c@d-e_f", "_private", "Tasks.Run9"]


def _create(scene: Scene, dispatch: dict[str, Any]) -> Any:
    return scene.http.post(
        "/workflow-executions/", json={"workflow_id": "wf-names", "dispatch": dispatch}
    )


@pytest.mark.parametrize("queue", BAD_QUEUES)
def test_a_queue_name_some_broker_cannot_take_is_refused_at_create_and_claim(
    scene: Scene, queue: str
) -> None:
    answer = _create(scene, {"task": "lifecycle.task", "queue": queue})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "validation_error"
    assert "queue" in answer.json()["detail"]
    assert scene.unpublished() == 0
    pk = scene.create(queue_name())
    claim = scene.http.post(
        f"/workflow-executions/{pk}/claim/",
        json={"worker": "w:1", "dispatch": {"task": "lifecycle.task", "queue": queue}},
    )
    assert (claim.status_code, "queue" in claim.json()["detail"]) == (400, True), claim.text
    assert scene.execution(pk)["attempts"] == 0


@pytest.mark.parametrize("task", BAD_TASKS)
def test_a_task_name_some_broker_cannot_take_is_refused_at_create_and_claim(
    scene: Scene, task: str
) -> None:
    answer = _create(scene, {"task": task, "queue": "celery"})
    assert answer.status_code == 400, answer.text
    assert "task" in answer.json()["detail"]
    pk = scene.create(queue_name())
    claim = scene.http.post(
        f"/workflow-executions/{pk}/claim/", json={"worker": "w:1", "dispatch": {"task": task}}
    )
    assert (claim.status_code, "task" in claim.json()["detail"]) == (400, True), claim.text


@pytest.mark.parametrize("name", GOOD)
def test_names_every_broker_takes_are_accepted_and_published(scene: Scene, name: str) -> None:
    answer = _create(scene, {"task": name, "queue": name})
    assert answer.status_code == 201, answer.text
    pk = answer.json()["id"]
    wait_for(lambda: scene.broker.messages(name).get(pk) == 1, f"the message on {name}")


# --- item 1: rows the broker refuses ------------------------------------------------------------


def test_refused_rows_at_the_lowest_ids_hold_back_no_other_and_end_their_execution_error(
    scene: Scene,
) -> None:
    queue, refused = queue_name(), "no/such/folder"  # rows written before names were checked
    bad = [scene.create(refused, webhook_url="https://hooks.example/x") for _ in range(2)]
    for pk in bad:
        scene.add_dispatch(pk, refused)
    finished = scene.create(refused, status="COMPLETED", webhook_id=f"msg_{'a' * 32}")
    scene.add_dispatch(finished, refused, reason="webhook_due")
    good = [scene.create(queue) for _ in range(3)]
    for pk in good:
        scene.add_dispatch(pk, queue)
    env = {"DISPATCH_MAX_FAILURES": "2", **LONG}
    first = scene.once(**env)
    assert (first["published"], first["publish_failed"], first["given_up"]) == (3, 3, 0)
    assert scene.broker.messages(queue) == Counter({str(pk): 1 for pk in good})
    rows = scene.sql(
        "SELECT attempts, last_error FROM internal_api_dispatch WHERE queue = %s", [refused]
    )
    assert [attempts for attempts, _ in rows] == [1, 1, 1]
    assert all(error for _, error in rows), rows  # what the broker raised, by type
    assert scene.execution(bad[0])["status"] == "PENDING"

    second = scene.once(**env)
    assert (second["published"], second["publish_failed"], second["given_up"]) == (0, 3, 3)
    for pk in bad:
        execution = scene.execution(pk)
        assert execution["status"] == "ERROR"
        (error,) = scene.sql(
            "SELECT last_error FROM internal_api_dispatch WHERE execution_id = %s", [pk]
        )[0]
        assert execution["error_message"] == (
            f"cannot be dispatched: task lifecycle.task on queue {refused}: {error}"
        )
        assert scene.events(pk) == [("PENDING", "ERROR", "undispatchable")]
        body = scene.http.get(f"/workflow-executions/{pk}/").json()
        assert body["webhook"]["failed"] is True and body["webhook"]["delivered"] is False
    assert scene.http.get(f"/workflow-executions/{finished}/").json()["webhook"]["failed"]
    assert scene.repairs(bad[0]) == ["undispatchable"]
    # Dead rows are no longer outbox work: never tried again (the last once, below).
    assert scene.health()["failed_webhooks"] == 3
    assert scene.metrics()['internal_api_lifecycle_given_up_total{kind="undispatchable"}'] == 2
    assert scene.once(**env)["publish_failed"] == 0


# --- item 2: the request's publish and run_lifecycle's never both publish a row ----------------


def test_rows_created_while_two_run_lifecycle_loops_run_are_published_once(scene: Scene) -> None:
    queue = queue_name()
    loops = [scene.run_lifecycle("--interval", "0.05", **LONG) for _ in range(2)]
    for loop in loops:
        wait_for(lambda p=loop: "run_lifecycle started" in p.logs(), "both loops")
    created: list[str] = []
    lock = threading.Lock()

    def create(count: int) -> None:
        for _ in range(count):
            answer = _create(scene, {"task": "lifecycle.task", "queue": queue})
            assert answer.status_code == 201, answer.text
            with lock:
                created.append(answer.json()["id"])

    try:
        threads = [threading.Thread(target=create, args=(40,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: scene.unpublished() == 0, "the outbox to empty")
        for loop in loops:
            assert loop.stop() == 0, loop.logs()[-3000:]
    finally:
        for loop in loops:
            loop.kill()
    assert len(created) == 120
    assert scene.broker.messages(queue) == Counter({pk: 1 for pk in created})


# --- item 3: dispatches nobody claims; webhooks nobody delivers --------------------------------


def _queued(scene: Scene, queue: str, unclaimed: int, age: float, **columns: Any) -> uuid.UUID:
    queued_at = datetime.now(UTC) - timedelta(seconds=age)
    return scene.create(
        queue, status="QUEUED", unclaimed_dispatches=unclaimed, queued_at=queued_at, **columns
    )


def test_the_redispatch_interval_doubles_per_unclaimed_dispatch_and_the_last_ends_error(
    scene: Scene,
) -> None:
    # run_lifecycle runs with DISPATCH_TIMEOUT 1, the default cap (600) and
    # EXECUTION_MAX_DISPATCHES 10: the n-th unclaimed dispatch waits min(2**(n-1), 600) s.
    queue = queue_name()
    due = [
        _queued(scene, queue, 0, 1.5),  # given back by its holder (release)
        _queued(scene, queue, 1, 1.5),
        _queued(scene, queue, 5, 30),  # waits 16 s
        _queued(scene, queue, 9, 300),  # waits 256 s
    ]
    waiting = [_queued(scene, queue, 5, 8), _queued(scene, queue, 9, 200)]
    spent = _queued(scene, queue, 10, 1000, webhook_url="https://hooks.example/x")
    # The backend counts with DISPATCH_TIMEOUT 600 (test_run_lifecycle.SERVED): only the
    # spent one waited longer than that.
    assert scene.health()["overdue_dispatches"] == 1
    result = scene.once(DISPATCH_TIMEOUT="1", WEBHOOK_DUE_TIMEOUT="3600")
    assert (result["redispatched"], result["given_up"], result["published"]) == (4, 1, 4)
    for pk in due:
        assert scene.dispatches(pk) == [("dispatch_timeout", True)]
    for pk in waiting:
        assert scene.dispatches(pk) == []
    assert scene.broker.messages(queue) == Counter({str(pk): 1 for pk in due})
    execution = scene.execution(spent)
    assert (execution["status"], execution["error_message"]) == (
        "ERROR",
        f"never claimed: task lifecycle.task on queue {queue}",
    )
    assert scene.events(spent) == [("QUEUED", "ERROR", "never_claimed")]
    assert scene.dispatches(spent) == []
    assert scene.http.get(f"/workflow-executions/{spent}/").json()["webhook"]["failed"]
    metrics = scene.metrics()
    assert metrics['internal_api_lifecycle_given_up_total{kind="never_claimed"}'] == 1
    assert scene.health()["overdue_dispatches"] == 0


def test_publishes_count_unclaimed_dispatches_and_a_claim_resets_them(scene: Scene) -> None:
    queue = queue_name()
    answer = _create(scene, {"task": "lifecycle.task", "queue": queue})
    pk = uuid.UUID(answer.json()["id"])
    wait_for(lambda: scene.broker.messages(queue).get(str(pk)), "the create's publish")
    unclaimed = "SELECT unclaimed_dispatches FROM internal_api_workflowexecution WHERE id = %s"
    assert scene.sql(unclaimed, [pk]) == [(1,)]
    scene.update(pk, unclaimed_dispatches=7)
    scene.claim(pk, "w:1", queue)
    assert scene.sql(unclaimed, [pk]) == [(0,)]


def _webhook_due(scene: Scene, queue: str, handed: int) -> uuid.UUID:
    return scene.create(
        queue,
        status="COMPLETED",
        webhook_url="https://hooks.example/x",
        webhook_id=f"msg_{uuid.uuid4().hex}",
        webhook_handed_at=datetime.now(UTC) - PAST,
        webhook_handed_count=handed,
        finished_at=datetime.now(UTC) - PAST,
    )


def test_a_webhook_handed_out_max_times_is_given_up_and_no_longer_handed(scene: Scene) -> None:
    queue = queue_name()
    again, spent = _webhook_due(scene, queue, 4), _webhook_due(scene, queue, 5)
    result = scene.once(WEBHOOK_MAX_ATTEMPTS="5", DISPATCH_TIMEOUT="3600")
    assert (result["webhooks_rehanded"], result["given_up"]) == (1, 1)
    assert scene.dispatches(again) == [("webhook_due", True)]
    assert scene.dispatches(spent) == []
    assert scene.repairs(spent) == ["webhook_failed"]
    body = scene.http.get(f"/workflow-executions/{spent}/").json()
    assert (body["webhook"]["delivered"], body["webhook"]["failed"]) == (False, True)
    claim = scene.http.post(f"/workflow-executions/{spent}/claim/", json={"worker": "w:1"})
    assert (claim.status_code, claim.json()["error"]) == (409, "illegal_transition")
    # The re-handed one: its claim is a hand-out, counted.
    scene.update(again, webhook_handed_at=datetime.now(UTC) - PAST)
    handed = scene.http.post(f"/workflow-executions/{again}/claim/", json={"worker": "w:2"})
    assert handed.status_code == 200, handed.text
    count = "SELECT webhook_handed_count FROM internal_api_workflowexecution WHERE id = %s"
    assert scene.sql(count, [again]) == [(5,)]
    assert scene.health()["failed_webhooks"] == 1
    assert scene.metrics()['internal_api_lifecycle_given_up_total{kind="webhook"}'] == 1
    assert scene.once(WEBHOOK_MAX_ATTEMPTS="5", DISPATCH_TIMEOUT="3600")["given_up"] == 0


def test_a_finish_hands_the_webhook_once_and_a_blocked_record_gives_it_up(scene: Scene) -> None:
    queue = queue_name()
    answer = scene.http.post(
        "/workflow-executions/",
        json={"workflow_id": "wf-hook", "webhook_url": "https://hooks.example/x"},
    )
    pk = uuid.UUID(answer.json()["id"])
    claim = scene.claim(pk, "w:1", queue)
    epoch = str(claim["lease"]["epoch"])
    done = scene.http.post(
        f"/workflow-executions/{pk}/status/",
        json={"status": "COMPLETED"},
        headers={"X-Lease-Epoch": epoch},
    )
    webhook = done.json()["webhook"]
    count = "SELECT webhook_handed_count FROM internal_api_workflowexecution WHERE id = %s"
    assert scene.sql(count, [pk]) == [(1,)]
    record = scene.http.post(
        "/webhook-deliveries/",
        json={
            "url": webhook["url"],
            "execution_id": str(pk),
            "outcome": "blocked",
            "webhook_id": webhook["id"],
            "error_message": "refused by the SSRF guard",
        },
        headers={"X-Lease-Epoch": epoch},
    )
    assert record.status_code == 201, record.text
    assert scene.http.get(f"/workflow-executions/{pk}/").json()["webhook"]["failed"] is True
    scene.update(pk, webhook_handed_at=datetime.now(UTC) - PAST)
    assert scene.health()["overdue_webhooks"] == 0
    assert scene.once(WEBHOOK_DUE_TIMEOUT="1", DISPATCH_TIMEOUT="3600")["webhooks_rehanded"] == 0


# --- items 4, 11, 12: the reaper's epoch, takeover claims, losses counted ----------------------


def test_a_holder_the_reaper_ended_error_is_fenced_out(scene: Scene) -> None:
    queue = queue_name()
    pk = scene.create(queue, webhook_url="https://hooks.example/x")
    epoch = str(scene.claim(pk, "w:1", queue)["lease"]["epoch"])
    scene.update(pk, lease_expires_at=datetime.now(UTC) - PAST)
    assert scene.once(EXECUTION_MAX_ATTEMPTS="1", **LONG)["lost"] == 1
    assert scene.execution(pk)["status"] == "ERROR"
    fenced = {"X-Lease-Epoch": epoch}
    patch = scene.http.patch(
        f"/workflow-executions/{pk}/", json={"successful_files": 3}, headers=fenced
    )
    assert (patch.status_code, patch.json()["error"]) == (409, "lease_lost"), patch.text
    webhook_id = scene.execution(pk)["webhook_id"]
    record = scene.http.post(
        "/webhook-deliveries/",
        json={
            "url": "https://hooks.example/x",
            "execution_id": str(pk),
            "outcome": "delivered",
            "status_code": 200,
            "webhook_id": webhook_id,
        },
        headers=fenced,
    )
    assert (record.status_code, record.json()["error"]) == (409, "lease_lost"), record.text
    body = scene.http.get(f"/workflow-executions/{pk}/").json()
    assert body["successful_files"] == 0 and body["webhook"]["delivered"] is False
    # The event still names the holder that lost it.
    assert scene.event_worker(pk) == ("w:1", int(epoch))


def test_a_requeued_holder_is_fenced_out_and_the_next_claim_takes_a_later_epoch(
    scene: Scene,
) -> None:
    queue = queue_name()
    pk = scene.create(queue)
    first = scene.claim(pk, "w:1", queue)["lease"]["epoch"]
    scene.update(pk, lease_expires_at=datetime.now(UTC) - PAST)
    assert scene.once(**LONG)["requeued"] == 1
    late = scene.http.post(
        f"/workflow-executions/{pk}/status/",
        json={"status": "COMPLETED"},
        headers={"X-Lease-Epoch": str(first)},
    )
    assert (late.status_code, late.json()["error"]) == (409, "lease_lost")
    assert scene.claim(pk, "w:2", queue)["lease"]["epoch"] > first + 1


def test_a_takeover_claim_before_the_reaper_came_by_is_an_event(scene: Scene) -> None:
    queue = queue_name()
    pk = scene.create(queue)
    scene.claim(pk, "w:1", queue)
    scene.update(pk, lease_expires_at=datetime.now(UTC) - PAST)
    second = scene.claim(pk, "w:2", queue)["lease"]["epoch"]
    rows = scene.sql(
        "SELECT from_status, to_status, reason, worker, epoch FROM internal_api_executionevent "
        "WHERE execution_id = %s ORDER BY id",
        [pk],
    )
    assert [tuple(row) for row in rows] == [
        ("PENDING", "IN_PROGRESS", "claimed", "w:1", 1),
        ("IN_PROGRESS", "IN_PROGRESS", "claimed", "w:2", second),
    ]
    events = scene.http.get(f"/workflow-executions/{pk}/events/").json()["results"]
    assert [(e["from"], e["to"], e["worker"]) for e in events] == [
        ("PENDING", "IN_PROGRESS", "w:1"),
        ("IN_PROGRESS", "IN_PROGRESS", "w:2"),
    ]


def test_the_error_threshold_counts_losses_not_claims_given_back(scene: Scene) -> None:
    queue = queue_name()
    # Five claims, four of them given back (transient re-queues), then one loss.
    retried = lease_expired(scene, queue, attempts=5, lost_count=0)
    worn = lease_expired(scene, queue, attempts=5, lost_count=4)
    result = scene.once(EXECUTION_MAX_ATTEMPTS="5", **LONG)
    assert (result["requeued"], result["lost"]) == (1, 1)
    assert scene.execution(retried)["status"] == "QUEUED"
    assert (scene.execution(worn)["status"], scene.execution(worn)["error_message"]) == (
        "ERROR",
        "lost by its worker 5 times",
    )


# --- items 9, 10: delivered records, webhooks nobody can hand out ------------------------------


def test_a_delivered_record_repeated_with_its_execution_marks_the_webhook_delivered(
    scene: Scene,
) -> None:
    queue = queue_name()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    pk = scene.create(
        queue, status="COMPLETED", webhook_url="https://hooks.example/x", webhook_id=webhook_id
    )
    body = {"url": "https://hooks.example/x", "outcome": "delivered", "webhook_id": webhook_id}
    first = scene.http.post("/webhook-deliveries/", json=body)
    assert first.status_code == 201, first.text
    again = scene.http.post("/webhook-deliveries/", json={**body, "execution_id": str(pk)})
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    assert scene.http.get(f"/workflow-executions/{pk}/").json()["webhook"]["delivered"] is True


def test_a_webhook_due_on_an_execution_without_a_task_is_counted_in_health(
    scene: Scene,
) -> None:
    answer = scene.http.post(
        "/workflow-executions/",
        json={"workflow_id": "wf-plain", "webhook_url": "https://hooks.example/x"},
    )
    pk = uuid.UUID(answer.json()["id"])
    for status in ("IN_PROGRESS", "COMPLETED"):  # the module README's plain task, no lease
        done = scene.http.post(f"/workflow-executions/{pk}/status/", json={"status": status})
        assert done.status_code == 200, done.text
    scene.update(pk, webhook_handed_at=datetime.now(UTC) - PAST)
    health = scene.health()
    assert (health["undeliverable_webhooks"], health["overdue_webhooks"]) == (1, 0)
    assert scene.metrics()['internal_api_lifecycle_overdue{kind="undeliverable_webhooks"}'] == 1
