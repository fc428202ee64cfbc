"""Command line of the shared package: ``python -m backend.workers.shared check|send``."""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

from .config import ConfigurationError, WorkerConfig

#: Seconds the scheme probe of ``check`` waits for the backend's port.
PROBE_TIMEOUT = 3.0


def check(*, backend: bool = True) -> int:
    """Print the effective configuration (secrets masked), then reach the backend.

    Exit codes: 0 all good, 2 the configuration is invalid, 1 the backend cannot be used
    (the message names what is wrong: URL, key, organization or network).
    ``backend=False`` (``--no-backend``) validates the configuration only.
    """
    from .api_client import InternalAPIClient

    try:
        config = WorkerConfig()
        # The client checks what goes into headers (WORKER_NAME, ORGANIZATION_ID, ...).
        InternalAPIClient(config)
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"configuration refused by the API client: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config.public_settings(), indent=2, default=str))
    print("configuration OK")
    if not backend:
        return 0
    problem = check_backend(config)
    # The verdict comes last, also when stdout and stderr share one terminal or pipe.
    sys.stdout.flush()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


def check_backend(config: WorkerConfig) -> str | None:
    """Call the backend's health endpoint with the configured key, then an org-scoped
    endpoint with the configured organization; ``None`` when both work, else the problem."""
    from .api_client import (
        APIConnectionError,
        APIResponseError,
        APITimeoutError,
        AuthenticationError,
        InternalAPIClient,
        InternalAPIError,
        NotFoundError,
    )

    url = config.internal_api_base_url
    timeout = min(config.api_timeout, 10.0)
    client = InternalAPIClient(config)
    try:
        health = client.health_check(timeout=timeout, retry=False)
    except (APIConnectionError, APITimeoutError) as exc:
        hint = scheme_mismatch(config.django_app_backend_url)
        return f"NETWORK: cannot reach the backend at {url}: {exc.detail}. " + (
            hint
            or "Is the backend running, and are the host and port of DJANGO_APP_BACKEND_URL right?"
        )
    except AuthenticationError as exc:
        return (
            f"KEY: the backend at {url} refused INTERNAL_SERVICE_API_KEY "
            f"({exc.status} {exc.error_code}: {exc.detail})"
        )
    except (NotFoundError, APIResponseError) as exc:
        hint = scheme_mismatch(config.django_app_backend_url)
        return f"URL: {url}/health/ did not answer as the internal API ({exc}). " + (
            hint or "Does DJANGO_APP_BACKEND_URL point at the backend (scheme, host, port)?"
        )
    except InternalAPIError as exc:
        return f"BACKEND: the backend at {url} failed its health check: {exc}"
    print(f"backend OK: {url} is {health.status} (version {health.version})")
    if config.organization_id is None:
        print(
            "ORGANIZATION_ID is not set: org-scoped calls need set_organization_context() "
            "or organization_id= on each call"
        )
        return None
    try:
        next(client.list_workflow_executions(limit=1), None)
    except NotFoundError as exc:
        return (
            f"ORGANIZATION: the backend does not know ORGANIZATION_ID "
            f"{config.organization_id!r} ({exc.error_code}: {exc.detail})"
        )
    except InternalAPIError as exc:
        return (
            f"ORGANIZATION: an org-scoped call for ORGANIZATION_ID "
            f"{config.organization_id!r} failed: {exc}"
        )
    print(f"organization OK: {config.organization_id!r}")
    return None


