"""``make demo``: the backend, a prefork worker fleet and 50 workflow executions, end to end.

Starts the Django backend (SQLite under ``.data/demo``, migrations, an organization, a
generated key) with ``manage.py run_lifecycle`` beside it, the example worker (prefork, 4
processes, the filesystem broker unless ``CELERY_BROKER_URL`` is set; the backend publishes
to the same broker), and a local webhook receiver that verifies Standard Webhooks
signatures. Creates 50 executions through the API client with ``dispatch`` (the backend
publishes their tasks) and a completion webhook each, shows a progress bar, prints a
summary (one execution's event history among it), stops everything it started and exits 0.
Any failure exits 1 with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from backend.workers.shared._redact import redact_url  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.e2e.harness import (  # noqa: E402
    TASK_NAME,
    WebhookReceiver,
    WorkerProcess,
    http_get,
    new_webhook_secret,
    wait_until,
    worker_env,
)
from tests.live_backend import LifecycleProcess, LiveBackend  # noqa: E402

EXECUTIONS = 50
CONCURRENCY = 4
RUN_TIMEOUT = 45.0
TERMINAL = ("COMPLETED", "ERROR", "STOPPED")
DEMO_WORK = {
    "EXAMPLE_WORK_SECONDS": "0.3",
    "EXAMPLE_FILES": "3",
    "EXAMPLE_FLAKE_RATE": "0.05",
    "EXAMPLE_FAILURE_RATE": "0.04",
}


class DemoFailure(Exception):
    """The demo could not show what it promises; the message says why."""


def _progress(counts: Counter[str], total: int, width: int = 40) -> str:
    done = sum(counts[s] for s in TERMINAL)
    filled = int(width * done / total)
    parts = " ".join(f"{s} {counts[s]}" for s in ("IN_PROGRESS", "COMPLETED", "ERROR") if counts[s])
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:3d}/{total}  {parts:<45}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


def _metric_sum(text: str, name: str, label_filter: str = "") -> float:
    """Sum of one Prometheus metric's samples whose labels contain ``label_filter``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match and label_filter in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def run(data_dir: Path) -> dict[str, Any]:
    """Run the whole demo; return its summary. Everything started is stopped on return."""
    from backend.workers.shared import InternalAPIClient, WorkerConfig

    broker_url = os.environ.get("CELERY_BROKER_URL") or None
    worker_name = f"demo-worker-{os.getpid()}"
    secret = new_webhook_secret()
    # The backend publishes to the workers' broker: the same URL (the same folders for the
    # embedded filesystem broker, under the same WORKER_DATA_DIR).
    backend = LiveBackend(data_dir=data_dir / "backend", extra_env={
        "CELERY_BROKER_URL": broker_url or "filesystem://",
        "WORKER_DATA_DIR": str(data_dir / "worker"),
    })
    lifecycle: LifecycleProcess | None = None
    receiver = WebhookReceiver(secret=secret)
    worker: WorkerProcess | None = None
    try:
        print("starting the backend (SQLite, migrations, organization, demo key) "
              "and run_lifecycle beside it ...")
        backend.start()
        lifecycle = backend.run_lifecycle()
        receiver.start()
        env = worker_env(
            backend_url=backend.url,
            api_key=backend.api_key,
            organization_id=backend.org_id,
            worker_name=worker_name,
            data_dir=data_dir / "worker",
            metrics_port=free_port(),
            broker_url=broker_url,
            concurrency=CONCURRENCY,
            extra={
                **DEMO_WORK,
                "WEBHOOK_SIGNING_SECRET": secret,
                "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
                "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "5",
            },
        )
        print(f"starting the example worker (prefork, {CONCURRENCY} processes, broker "
              f"{redact_url(broker_url) if broker_url else 'filesystem'}) ...")
        worker = WorkerProcess(env, data_dir / "worker.log").start()

        config = WorkerConfig(
            _env_file=None,
            internal_service_api_key=backend.api_key,
            django_app_backend_url=backend.url,
            organization_id=backend.org_id,
            worker_name="demo-submitter",
        )
        print(f"creating {EXECUTIONS} executions through the API client, each dispatched "
              "by the backend, with a completion webhook ...")
        started = time.monotonic()
        dispatch = {"task": TASK_NAME, "queue": worker_name}
        with InternalAPIClient(config) as client:
            ids = []
            for n in range(EXECUTIONS):
                execution = client.create_workflow_execution(
                    f"demo-workflow-{n % 5}", total_files=3, dispatch=dispatch,
                    webhook_url=receiver.url,
                )
                ids.append(str(execution.id))

            shown = [""]
            tty = sys.stdout.isatty()

            def finished() -> bool:
                counts = Counter(e.status for e in client.list_workflow_executions())
                bar = _progress(counts, EXECUTIONS)
                if bar != shown[0]:
                    # A terminal gets one bar redrawn in place; a log gets one line a change.
                    print(f"\r{bar}" if tty else bar.rstrip(), end="" if tty else "\n",
                          flush=True)
                    shown[0] = bar
                return sum(counts[s] for s in TERMINAL) >= EXECUTIONS

            try:
                wait_until(finished, RUN_TIMEOUT, f"{EXECUTIONS} executions to finish", 0.25)
            finally:
                if tty:
                    print()
            wall = time.monotonic() - started
            executions = list(client.list_workflow_executions())

            def webhooks() -> list[dict[str, Any]]:
                return [client.get(f"workflow-executions/{i}/").get("webhook") or {}
                        for i in ids]

            wait_until(lambda: all(w.get("delivered") for w in webhooks()), 15.0,
                       "every due webhook recorded delivered")
            due = webhooks()
            deliveries = list(client.list_webhook_deliveries())
            example = next(e for e in executions if e.status == "COMPLETED")
            history = client.get(f"workflow-executions/{example.id}/events/")["results"]
            lifecycle_counts = client.get("health/").get("lifecycle", {})

        completed = [e for e in executions if e.status == "COMPLETED"]
        errors = [e for e in executions if e.status == "ERROR"]
        _, metrics = http_get(worker.health_url + "/metrics")
        health_status, health = worker.health("/health")
        (data_dir / "health.json").write_text(json.dumps(health, indent=2) + "\n")
        metrics_text = metrics.decode()
        times = [float(e.execution_time) for e in completed if e.execution_time is not None]
        return {
            "wall_seconds": wall,
            "by_status": dict(Counter(e.status for e in executions)),
            "errors": [(str(e.id), e.error_message) for e in errors],
            "task_time_p50": _percentile(times, 0.50),
            "task_time_p95": _percentile(times, 0.95),
            "retries_in_place": _metric_sum(metrics_text, "worker_retries_total"),
            "api_retries": _metric_sum(metrics_text, "worker_api_retries_total"),
            "task_requeues": _metric_sum(metrics_text, "worker_tasks_total", 'outcome="retry"'),
            "webhooks_due": sum(1 for w in due if w.get("id")),
            "webhooks_recorded": sum(1 for d in deliveries if d.outcome == "delivered"),
            "webhooks_verified": len(receiver.verified),
            "webhook_ids_received": len(set(receiver.arrivals)),
            "webhooks_rejected": len(receiver.rejected),
            "example_id": str(example.id),
            "example_history": history,
            "lifecycle": lifecycle_counts,
            "completed": len(completed),
            "health_status": health_status,
            "health": health,
            "health_file": data_dir / "health.json",
        }
    finally:
        if worker is not None:
            worker.terminate()
        if lifecycle is not None:
            lifecycle.stop()
        receiver.stop()
        backend.close()


