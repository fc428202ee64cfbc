"""The seed as written: its Python blocks run unedited against the real backend.

The blocks are read from ``../shared/seed/000_c1692ca2f3b27064.txt`` at test time. The
environment is the Quick Start's (its ``.env`` block is written verbatim); only the values
that the seed leaves as placeholders come from the test, through the environment:

- ``INTERNAL_SERVICE_API_KEY``, ``ORGANIZATION_ID``: the live backend's;
- ``DJANGO_APP_BACKEND_URL``: a loopback proxy to the live backend that maps the seed's
  literal ``execution-id`` in request paths to a real execution (created here), so
  ``client.get_workflow_execution('execution-id')`` reads, and updates, a real execution;
- ``https://example.com/webhook``: the snippet runs in its own mount namespace whose
  ``/etc/hosts`` points ``example.com`` at a loopback address where an HTTPS receiver
  (certificate made here, trusted through ``SSL_CERT_FILE``) verifies the Standard Webhooks
  signature; ``WEBHOOK_ALLOWED_HOSTS=example.com`` lets the SSRF guard through for it.

The Quick Start worker module is saved as ``my_worker.py`` and started with the seed's own
command; the seed's ``curl http://localhost:8080/health`` is run as written.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    REPO_ROOT,
    WebhookReceiver,
    WorkerProcess,
    client_config,
    new_webhook_secret,
    producer,
    wait_until,
)
from tests.e2e.seedenv import (
    PlaceholderProxy,
    code_blocks,
    env_assignments,
    self_signed_certificate,
)

pytestmark = pytest.mark.timeout(300)

BLOCKS = code_blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
QUICK_START = next(b for b in PYTHON_BLOCKS if "Celery(" in b.text)
SNIPPETS = [b for b in PYTHON_BLOCKS if b is not QUICK_START]
ENV_BLOCK = next(b for b in BLOCKS if b.language == "bash" and "INTERNAL_SERVICE_API_KEY" in b.text)
RUN_COMMAND = next(b for b in BLOCKS if b.text.startswith("celery -A my_worker")).text.strip()
TESTING = next(b for b in BLOCKS if "python -m backend.workers.shared.example_worker" in b.text)
CURL = next(b for b in BLOCKS if b.text.startswith("curl ")).text.strip()
HEALTH_SHAPE = json.loads(next(b for b in BLOCKS if b.language == "json").text)

RUNNER = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        print(f"--- seed block at line {block['line']}", flush=True)
        exec(compile(block["text"], f"seed:{block['line']}", "exec"), namespace)
    print("--- all blocks ran", flush=True)
    """
)


def test_the_seed_has_the_blocks_this_test_runs() -> None:
    assert len(SNIPPETS) == 5, [b.line for b in SNIPPETS]
    assert RUN_COMMAND == "celery -A my_worker worker --loglevel=info -Q my-worker"
    assert CURL == "curl http://localhost:8080/health"
    assert "METRICS_PORT" in env_assignments(ENV_BLOCK)


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's working directory: the Quick Start's ``.env`` written verbatim."""
    folder = tmp_path_factory.mktemp("seed")
    (folder / ".env").write_text(ENV_BLOCK.text)
    return folder


@pytest.fixture(scope="module")
def client(live_backend: Any) -> Iterator[Any]:
    """An API client on the live backend (for setting up and checking)."""
    from backend.workers.shared import InternalAPIClient

    config = client_config(live_backend, live_backend.org_id)
    with InternalAPIClient(config) as api:
        yield api


@pytest.fixture(scope="module")
def placeholder_execution(client: Any) -> str:
    """The real execution that stands in for the seed's ``'execution-id'``."""
    return str(client.create_workflow_execution("seed-usage-snippet").id)