def send(task: str, *, queue: str | None, workflow_id: str | None, wait: float) -> int:
    """Create an execution that the backend dispatches: ``task`` (by name) on a queue.

    The configuration is the worker's (environment and ``.env``): the same backend, the same
    organization, the queue ``WORKER_NAME`` unless ``queue`` names another. The execution is
    created with ``dispatch``: the backend sends the Celery message (the execution's id as
    argument, ``organization_id`` as keyword) to its broker, marks it ``QUEUED``, and sends it
    again if no worker claims it in time. The worker module is never imported, so no second
    health server starts. With ``wait`` > 0, waits that many seconds for a final status.

    Exit codes: 0 created (with ``wait``: ended ``COMPLETED``), 2 the configuration is invalid
    or names no organization, 1 anything else (the backend refused or failed, an end other
    than ``COMPLETED``, no end in time).
    """
    from .api_client import InternalAPIClient, InternalAPIError

    try:
        config = WorkerConfig()
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    if config.organization_id is None:
        print(
            "ORGANIZATION_ID is not set: executions belong to an organization. Set it to one "
            "the backend knows (`manage.py create_organization <id>` creates one)",
            file=sys.stderr,
        )
        return 2
    queue = queue or config.worker_name
    try:
        with InternalAPIClient(config) as client:
            execution = client.create_workflow_execution(
                workflow_id or task, dispatch={"task": task, "queue": queue}
            )
            print(
                f"execution {execution.id}: {task} sent to queue {queue!r} "
                "(the backend dispatches it)",
                flush=True,
            )
            if wait <= 0:
                return 0
            deadline = time.monotonic() + wait
            while not execution.is_final and time.monotonic() < deadline:
                time.sleep(0.5)
                execution = client.get_workflow_execution(execution.id)
    except InternalAPIError as exc:
        print(
            f"the backend refused or failed: {exc} "
            "(`python -m backend.workers.shared check` says what is wrong)",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        print(f"configuration refused by the API client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (an execution already created stays queued)", file=sys.stderr)
        return 130
    if not execution.is_final:
        print(
            f"execution {execution.id}: still {execution.status} after {wait:g}s "
            f"(is a worker consuming queue {queue!r}, on the backend's broker?)",
            file=sys.stderr,
        )
        return 1
    detail = f": {execution.error_message}" if execution.error_message else ""
    print(f"execution {execution.id}: {execution.status}{detail}")
    return 0 if execution.status == "COMPLETED" else 1


def scheme_mismatch(backend_url: str) -> str | None:
    """What to write instead when the backend's port does not speak the URL's scheme: plain
    HTTP behind an ``https://`` URL, or TLS behind an ``http://`` one; ``None`` otherwise."""
    parts = urlsplit(backend_url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    address = (host, parts.port or (443 if tls else 80))
    other = f"{'http' if tls else 'https'}://{parts.netloc}"
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT) as sock:
            if tls:
                sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
                speaks_other = sock.recv(5) == b"HTTP/"
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # only asks whether it speaks TLS
                with context.wrap_socket(sock, server_hostname=host or None):
                    speaks_other = True
    except (OSError, ssl.SSLError, UnicodeError):
        return None
    if not speaks_other:
        return None
    spoken = "plain HTTP, not TLS" if tls else "TLS, not plain HTTP"
    return f"The backend speaks {spoken} on this address: write DJANGO_APP_BACKEND_URL={other}"


def main(argv: list[str] | None = None) -> int:
    """Dispatch the sub-command named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m backend.workers.shared")
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser(
        "check", help="validate the configuration and print it, secrets masked"
    )
    check_parser.add_argument(
        "--no-backend", action="store_true", help="skip the backend connectivity check"
    )
    send_parser = sub.add_parser(
        "send", help="create an execution the backend dispatches to a worker's task (by name)"
    )
    send_parser.add_argument("task", help="the Celery task's name, e.g. my_worker.my_task")
    send_parser.add_argument("--queue", help="the queue to send to (default: WORKER_NAME)")
    send_parser.add_argument(
        "--workflow-id", help="the new execution's workflow_id (default: the task's name)"
    )
    send_parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the execution to end; exit 0 only when COMPLETED",
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(backend=not args.no_backend)
    if args.command == "send":
        return send(args.task, queue=args.queue, workflow_id=args.workflow_id, wait=args.wait)
    return 2


if __name__ == "__main__":
    sys.exit(main())
