"""The one place the backend publishes a Celery message: :func:`publish_dispatch`.

The broker is ``CELERY_BROKER_URL`` (settings); its default, ``filesystem://``, is the
workers' embedded broker: the same folders under ``WORKER_DATA_DIR/broker`` and the same
atomic transport (``backend.workers.shared._fs_transport``), so a worker started with the same
``WORKER_DATA_DIR`` consumes what the backend publishes. The Celery app is built once per
process, on first use; its producer pool keeps the broker connection between messages.

Publishing is bounded: connecting gives up after :data:`CONNECT_TIMEOUT` seconds and a Redis
command after :data:`SOCKET_TIMEOUT`, so a stalled broker cannot hold the outbox rows that
``lifecycle`` locks while it publishes for longer than that.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from django.conf import settings

from backend.internal_api.models import Dispatch
from backend.workers.shared._redact import redact_url

CONNECT_TIMEOUT = 5.0
SOCKET_TIMEOUT = 10.0
FILESYSTEM_TRANSPORT = "backend.workers.shared._fs_transport:Transport"


def broker_folders(data_dir: Path) -> dict[str, Path]:
    """The embedded broker's folders under ``data_dir`` (the workers' own layout)."""
    return {name: data_dir / "broker" / name for name in ("queue", "processed", "control")}


def celery_config() -> dict[str, Any]:
    """Celery settings for publishing to ``settings.CELERY_BROKER_URL``."""
    url: str = settings.CELERY_BROKER_URL
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_timeout": CONNECT_TIMEOUT,
    }
    if url.startswith("filesystem://"):
        folders = broker_folders(Path(settings.WORKER_DATA_DIR))
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = FILESYSTEM_TRANSPORT
        conf["broker_transport_options"] = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": False,
            "control_folder": str(folders["control"]),
        }
    elif url.startswith(("redis://", "rediss://")):
        conf["broker_transport_options"] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": SOCKET_TIMEOUT,
        }
    return conf


@functools.cache
def celery_app() -> Celery:
    """This process's publishing Celery app (built on first use)."""
    app = Celery("internal_api", set_as_current=False)
    app.config_from_object(celery_config())
    return app


def publish_dispatch(dispatch: Dispatch) -> None:
    """Send the Celery message of one outbox row; raises the broker's error if it fails.

    The message is ``send_task(task, args=[execution_id], kwargs={"organization_id": ...},
    queue=queue)``; marking the row published is the caller's (see ``lifecycle``). No retry
    here: a row that failed stays unpublished, and the next pass of ``run_lifecycle`` (a new
    connection from the pool) is the retry.
    """
    execution = dispatch.execution
    celery_app().send_task(
        dispatch.task,
        args=[str(execution.pk)],
        kwargs={"organization_id": execution.organization_id},
        queue=dispatch.queue,
        retry=False,
    )


def broker_problem() -> str | None:
    """Connect to the broker once: None when it answers, else one line saying why not.

    The line names ``CELERY_BROKER_URL`` and the URL without its password.
    """
    url: str = settings.CELERY_BROKER_URL
    shown = redact_url(url)
    try:
        with celery_app().connection_for_write() as connection:
            connection.connect()
    except Exception as exc:  # whatever the kind of failure, it is the one line
        # kombu names an unknown scheme in a KeyError, whose str() is quoted.
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        reason = " ".join(text.split()) or type(exc).__name__
        password = urlsplit(url).password if "://" in url else None
        if password:
            reason = reason.replace(password, "***")
        return f"CELERY_BROKER_URL: cannot use {shown}: {reason}"
    return None
