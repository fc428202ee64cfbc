"""The execution lifecycle on real processes: requests per execution, recovery after an outage,
and a broker that forgets its messages in a run of 300.

Everything is real: the backend (gunicorn, 2 ``gthread`` workers, a fresh PostgreSQL
database) publishing to Redis, ``manage.py run_lifecycle`` beside it, the example worker
(``celery worker`` prefork, 4 processes), a webhook receiver on loopback. Settings are the
defaults (lease 30 s, dispatch timeout 30 s, breaker 1 s first open, growing to 60 s) unless
a line says otherwise.

(1) Requests per execution, counted at a forwarding proxy on loopback between the worker and
    the backend: tasks that finish well within a third of their lease (target <= 3: claim,
    finish, webhook record) and tasks longer than a third of their lease (heartbeats added).
(2) From the backend's return after a 20 s outage to the first execution completed after it
    (target <= 10 s), against the same with the breaker's open time fixed at 60 s (what the
    worker did before: ``CIRCUIT_BREAKER_INITIAL_RECOVERY_TIMEOUT=60``) in the same run.
(3) Redis ``FLUSHDB`` of the workers' database in the middle of a run of 300: how many
    complete (target: all 300), and in how long after the flush.

Medians of ``--runs`` runs (default 3). Needs PostgreSQL and Redis on localhost.
Run: ``.venv/bin/python benchmarks/bench_lifecycle.py [--runs N] [--only 1,2,3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import service_up  # noqa: E402
from tests.e2e.fleet import Fleet  # noqa: E402
from tests.e2e.harness import WebhookReceiver, new_webhook_secret, wait_until  # noqa: E402
from tests.e2e.lifecycle import RoutingProxy, Stack  # noqa: E402

COUNT_EXECUTIONS = 60
LONG_TASKS = 8
LONG_LEASE = 6  # seconds; a long task runs 2.5 s, past a third of it (one heartbeat)
OUTAGE = 20.0
OUTAGE_EXECUTIONS = 40
FLUSH_EXECUTIONS = 300
QUIET = {"HEALTH_CHECK_INTERVAL": "3600"}  # no health probes among the counted requests
# Fleet sets a short breaker for tests; the benchmark runs the worker's defaults.
DEFAULT_BREAKER = {"CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "60"}


def kind_of(method: str, path: str) -> str:
    """The endpoint a request went to, by name (``claim``, ``finish``, ``record``, ...)."""
    tail = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if method == "POST" and tail in ("claim", "heartbeat", "release", "status"):
        return "finish/status" if tail == "status" else tail
    if method == "POST" and tail == "webhook-deliveries":
        return "webhook record"
    if tail == "health":
        return "health"
    return f"{method} other"


def count_requests(stack: Stack, tmp: Path, *, long_tasks: bool) -> tuple[float, Counter[str]]:
    """One run of (1): requests per execution at the proxy, and how many of each kind."""
    secret = new_webhook_secret()
    receiver = WebhookReceiver(secret=secret).start()
    count = LONG_TASKS if long_tasks else COUNT_EXECUTIONS
    work = {"EXAMPLE_WORK_SECONDS": "2.5" if long_tasks else "0.05",
            "WEBHOOK_SIGNING_SECRET": secret, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            **QUIET, **DEFAULT_BREAKER}
    if long_tasks:
        work["EXECUTION_LEASE_SECONDS"] = str(LONG_LEASE)
    try:
        with RoutingProxy(stack.backend.url) as proxy:
            crew = stack.fleet(tmp, work={**work, "DJANGO_APP_BACKEND_URL": proxy.url})
            try:
                crew.start_worker()
                proxy.reset()
                ids = crew.dispatch(count, webhook_url=receiver.url)
                wait_until(lambda: all((crew.execution(i).get("webhook") or {}).get("delivered")
                                       for i in ids), 180, "every webhook recorded", 0.5)
                kinds = Counter(kind_of(r.method, r.path) for r in proxy.requests[:])
            finally:
                crew.close()
    finally:
        receiver.stop()
    kinds.pop("health", None)
    return sum(kinds.values()) / count, kinds


def outage_recovery(stack: Stack, tmp: Path, breaker: dict[str, str]) -> float:
    """One run of (2): seconds from the backend's return to the first completion after it."""
    crew = stack.fleet(tmp, work={"EXAMPLE_WORK_SECONDS": "1", **QUIET, **breaker})
    try:
        crew.start_worker()
        ids = crew.dispatch(OUTAGE_EXECUTIONS)
        wait_until(lambda: list(crew.statuses().values()).count("COMPLETED") >= 4, 60,
                   "the first completions")
        stack.backend.stop()
        time.sleep(OUTAGE)
        stack.backend.start()
        back = datetime.now().astimezone()
        wait_until(lambda: any(finished_after(crew, ids, back)), 300,
                   "a completion after the outage", 0.2)
        first = min(finished_after(crew, ids, back))
        crew.wait_all(ids, "COMPLETED", timeout=300)
        return (first - back).total_seconds()
    finally:
        crew.close()


