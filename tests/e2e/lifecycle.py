"""The execution lifecycle under test: a backend that publishes, ``run_lifecycle`` beside it.

:class:`Stack` is one real backend (gunicorn on PostgreSQL or SQLite) publishing to one
real broker, with one real ``manage.py run_lifecycle`` process beside it;
workers join it through :meth:`Stack.fleet` so that they consume the broker the backend
publishes to. :func:`history_problems` says what is illegal in an execution's event history
(``GET .../events/``); :class:`RoutingProxy` is a forwarding proxy whose answers can be held
for chosen requests, so a worker can be killed between a write and its answer.

Used by ``tests/e2e/test_lifecycle.py``, ``benchmarks/bench_lifecycle.py`` and
``scripts/demo.py``. Nothing here imports Django.
"""

from __future__ import annotations

import contextlib
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from tests.conftest import RABBITMQ_URL
from tests.e2e.fleet import TERMINAL, Fleet
from tests.e2e.harness import http_get, wait_until
from tests.fault_server import Action, FaultServer, Forward, RecordedRequest
from tests.live_backend import LifecycleProcess, LiveBackend

# The settings the e2e runs give the backend and run_lifecycle: short, to keep them fast.
FAST_LIFECYCLE = {
    "DISPATCH_TIMEOUT": "5",
    "WEBHOOK_DUE_TIMEOUT": "8",
    "LIFECYCLE_INTERVAL": "1",
}
# Every status change an event may record, with the reasons it may carry.
LEGAL_MOVES: dict[tuple[str, str], frozenset[str]] = {
    ("PENDING", "QUEUED"): frozenset({"dispatched", "status"}),
    ("PENDING", "IN_PROGRESS"): frozenset({"claimed", "status"}),
    ("QUEUED", "IN_PROGRESS"): frozenset({"claimed", "status"}),
    ("IN_PROGRESS", "QUEUED"): frozenset({"released", "lease_expired", "unleased_timeout",
                                          "status"}),
    **{("IN_PROGRESS", end): frozenset({"finished", "status", "lost", "unleased_timeout"})
       for end in TERMINAL},
    **{(start, end): frozenset({"status"}) for start in ("PENDING", "QUEUED") for end in TERMINAL},
    # A takeover: a claim of an execution whose lease ran out before the reaper came by.
    ("IN_PROGRESS", "IN_PROGRESS"): frozenset({"claimed"}),
    # Given up by run_lifecycle: nobody claimed it, or the broker refused its message.
    **{(start, "ERROR"): frozenset({"status", "never_claimed", "undispatchable"})
       for start in ("PENDING", "QUEUED")},
}


def stack_broker_url(kind: str) -> str:
    """The broker URL a stack of ``kind`` publishes to (Redis: a random database number)."""
    if kind == "filesystem":
        return "filesystem://"
    if kind == "redis":
        return f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    if kind == "rabbitmq":
        return RABBITMQ_URL
    raise ValueError(f"unknown broker kind {kind!r}")


