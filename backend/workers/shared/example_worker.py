"""The complete example worker: every feature of the shared infrastructure in one module.

Its task ``example_worker.process_execution`` takes a workflow execution's id. Its base,
:class:`ExecutionTask`, claims the execution (``IN_PROGRESS`` under a lease, heartbeats while
it runs); the task does simulated work (its length and failure rates set by the
environment), records its files' outcomes in one batch (``file-executions/batch/``: the
execution's file counts follow from them) and finishes the execution ``COMPLETED`` with its
result in one call (a permanent failure ends it ``ERROR``); then the completion webhook the
backend made due (the execution's ``webhook_url``) is delivered, signed, and recorded.
Fault-free, that is four requests to the backend per execution (claim, files, finish,
webhook record) and the webhook itself.

Run it as a prefork worker with its health server on ``METRICS_PORT``::

    python -m backend.workers.shared.example_worker        # Ctrl-C or SIGTERM stops it
    celery -A backend.workers.shared.example_worker worker -Q "$WORKER_NAME"

Importing the module starts nothing: the health server starts when the worker is ready
(``worker_ready``) and stops with it (``worker_shutdown``). The shared package's Celery
wiring does the rest (task context in the log, heartbeats, metrics, and, before the pool
forks, the shared imports and ``gc.freeze()`` that keep the children's memory shared).

Settings of the simulated work (beyond :class:`WorkerConfig`'s):

``EXAMPLE_WORK_SECONDS`` (0.2)  time one execution's work takes, spread over its files;
``EXAMPLE_FILES`` (3)  files per execution;
``EXAMPLE_FAILURE_RATE`` (0.0)  chance that an execution's input is invalid (a permanent
failure: the execution ends ``ERROR``);
``EXAMPLE_FLAKE_RATE`` (0.0)  chance that one step hits a passing hiccup (retried in place);
``EXAMPLE_WEBHOOK_URL`` (unset)  where the completion webhook goes for an execution created
without a ``webhook_url`` (none when unset).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals

from . import (
    CircuitBreaker,
    ConfigurationError,
    FileExecution,
    FileStatus,
    HealthChecker,
    HealthCheckResult,
    HealthServer,
    HealthStatus,
    InternalAPIClient,
    InternalAPIError,
    ResilientExecutor,
    WebhookNotRecordedError,
    WebhookURLRefusedError,
    WorkerConfig,
    WorkerLogger,
    log_context,
    monitor_performance,
    retry,
)
from .api_client import MAX_BATCH
from .tasks import ExecutionTask

TASK_NAME = "example_worker.process_execution"


@dataclass(frozen=True)
class WorkSettings:
    """The simulated work's knobs, read from ``EXAMPLE_*`` environment variables."""

    work_seconds: float = 0.2
    files: int = 3
    failure_rate: float = 0.0
    flake_rate: float = 0.0
    webhook_url: str | None = None

    @classmethod
    def from_env(cls) -> WorkSettings:
        """Read and check the ``EXAMPLE_*`` variables; one error names every bad one."""
        problems: dict[str, str] = {}

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                problems[name] = f"must be a number (got {raw!r})"
                return default
            if not low <= value <= high:
                problems[name] = f"must be between {low:g} and {high:g} (got {raw!r})"
            return value

        settings = cls(
            work_seconds=number("EXAMPLE_WORK_SECONDS", cls.work_seconds, 0.0, 3600.0),
            files=int(number("EXAMPLE_FILES", cls.files, 1, 1000)),
            failure_rate=number("EXAMPLE_FAILURE_RATE", cls.failure_rate, 0.0, 1.0),
            flake_rate=number("EXAMPLE_FLAKE_RATE", cls.flake_rate, 0.0, 1.0),
            webhook_url=os.environ.get("EXAMPLE_WEBHOOK_URL", "").strip() or None,
        )
        if problems:
            raise ConfigurationError(problems)
        return settings


class InvalidInputError(Exception):
    """The execution's input cannot be processed: a permanent failure (execution ``ERROR``)."""