@pytest.fixture(scope="module")
def proxy(live_backend: Any, placeholder_execution: str) -> Iterator[PlaceholderProxy]:
    """The backend as the seed's snippets reach it: ``execution-id`` mapped to a real id."""
    server = PlaceholderProxy(live_backend.url, {"execution-id": placeholder_execution}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def example_com(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An HTTPS receiver standing in for example.com, and a hosts file that points there."""
    if shutil.which("unshare") is None or shutil.which("openssl") is None:
        pytest.fail("the seed test needs util-linux `unshare` and `openssl`")
    folder = tmp_path_factory.mktemp("example-com")
    cert, key = self_signed_certificate("example.com", folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secret = new_webhook_secret()
    receiver = None
    for _ in range(20):
        address = f"127.0.0.{random.randint(2, 250)}"
        try:
            receiver = WebhookReceiver(secret, host=address, port=443, tls=context).start()
            break
        except OSError:
            continue
    assert receiver is not None, "no loopback address with port 443 free"
    hosts = folder / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + f"\n{receiver.host} example.com\n")
    yield {"receiver": receiver, "hosts": hosts, "cert": cert, "secret": secret}
    receiver.stop()


def seed_environment(live_backend: Any, proxy: PlaceholderProxy, seed_dir: Path,
                     example_com: dict[str, Any]) -> dict[str, str]:
    """The process environment: the user's shell plus the placeholders' real values."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "EXAMPLE_")) and k != "ENV_FILE"}
    env.update(
        {
            "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
            "DJANGO_APP_BACKEND_URL": proxy.url,
            "ORGANIZATION_ID": live_backend.org_id,
            "WEBHOOK_SIGNING_SECRET": example_com["secret"],
            "WEBHOOK_ALLOWED_HOSTS": "example.com",
            "SSL_CERT_FILE": str(example_com["cert"]),
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{seed_dir}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def check_health_shape(body: dict[str, Any]) -> None:
    """The seed's example response: the same keys, checks and value types."""
    assert set(HEALTH_SHAPE) <= set(body), body
    assert body["status"] in ("healthy", "degraded", "unhealthy")
    assert body["worker_name"] == "my-worker"
    assert isinstance(body["uptime_seconds"], int | float)
    assert body["timestamp"].endswith(("Z", "+00:00"))
    for name in HEALTH_SHAPE["checks"]:
        check = body["checks"][name]
        assert check["status"] in ("healthy", "degraded", "unhealthy"), check
        assert isinstance(check["message"], str) and check["message"], check
    assert body["checks"]["api_connectivity"]["status"] == "healthy", body


def curl_health() -> dict[str, Any]:
    """The seed's own check, run as written."""
    done = subprocess.run([*shlex.split(CURL), "--silent", "--max-time", "20"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"curl exit {done.returncode}: {done.stderr}"
    return dict(json.loads(done.stdout))


def wait_for_port_8080() -> None:
    """Wait until nothing listens on 8080 (the seed's port; another run may hold it a while)."""
    import socket

    def free() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", 8080)) != 0

    wait_until(free, 120, "port 8080 to be free: the seed's health server needs it", 1.0)


def test_usage_snippets_run_unedited(live_backend: Any, client: Any, proxy: PlaceholderProxy,
                                     seed_dir: Path, example_com: dict[str, Any],
                                     placeholder_execution: str) -> None:
    wait_for_port_8080()
    blocks = seed_dir / "blocks.json"
    blocks.write_text(json.dumps([{"line": b.line, "text": b.text} for b in SNIPPETS]))
    runner = seed_dir / "run_blocks.py"
    runner.write_text(RUNNER)
    env = seed_environment(live_backend, proxy, seed_dir, example_com)
    command = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
               str(example_com["hosts"]), sys.executable, str(runner), str(blocks)]
    done = subprocess.run(command, cwd=seed_dir, env=env, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "--- all blocks ran" in done.stdout, output
    assert f"API URL: {proxy.url}/internal/v1" in done.stdout
    assert "Worker: my-worker" in done.stdout

    execution = client.get_workflow_execution(placeholder_execution)
    assert execution.status == "COMPLETED"
    assert ("GET", "/internal/v1/workflow-executions/execution-id/") in proxy.requests
    receiver = example_com["receiver"]
    assert receiver.verified == [{"data": "test"}], receiver.rejected
    deliveries = [d for d in client.list_webhook_deliveries()
                  if d.url == "https://example.com/webhook"]
    assert [d.outcome for d in deliveries] == ["delivered"]


def _run_and_check_worker(command: list[str], live_backend: Any, client: Any,
                          proxy: PlaceholderProxy, seed_dir: Path,
                          example_com: dict[str, Any], task_name: str, log_name: str) -> None:
    wait_for_port_8080()
    env = seed_environment(live_backend, proxy, seed_dir, example_com)
    env["METRICS_PORT"] = env_assignments(ENV_BLOCK)["METRICS_PORT"]
    worker = WorkerProcess(env, seed_dir / log_name, command=command, cwd=seed_dir).launch()
    try:
        def answers() -> bool:
            assert worker.alive(), worker.log_tail()
            try:
                curl_health()
            except (AssertionError, json.JSONDecodeError):
                return False
            return True

        wait_until(answers, 60, f"{CURL} to answer (log {worker.log_path})", 0.5)
        execution_id = str(client.create_workflow_execution("seed-quick-start").id)
        app = producer({**env, "WORKER_NAME": "my-worker",
                        "WORKER_DATA_DIR": str(seed_dir / ".data")})
        app.send_task(task_name, args=[execution_id], queue="my-worker")

        def completed() -> bool:
            return bool(client.get_workflow_execution(execution_id).status == "COMPLETED")

        wait_until(completed, 60, f"the task to complete execution {execution_id}", 0.3)
        check_health_shape(curl_health())
    finally:
        code = worker.terminate(timeout=60)
    assert code == 0, worker.log_tail()


def test_quick_start_worker_runs_with_the_seeds_command(
    live_backend: Any, client: Any, proxy: PlaceholderProxy, seed_dir: Path,
    example_com: dict[str, Any]
) -> None:
    (seed_dir / "my_worker.py").write_text(QUICK_START.text)
    _run_and_check_worker(shlex.split(RUN_COMMAND), live_backend, client, proxy, seed_dir,
                          example_com, "my_worker.my_task", "my_worker.log")


def test_testing_section_runs_the_example_worker(
    live_backend: Any, client: Any, proxy: PlaceholderProxy, seed_dir: Path,
    example_com: dict[str, Any]
) -> None:
    command = next(line.strip() for line in TESTING.text.splitlines()
                   if line.strip().startswith("python -m"))
    _run_and_check_worker(shlex.split(command), live_backend, client, proxy, seed_dir,
                          example_com, "example_worker.process_execution", "example.log")

