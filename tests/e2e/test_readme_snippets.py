"""The specification as written: the module README's copy of its blocks runs unedited.

The specification's fenced blocks stand verbatim in the module README
(``backend/workers/shared/README.md``); :data:`tests.e2e.readme_snippets.SPEC_BLOCKS` knows each by
the SHA-256 of its text, so the README is checked to still hold every one unchanged, and the
blocks run here are read from it (nothing outside the repository is read). The environment is
the Quick Start's: its ``.env`` block and the README's ``ORGANIZATION_ID`` block are written
verbatim, and the organization is created with the README's own ``create_organization``
command. Only the values the specification leaves as placeholders come from the test, through
the environment:

- ``INTERNAL_SERVICE_API_KEY``: the live backend's;
- ``DJANGO_APP_BACKEND_URL``: a loopback proxy to the live backend that maps the README's
  literal ``execution-id`` in request paths to a real execution (created here), so
  ``client.get_workflow_execution('execution-id')`` reads, and updates, a real execution;
- ``https://example.com/webhook``: the snippet runs in its own mount namespace whose
  ``/etc/hosts`` points ``example.com`` at a loopback address where an HTTPS receiver
  (certificate made here, trusted through ``SSL_CERT_FILE``) verifies the Standard Webhooks
  signature; ``WEBHOOK_ALLOWED_HOSTS=example.com`` lets the SSRF guard through for it.

The Quick Start worker module is saved as ``my_worker.py`` and started with the README's own
command, its task is sent with the README's ``send`` command, and the README's
``curl http://localhost:8080/health`` is run as written.
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
    wait_until,
)
from tests.e2e.readme_snippets import (
    SPEC_BLOCKS,
    Block,
    PlaceholderProxy,
    code_blocks,
    env_assignments,
    self_signed_certificate,
    spec_blocks,
)

pytestmark = pytest.mark.timeout(300)

# The specification's Python blocks run one after the other in one namespace.
SNIPPETS = ("client usage", "config usage", "retry usage", "logging usage", "health usage")

BLOCKS = code_blocks()
SPEC = spec_blocks(BLOCKS)


def spec(name: str) -> Block:
    """The specification's block ``name`` as the README holds it (fails when it was edited)."""
    if name not in SPEC:
        pytest.fail(f"the module README no longer holds the specification's {name!r} block")
    return SPEC[name]


def readme_command(prefix: str) -> str:
    """The README's one shell line that starts with ``prefix`` (outside the spec blocks)."""
    lines = [
        line.strip()
        for block in BLOCKS
        if block.language == "bash"
        for line in block.text.splitlines()
        if line.strip().startswith(prefix)
    ]
    assert len(lines) == 1, f"the README should show `{prefix} ...` once: {lines}"
    return lines[0]


def organization_block() -> Block:
    """The Quick Start's ``.env`` addition that names the organization."""
    found = [b for b in BLOCKS if b.language == "bash" and "ORGANIZATION_ID=" in b.text]
    assert len(found) == 1, "the Quick Start should set ORGANIZATION_ID in one .env block"
    return found[0]


