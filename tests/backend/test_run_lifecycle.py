"""``manage.py run_lifecycle`` as a real process, on SQLite and PostgreSQL, with real brokers.

The backend is a real gunicorn process (``LiveBackend``); ``run_lifecycle`` runs as its own
subprocess on the backend's database; messages are counted by reading the broker itself (the
embedded filesystem broker's folder, or a Redis list on a database number of its own). The
state a repair needs (a lease that expired, a message the broker lost) is written to the
database directly: the test plays the worker that vanished. Nothing is timed: every wait polls
with a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import REDIS_URL, require_service
from tests.fault_server import TcpProxy
from tests.live_backend import LifecycleProcess, LiveBackend

# A Redis database of this suite's own; each test also uses queues of its own.
REDIS_DB = 13
REDIS_TEST_URL = f"{REDIS_URL.rsplit('/', 1)[0]}/{REDIS_DB}"
# The timeouts the gunicorn side counts overdue items with (health, metrics): shorter than the
# hour the tests date overdue items back, longer than any test (a repair stays repaired).
SERVED = {"DISPATCH_TIMEOUT": "600", "WEBHOOK_DUE_TIMEOUT": "600", "UNLEASED_TIMEOUT": "600"}
# run_lifecycle processes of the tests that must not repair anything by timeout meanwhile.
LONG = {"DISPATCH_TIMEOUT": "3600", "WEBHOOK_DUE_TIMEOUT": "3600", "UNLEASED_TIMEOUT": "3600"}
TABLES = ("executionevent", "dispatch", "webhookdelivery", "workflowexecution")
PAST = timedelta(hours=1)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def message_execution_ids(raw: list[bytes]) -> Counter[str]:
    """Execution id -> number of Celery messages (protocol 2, JSON) naming it."""
    counts: Counter[str] = Counter()
    for item in raw:
        envelope = json.loads(item)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert set(kwargs) == {"organization_id"}
        counts[args[0]] += 1
    return counts


class Broker:
    """Reads the messages of one queue, from the filesystem broker's folder or Redis."""

    def __init__(self, url: str, folder: Path) -> None:
        self.url = url
        self.folder = folder
        self._redis: Any = None
        if url.startswith("redis://"):
            import redis

            self._redis = redis.Redis.from_url(url)

    def messages(self, queue: str) -> Counter[str]:
        """Execution id -> messages in ``queue`` now."""
        if self._redis is not None:
            return message_execution_ids(self._redis.lrange(queue, 0, -1))
        files = sorted(self.folder.glob(f"*.{queue}.msg")) if self.folder.exists() else []
        return message_execution_ids([path.read_bytes() for path in files])

    def forget(self, queue: str) -> None:
        """Drop the queue (what a broker that lost its messages looks like)."""
        if self._redis is not None:
            self._redis.delete(queue)
        else:
            for path in self.folder.glob(f"*.{queue}.msg"):
                path.unlink()