def check(summary: dict[str, Any]) -> None:
    """Raise :class:`DemoFailure` when the run did not do what the demo promises."""
    problems = []
    if sum(summary["by_status"].values()) != EXECUTIONS:
        problems.append(f"expected {EXECUTIONS} executions, found {summary['by_status']}")
    if summary["completed"] == 0:
        problems.append("no execution completed")
    if any(not message for _, message in summary["errors"]):
        problems.append("an ERROR execution has no error message")
    if summary["webhooks_rejected"]:
        problems.append(f"{summary['webhooks_rejected']} webhook(s) failed verification")
    if summary["webhooks_due"] != EXECUTIONS:
        problems.append(f"{summary['webhooks_due']} webhooks due for {EXECUTIONS} finished "
                        "executions")
    if not (summary["webhooks_recorded"] == summary["webhook_ids_received"]
            == summary["webhooks_due"]):
        problems.append(f"{summary['webhooks_due']} webhooks due, "
                        f"{summary['webhook_ids_received']} webhook-ids received, "
                        f"{summary['webhooks_recorded']} recorded delivered")
    if summary["webhooks_verified"] < summary["webhooks_due"]:
        problems.append(f"{summary['webhooks_verified']} verified webhooks for "
                        f"{summary['webhooks_due']} due")
    if summary["health_status"] != 200:
        problems.append(f"worker /health answered {summary['health_status']}")
    if problems:
        raise DemoFailure("; ".join(problems))


