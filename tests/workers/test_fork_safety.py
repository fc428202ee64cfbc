"""The process-wide pool across fork(): the child builds its own, the parent's is untouched.

The parent uses the client (one pooled connection), forks; the child's calls succeed on a new
connection of its own; afterwards the parent's next call still goes over its original
connection (the child neither closed nor used it). And what a prefork worker's main process
prepares before its pool forks, so that no child builds it again: the transport stack, the
TLS context, the quieted httpx2 loggers, the models' validators.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from backend.workers.shared import _http
from backend.workers.shared.api_client import InternalAPIClient
from backend.workers.shared.config import WorkerConfig
from tests.fault_server import FaultServer, Forward, Respond
from tests.live_backend import LiveBackend

EXECUTION = {"id": "e-1", "workflow_id": "wf", "status": "PENDING"}


def make_config(url: str, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "internal_service_api_key": "swi-test-key-7Q2xK9-fork",
        "django_app_backend_url": url,
        "organization_id": "org-a",
        "_env_file": None,
    }
    values.update(overrides)
    return WorkerConfig(**values)


def run_in_child(body: Any) -> int:
    """Fork; run ``body()`` in the child and exit with its int result (1 on an exception)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the exit code
        code = 1
        try:
            code = int(body())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_child_gets_its_own_pool_and_parent_pool_survives() -> None:
    with FaultServer(default=Respond(200, EXECUTION)) as server:
        config = make_config(server.url)
        with InternalAPIClient(config) as client:
            client.get_workflow_execution("e-1")
        parent_pool = _http.get_pool(config.internal_api_base_url + "/")
        assert server.connections_accepted == 1

        def child() -> int:
            if _http.pool_count() != 0:  # the inherited pool was dropped at fork
                return 3
            for _ in range(3):
                with InternalAPIClient(config) as api:
                    if api.get_workflow_execution("e-1").id != "e-1":
                        return 4
            return 0 if _http.get_pool(config.internal_api_base_url + "/") is not parent_pool \
                else 5

        assert run_in_child(child) == 0
        assert server.connections_accepted == 2  # the child opened exactly one of its own
        child_connections = {r.connection for r in server.requests[1:]}
        assert child_connections == {2}

        with InternalAPIClient(config) as client:
            client.get_workflow_execution("e-1")
        assert server.requests[-1].connection == 1  # the parent's connection still works
        assert server.connections_accepted == 2
        assert _http.get_pool(config.internal_api_base_url + "/") is parent_pool


def test_many_blocks_share_one_connection() -> None:
    with FaultServer(default=Respond(200, EXECUTION)) as server:
        config = make_config(server.url)
        for _ in range(20):
            with InternalAPIClient(config) as client:
                client.get_workflow_execution("e-1")
        assert server.connections_accepted == 1
        assert {r.connection for r in server.requests} == {1}


def test_fork_against_the_real_backend(live_backend: LiveBackend) -> None:
    with FaultServer(default=Forward(live_backend.url)) as proxy:
        config = make_config(proxy.url, internal_service_api_key=live_backend.api_key,
                             organization_id=live_backend.org_id)
        with InternalAPIClient(config) as client:
            created = client.create_workflow_execution(f"wf-fork-{uuid.uuid4().hex[:6]}")

        def child() -> int:
            with InternalAPIClient(config) as api:
                api.update_workflow_execution_status(created.id, "IN_PROGRESS")
                return 0 if api.get_workflow_execution(created.id).status == "IN_PROGRESS" \
                    else 6

        assert run_in_child(child) == 0
        with InternalAPIClient(config) as client:
            done = client.update_workflow_execution_status(created.id, "COMPLETED")
        assert done.status == "COMPLETED"
        assert proxy.requests[-1].connection == 1  # the parent kept its connection
        assert proxy.connections_accepted == 2


def test_close_all_closes_and_next_use_reopens() -> None:
    with FaultServer(default=Respond(200, EXECUTION)) as server:
        config = make_config(server.url)
        for _ in range(2):
            InternalAPIClient(config).get_workflow_execution("e-1")
            _http.close_all()
            assert _http.pool_count() == 0
        assert server.connections_accepted == 2


def test_preload_before_the_fork_leaves_the_child_its_transport_and_tls_context() -> None:
    # What a prefork worker's main process does before its pool forks (_celery): the child
    # finds the transport stack imported and the parent's TLS context, and its calls work.
    _http.preload()
    context = _http.shared_ssl_context()
    with FaultServer(default=Respond(200, EXECUTION)) as server:
        config = make_config(server.url)

        def child() -> int:
            if "httpcore2" not in sys.modules or "h11" not in sys.modules:
                return 3
            if _http.shared_ssl_context() is not context:  # inherited, not rebuilt
                return 4
            with InternalAPIClient(config) as api:
                return 0 if api.get_workflow_execution("e-1").id == "e-1" else 5

        assert run_in_child(child) == 0
        assert server.connections_accepted == 1


def test_preload_quiets_httpx2_before_the_fork_and_keeps_an_explicit_level() -> None:
    # Quieted in the parent, so no process sets a logger's level after the fork (setLevel
    # clears the cache of every logger, writing to pages the fork shared).
    unset, chosen = logging.getLogger("httpx2"), logging.getLogger("httpcore2")
    saved = unset.level, chosen.level
    try:
        unset.setLevel(logging.NOTSET)
        chosen.setLevel(logging.DEBUG)
        _http.preload()
        assert (unset.level, chosen.level) == (logging.WARNING, logging.DEBUG)
    finally:
        unset.setLevel(saved[0])
        chosen.setLevel(saved[1])


def fresh_python(script: str) -> str:
    """What ``script`` prints, run by a fresh interpreter (nothing imported or built yet)."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    return done.stdout


def test_preload_imports_the_idna_codec_of_the_first_request() -> None:
    # Each prefork child imported it (and stringprep) at its first request, after the fork.
    assert fresh_python(
        "import sys\n"
        "from backend.workers.shared import _http\n"
        "before = 'encodings.idna' in sys.modules\n"
        "_http.preload()\n"
        "print(before, 'encodings.idna' in sys.modules)\n"
    ).split() == ["False", "True"]


def test_the_models_validators_are_built_before_the_fork() -> None:
    # Deferred at import (defer_build); a fresh interpreter shows that _build_models, which
    # the prefork main process runs before forking, leaves none of them to build after it.
    script = (
        "from backend.workers.shared import _celery, models\n"
        "def pending():\n"
        "    return [n for n in models.__all__\n"
        "            if getattr(getattr(models, n), '__pydantic_complete__', True) is False]\n"
        "before = pending()\n"
        "_celery._build_models()\n"
        "print(bool(before), pending())\n"
    )
    assert fresh_python(script).split() == ["True", "[]"]
