"""A worker fleet under test: the example worker on a chosen broker, fed through the API.

:class:`Fleet` creates executions on the live backend, sends their tasks, records every
status it sees while they run (:class:`StatusRecorder`), and checks the histories.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

from backend.workers.shared import InternalAPIError
from tests.conftest import RABBITMQ_URL, free_port
from tests.e2e.harness import (
    TASK_NAME,
    WorkerProcess,
    client_config,
    producer,
    submit,
    wait_until,
    worker_env,
)

ORDER = {"PENDING": 0, "QUEUED": 1, "IN_PROGRESS": 2, "COMPLETED": 3, "ERROR": 3, "STOPPED": 3}
TERMINAL = frozenset({"COMPLETED", "ERROR", "STOPPED"})


def broker_url(kind: str) -> str | None:
    """A broker URL of the given kind for one test (Redis: a random database number)."""
    if kind == "filesystem":
        return None
    if kind == "redis":
        return f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    if kind == "rabbitmq":
        return RABBITMQ_URL
    raise ValueError(f"unknown broker kind {kind!r}")


def legal_history(history: list[str]) -> bool:
    """A status sequence only moves forward and never leaves a terminal status."""
    return all(
        ORDER[before] < ORDER[after] and before not in TERMINAL
        for before, after in pairwise(history)
    )


class StatusRecorder:
    """Polls the backend's execution list and keeps each execution's distinct statuses."""

    def __init__(self, client: Any, interval: float = 0.05) -> None:
        self.client = client
        self.interval = interval
        self.histories: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-recorder")
        self.errors: list[str] = []

    def poll(self) -> dict[str, str]:
        """Read every execution's status once and record the changes."""
        current = {e.id: str(e.status) for e in self.client.list_workflow_executions()}
        for execution_id, status in current.items():
            history = self.histories.setdefault(execution_id, [])
            if not history or history[-1] != status:
                history.append(status)
        return current

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # the backend may be down on purpose: keep watching
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Fleet:
    """The example worker on one broker, against the live backend, in its own organization."""

    def __init__(self, backend: Any, tmp: Path, broker: str, *, concurrency: int = 4,
                 work: dict[str, str] | None = None, broker_at: str | None = None,
                 data_dir: Path | None = None,
                 create_organization: Callable[[str], object] | None = None) -> None:
        """``broker_at`` and ``data_dir``: the broker URL and data folder to share (the
        backend's, when it publishes); by default a new one of ``broker``'s kind.
        ``create_organization``: how the fleet's organization is made (default: the
        backend's ``manage.py create_organization``)."""
        from backend.workers.shared import InternalAPIClient

        self.backend = backend
        self.tmp = tmp
        self.name = f"e2e-{broker}-{uuid.uuid4().hex[:8]}"
        self.organization_id = f"org-{self.name}"
        (create_organization or backend.create_organization)(self.organization_id)
        self.env = worker_env(
            backend_url=backend.url,
            api_key=backend.api_key,
            organization_id=self.organization_id,
            worker_name=self.name,
            data_dir=data_dir or tmp / "data",
            metrics_port=free_port(),
            broker_url=broker_at or broker_url(broker),
            concurrency=concurrency,
            extra={"EXAMPLE_WORK_SECONDS": "0.02", "EXAMPLE_FILES": "2",
                   "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "3", **(work or {})},
        )
        self.config = client_config(backend, self.organization_id, worker_name=self.name)
        self.client = InternalAPIClient(self.config)
        self.app = producer(self.env)
        self.workers: list[WorkerProcess] = []

    def start_worker(self, command: list[str] | None = None,
                     env: dict[str, str] | None = None) -> WorkerProcess:
        """Start one more example worker on the fleet's queue (``python -m`` by default);
        ``env`` overrides some of the fleet's environment for this worker only."""
        (worker,) = self.start_workers([env or {}], command)
        return worker

    def start_workers(self, envs: list[dict[str, str]],
                      command: list[str] | None = None) -> list[WorkerProcess]:
        """Start one worker per environment override of ``envs`` at once; wait for all.

        Each gets its own health port and Celery node name (two workers of one name on one
        host clash on RabbitMQ), unless ``command`` is given.
        """
        workers = []
        for env in envs:
            number = len(self.workers)
            worker_env = {**self.env, "METRICS_PORT": str(free_port()), **env}
            node = f"--hostname={worker_env['WORKER_NAME']}-{number}@%h"
            argv = command or [sys.executable, "-m", "backend.workers.shared.example_worker", node]
            worker = WorkerProcess(worker_env, self.tmp / f"worker-{number}.log", command=argv)
            self.workers.append(worker.launch())
            workers.append(worker)
        for worker in workers:
            wait_until(worker.ready, 60, f"worker ready (log: {worker.log_path})", 0.2)
        return workers

    def create(self, count: int) -> list[str]:
        """Create ``count`` executions and move them to QUEUED."""
        ids = []
        for n in range(count):
            execution = self.client.create_workflow_execution(f"wf-{n % 7}", total_files=2)
            self.client.update_workflow_execution_status(execution.id, "QUEUED")
            ids.append(str(execution.id))
        return ids

    def dispatch(self, count: int, *, queue: str | None = None,
                 webhook_url: str | None = None) -> list[str]:
        """Create ``count`` executions that the backend dispatches to ``queue`` (the fleet's
        by default), each with a completion webhook to ``webhook_url`` when given."""
        ids = []
        for n in range(count):
            fields: dict[str, Any] = {
                "total_files": 2, "dispatch": {"task": TASK_NAME, "queue": queue or self.name},
            }
            if webhook_url:
                fields["webhook_url"] = webhook_url
            execution = self.client.create_workflow_execution(f"wf-{n % 7}", **fields)
            ids.append(str(execution.id))
        return ids

    def execution(self, execution_id: str) -> dict[str, Any]:
        """One execution as the backend answers it (every field, lifecycle ones included)."""
        return dict(self.client.get(f"workflow-executions/{execution_id}/"))

    def events(self, execution_id: str) -> list[dict[str, Any]]:
        """An execution's event history, oldest first."""
        return list(self.client.get(f"workflow-executions/{execution_id}/events/")["results"])

    def submit(self, ids: list[str]) -> None:
        """Send one task per execution to the fleet's queue."""
        submit(self.app, self.name, ids, self.organization_id)

    def statuses(self) -> dict[str, str]:
        """Every execution's current status."""
        return {e.id: str(e.status) for e in self.client.list_workflow_executions()}

    def wait_all(self, ids: list[str], status: str, timeout: float) -> None:
        """Wait until every execution of ``ids`` has ``status``."""
        wanted = set(ids)

        def done() -> bool:
            try:
                current = self.statuses()
            except InternalAPIError as exc:
                if exc.transient:  # the backend may be down on purpose
                    return False
                raise
            return all(current.get(i) == status for i in wanted)

        try:
            wait_until(done, timeout, f"{len(ids)} executions {status}", 0.25)
        except TimeoutError as exc:
            current = self.statuses()
            counts = Counter(current.get(i, "missing") for i in wanted)
            raise TimeoutError(f"{exc}; now {dict(counts)}; log: {self.log_tails()}") from None

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """Every JSON line the fleet's workers wrote."""
        for worker in self.workers:
            for line in worker.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue

    def log_tails(self) -> str:
        """The end of every worker's log, for failure messages."""
        return "\n".join(w.log_tail() for w in self.workers)

    def close(self, *, kill: bool = False) -> None:
        """Stop every worker (group killed if needed; at once with ``kill``), delete a
        RabbitMQ queue."""
        for worker in self.workers:
            if kill:
                worker.kill()
            elif worker.alive():
                worker.terminate(timeout=30)
        if self.env.get("CELERY_BROKER_URL", "").startswith("amqp"):
            with self.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.name)
        self.client.close()


@contextmanager
def fleet(backend: Any, tmp: Path, broker: str, **kwargs: Any) -> Iterator[Fleet]:
    """A :class:`Fleet` that is always closed."""
    crew = Fleet(backend, tmp, broker, **kwargs)
    try:
        yield crew
    finally:
        crew.close()


def wait_for_log(crew: Fleet, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    """The first JSON log line of the fleet that satisfies ``predicate``."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [line for line in crew.log_lines() if predicate(line)][:1]
        return bool(found)

    wait_until(seen, timeout, what, 0.1)
    return found[0]