class Scene:
    """One backend, its organization and API client, and helpers to shape executions."""

    def __init__(self, backend: LiveBackend, broker: Broker) -> None:
        self.backend = backend
        self.broker = broker
        # run_lifecycle publishes to this scene's broker (the backend's own by default).
        self.broker_env = {} if broker.url == "filesystem://" else {"CELERY_BROKER_URL": broker.url}
        self.http = httpx2.Client(
            base_url=f"{backend.url}/internal/v1", headers=backend.headers(), timeout=30
        )
        self.last_log: list[dict[str, Any]] = []

    def create(self, queue: str, **columns: Any) -> uuid.UUID:
        """An execution made through the API, then given ``columns`` (its dispatch task in
        ``queue`` by default) straight in the database."""
        response = self.http.post("/workflow-executions/", json={"workflow_id": "wf-lifecycle"})
        assert response.status_code == 201, response.text
        pk = uuid.UUID(response.json()["id"])
        values = {"dispatch_task": "lifecycle.task", "dispatch_queue": queue, **columns}
        self.update(pk, **values)
        return pk

    def create_many(self, count: int, queue: str) -> list[uuid.UUID]:
        """``count`` executions made through the API, given their dispatch task at once."""
        workflow = f"wf-{uuid.uuid4().hex[:8]}"
        ids = []
        for _ in range(count):
            response = self.http.post("/workflow-executions/", json={"workflow_id": workflow})
            assert response.status_code == 201, response.text
            ids.append(uuid.UUID(response.json()["id"]))
        self.sql(
            "UPDATE internal_api_workflowexecution SET dispatch_task = 'lifecycle.task', "
            "dispatch_queue = %s WHERE workflow_id = %s",
            [queue, workflow],
        )
        return ids

    def update(self, pk: uuid.UUID, **columns: Any) -> None:
        """Set columns of one execution."""
        sets = ", ".join(f"{name} = %s" for name in columns)
        self.sql(
            f"UPDATE internal_api_workflowexecution SET {sets} WHERE id = %s",
            [*columns.values(), pk],
        )

    def add_dispatch(self, pk: uuid.UUID, queue: str, reason: str = "created") -> None:
        """An unpublished outbox row for ``pk``."""
        self.sql(
            "INSERT INTO internal_api_dispatch (execution_id, task, queue, reason, created_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            [pk, "lifecycle.task", queue, reason, datetime.now(UTC)],
        )

    def sql(self, query: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on the backend's database."""
        return self.backend.sql(query, params)

    def execution(self, pk: uuid.UUID) -> dict[str, Any]:
        """The execution's lifecycle columns, as stored."""
        names = (
            "status", "error_message", "attempts", "lost_count", "lease_expires_at",
            "finished_at", "webhook_id", "webhook_delivered_at", "queued_at",
        )  # fmt: skip
        row = self.sql(
            f"SELECT {', '.join(names)} FROM internal_api_workflowexecution WHERE id = %s", [pk]
        )
        assert row, f"no execution {pk}"
        return dict(zip(names, row[0], strict=True))

    def claim(self, pk: uuid.UUID, worker: str, queue: str) -> dict[str, Any]:
        """``POST .../claim/`` as a worker's task does; the answer."""
        response = self.http.post(
            f"/workflow-executions/{pk}/claim/",
            json={
                "worker": worker,
                "lease_seconds": 30,
                "dispatch": {"task": "lifecycle.task", "queue": queue},
            },
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def api_events(self, pk: uuid.UUID) -> list[tuple[str, str, str]]:
        """(from, to, reason) of ``GET .../events/``."""
        response = self.http.get(f"/workflow-executions/{pk}/events/")
        assert response.status_code == 200, response.text
        return [(e["from"], e["to"], e["reason"]) for e in response.json()["results"]]

    def event_worker(self, pk: uuid.UUID) -> tuple[str, int | None]:
        """(worker, epoch) of the last event of ``pk``."""
        rows = self.sql(
            "SELECT worker, epoch FROM internal_api_executionevent WHERE execution_id = %s "
            "ORDER BY id DESC",
            [pk],
        )
        return (str(rows[0][0]), rows[0][1])

    def run_lifecycle(self, *args: str, **env: str) -> LifecycleProcess:
        """A looping ``run_lifecycle`` publishing to this scene's broker."""
        return self.backend.run_lifecycle(*args, extra_env={**self.broker_env, **env})

    def repairs(self, pk: uuid.UUID) -> list[str]:
        """The ``repair`` of every log line the last ``once`` wrote about ``pk``."""
        return [
            line["repair"]
            for line in self.last_log
            if line.get("execution_id") == str(pk) and "repair" in line
        ]

    def events(self, pk: uuid.UUID) -> list[tuple[str, str, str]]:
        """(from, to, reason) of every event of ``pk``, oldest first."""
        rows = self.sql(
            "SELECT from_status, to_status, reason FROM internal_api_executionevent "
            "WHERE execution_id = %s ORDER BY id",
            [pk],
        )
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def dispatches(self, pk: uuid.UUID) -> list[tuple[str, bool]]:
        """(reason, published) of every outbox row of ``pk``, oldest first."""
        rows = self.sql(
            "SELECT reason, published_at IS NOT NULL FROM internal_api_dispatch "
            "WHERE execution_id = %s ORDER BY id",
            [pk],
        )
        return [(str(reason), bool(published)) for reason, published in rows]

    def unpublished(self) -> int:
        """Outbox rows not published yet."""
        return int(
            self.sql("SELECT COUNT(*) FROM internal_api_dispatch WHERE published_at IS NULL")[0][0]
        )

    def health(self) -> dict[str, int]:
        """The ``lifecycle`` counts of ``GET health/``."""
        response = self.http.get("/health/")
        assert response.status_code == 200, response.text
        return dict(response.json()["lifecycle"])

    def metrics(self) -> dict[str, float]:
        """``GET metrics/`` as sample name with labels -> value."""
        response = self.http.get("/metrics/")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        samples = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def once(self, **env: str) -> dict[str, int]:
        """``run_lifecycle --once`` with ``env``; what the pass did."""
        done = subprocess.run(
            [sys.executable, "manage.py", "run_lifecycle", "--once"],
            cwd=Path(__file__).resolve().parents[2],
            env={**self.backend.env, **self.broker_env, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        self.last_log = [json.loads(line) for line in done.stderr.splitlines() if line[:1] == "{"]
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _backend(postgres: bool) -> LiveBackend:
    if postgres:
        require_service("postgres")
        return LiveBackend.postgres(extra_env=SERVED, threads=4)
    return LiveBackend(extra_env=SERVED, threads=4)


@pytest.fixture(scope="module")
def sqlite_backend() -> Iterator[LiveBackend]:
    """The backend on SQLite, its embedded broker in its own folder."""
    live = _backend(False)
    try:
        yield live.start()
    finally:
        live.close()


@pytest.fixture(scope="module")
def pg_backend() -> Iterator[LiveBackend]:
    """The backend on a PostgreSQL database of its own."""
    live = _backend(True)
    try:
        yield live.start()
    finally:
        live.close()


def _scene(backend: LiveBackend, broker_url: str) -> Iterator[Scene]:
    for table in TABLES:
        backend.sql(f"DELETE FROM internal_api_{table}")
    scene = Scene(backend, Broker(broker_url, backend.broker_queue_dir))
    try:
        yield scene
    finally:
        scene.http.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scene(request: pytest.FixtureRequest) -> Iterator[Scene]:
    """Each database's backend emptied of executions (counts are global), with the
    filesystem broker."""
    backend: LiveBackend = request.getfixturevalue(
        "sqlite_backend" if request.param == "sqlite" else "pg_backend"
    )
    yield from _scene(backend, "filesystem://")


@pytest.fixture
def redis_scene(pg_backend: LiveBackend) -> Iterator[Scene]:
    """The PostgreSQL backend emptied; its run_lifecycle processes publish to Redis."""
    require_service("redis")
    yield from _scene(pg_backend, REDIS_TEST_URL)


def queue_name() -> str:
    """A queue no other test uses."""
    return f"lc-{uuid.uuid4().hex[:10]}"


# --- step 1: the outbox -------------------------------------------------------------------------


def test_the_outbox_is_published_once_and_a_row_the_broker_refuses_holds_back_no_other(
    scene: Scene,
) -> None:
    queue, refused = queue_name(), "no/such/folder"
    ids = [scene.create(queue) for _ in range(3)]
    bad = scene.create(refused)
    for pk in ids[:1]:
        scene.add_dispatch(pk, queue)
    scene.add_dispatch(bad, refused)  # the filesystem broker cannot name a file after it
    for pk in ids[1:]:
        scene.add_dispatch(pk, queue)
    assert scene.once(**LONG) == {
        "published": 3, "publish_failed": 1, "requeued": 0, "lost": 0, "redispatched": 0,
        "webhooks_rehanded": 0, "given_up": 0,
    }  # fmt: skip
    assert scene.broker.messages(queue) == Counter({str(pk): 1 for pk in ids})
    for pk in ids:
        assert scene.execution(pk)["status"] == "QUEUED"
        assert scene.events(pk) == [("PENDING", "QUEUED", "dispatched")]
        assert scene.dispatches(pk) == [("created", True)]
    assert scene.dispatches(bad) == [("created", False)]
    assert scene.execution(bad)["status"] == "PENDING"
    assert any(
        line["event"] == "dispatch refused by the broker; retried next pass"
        and line["execution_id"] == str(bad)
        for line in scene.last_log
    )
    # The next pass publishes nothing twice; the refused row is tried again.
    assert (scene.once(**LONG)["published"], scene.last_log != []) == (0, True)
    assert scene.broker.messages(queue) == Counter({str(pk): 1 for pk in ids})


# --- step 2: the reaper -------------------------------------------------------------------------


def lease_expired(scene: Scene, queue: str, attempts: int, **columns: Any) -> uuid.UUID:
    """An execution a worker claimed ``attempts`` times and then vanished (lease ran out)."""
    now = datetime.now(UTC)
    values = {
        "status": "IN_PROGRESS",
        "attempts": attempts,
        "lease_epoch": attempts,
        "lease_worker": "gone-host:4242",
        "lease_expires_at": now - PAST,
        "started_at": now - PAST,
    }
    return scene.create(queue, **{**values, **columns})


def test_the_reaper_requeues_lost_executions_and_ends_them_error_after_max_attempts(
    scene: Scene,
) -> None:
    queue = queue_name()
    again = lease_expired(scene, queue, attempts=1)
    spent = lease_expired(scene, queue, attempts=2, lost_count=1)
    hooked = lease_expired(
        scene, queue, attempts=3, lost_count=1, webhook_url="https://hooks.example/x"
    )
    taskless = lease_expired(scene, queue, attempts=1, dispatch_task="")
    old = datetime.now(UTC) - PAST
    stale = scene.create(queue, status="IN_PROGRESS", attempts=1, modified_at=old)
    fresh = scene.create(queue, status="IN_PROGRESS", attempts=1)
    live = lease_expired(scene, queue, attempts=1, lease_expires_at=datetime.now(UTC) + PAST)
    result = scene.once(EXECUTION_MAX_ATTEMPTS="2", UNLEASED_TIMEOUT="60", DISPATCH_TIMEOUT="3600")
    assert (result["requeued"], result["lost"]) == (2, 3)

    for pk, reason in ((again, "lease_expired"), (stale, "unleased_timeout")):
        execution = scene.execution(pk)
        assert execution["status"] == "QUEUED" and execution["lost_count"] == 1
        assert execution["lease_expires_at"] is None
        assert scene.events(pk) == [("IN_PROGRESS", "QUEUED", reason)]
        assert scene.dispatches(pk) == [(reason, True)]
        assert scene.repairs(pk) == [reason]
    assert scene.event_worker(again) == ("gone-host:4242", 1)

    for pk, message in (
        (spent, "lost by its worker 2 times"),
        (hooked, "lost by its worker 2 times"),
        (taskless, "lost by its worker 1 times; no task is known to dispatch it again"),
    ):
        execution = scene.execution(pk)
        assert (execution["status"], execution["error_message"]) == ("ERROR", message)
        assert execution["finished_at"] is not None and execution["lease_expires_at"] is None
        assert scene.events(pk) == [("IN_PROGRESS", "ERROR", "lost")]
        assert scene.repairs(pk) == ["lost"]
    assert scene.dispatches(spent) == scene.dispatches(taskless) == []
    assert scene.execution(spent)["webhook_id"] == ""
    # The ERROR's webhook is due and handed to a worker through a dispatch at once.
    webhook_id = scene.execution(hooked)["webhook_id"]
    assert webhook_id.startswith("msg_") and len(webhook_id) == 36
    assert scene.execution(hooked)["webhook_delivered_at"] is None
    assert scene.dispatches(hooked) == [("webhook_due", True)]

    for pk in (fresh, live):
        assert scene.execution(pk)["status"] == "IN_PROGRESS"
        assert scene.events(pk) == scene.dispatches(pk) == []
    assert scene.broker.messages(queue) == Counter({str(again): 1, str(stale): 1, str(hooked): 1})


def test_an_execution_lost_at_every_claim_ends_error_after_max_attempts_with_legal_events(
    scene: Scene,
) -> None:
    queue = queue_name()
    pk = scene.create(queue, dispatch_task="")
    env = {"EXECUTION_MAX_ATTEMPTS": "2", **LONG}
    for attempt in (1, 2):
        # A worker claims it through the API (as ExecutionTask does) and vanishes; its lease
        # is made to have run out.
        claim = scene.claim(pk, f"host-{attempt}:1", queue)
        # The reaper's requeue took an epoch of its own (fencing the lost holder out).
        assert claim["lease"]["epoch"] == 2 * attempt - 1
        scene.update(pk, lease_expires_at=datetime.now(UTC) - PAST)
        result = scene.once(**env)
        assert (result["requeued"], result["lost"]) == ((1, 0) if attempt == 1 else (0, 1))
    execution = scene.execution(pk)
    assert execution["status"] == "ERROR"
    assert (execution["error_message"], execution["lost_count"]) == (
        "lost by its worker 2 times",
        2,
    )
    assert scene.events(pk) == [
        ("PENDING", "IN_PROGRESS", "claimed"),
        ("IN_PROGRESS", "QUEUED", "lease_expired"),
        ("QUEUED", "IN_PROGRESS", "claimed"),
        ("IN_PROGRESS", "ERROR", "lost"),
    ]
    assert scene.api_events(pk) == scene.events(pk)
    assert scene.broker.messages(queue) == Counter({str(pk): 1})
    # A worker that comes back with the lost lease is refused.
    late = scene.http.post(f"/workflow-executions/{pk}/heartbeat/", json={"epoch": 2})
    assert (late.status_code, late.json()["error"]) == (409, "lease_lost")


# --- steps 3 and 4: the broker lost the message; the webhook was not recorded ------------------


def test_lost_messages_and_unrecorded_webhooks_are_dispatched_again_once(scene: Scene) -> None:
    queue = queue_name()
    old, now = datetime.now(UTC) - PAST, datetime.now(UTC)
    lost = scene.create(queue, status="QUEUED", queued_at=old)
    recent = scene.create(queue, status="QUEUED", queued_at=now)
    plain = scene.create(queue, status="QUEUED", queued_at=old, dispatch_task="")
    waiting = scene.create(queue, status="QUEUED", queued_at=old)
    scene.add_dispatch(waiting, "no/such/folder")  # its message is still in the outbox

    done = {"status": "COMPLETED", "finished_at": old, "webhook_url": "https://hooks.example/y"}
    due = scene.create(queue, **done, webhook_id=f"msg_{uuid.uuid4().hex}", webhook_handed_at=old)
    handed_now = scene.create(
        queue, **done, webhook_id=f"msg_{uuid.uuid4().hex}", webhook_handed_at=now
    )
    delivered = scene.create(
        queue,
        **done,
        webhook_id=f"msg_{uuid.uuid4().hex}",
        webhook_handed_at=old,
        webhook_delivered_at=old,
    )
    env = {"DISPATCH_TIMEOUT": "60", "WEBHOOK_DUE_TIMEOUT": "60"}
    result = scene.once(**env)
    assert (result["redispatched"], result["webhooks_rehanded"]) == (1, 1)
    assert scene.dispatches(lost) == [("dispatch_timeout", True)]
    assert scene.dispatches(due) == [("webhook_due", True)]
    for pk in (recent, plain, handed_now, delivered):
        assert scene.dispatches(pk) == []
    assert scene.dispatches(waiting) == [("created", False)]
    assert scene.broker.messages(queue) == Counter({str(lost): 1, str(due): 1})
    assert (scene.repairs(lost), scene.repairs(due)) == (["dispatch_timeout"], ["webhook_due"])
    # Dispatched again means counted again from now: the next pass sends nothing more.
    result = scene.once(**env)
    assert (result["redispatched"], result["webhooks_rehanded"]) == (0, 0)
    assert scene.broker.messages(queue) == Counter({str(lost): 1, str(due): 1})
    assert (scene.execution(lost)["status"], scene.execution(due)["status"]) == (
        "QUEUED",
        "COMPLETED",
    )
    assert scene.events(lost) == scene.events(due) == []  # no status changed


# --- health and metrics -------------------------------------------------------------------------


def test_health_and_metrics_count_what_is_overdue_until_it_is_repaired(scene: Scene) -> None:
    queue = queue_name()
    old = datetime.now(UTC) - PAST
    zero = {
        "overdue_leases": 0, "overdue_dispatches": 0, "unpublished_dispatches": 0,
        "overdue_webhooks": 0, "undeliverable_webhooks": 0, "failed_webhooks": 0,
    }  # fmt: skip
    assert scene.health() == zero
    lease_expired(scene, queue, attempts=1)
    scene.create(queue, status="QUEUED", queued_at=old)
    scene.add_dispatch(scene.create(queue), queue)
    scene.create(
        queue,
        status="COMPLETED",
        webhook_url="https://hooks.example/z",
        webhook_id=f"msg_{uuid.uuid4().hex}",
        webhook_handed_at=old,
    )
    assert scene.health() == {
        "overdue_leases": 1, "overdue_dispatches": 1, "unpublished_dispatches": 1,
        "overdue_webhooks": 1, "undeliverable_webhooks": 0, "failed_webhooks": 0,
    }  # fmt: skip
    before = scene.metrics()
    for kind in ("leases", "dispatches", "unpublished_dispatches", "webhooks"):
        assert before[f'internal_api_lifecycle_overdue{{kind="{kind}"}}'] == 1
    assert before["internal_api_lifecycle_lost_total"] == 0
    result = scene.once(**LONG)
    assert (result["requeued"], result["redispatched"], result["webhooks_rehanded"]) == (1, 1, 1)
    assert scene.health() == zero
    after = scene.metrics()
    for kind in ("leases", "dispatches", "unpublished_dispatches", "webhooks"):
        assert after[f'internal_api_lifecycle_overdue{{kind="{kind}"}}'] == 0
    assert after["internal_api_lifecycle_lost_total"] == 1
    for reason in ("created", "lease_expired", "dispatch_timeout", "webhook_due"):
        assert after[f'internal_api_lifecycle_dispatches_total{{reason="{reason}"}}'] == 1
    assert after['internal_api_executions{status="QUEUED"}'] == 3
    refused = httpx2.get(f"{scene.backend.url}/internal/v1/metrics/")
    assert (refused.status_code, refused.json()["error"]) == (401, "authentication_required")


# --- the process --------------------------------------------------------------------------------


def test_sigterm_stops_the_loop_after_its_pass(scene: Scene) -> None:
    queue = queue_name()
    process = scene.run_lifecycle("--interval", "0.05", **LONG)
    try:
        wait_for(lambda: "run_lifecycle started" in process.logs(), "the loop to start")
        pk = scene.create(queue)
        scene.add_dispatch(pk, queue)
        wait_for(lambda: scene.broker.messages(queue), "the loop to publish")
        assert process.stop() == 0
    finally:
        process.kill()
    lines = [json.loads(line) for line in process.logs().splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "run_lifecycle stopped" and lines[-1]["signal"] == "SIGTERM"
    assert any(line.get("published") == 1 for line in lines)
    assert "Traceback" not in process.logs()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("nosuch://host/", "No such transport: nosuch"),
        ("redis://user:s3cr3t-pw@127.0.0.1:1/0", "Connection refused"),
    ],
)
def test_an_unusable_broker_is_one_line_and_exit_2(
    sqlite_backend: LiveBackend, url: str, reason: str
) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "run_lifecycle"],
        cwd=Path(__file__).resolve().parents[2],
        env={**sqlite_backend.env, "CELERY_BROKER_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("run_lifecycle: CELERY_BROKER_URL: cannot use ")
    assert reason in lines[0] and "s3cr3t" not in lines[0]


# --- PostgreSQL and Redis: two processes, and a kill -9 before the publish ----------------------


@pytest.mark.postgres
@pytest.mark.redis
def test_two_processes_on_postgresql_publish_every_dispatch_exactly_once(
    redis_scene: Scene,
) -> None:
    scene, queue = redis_scene, queue_name()
    ids = scene.create_many(300, queue)
    processes = [scene.run_lifecycle("--interval", "0.05", **LONG) for _ in range(2)]
    try:
        for process in processes:
            wait_for(lambda p=process: "run_lifecycle started" in p.logs(), "both loops")
        # Rows arrive while both processes poll, in commits of 20, as requests would add them.
        for start in range(0, len(ids), 20):
            chunk = ids[start : start + 20]
            values = ", ".join(["(%s, 'lifecycle.task', %s, 'created', %s)"] * len(chunk))
            now = datetime.now(UTC)
            scene.sql(
                "INSERT INTO internal_api_dispatch (execution_id, task, queue, reason, created_at) "
                f"VALUES {values}",
                [value for pk in chunk for value in (pk, queue, now)],
            )
        wait_for(lambda: scene.unpublished() == 0, "every dispatch published", timeout=180)
        for process in processes:
            assert process.stop() == 0
    finally:
        for process in processes:
            process.kill()
    published = [
        sum(json.loads(line).get("published", 0) for line in p.logs().splitlines()
            if line.startswith("{"))
        for p in processes
    ]  # fmt: skip
    messages = scene.broker.messages(queue)
    scene.broker.forget(queue)
    assert sum(messages.values()) == 300 and set(messages) == {str(pk) for pk in ids}
    assert messages.most_common(1)[0][1] == 1, "a message was published twice"
    assert sum(published) == 300 and all(published), f"both processes published: {published}"
    events = scene.sql(
        "SELECT COUNT(*), COUNT(DISTINCT execution_id) FROM internal_api_executionevent "
        "WHERE reason = 'dispatched'"
    )
    assert events == [(300, 300)]


@pytest.mark.postgres
@pytest.mark.redis
def test_kill_9_after_the_outbox_commit_and_before_the_publish_loses_nothing(
    redis_scene: Scene,
) -> None:
    import psycopg

    scene, queue = redis_scene, queue_name()
    port = int(REDIS_TEST_URL.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy("127.0.0.1", port, scheme="redis") as proxy:
        stalled_url = f"{proxy.url}/{REDIS_DB}"
        first = scene.backend.run_lifecycle(
            "--interval", "0.05", extra_env={**LONG, "CELERY_BROKER_URL": stalled_url}
        )
        try:
            wait_for(lambda: "run_lifecycle started" in first.logs(), "the first process")
            proxy.mode = "stall"  # accepts connections, then nothing comes back
            accepted = proxy.connections_accepted
            pk = scene.create(queue)
            scene.add_dispatch(pk, queue)  # the outbox row is committed
            wait_for(lambda: proxy.connections_accepted > accepted, "the publish to start")

            def held_by_the_publisher() -> bool:
                with psycopg.connect(scene.backend.database_url, autocommit=True) as conn:
                    try:
                        conn.execute(
                            "SELECT id FROM internal_api_dispatch WHERE execution_id = %s "
                            "FOR UPDATE NOWAIT",
                            [pk],
                        )
                    except psycopg.errors.LockNotAvailable:
                        return True
                return False

            wait_for(held_by_the_publisher, "the publisher to hold the outbox row")
            assert scene.dispatches(pk) == [("created", False)]
            os.kill(first.pid, signal.SIGKILL)
            first.process.wait(timeout=10)
        finally:
            first.kill()
    assert scene.broker.messages(queue) == Counter()
    second = scene.run_lifecycle("--interval", "0.05", **LONG)
    try:
        wait_for(lambda: scene.broker.messages(queue), "the message from the second process")
        assert second.stop() == 0
    finally:
        second.kill()
    assert scene.broker.messages(queue) == Counter({str(pk): 1})
    assert scene.dispatches(pk) == [("created", True)]
    assert scene.execution(pk)["status"] == "QUEUED"
    assert scene.events(pk) == [("PENDING", "QUEUED", "dispatched")]
    scene.broker.forget(queue)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["0", "0.001", "-1", "3600.5", "1e9", "nan", "inf", "-inf", "", " ", "abc", "1s", "\u0663",
     "\uff11", "2\x00", "0x10"],
)  # fmt: skip
def test_interval_out_of_range_or_not_a_number_is_refused_by_name(text: str) -> None:
    from argparse import ArgumentTypeError

    from backend.internal_api.management.commands.run_lifecycle import _interval

    with pytest.raises(ArgumentTypeError, match=r"must be a number of seconds from 0\.01 to 3600"):
        _interval(text)


@pytest.mark.parametrize("text", ["0.01", "0.05", "2", "3600", " 7 "])
def test_interval_in_range_is_taken(text: str) -> None:
    from backend.internal_api.management.commands.run_lifecycle import _interval

    assert _interval(text) == float(text)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_broker_outage_is_logged_and_the_loop_publishes_once_it_is_back(
    redis_scene: Scene,
) -> None:
    scene, queue = redis_scene, queue_name()
    port = int(REDIS_TEST_URL.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy("127.0.0.1", port, scheme="redis") as proxy:
        # Two refusals would end a row's execution: an unreachable broker must blame no row
        # (one may be blamed when the broker comes back between a failure and its probe).
        loop = scene.run_lifecycle(
            "--interval",
            "0.05",
            **LONG,
            CELERY_BROKER_URL=f"{proxy.url}/{REDIS_DB}",
            DISPATCH_MAX_FAILURES="2",
        )
        try:
            wait_for(lambda: "run_lifecycle started" in loop.logs(), "the loop to start")
            before = scene.create(queue)  # published: the loop's pool now holds a connection
            scene.add_dispatch(before, queue)
            wait_for(lambda: scene.broker.messages(queue), "the first message")
            proxy.mode = "reset"  # the broker goes away: every connection is reset
            pk = scene.create(queue)
            scene.add_dispatch(pk, queue)
            wait_for(lambda: "broker unreachable" in loop.logs(), "a failed publish")
            assert scene.dispatches(pk) == [("created", False)]
            attempts = "SELECT attempts FROM internal_api_dispatch WHERE execution_id = %s"
            assert scene.sql(attempts, [pk]) == [(0,)]
            proxy.mode = "forward"  # the broker is back
            wait_for(
                lambda: str(pk) in scene.broker.messages(queue),
                "the message once the broker is back",
            )
            assert loop.process.poll() is None
            assert loop.stop() == 0
        finally:
            loop.kill()
    assert scene.broker.messages(queue) == Counter({str(before): 1, str(pk): 1})
    assert scene.dispatches(pk) == [("created", True)]
    assert scene.execution(pk)["status"] == "QUEUED"
    assert "Traceback" not in loop.logs()
    scene.broker.forget(queue)


@pytest.mark.postgres
def test_with_the_database_gone_health_answers_without_counts_and_metrics_is_503() -> None:
    import psycopg

    from tests.conftest import POSTGRES_ADMIN_URL

    with LiveBackend.postgres(threads=2) as backend:
        headers = backend.headers()
        base = f"{backend.url}/internal/v1"
        with httpx2.Client(base_url=base, headers=headers, timeout=30) as http:
            assert http.get("/health/").json()["lifecycle"]["overdue_leases"] == 0
            name = backend.database_url.rsplit("/", 1)[1]
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            for _ in range(2):  # the broken connection, then a failed reconnect
                health = http.get("/health/")
                assert health.status_code == 200
                assert (health.json()["status"], health.json()["lifecycle"]) == ("healthy", None)
                metrics = http.get("/metrics/")
                assert (metrics.status_code, metrics.json()["error"]) == (
                    503,
                    "database_unavailable",
                )
                assert metrics.headers["Retry-After"] == "1"
        assert "Traceback" not in backend.logs()