class InputUnavailableError(Exception):
    """Reading the input hit a passing hiccup; retried in place, then re-queued."""

    transient = True


class EngineBusyError(Exception):
    """The processing engine refused a file for now; retried, counted by its breaker."""

    transient = True


config = WorkerConfig()
settings = WorkSettings.from_env()

WorkerLogger.configure(
    log_level=config.log_level, log_format=config.log_format, worker_name=config.worker_name
)
logger = WorkerLogger.get_logger(__name__)

app = Celery("example_worker")
app.config_from_object(config.get_celery_config())

# The processing engine is guarded by a breaker (shared through Redis when
# CIRCUIT_BREAKER_REDIS_URL is set): after repeated failures tasks stop hammering it, and
# the open breaker's remaining time becomes the re-queued task's countdown.
engine_breaker = CircuitBreaker(
    "example-engine",
    failure_threshold=config.circuit_breaker_failure_threshold,
    recovery_timeout=config.circuit_breaker_recovery_timeout,
    expected_exception=EngineBusyError,
    redis_url=config.circuit_breaker_redis_url,
)
engine = ResilientExecutor(
    retry_config={
        "max_attempts": 3,
        "base_delay": 0.05,
        "max_delay": 0.5,
        "exceptions": (EngineBusyError,),
    },
    circuit_breaker=engine_breaker,
)


def _hiccup(rate: float) -> bool:
    return rate > 0 and random.random() < rate


@retry(max_attempts=3, base_delay=0.05, max_delay=0.5, exceptions=(InputUnavailableError,))
def read_input(execution_id: str) -> dict[str, Any]:
    """Fetch the execution's input (simulated); fails now and then with a passing hiccup."""
    if _hiccup(settings.flake_rate):
        raise InputUnavailableError(f"input store busy for execution {execution_id}")
    if _hiccup(settings.failure_rate):
        raise InvalidInputError(f"execution {execution_id}: input is not a valid document")
    return {"execution_id": execution_id, "files": [f"file-{i}" for i in range(settings.files)]}


@engine
def process_file(name: str) -> dict[str, Any]:
    """Process one file (simulated) through the engine guarded by ``engine_breaker``."""
    time.sleep(settings.work_seconds / settings.files)
    if _hiccup(settings.flake_rate):
        raise EngineBusyError(f"engine busy while processing {name}")
    return {"file": name, "pages": random.randint(1, 20)}


@monitor_performance
def do_work(execution_id: str) -> dict[str, Any]:
    """The execution's whole work: read its input, process each file."""
    document = read_input(execution_id)
    return {"files": [process_file(name) for name in document["files"]]}


@app.task(bind=True, base=ExecutionTask, name=TASK_NAME, worker_config=config)
def process_execution(
    self: ExecutionTask, execution_id: str, organization_id: str | None = None
) -> dict[str, Any]:
    """Process one workflow execution, claimed for this run by :class:`ExecutionTask`.

    Safe to run again for the same execution (a redelivered message): a second claim is
    refused while this one holds the lease, or once the execution is final, and that run
    ends quietly. The claim returned the execution (``self.execution``): no separate read.
    """
    started = time.monotonic()
    execution = self.execution
    workflow_id = execution.workflow_id if execution is not None else None
    # task_id and execution_id are bound for every task; add the workflow for this one.
    with log_context(workflow_id=workflow_id):
        logger.info("processing execution")
        result = do_work(execution_id)
        elapsed = round(time.monotonic() - started, 6)
        with InternalAPIClient(config, organization_id=organization_id) as client:
            first_run = execution is None or execution.lease is None or execution.lease.epoch == 1
            record_files(client, execution_id, result["files"], first_run=first_run)
            finished = client.finish_execution(
                execution_id, "COMPLETED", result=result, execution_time=elapsed
            )
            logger.info("execution completed", execution_time=elapsed)
            # The webhook the backend made due is ExecutionTask's to deliver, once it returns.
            if finished.webhook_due is None and settings.webhook_url:
                notify(client, settings.webhook_url, execution_id, elapsed)
    return {"execution_id": execution_id, "status": "COMPLETED"}


