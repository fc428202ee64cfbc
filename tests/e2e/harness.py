"""Real processes for end-to-end runs: worker subprocesses, a webhook receiver, a producer.

Used by the e2e tests and by ``scripts/demo.py``. Nothing here imports Django: the backend
runs as a subprocess (``tests.live_backend.LiveBackend``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]
TASK_NAME = "example_worker.process_execution"


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_quiet(server: Any, seconds: float = 1.0, timeout: float = 30.0) -> None:
    """Wait until ``server`` (a ``FaultServer``) has received no request for ``seconds``."""
    count = [-1]

    def still() -> bool:
        before, count[0] = count[0], len(server.requests)
        return before == count[0]

    wait_until(still, timeout, "the fault server to be quiet", seconds)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: the status and body (any status, no exception for 4xx/5xx)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def serve_in_thread(
    handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0,
    tls: ssl.SSLContext | None = None, name: str = "http-server",
) -> ThreadingHTTPServer:
    """Bind a threading HTTP server (HTTPS with ``tls``) and serve it in a daemon thread."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
    return server


def stop_server(server: ThreadingHTTPServer | None) -> None:
    """Stop a server of :func:`serve_in_thread` and close its socket (``None``: nothing)."""
    if server is not None:
        server.shutdown()
        server.server_close()


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret (``whsec_`` + base64 of 32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class WebhookReceiver:
    """A loopback HTTP(S) server that checks Standard Webhooks signatures of what it gets.

    ``verified`` holds the JSON payloads whose signature checked out, ``rejected`` the
    reasons of the others, ``arrivals`` the ``webhook-id`` header of every POST as it arrives
    (before its answer). ``delay`` makes it a slow receiver: it answers that many seconds
    after the request arrived. ``tls`` (a server-side ``SSLContext``) makes it HTTPS.
    """

    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/webhook"
    tls: ssl.SSLContext | None = None
    delay: float = 0.0
    verified: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    arrivals: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The URL to send webhooks to."""
        scheme = "https" if self.tls else "http"
        port = "" if self.port == (443 if self.tls else 80) else f":{self.port}"
        return f"{scheme}://{self.host}{port}{self.path}"

    def start(self) -> WebhookReceiver:
        """Bind and serve in a background thread."""
        from standardwebhooks.webhooks import Webhook

        verifier = Webhook(self.secret)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.arrivals.append(self.headers.get("webhook-id", ""))
                if receiver.delay:
                    time.sleep(receiver.delay)
                try:
                    payload = verifier.verify(body, dict(self.headers.items()))
                except Exception as exc:
                    with receiver._lock:
                        receiver.rejected.append(f"{type(exc).__name__}: {exc}")
                    self._answer(401, b'{"error":"bad signature"}')
                    return
                with receiver._lock:
                    receiver.verified.append(payload)
                self._answer(200, b'{"ok":true}')

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = serve_in_thread(Handler, self.host, self.port, self.tls, "webhooks")
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        stop_server(self._server)
        self._server = None


def worker_env(
    *,
    backend_url: str,
    api_key: str,
    organization_id: str,
    worker_name: str,
    data_dir: Path,
    metrics_port: int,
    broker_url: str | None = None,
    concurrency: int = 4,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a worker subprocess (and of the producer that feeds it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "EXAMPLE_"))}
    env.update(
        {
            "INTERNAL_SERVICE_API_KEY": api_key,
            "DJANGO_APP_BACKEND_URL": backend_url,
            "ORGANIZATION_ID": organization_id,
            "WORKER_NAME": worker_name,
            "WORKER_DATA_DIR": str(data_dir),
            "METRICS_PORT": str(metrics_port),
            "HEALTH_HOST": "127.0.0.1",
            "MAX_CONCURRENT_TASKS": str(concurrency),
            "LOG_FORMAT": "structured",
            "LOG_LEVEL": "INFO",
            "ENV_FILE": os.devnull,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if broker_url:
        env["CELERY_BROKER_URL"] = broker_url
    env.update(extra or {})
    return env


class WorkerProcess:
    """A real worker subprocess in its own process group, logging to a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, command: list[str] | None = None,
                 cwd: Path = REPO_ROOT) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.command = command or [sys.executable, "-m", "backend.workers.shared.example_worker"]
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        """Base URL of the worker's health server."""
        return f"http://127.0.0.1:{self.env['METRICS_PORT']}"

    @property
    def pid(self) -> int:
        """The worker's main process id."""
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def launch(self) -> WorkerProcess:
        """Start the worker process (its own process group) without waiting for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )
        return self

    def start(self, ready_timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until its health server says it is ready."""
        self.launch()
        try:
            wait_until(self.ready, ready_timeout, f"worker ready (log: {self.log_path})", 0.2)
        except BaseException:
            self.kill()
            raise
        return self

    def alive(self) -> bool:
        """True while the worker's main process runs."""
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """True when the worker's main process is alive and ``/readyz`` answers 200."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {self.proc and self.proc.returncode}: {self.log_tail()}"
            )
        try:
            status, _ = http_get(self.health_url + "/readyz", timeout=2.0)
        except OSError:
            return False
        return status == 200

    def children(self) -> list[int]:
        """Process ids of the worker's pool processes."""
        import psutil

        return [child.pid for child in psutil.Process(self.pid).children(recursive=False)]

    def health(self, path: str = "/health") -> tuple[int, dict[str, Any]]:
        """Status and JSON body of one health endpoint."""
        status, body = http_get(self.health_url + path, timeout=15.0)
        return status, json.loads(body)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (Celery's warm shutdown), wait for the exit; SIGKILL the group if it hangs."""
        assert self.proc is not None, "worker not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def _reap_group(self) -> None:
        """Kill anything of the group that outlived the main process (orphaned children)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the worker's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def client_config(backend: Any, organization_id: str, **values: Any) -> Any:
    """The configuration of a test-side API client of ``backend`` (not from the environment).

    Every test-side client of one backend URL shares one circuit breaker in the process, so
    they all use the same breaker settings: a short recovery, since tests stop the backend.
    """
    from backend.workers.shared.config import WorkerConfig

    return WorkerConfig(
        _env_file=None, internal_service_api_key=backend.api_key,
        django_app_backend_url=backend.url, organization_id=organization_id,
        circuit_breaker_recovery_timeout=1.0, **values,
    )


def producer(env: Mapping[str, str]) -> Any:
    """A Celery app that sends to the broker described by a worker's environment."""
    from celery import Celery

    from backend.workers.shared.config import WorkerConfig

    fields = WorkerConfig.model_fields
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k.lower() in fields}
    values.setdefault("celery_broker_url", None)
    config = WorkerConfig(_env_file=None, **values)
    app = Celery("producer")
    app.config_from_object(config.get_celery_config())
    return app


def submit(app: Any, queue: str, execution_ids: Iterable[str], organization_id: str) -> None:
    """Send one ``process_execution`` task per execution id to ``queue``."""
    with app.producer_or_acquire() as prod:
        for execution_id in execution_ids:
            app.send_task(
                TASK_NAME, args=[execution_id], kwargs={"organization_id": organization_id},
                queue=queue, producer=prod,
            )
