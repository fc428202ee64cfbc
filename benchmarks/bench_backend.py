"""Status transitions per second through gunicorn and PostgreSQL: plain, idempotent, and the
lifecycle's claim and finish.

The backend runs as in production (gunicorn, 2 ``gthread`` workers, PostgreSQL on loopback, a
fresh database dropped afterwards). A load generator in a second process drives it over
kept-alive connections from several threads; each execution goes QUEUED -> IN_PROGRESS ->
COMPLETED, so every request is a real transition. Measured side by side, in alternating
rounds (median of each): the trivial authenticated ``health`` endpoint (the baseline: HTTP,
gunicorn and Django with no database work), plain status updates, status updates carrying
a fresh ``Idempotency-Key`` each, claims (PENDING -> IN_PROGRESS under a new lease) and
finishes (``COMPLETED`` with the result, file counts and ``X-Lease-Epoch``, in one call, of
executions claimed before the clock starts). The claim's and the finish's server CPU per
request are compared with the plain update's (ratio of each round, median; target <= 1).
Then, in this process, the SQL statements one request of each kind issues (Django's test
client on the same database, organization cached).

Run: ``.venv/bin/python benchmarks/bench_backend.py`` (or ``make bench``); needs PostgreSQL
on 127.0.0.1:5432. ``python benchmarks/bench_backend.py --load ...`` is the load generator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

THREADS = 8
EXECUTIONS_PER_ROUND = 150  # x3 transitions
HEALTH_PER_ROUND = 500
ROUNDS = 6
TARGET_RATE = 300.0
TARGET_SQL = 3
TARGET_IDEMPOTENT_RATIO = 1.25
TARGET_LIFECYCLE_RATIO = 1.0  # claim and finish: server CPU per request <= a plain update
MODES = ("health", "plain", "idempotent", "claim", "finish")
# Requests per execution of each mode.
PER_EXECUTION = {"plain": 3, "idempotent": 3, "claim": 1, "finish": 1}
FINISH_RESULT = {"rows": 3, "tables": ["invoices", "lines"], "warnings": []}


# --- the load generator (second process) -----------------------------------------------------


def _load(url: str, key: str, org: str, mode: str, count: int, threads: int) -> dict[str, Any]:
    """Run ``count`` units of ``mode`` from ``threads`` threads; returns requests and seconds."""
    import httpx2

    headers = {"Authorization": f"Bearer {key}", "X-Organization-ID": org}
    clients = [
        httpx2.Client(base_url=f"{url}/internal/v1", headers=headers, timeout=60)
        for _ in range(threads)
    ]
    ids: list[str] = []
    epochs: dict[str, int] = {}
    if mode != "health":
        for i in range(count):
            response = clients[0].post("/workflow-executions/", json={"workflow_id": f"b{i}"})
            response.raise_for_status()
            ids.append(response.json()["id"])
    if mode == "finish":
        for execution_id in ids:
            response = clients[0].post(
                f"/workflow-executions/{execution_id}/claim/",
                json={"worker": "bench:1", "lease_seconds": 300},
            )
            response.raise_for_status()
            epochs[execution_id] = response.json()["lease"]["epoch"]
    failures: list[str] = []
    barrier = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        client = clients[index]
        barrier.wait()
        if mode == "health":
            for _ in range(index, count, threads):
                response = client.get("/health/")
                if response.status_code != 200:
                    failures.append(response.text)
            return
        for execution_id in ids[index::threads]:
            if mode in ("claim", "finish"):
                response = _lifecycle_request(client, mode, execution_id, epochs)
                if response.status_code != 200:
                    failures.append(response.text)
                continue
            for status in ("QUEUED", "IN_PROGRESS", "COMPLETED"):
                extra = {"Idempotency-Key": uuid.uuid4().hex} if mode == "idempotent" else {}
                response = client.post(
                    f"/workflow-executions/{execution_id}/status/",
                    json={"status": status},
                    headers=extra,
                )
                if response.status_code != 200:
                    failures.append(response.text)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    print("ready", flush=True)  # the parent takes its CPU readings, then says go
    sys.stdin.readline()
    barrier.wait()
    started = time.perf_counter()
    for thread in workers:
        thread.join()
    seconds = time.perf_counter() - started
    for client in clients:
        client.close()
    requests = count * PER_EXECUTION.get(mode, 1)
    return {"requests": requests, "seconds": seconds, "failures": failures[:3]}


def _lifecycle_request(client: Any, mode: str, execution_id: str, epochs: dict[str, int]) -> Any:
    """One claim, or one finish under the execution's lease."""
    if mode == "claim":
        return client.post(
            f"/workflow-executions/{execution_id}/claim/",
            json={"worker": "bench:1", "lease_seconds": 300},
        )
    return client.post(
        f"/workflow-executions/{execution_id}/status/",
        json={
            "status": "COMPLETED",
            "result": FINISH_RESULT,
            "total_files": 3,
            "successful_files": 3,
            "failed_files": 0,
            "execution_time": 0.25,
        },
        headers={"X-Lease-Epoch": str(epochs[execution_id])},
    )