def finished_after(crew: Fleet, ids: list[str], moment: datetime) -> list[datetime]:
    """When executions of ``ids`` completed, for those that completed after ``moment``."""
    wanted = set(ids)
    return [e.finished_at for e in crew.client.list_workflow_executions(status="COMPLETED")
            if e.id in wanted and e.finished_at is not None and e.finished_at > moment]


def flush_run(stack: Stack, tmp: Path) -> tuple[Counter[str], float, Counter[str]]:
    """(3): statuses at the flush, seconds from the flush to all complete, final statuses."""
    import redis

    crew = stack.fleet(tmp, work={"EXAMPLE_WORK_SECONDS": "0.2", **QUIET, **DEFAULT_BREAKER})
    try:
        crew.start_worker()
        ids = crew.dispatch(FLUSH_EXECUTIONS)
        wait_until(lambda: list(crew.statuses().values()).count("COMPLETED") >= 60, 120,
                   "60 completions")
        with redis.Redis.from_url(stack.broker_url) as broker:
            broker.flushdb()
        flushed = time.monotonic()
        at_flush = Counter(crew.statuses().values())
        with contextlib.suppress(TimeoutError):  # counted below: what did not complete
            crew.wait_all(ids, "COMPLETED", timeout=240)
        return at_flush, time.monotonic() - flushed, Counter(crew.statuses().values())
    finally:
        crew.close()


def main() -> int:
    """Run the chosen measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--only", default="1,2,3", help="which measurements, e.g. 1,3")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    for service in ("redis", "postgres"):
        if not service_up(service):
            print(f"bench_lifecycle: {service} is not running on localhost", file=sys.stderr)
            return 1
    command = " ".join(["python", "benchmarks/bench_lifecycle.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as folder:
        tmp = Path(folder)
        stack = Stack(tmp / "stack", "redis", settings={}).start()
        try:
            print(f"$ {command}\nbackend gunicorn (2 gthread workers) + PostgreSQL, broker "
                  f"Redis, run_lifecycle every 2 s, example worker prefork 4; defaults")
            if "1" in chosen:
                measure_requests(stack, tmp, args.runs)
            if "2" in chosen:
                measure_outage(stack, tmp, args.runs)
            if "3" in chosen:
                measure_flush(stack, tmp)
        finally:
            stack.close()
    return 0


def measure_requests(stack: Stack, tmp: Path, runs: int) -> None:
    """Print (1)."""
    for long_tasks in (False, True):
        results = [count_requests(stack, tmp / f"count-{long_tasks}-{n}", long_tasks=long_tasks)
                   for n in range(runs)]
        per = [r[0] for r in results]
        label = (f"tasks of 2.5 s, lease {LONG_LEASE} s ({LONG_TASKS} executions)" if long_tasks
                 else f"tasks of 0.05 s, lease 30 s ({COUNT_EXECUTIONS} executions)")
        print(f"(1) requests per execution, {label}: median {statistics.median(per):.2f} "
              f"(runs {', '.join(f'{p:.2f}' for p in per)}; target <= 3 + heartbeats)")
        print(f"    by kind, last run: {dict(sorted(results[-1][1].items()))}")


def measure_outage(stack: Stack, tmp: Path, runs: int) -> None:
    """Print (2)."""
    growing = [outage_recovery(stack, tmp / f"outage-g{n}", DEFAULT_BREAKER) for n in range(runs)]
    fixed_breaker = {**DEFAULT_BREAKER, "CIRCUIT_BREAKER_INITIAL_RECOVERY_TIMEOUT": "60"}
    fixed = [outage_recovery(stack, tmp / f"outage-f{n}", fixed_breaker) for n in range(runs)]
    g, f = statistics.median(growing), statistics.median(fixed)
    print(f"(2) backend out {OUTAGE:.0f} s: back -> first completion, median {g:.1f} s "
          f"(runs {', '.join(f'{x:.1f}' for x in growing)}; target <= 10 s); breaker fixed "
          f"at 60 s: {f:.1f} s (runs {', '.join(f'{x:.1f}' for x in fixed)}); "
          f"ratio {g / f:.2f}")


def measure_flush(stack: Stack, tmp: Path) -> None:
    """Print (3)."""
    at_flush, seconds, final = flush_run(stack, tmp / "flush")
    print(f"(3) Redis FLUSHDB in a run of {FLUSH_EXECUTIONS}: at the flush {dict(at_flush)}; "
          f"{seconds:.1f} s later {dict(final)} (target: all {FLUSH_EXECUTIONS} COMPLETED)")


if __name__ == "__main__":
    sys.exit(main())