def report(summary: dict[str, Any]) -> None:
    """Print the summary for a person."""
    print(f"\n{EXECUTIONS} executions in {summary['wall_seconds']:.1f}s")
    for status, count in sorted(summary["by_status"].items()):
        print(f"  {status:<12} {count}")
    rate = float(DEMO_WORK["EXAMPLE_FAILURE_RATE"])
    print(f"  (each input is invalid with a {rate:.0%} chance, on purpose: EXAMPLE_FAILURE_RATE)")
    for execution_id, message in summary["errors"]:
        short = execution_id[:8]
        print(f"    {short}  {message.replace(execution_id, short)}")
    print(f"task time      p50 {summary['task_time_p50']:.3f}s   "
          f"p95 {summary['task_time_p95']:.3f}s")
    print(f"retries        {summary['retries_in_place']:.0f} in place (retry/executor), "
          f"{summary['api_retries']:.0f} API, {summary['task_requeues']:.0f} task re-queues")
    print(f"webhooks       {summary['webhooks_due']} due (one per finished execution), "
          f"{summary['webhooks_recorded']} delivered (recorded by the backend), "
          f"{summary['webhooks_verified']} signatures verified by the receiver")
    steps = " -> ".join(
        [str(summary["example_history"][0]["from"])] if summary["example_history"] else []
    )
    for event in summary["example_history"]:
        epoch = f", epoch {event['epoch']}" if event.get("epoch") else ""
        steps += f" -> {event['to']} ({event['reason']}{epoch})"
    print(f"events of {summary['example_id'][:8]} (GET .../events/): {steps}")
    counts = ", ".join(f"{k} {v}" for k, v in summary["lifecycle"].items())
    print(f"backend health lifecycle: {counts or 'not reported'}")
    health = summary["health"]
    print(f"worker /health {summary['health_status']} {health.get('status')}  "
          f"(full answer in {summary['health_file']})")
    for name, check in health.get("checks", {}).items():
        print(f"    {name:<18} {check.get('status'):<10} {check.get('message')}")


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    """Run the demo; 0 when it did everything it promises, 1 (with the reason) otherwise."""
    signal.signal(signal.SIGTERM, _stop_on_signal)
    data_dir = Path(os.environ.get("DEMO_DATA_DIR") or REPO_ROOT / ".data" / "demo")
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    try:
        summary = run(data_dir)
        report(summary)
        check(summary)
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\ndemo FAILED: {type(exc).__name__}: {exc}\n(logs in {data_dir})",
              file=sys.stderr)
        return 1
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