class _CpuMeter:
    """CPU seconds used by the backend's gunicorn processes and its PostgreSQL sessions."""

    def __init__(self, backend: Any) -> None:
        import psutil
        import psycopg

        from tests.conftest import POSTGRES_ADMIN_URL

        self._psutil = psutil
        self._master = psutil.Process(backend.pid)
        self._database = backend.database_url.rsplit("/", 1)[1]
        self._admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)

    def read(self) -> dict[tuple[str, int], float]:
        """CPU seconds so far of every process serving the backend, by (kind, pid)."""
        rows = self._admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self._database]
        ).fetchall()
        processes = [("gunicorn", p) for p in (self._master, *self._master.children(True))]
        for (pid,) in rows:
            try:
                processes.append(("postgres", self._psutil.Process(pid)))
            except self._psutil.NoSuchProcess:
                continue
        out: dict[tuple[str, int], float] = {}
        for kind, process in processes:
            try:
                times = process.cpu_times()
            except self._psutil.NoSuchProcess:
                continue
            out[kind, process.pid] = times.user + times.system
        return out

    def close(self) -> None:
        """Close the monitoring connection."""
        self._admin.close()


def _drive(backend: Any, meter: _CpuMeter, mode: str, count: int) -> tuple[float, dict[str, float]]:
    """One round from a load generator in a second process: requests/s, and CPU ms/request
    of the gunicorn processes and of the PostgreSQL sessions.

    The generator prepares (creates executions, opens connections), says ``ready``, and starts
    its clock only on ``go``, so that neither figure includes the preparation.
    """
    process = subprocess.Popen(
        [
            sys.executable, __file__, "--load", backend.url, backend.api_key, backend.org_id,
            mode, str(count), str(THREADS),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise SystemExit(f"{mode}: the load generator failed to prepare")
    before = meter.read()
    process.stdin.write("go\n")
    process.stdin.flush()
    result = json.loads(process.stdout.readline())
    after = meter.read()
    process.wait(timeout=60)
    if result["failures"]:
        raise SystemExit(f"{mode}: requests failed: {result['failures']}")
    cpu = {"gunicorn": 0.0, "postgres": 0.0}
    for (kind, pid), seconds in after.items():
        cpu[kind] += (seconds - before.get((kind, pid), 0.0)) / result["requests"] * 1000
    return float(result["requests"] / result["seconds"]), cpu


# --- SQL statements per update (in this process) ---------------------------------------------


def _count_sql(database_url: str, api_key: str) -> dict[str, list[str]]:
    """Statements issued by one plain and one idempotent status update, one claim and one
    finish (warm), by their first word."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="backend.settings",
        DATABASE_URL=database_url,
        INTERNAL_SERVICE_API_KEY=api_key,
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment

    from backend.internal_api.models import Organization, WorkflowExecution

    setup_test_environment()
    org = Organization.objects.create(pk=f"sql-{uuid.uuid4().hex[:8]}")
    executions = [
        WorkflowExecution.objects.create(organization=org, workflow_id="w") for _ in range(4)
    ]
    client = Client(headers={"Authorization": f"Bearer {api_key}", "X-Organization-ID": org.pk})

    def run(execution: Any, path: str, body: Any, extra: dict[str, str]) -> list[str]:
        statements: list[str] = []

        def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            statements.append(sql.split()[0])
            return execute(sql, params, many, context)

        with connection.execute_wrapper(record):
            response = client.post(
                f"/internal/v1/workflow-executions/{execution.pk}/{path}/",
                body,
                content_type="application/json",
                headers=extra,
            )
        assert response.status_code == 200, response.content
        return statements

    # Warm-up: the organization is cached and the once-a-while purge of expired keys is done.
    run(executions[2], "status", {"status": "IN_PROGRESS"}, {"Idempotency-Key": uuid.uuid4().hex})
    counts = {
        "plain": run(executions[0], "status", {"status": "IN_PROGRESS"}, {}),
        "idempotent": run(
            executions[1], "status", {"status": "IN_PROGRESS"}, {"Idempotency-Key": "k1"}
        ),
        "claim": run(executions[3], "claim", {"worker": "bench:1"}, {}),
    }
    epoch = str(WorkflowExecution.objects.get(pk=executions[3].pk).lease_epoch)
    finish = {"status": "COMPLETED", "result": FINISH_RESULT, "total_files": 3}
    counts["finish"] = run(executions[3], "status", finish, {"X-Lease-Epoch": epoch})
    connection.close()
    return counts


def main() -> None:
    """Measure and print."""
    from tests.conftest import service_up
    from tests.live_backend import LiveBackend

    if not service_up("postgres"):
        raise SystemExit("bench_backend: PostgreSQL is not running on 127.0.0.1:5432")
    with LiveBackend.postgres(workers=2, threads=8, log_level="WARNING") as backend:
        meter = _CpuMeter(backend)
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu_ms: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        ratios: list[float] = []
        cpu_ratios: dict[str, list[float]] = {"claim": [], "finish": []}
        for mode in ("plain", "claim", "finish"):
            _drive(backend, meter, mode, 20)  # warm-up: connections, caches, prepared plans
        for round_no in range(ROUNDS):
            # Back to back, rotating which goes first: the machine is shared and noisy.
            order = ["plain", "idempotent", "claim", "finish"]
            order = order[round_no % 4 :] + order[: round_no % 4]
            pair: dict[str, float] = {}
            cpu_round: dict[str, float] = {}
            for mode in ("health", *order):
                count = HEALTH_PER_ROUND if mode == "health" else EXECUTIONS_PER_ROUND
                if mode in ("claim", "finish"):
                    count *= 3  # as many requests as a plain round
                rate, cpu = _drive(backend, meter, mode, count)
                rates[mode].append(rate)
                cpu_ms[mode].append(cpu)
                pair[mode] = rate
                cpu_round[mode] = cpu["gunicorn"] + cpu["postgres"]
            ratios.append(pair["plain"] / pair["idempotent"])
            for mode in cpu_ratios:
                cpu_ratios[mode].append(cpu_round[mode] / cpu_round["plain"])
        meter.close()
        sql = _count_sql(backend.database_url, backend.api_key)

    health = statistics.median(rates["health"])
    plain = statistics.median(rates["plain"])
    idem = statistics.median(rates["idempotent"])
    ratio = statistics.median(ratios)
    cpu_median = {
        (mode, kind): statistics.median(v[kind] for v in values)
        for mode, values in cpu_ms.items()
        for kind in ("gunicorn", "postgres")
    }
    total = {mode: cpu_median[mode, "gunicorn"] + cpu_median[mode, "postgres"] for mode in cpu_ms}
    cores = os.cpu_count()
    print(f"backend: gunicorn 2 gthread workers x 8 threads, PostgreSQL; {cores} cores; ", end="")
    print(f"load: {THREADS} threads in a second process; median of {ROUNDS} rounds")
    print(f"  health (baseline, no database)   {health:8.0f} req/s")
    print(f"  status update, plain             {plain:8.0f} /s   ({plain / health:.2f} of health)")
    print(f"  status update, Idempotency-Key   {idem:8.0f} /s   ({idem / health:.2f} of health)")
    print(
        f"  idempotent cost ratio            {ratio:8.2f} x    "
        f"(median of per-round plain/idempotent; target <= {TARGET_IDEMPOTENT_RATIO})"
    )
    print("  server CPU per request, ms       gunicorn  PostgreSQL  total")
    for mode in cpu_ms:
        print(
            f"    {mode:<30} {cpu_median[mode, 'gunicorn']:8.2f}  "
            f"{cpu_median[mode, 'postgres']:10.2f}  "
            f"{total[mode]:5.2f}"
        )
    print(
        f"  idempotent CPU cost ratio        {total['idempotent'] / total['plain']:8.2f} x    "
        f"(server CPU per request; target <= {TARGET_IDEMPOTENT_RATIO})"
    )
    for mode in ("claim", "finish"):
        print(
            f"  {mode} CPU / plain update CPU    {statistics.median(cpu_ratios[mode]):8.2f} x    "
            f"(median of per-round ratios; target <= {TARGET_LIFECYCLE_RATIO}; rounds: "
            + " ".join(f"{v:.2f}" for v in cpu_ratios[mode])
            + ")"
        )
    print(
        f"  SQL per plain status update      {len(sql['plain']):8d}      (target <= {TARGET_SQL})"
    )
    print(
        f"  SQL per idempotent update        {len(sql['idempotent']):8d}      "
        f"({', '.join(sql['idempotent'])}; plus BEGIN/COMMIT)"
    )
    for mode in ("claim", "finish"):
        print(f"  SQL per {mode:<24} {len(sql[mode]):8d}      ({', '.join(sql[mode])})")
    print(f"  target: several hundred plain updates/s ({TARGET_RATE:.0f}+)")
    for name, values in rates.items():
        print(f"  rounds, {name:<10} " + " ".join(f"{v:6.0f}" for v in values))
    print("  rounds, ratio      " + " ".join(f"{v:6.2f}" for v in ratios))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        parser = argparse.ArgumentParser()
        parser.add_argument("--load", nargs=6)
        url, key, org, mode, count, threads = parser.parse_args().load
        print(json.dumps(_load(url, key, org, mode, int(count), int(threads))))
    else:
        main()