class Stack:
    """A backend publishing to one broker, with ``run_lifecycle`` running beside it."""

    def __init__(self, tmp: Path, broker: str, *, postgres: bool = True,
                 settings: Mapping[str, str] | None = None) -> None:
        self.tmp = tmp
        self.broker = broker
        self.broker_url = stack_broker_url(broker)
        self.data_dir = tmp / "data"
        env = {"CELERY_BROKER_URL": self.broker_url, "WORKER_DATA_DIR": str(self.data_dir),
               **(settings if settings is not None else FAST_LIFECYCLE)}
        kwargs: dict[str, Any] = {"workers": 2, "data_dir": tmp / "backend", "extra_env": env}
        self.backend = LiveBackend.postgres(**kwargs) if postgres else LiveBackend(**kwargs)
        self.lifecycle: LifecycleProcess | None = None

    def start(self) -> Stack:
        """Start the backend (migrating it), then run_lifecycle."""
        self.backend.start()
        return self.start_lifecycle()

    def start_lifecycle(self) -> Stack:
        """Start run_lifecycle (again, after :meth:`stop_lifecycle`)."""
        self.lifecycle = self.backend.run_lifecycle()
        return self

    def stop_lifecycle(self) -> None:
        """Stop run_lifecycle (SIGTERM: after its current pass)."""
        if self.lifecycle is not None:
            self.lifecycle.stop()
            self.lifecycle = None

    def close(self) -> None:
        """Stop run_lifecycle and the backend; drop what the backend created."""
        self.stop_lifecycle()
        self.backend.close()

    def fleet(self, tmp: Path, **kwargs: Any) -> Fleet:
        """A worker fleet (its own organization) on the broker this stack publishes to."""
        at = None if self.broker == "filesystem" else self.broker_url
        return Fleet(self.backend, tmp, self.broker, broker_at=at, data_dir=self.data_dir,
                     create_organization=self.create_organization, **kwargs)

    def create_organization(self, org_id: str) -> None:
        """Create an organization with one INSERT (what ``create_organization`` stores,
        without starting Django for it: tests make one per fleet)."""
        self.backend.sql("INSERT INTO internal_api_organization (id, name, created_at) "
                         "VALUES (%s, '', %s)", (org_id, datetime.now(UTC)))

    def dispatch_reasons(self, execution_id: str) -> list[str]:
        """Why each of an execution's outbox rows was written, oldest first (``created``,
        ``lease_expired``, ``dispatch_timeout``, ``webhook_due``, ...)."""
        rows = self.backend.sql("SELECT reason FROM internal_api_dispatch WHERE execution_id = %s "
                                "ORDER BY id", (uuid.UUID(execution_id),))
        return [str(row[0]) for row in rows]

    def health(self) -> dict[str, Any]:
        """The backend's own ``GET health/`` answer."""
        import json

        status, body = http_get_auth(self.backend, "/internal/v1/health/")
        return dict(json.loads(body)) | {"http_status": status}

    def metrics(self) -> str:
        """The backend's ``GET metrics/`` (Prometheus text)."""
        _, body = http_get_auth(self.backend, "/internal/v1/metrics/")
        return body.decode()


