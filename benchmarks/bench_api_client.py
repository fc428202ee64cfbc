"""Cost of InternalAPIClient's per-task pattern against raw httpx2, in one run, real backend.

Against gunicorn (gthread) on SQLite, the same ``GET workflow-executions/{id}/``:

(a) the module README's pattern, ``with InternalAPIClient(config) as client:
    client.get_workflow_execution(id)``, once per iteration (a task's life);
(b) the same GET through one raw pooled ``httpx2.Client`` with the same headers, JSON decoded;
(c) a fresh ``httpx2.Client`` per call (what a naive worker does).

Printed: calls per second of each, the ratios a/b (target >= 0.85) and a/c, and the TCP
connections the server accepted during a repeat of (a) through a counting TCP proxy (target:
no more than the pool size). (a) and (b) alternate in blocks of 50 calls, so that load from
other processes on the machine falls on both alike.

Run: ``.venv/bin/python benchmarks/bench_api_client.py`` (``make bench`` runs every bench).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx2  # noqa: E402

from backend.workers.shared import _http  # noqa: E402
from backend.workers.shared.api_client import InternalAPIClient  # noqa: E402
from backend.workers.shared.config import WorkerConfig  # noqa: E402
from tests.fault_server import TcpProxy  # noqa: E402
from tests.live_backend import LiveBackend  # noqa: E402

ITERATIONS = 2000
FRESH_ITERATIONS = 300
WARMUP = 100
BLOCK = 50


def report(label: str, per_second: float) -> None:
    """Print one figure."""
    print(f"  {label:<58} {per_second:8.0f} calls/s  ({1000 / per_second:.3f} ms/call)")


def rate(label: str, count: int, fn: Callable[[], object]) -> float:
    """Run ``fn`` ``count`` times; calls per second."""
    started = time.perf_counter()
    for _ in range(count):
        fn()
    per_second = count / (time.perf_counter() - started)
    report(label, per_second)
    return per_second


def main() -> int:
    """Run the three variants against a live backend; print figures and ratios."""
    logging.basicConfig(level=logging.WARNING)
    with LiveBackend() as backend:
        config = WorkerConfig(
            internal_service_api_key=backend.api_key,
            django_app_backend_url=backend.url,
            organization_id=backend.org_id,
            worker_name="bench-worker",
            _env_file=None,
        )
        with InternalAPIClient(config) as setup:
            execution_id = setup.create_workflow_execution(f"wf-bench-{uuid.uuid4().hex[:6]}").id
        path = f"workflow-executions/{execution_id}/"
        headers = {
            "Authorization": f"Bearer {backend.api_key}",
            "X-Organization-ID": backend.org_id,
            "User-Agent": "bench-worker/1.0.0",
            "Accept": "application/json",
            "X-Request-ID": uuid.uuid4().hex,
        }
        base = config.internal_api_base_url + "/"

        def readme_pattern() -> None:
            with InternalAPIClient(config) as client:
                client.get_workflow_execution(execution_id)

        raw = httpx2.Client(base_url=base, headers=headers, trust_env=False)

        def raw_pooled() -> None:
            response = raw.get(path)
            response.raise_for_status()
            response.json()

        def fresh_client() -> None:
            with httpx2.Client(base_url=base, headers=headers, trust_env=False) as client:
                response = client.get(path)
                response.raise_for_status()
                response.json()

        for _ in range(WARMUP):
            readme_pattern()
            raw_pooled()

        print(f"GET {path} against gunicorn gthread + SQLite at {backend.url}")
        spent = {"a": 0.0, "b": 0.0}
        for _ in range(ITERATIONS // BLOCK):
            for name, fn in (("a", readme_pattern), ("b", raw_pooled)):
                started = time.perf_counter()
                for _ in range(BLOCK):
                    fn()
                spent[name] += time.perf_counter() - started
        a_rate, b_rate = ITERATIONS / spent["a"], ITERATIONS / spent["b"]
        report(f"(a) with InternalAPIClient(config) x {ITERATIONS}", a_rate)
        report(f"(b) one raw pooled httpx2.Client x {ITERATIONS}", b_rate)
        c_rate = rate(f"(c) fresh httpx2.Client per call x {FRESH_ITERATIONS}",
                      FRESH_ITERATIONS, fresh_client)
        raw.close()

        print(f"ratio a/b = {a_rate / b_rate:.2f}  (target >= 0.85)")
        print(f"ratio a/c = {a_rate / c_rate:.1f}x")

        _http.close_all()  # (a) again from cold, through a proxy that counts connections
        with TcpProxy("127.0.0.1", backend.port) as proxy:
            counted = WorkerConfig(
                internal_service_api_key=backend.api_key,
                django_app_backend_url=proxy.url,
                organization_id=backend.org_id,
                worker_name="bench-worker",
                _env_file=None,
            )
            for _ in range(ITERATIONS):
                with InternalAPIClient(counted) as client:
                    client.get_workflow_execution(execution_id)
            accepted = proxy.connections_accepted
        print(f"TCP connections accepted during (a) x {ITERATIONS}: {accepted} "
              f"(pool size {_http.POOL_MAX_CONNECTIONS}; target <= pool size)")
        ok = a_rate / b_rate >= 0.85 and accepted <= _http.POOL_MAX_CONNECTIONS
        print("targets met" if ok else "TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