RUNNER = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        print(f"--- README block at line {block['line']}", flush=True)
        exec(compile(block["text"], f"README.md:{block['line']}", "exec"), namespace)
    print("--- all blocks ran", flush=True)
    """
)


def test_the_module_readme_holds_every_spec_block_verbatim() -> None:
    missing = [name for name in SPEC_BLOCKS if name not in SPEC]
    assert missing == [], f"edited or removed from the module README: {missing}"
    assert [b.line for b in SPEC.values()] == sorted(b.line for b in SPEC.values())


def test_the_quick_start_says_how_to_get_an_organization_and_send_a_task() -> None:
    organization = env_assignments(organization_block())["ORGANIZATION_ID"]
    create = shlex.split(readme_command("python manage.py create_organization"))
    assert create[3] == organization, create
    send = shlex.split(readme_command("python -m backend.workers.shared send"))
    assert send[4] == "my_worker.my_task", send
    environment = env_assignments(spec("quick start environment"))
    backend_key = readme_command("export INTERNAL_SERVICE_API_KEY=").split("=", 1)[1].split()[0]
    assert backend_key == environment["INTERNAL_SERVICE_API_KEY"]  # the backend takes its key
    worker = environment["WORKER_NAME"]
    assert spec("run command").text.strip().endswith(f"-Q {worker}")


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's working directory: the Quick Start's ``.env`` written verbatim."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".env").write_text(spec("quick start environment").text + organization_block().text)
    return folder


@pytest.fixture(scope="module")
def organization(live_backend: Any) -> str:
    """The Quick Start's organization, created with the README's own command."""
    command = shlex.split(readme_command("python manage.py create_organization"))
    assert command[:2] == ["python", "manage.py"], command
    return str(live_backend.manage(*command[2:]).strip())


@pytest.fixture(scope="module")
def client(live_backend: Any, organization: str) -> Iterator[Any]:
    """An API client on the live backend, in the Quick Start's organization (to set up, check)."""
    from backend.workers.shared import InternalAPIClient

    config = client_config(live_backend, organization)
    with InternalAPIClient(config) as api:
        yield api


@pytest.fixture(scope="module")
def placeholder_execution(client: Any) -> str:
    """The real execution that stands in for the module README's ``'execution-id'``."""
    return str(client.create_workflow_execution("readme-usage-snippet").id)


@pytest.fixture(scope="module")
def proxy(live_backend: Any, placeholder_execution: str) -> Iterator[PlaceholderProxy]:
    """The backend as the README's snippets reach it: ``execution-id`` mapped to a real id."""
    server = PlaceholderProxy(live_backend.url, {"execution-id": placeholder_execution}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def example_com(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An HTTPS receiver standing in for example.com, and a hosts file that points there."""
    if shutil.which("unshare") is None or shutil.which("openssl") is None:
        pytest.fail("the README snippets test needs util-linux `unshare` and `openssl`")
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


def readme_environment(
    live_backend: Any, proxy: PlaceholderProxy, readme_dir: Path, example_com: dict[str, Any]
) -> dict[str, str]:
    """The process environment: the user's shell plus the placeholders' real values."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CELERY_", "EXAMPLE_")) and k not in ("ENV_FILE", "ORGANIZATION_ID")
    }
    env.update(
        {
            "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
            "DJANGO_APP_BACKEND_URL": proxy.url,
            "WEBHOOK_SIGNING_SECRET": example_com["secret"],
            "WEBHOOK_ALLOWED_HOSTS": "example.com",
            "SSL_CERT_FILE": str(example_com["cert"]),
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{readme_dir}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            # The backend publishes the task (send's dispatch): the worker consumes the same
            # embedded broker, as when both run in one directory (the Quick Start's way).
            "WORKER_DATA_DIR": str(live_backend.data_dir),
        }
    )
    return env


def check_health_shape(body: dict[str, Any]) -> None:
    """The module README's example response: the same keys, checks and value types."""
    shape = json.loads(spec("health response").text)
    assert set(shape) <= set(body), body
    assert body["status"] in ("healthy", "degraded", "unhealthy")
    assert body["worker_name"] == "my-worker"
    assert isinstance(body["uptime_seconds"], int | float)
    assert body["timestamp"].endswith(("Z", "+00:00"))
    for name in shape["checks"]:
        check = body["checks"][name]
        assert check["status"] in ("healthy", "degraded", "unhealthy"), check
        assert isinstance(check["message"], str) and check["message"], check
    assert body["checks"]["api_connectivity"]["status"] == "healthy", body