def record_files(
    client: InternalAPIClient, execution_id: str, outcomes: list[dict[str, Any]], *, first_run: bool
) -> None:
    """Record each processed file ``COMPLETED`` in one batch per execution (500 files a call).

    A later run of the execution (a lease taken over) first reads the files an earlier run
    recorded and updates those instead of adding them twice (a final one is left as it is).
    Each batch is fenced by the run's lease (``for_execution``): a run whose lease was taken
    over writes none of them (``LeaseLostError``).
    """
    files = client.resource("file-executions", FileExecution)
    earlier = {} if first_run else {f.file_name: f for f in files.list(execution_id=execution_id)}
    items: list[dict[str, Any]] = []
    for outcome in outcomes:
        done = {"status": FileStatus.COMPLETED.value, "result": outcome}
        prior = earlier.get(outcome["file"])
        if prior is None:
            items.append({"execution_id": execution_id, "file_name": outcome["file"], **done})
        elif not prior.is_final:
            items.append({"id": prior.id, **done})
    for start in range(0, len(items), MAX_BATCH):
        files.batch(items[start : start + MAX_BATCH], for_execution=execution_id)


def notify(client: InternalAPIClient, url: str, execution_id: str, elapsed: float) -> None:
    """Send the completion webhook; its failure is logged, never undoes the completion."""
    payload = {
        "type": "workflow_execution.completed",
        "execution_id": execution_id,
        "status": "COMPLETED",
        "execution_time": round(elapsed, 6),
        "worker": config.worker_name,
    }
    try:
        outcome = client.send_webhook(url, payload, execution_id=execution_id)
    except WebhookNotRecordedError as exc:
        # It went out: sending it again would deliver it twice. Only the record is missing.
        logger.warning(
            f"completion webhook sent but not recorded: {exc.__cause__}",
            webhook_id=exc.result.message_id,
            outcome=exc.result.outcome,
            attempts=exc.result.attempts,
            error_type=type(exc.__cause__).__name__,
        )
        return
    except WebhookURLRefusedError as exc:
        # The SSRF guard refused the URL, or a redirect target (then recorded as blocked).
        recorded = exc.result.delivery_id if exc.result is not None else None
        logger.error(f"completion webhook blocked: {exc}", delivery_id=recorded)
        return
    except (InternalAPIError, ValueError) as exc:
        logger.error(f"completion webhook not sent: {exc}")
        return
    logger.info("completion webhook sent", outcome=outcome.outcome, attempts=outcome.attempts)


def engine_check() -> HealthCheckResult:
    """Health of the processing engine, as its breaker sees it."""
    state = engine_breaker.state.value
    status = HealthStatus.HEALTHY if state == "closed" else HealthStatus.DEGRADED
    return HealthCheckResult("processing_engine", status, f"engine breaker {state}")


_health_server: HealthServer | None = None


@signals.worker_ready.connect
def start_health_server(**_: Any) -> None:
    """Start the health server in the worker's main process once its pool has forked.

    Started later than the pool, the server's threads never run while a child is forked.
    """
    global _health_server
    checker = HealthChecker(config)
    checker.add_custom_check("processing_engine", engine_check)
    _health_server = HealthServer(checker, port=config.metrics_port, host=config.health_host)
    _health_server.start()
    logger.info("health server started", port=_health_server.port)  # METRICS_PORT=0: any free


@signals.worker_shutdown.connect
def stop_health_server(**_: Any) -> None:
    """Stop the health server when the worker shuts down."""
    if _health_server is not None:
        _health_server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a prefork worker on the ``WORKER_NAME`` queue; extra arguments go to Celery."""
    app.worker_main(
        [
            "worker",
            f"--queues={config.worker_name}",
            "--pool=prefork",
            f"--concurrency={config.max_concurrent_tasks}",
            f"--loglevel={config.log_level}",
            f"--hostname={config.worker_name}@%h",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