def http_get_auth(backend: LiveBackend, path: str) -> tuple[int, bytes]:
    """GET one of the backend's internal endpoints with its key: status and body."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(backend.url + path, headers=backend.headers())
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@contextmanager
def stack_fleet(stack: Stack, tmp: Path, **kwargs: Any) -> Iterator[Fleet]:
    """A fleet of :meth:`Stack.fleet` whose workers are always killed at the end."""
    crew = stack.fleet(tmp, **kwargs)
    try:
        yield crew
    finally:
        crew.close(kill=True)  # the test has checked everything: no warm shutdown to wait for


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of one Prometheus sample whose labels contain ``labels`` (None: absent)."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match and labels in (match.group(1) or ""):
            return float(match.group(2))
    return None


def history_problems(events: list[dict[str, Any]]) -> list[str]:
    """What is illegal in one execution's event history (empty: legal).

    Each event starts where the previous one ended, makes a move of :data:`LEGAL_MOVES`
    with one of its reasons, nothing follows a terminal status, claims carry increasing
    epochs, and a leased finish carries the epoch of the last claim.
    """
    problems = []
    epoch = 0
    for n, event in enumerate(events):
        move = (event.get("from"), event.get("to"))
        if move not in LEGAL_MOVES:
            problems.append(f"event {n}: illegal move {move}")
        elif event.get("reason") not in LEGAL_MOVES[move]:
            problems.append(f"event {n}: {move} with reason {event.get('reason')!r}")
        if event.get("reason") == "claimed":
            if not isinstance(event.get("epoch"), int) or event["epoch"] <= epoch:
                problems.append(f"event {n}: claim epoch {event.get('epoch')} after {epoch}")
            else:
                epoch = event["epoch"]
        if event.get("reason") == "finished" and event.get("epoch") != epoch:
            problems.append(f"event {n}: finished with epoch {event.get('epoch')}, "
                            f"the last claim had {epoch}")
    for n, (before, after) in enumerate(pairwise(events), start=1):
        if after.get("from") != before.get("to"):
            problems.append(f"event {n}: starts at {after.get('from')}, "
                            f"the previous ended at {before.get('to')}")
        if before.get("to") in TERMINAL:
            problems.append(f"event {n}: a change after the terminal {before.get('to')}")
    return problems


def losses(crew: Fleet, ids: list[str]) -> dict[str, Any]:
    """What a run lost or did twice, read back from the backend: each count should be 0.

    ``not_completed``: executions not ``COMPLETED``; ``error``: executions ``ERROR``;
    ``finished_twice``: executions with more than one terminal event; ``illegal``: executions
    whose history breaks :func:`history_problems` (the first problem of each is kept).
    """
    statuses = crew.statuses()
    illegal: dict[str, list[str]] = {}
    finished_twice = []
    for execution_id in ids:
        events = crew.events(execution_id)
        if problems := history_problems(events):
            illegal[execution_id] = problems
        if sum(1 for e in events if e.get("to") in TERMINAL) != 1:
            finished_twice.append(execution_id)
    counts = Counter(statuses.get(i, "missing") for i in ids)
    return {
        "not_completed": len(ids) - counts["COMPLETED"],
        "error": counts["ERROR"],
        "finished_twice": len(finished_twice),
        "illegal": len(illegal),
        "detail": {"statuses": dict(counts), "illegal": dict(list(illegal.items())[:3]),
                   "finished_twice": finished_twice[:3]},
    }


def assert_nothing_lost(crew: Fleet, ids: list[str]) -> dict[str, Any]:
    """Assert :func:`losses` counts zero everywhere; returns the tally."""
    tally = losses(crew, ids)
    counts = {k: v for k, v in tally.items() if k != "detail"}
    assert counts == {"not_completed": 0, "error": 0, "finished_twice": 0, "illegal": 0}, (
        counts, tally["detail"], crew.log_tails()[-4000:])
    return tally


def claimed_by(crew: Fleet, execution_id: str) -> list[int]:
    """Process ids (the ``<pid>`` of the worker name ``<host>:<pid>:<token>``) of every claim
    of an execution."""
    pids = []
    for event in crew.events(execution_id):
        if event.get("reason") == "claimed":
            with contextlib.suppress(ValueError, IndexError):
                pids.append(int(str(event.get("worker", "")).rsplit(":", 2)[-2]))
    return pids


def wait_claimed(crew: Fleet, ids: list[str], pids: set[int], timeout: float) -> list[str]:
    """Wait until processes of ``pids`` hold at least one execution of ``ids``; those ids."""
    held: list[str] = []

    def some() -> bool:
        statuses = crew.statuses()
        held[:] = [i for i in ids if statuses.get(i) == "IN_PROGRESS"
                   and (claimed_by(crew, i) or [0])[-1] in pids]
        return bool(held)

    wait_until(some, timeout, f"a claim by one of {sorted(pids)}", 0.2)
    return held


class RoutingProxy(FaultServer):
    """A :class:`FaultServer` that forwards to ``upstream`` and picks, for each request, the
    action of the first rule whose predicate matches it (``Forward`` to ``upstream`` when
    none does). ``answers`` has what the upstream answered to each forwarded request."""

    def __init__(self, upstream: str) -> None:
        super().__init__(default=Forward(upstream))
        self.upstream = upstream
        self.rules: list[tuple[Callable[[RecordedRequest], bool], Action]] = []

    def route(self, predicate: Callable[[RecordedRequest], bool], action: Action) -> None:
        """Give requests that match ``predicate`` the ``action`` (first matching rule wins)."""
        with self._lock:
            self.rules.append((predicate, action))

    def _next_action(self, request: RecordedRequest) -> Action:
        action = super()._next_action(request)
        with self._lock:
            for predicate, chosen in self.rules:
                if predicate(request):
                    return chosen
        return action


def is_finish(execution_id: str) -> Callable[[RecordedRequest], bool]:
    """Predicate: the request moves ``execution_id`` to a terminal status."""
    def match(request: RecordedRequest) -> bool:
        if request.method != "POST" or not request.path.endswith(f"/{execution_id}/status/"):
            return False
        try:
            return request.json().get("status") in TERMINAL
        except ValueError:
            return False
    return match


def readyz(worker: Any) -> int:
    """The status of a worker's ``/readyz``."""
    status, _ = http_get(worker.health_url + "/readyz", timeout=15.0)
    return status