def curl_health() -> dict[str, Any]:
    """The module README's own check, run as written."""
    curl = shlex.split(spec("testing: curl").text)
    done = subprocess.run(
        [*curl, "--silent", "--max-time", "20"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"curl exit {done.returncode}: {done.stderr}"
    return dict(json.loads(done.stdout))


def wait_for_port_8080() -> None:
    """Wait until nothing listens on 8080 (the README's port; another run may hold it a while)."""
    import socket

    def free() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", 8080)) != 0

    wait_until(free, 120, "port 8080 to be free: the README's health server needs it", 1.0)


def test_usage_snippets_run_unedited(
    live_backend: Any,
    client: Any,
    proxy: PlaceholderProxy,
    readme_dir: Path,
    example_com: dict[str, Any],
    placeholder_execution: str,
) -> None:
    wait_for_port_8080()
    snippets = [spec(name) for name in SNIPPETS]
    blocks = readme_dir / "blocks.json"
    blocks.write_text(json.dumps([{"line": b.line, "text": b.text} for b in snippets]))
    runner = readme_dir / "run_blocks.py"
    runner.write_text(RUNNER)
    env = readme_environment(live_backend, proxy, readme_dir, example_com)
    command = [
        "unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
        str(example_com["hosts"]), sys.executable, str(runner), str(blocks),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=readme_dir, env=env, capture_output=True, text=True, timeout=120
    )
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
    deliveries = [
        d for d in client.list_webhook_deliveries() if d.url == "https://example.com/webhook"
    ]
    assert [d.outcome for d in deliveries] == ["delivered"]


def send_as_documented(task_name: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """The README's ``send`` command for ``task_name``; the execution id and the output."""
    command = shlex.split(readme_command("python -m backend.workers.shared send"))
    command[command.index("my_worker.my_task")] = task_name
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    first, last = done.stdout.splitlines()[0], done.stdout.splitlines()[-1]
    execution_id = first.split()[1].rstrip(":")
    assert first.startswith(f"execution {execution_id}: {task_name} sent to queue 'my-worker'")
    assert last == f"execution {execution_id}: COMPLETED", output
    assert done.stderr == "", output  # no second health server, no warning
    return execution_id, output


def _run_and_check_worker(
    command: list[str],
    live_backend: Any,
    client: Any,
    proxy: PlaceholderProxy,
    readme_dir: Path,
    example_com: dict[str, Any],
    task_name: str,
    log_name: str,
) -> None:
    wait_for_port_8080()
    env = readme_environment(live_backend, proxy, readme_dir, example_com)
    env["METRICS_PORT"] = env_assignments(spec("quick start environment"))["METRICS_PORT"]
    worker = WorkerProcess(env, readme_dir / log_name, command=command, cwd=readme_dir).launch()
    try:

        def answers() -> bool:
            assert worker.alive(), worker.log_tail()
            try:
                curl_health()
            except (AssertionError, json.JSONDecodeError):
                return False
            return True

        wait_until(answers, 60, f"curl of /health to answer (log {worker.log_path})", 0.5)
        execution_id, _ = send_as_documented(task_name, env, readme_dir)
        execution = client.get_workflow_execution(execution_id)
        assert execution.status == "COMPLETED", execution
        check_health_shape(curl_health())
    finally:
        code = worker.terminate(timeout=60)
    assert code == 0, worker.log_tail()
    log = worker.log_path.read_text()
    assert "OrganizationRequiredError" not in log
    assert "No hostname was supplied" not in log


def test_quick_start_worker_runs_with_the_readmes_command(
    live_backend: Any,
    client: Any,
    proxy: PlaceholderProxy,
    readme_dir: Path,
    example_com: dict[str, Any],
) -> None:
    (readme_dir / "my_worker.py").write_text(spec("quick start worker").text)
    run = shlex.split(spec("run command").text)
    _run_and_check_worker(
        run, live_backend, client, proxy, readme_dir, example_com, "my_worker.my_task",
        "my_worker.log",
    )  # fmt: skip


def test_testing_section_runs_the_example_worker(
    live_backend: Any,
    client: Any,
    proxy: PlaceholderProxy,
    readme_dir: Path,
    example_com: dict[str, Any],
) -> None:
    testing = spec("testing: example worker").text
    command = next(line.strip() for line in testing.splitlines() if line.startswith("python -m"))
    _run_and_check_worker(
        shlex.split(command), live_backend, client, proxy, readme_dir, example_com,
        "example_worker.process_execution", "example.log",
    )  # fmt: skip
