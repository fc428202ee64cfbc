"""The client's conditional-GET cache against a plain read, in one run, real backend.

Against gunicorn (gthread) on SQLite, reads of one file execution whose result is about
200 KB, each parsed into a ``FileExecution``:

(a) ``client.resource("file-executions", FileExecution).get(id)``: the object was read
    before, so the call sends ``If-None-Match`` and the backend answers 304 (one narrow
    query, no body); the client answers from its kept copy;
(b) the same read without the cache: ``client.get("file-executions/{id}/")`` (a full 200
    with the body) parsed the same way.

(a) and (b) alternate in blocks of 50 reads, so that load from other processes on the
machine falls on both alike. Printed: milliseconds per read of each (median of the blocks)
and the ratio b/a.

Run: ``.venv/bin/python benchmarks/bench_resource_cache.py`` (``make bench`` runs every bench).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from backend.workers.shared.api_client import FileExecution, InternalAPIClient  # noqa: E402
from backend.workers.shared.config import WorkerConfig  # noqa: E402
from tests.live_backend import LiveBackend  # noqa: E402

BLOCKS = 10
BLOCK = 50
LARGE_RESULT = {"rows": [{"line": i, "text": "x" * 180} for i in range(1000)]}


def _block(read: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(BLOCK):
        read()
    return (time.perf_counter() - started) / BLOCK * 1000


def main() -> int:
    """Time both reads against a live backend; print figures and the ratio."""
    with LiveBackend() as backend:
        config = WorkerConfig(
            _env_file=None,
            internal_service_api_key=backend.api_key,
            django_app_backend_url=backend.url,
            organization_id=backend.org_id,
        )
        with InternalAPIClient(config) as client:
            execution = client.create_workflow_execution("wf-bench-cache")
            files = client.resource("file-executions", FileExecution)
            made = files.create(execution_id=execution.id, file_name="big", result=LARGE_RESULT)
            path = f"file-executions/{made.id}/"

            def cached() -> object:
                return files.get(made.id)

            def full() -> object:
                return FileExecution.model_validate(client.get(path))

            for read in (cached, full):
                _block(read)  # warm-up
            a: list[float] = []
            b: list[float] = []
            for _ in range(BLOCKS):
                a.append(_block(cached))
                b.append(_block(full))
        a_ms, b_ms = statistics.median(a), statistics.median(b)
        print(f"GET {path} (result ~200 KB) against gunicorn gthread + SQLite")
        print(f"  (a) resource get, 304 from the cache  {a_ms:7.3f} ms/read")
        print(f"  (b) full read, parsed                 {b_ms:7.3f} ms/read")
        print(f"ratio b/a = {b_ms / a_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
