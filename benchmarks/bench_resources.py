"""File executions through gunicorn and PostgreSQL: one batch of 500 updates against 500
single PATCH calls, and a 304 read against a full read of a large object.

The backend runs as in production (gunicorn, 2 ``gthread`` workers, PostgreSQL on loopback, a
fresh database dropped afterwards); the client is one kept-alive ``httpx2`` connection in
this process, as a worker's is. Measured side by side in alternating rounds (median of each):

- ``batch``: ``POST file-executions/batch/`` updating the 500 files of an execution (status,
  execution time, a small result), one call; ``single``: the same 500 updates as 500
  ``PATCH file-executions/{id}/`` calls. Ratio: single time / batch time (target >= 20).
- ``304``: ``GET file-executions/{id}/`` with the ``If-None-Match`` of a file whose result is
  about 200 KB; ``full``: the same read without it. Ratio: full time / 304 time.

Run: ``.venv/bin/python benchmarks/bench_resources.py`` (or ``make bench``); needs PostgreSQL
on 127.0.0.1:5432.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

FILES = 500
ROUNDS = 5
READS = 200
TARGET_BATCH_RATIO = 20.0
LARGE_RESULT = {"rows": [{"line": i, "text": "x" * 180} for i in range(1000)]}


def _files(client: Any, execution_id: str) -> list[str]:
    """Record the execution's files (one batch), their ids."""
    items = [{"execution_id": execution_id, "file_name": f"f{i}.pdf"} for i in range(FILES)]
    response = client.post("/file-executions/batch/", json={"items": items})
    response.raise_for_status()
    return [row["id"] for row in response.json()["results"]]


def _update(status: str, n: int) -> dict[str, Any]:
    return {"status": status, "execution_time": 0.5 + n, "result": {"pages": n}}


def _batch_round(client: Any, ids: list[str]) -> float:
    items = [{"id": file_id, **_update("IN_PROGRESS", n)} for n, file_id in enumerate(ids)]
    started = time.perf_counter()
    client.post("/file-executions/batch/", json={"items": items}).raise_for_status()
    return time.perf_counter() - started


def _single_round(client: Any, ids: list[str]) -> float:
    started = time.perf_counter()
    for n, file_id in enumerate(ids):
        client.patch(
            f"/file-executions/{file_id}/", json=_update("IN_PROGRESS", n)
        ).raise_for_status()
    return time.perf_counter() - started


def _reads(client: Any, path: str, headers: dict[str, str], status: int) -> float:
    started = time.perf_counter()
    for _ in range(READS):
        response = client.get(path, headers=headers)
        if response.status_code != status:
            raise SystemExit(f"bench_resources: {path} answered {response.status_code}")
    return time.perf_counter() - started


def main() -> None:
    """Measure and print."""
    import httpx2

    from tests.conftest import service_up
    from tests.live_backend import LiveBackend

    if not service_up("postgres"):
        raise SystemExit("bench_resources: PostgreSQL is not running on 127.0.0.1:5432")
    with LiveBackend.postgres(workers=2, threads=8, log_level="WARNING") as backend:
        headers = {
            "Authorization": f"Bearer {backend.api_key}",
            "X-Organization-ID": backend.org_id,
        }
        with httpx2.Client(
            base_url=f"{backend.url}/internal/v1", headers=headers, timeout=120
        ) as client:
            times: dict[str, list[float]] = {"batch": [], "single": [], "304": [], "full": []}
            batch_ratios: list[float] = []
            read_ratios: list[float] = []
            large = client.post("/workflow-executions/", json={"workflow_id": "large"}).json()
            created = client.post(
                "/file-executions/",
                json={"execution_id": large["id"], "file_name": "big", "result": LARGE_RESULT},
            )
            created.raise_for_status()
            path, etag = f"/file-executions/{created.json()['id']}/", created.headers["ETag"]
            size = len(client.get(path).content)
            for round_no in range(ROUNDS):
                # Fresh files each round (every update is a real move PENDING -> IN_PROGRESS),
                # the order alternating: the machine is shared and noisy.
                pair: dict[str, float] = {}
                for mode in ("batch", "single") if round_no % 2 == 0 else ("single", "batch"):
                    execution = client.post("/workflow-executions/", json={"workflow_id": "b"})
                    ids = _files(client, execution.json()["id"])
                    run = _batch_round if mode == "batch" else _single_round
                    pair[mode] = run(client, ids)
                    times[mode].append(pair[mode])
                batch_ratios.append(pair["single"] / pair["batch"])
                reads = {
                    "304": _reads(client, path, {"If-None-Match": etag}, 304),
                    "full": _reads(client, path, {}, 200),
                }
                for mode, seconds in reads.items():
                    times[mode].append(seconds)
                read_ratios.append(reads["full"] / reads["304"])

    median = {mode: statistics.median(values) for mode, values in times.items()}
    batch_ratio = statistics.median(batch_ratios)
    print(f"backend: gunicorn 2 gthread workers x 8 threads, PostgreSQL; median of {ROUNDS} rounds")
    print(f"  {FILES} updates, one batch         {median['batch'] * 1000:9.1f} ms")
    print(f"  {FILES} updates, single PATCHes    {median['single'] * 1000:9.1f} ms")
    target = f"(target >= {TARGET_BATCH_RATIO:.0f})"
    print(f"  batch speed-up                   {batch_ratio:9.1f} x    {target}")
    print(f"  {READS} reads of a {size // 1024} KB file, 304   {median['304'] * 1000:9.1f} ms")
    print(f"  {READS} reads of a {size // 1024} KB file, full  {median['full'] * 1000:9.1f} ms")
    print(f"  304 speed-up                     {statistics.median(read_ratios):9.1f} x")


if __name__ == "__main__":
    main()
