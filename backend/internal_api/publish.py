"""Publishing executions' Celery messages: an outbox row (:class:`Dispatch`) to the broker.

The backend publishes with Celery's producer API (``send_task``) on ``CELERY_BROKER_URL``; by
default the workers' embedded filesystem broker, with the same folders under
``WORKER_DATA_DIR/broker`` and the same atomic transport
(``backend.workers.shared._fs_transport``), so a worker started with the defaults consumes
what the backend publishes. The message is the one a worker's task takes:
``send_task(task, args=[execution_id], kwargs={"organization_id": ...}, queue=queue)``.

:func:`publish_dispatch` publishes one row and records it (``published_at``, the execution
PENDING/QUEUED -> QUEUED); ``run_lifecycle`` calls it for rows left unpublished, the create
view after its commit (:func:`publish_after_commit`). A row published twice (a crash between
the publish and the commit) is a duplicate message, which the claim makes harmless.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backend.internal_api.models import Dispatch, WorkflowExecution
from backend.internal_api.transitions import mark_dispatched
from backend.workers.shared import _fs_transport as fs_transport

logger = logging.getLogger("backend.internal_api")

# A broker that does not answer must not hold a request long: one quick retry, then the
# lifecycle process publishes the row on its next pass.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}

_apps: dict[tuple[str, str], Celery] = {}
_apps_lock = threading.Lock()


def celery_app() -> Celery:
    """The producer app for the configured broker (one per process and broker)."""
    key = (settings.CELERY_BROKER_URL, str(settings.WORKER_DATA_DIR))
    app = _apps.get(key)
    if app is not None:
        return app
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = Celery("backend", set_as_current=False)
            app.conf.update(_broker_conf(settings.CELERY_BROKER_URL, settings.WORKER_DATA_DIR))
            _apps[key] = app
    return app


def _broker_conf(url: str, data_dir: Path) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_timeout": 2.0,
        "broker_connection_retry": False,
    }
    if url.startswith("filesystem://"):
        conf.update(fs_transport.celery_conf(Path(data_dir) / "broker"))
    elif url.startswith(("redis://", "rediss://")):
        # A Redis that accepts and then stalls must not hold the outbox rows (locked while
        # run_lifecycle publishes) for good: its commands give up after a while.
        conf["broker_transport_options"] = {"socket_connect_timeout": 2.0, "socket_timeout": 10.0}
    return conf


def publish_dispatch(dispatch: Dispatch) -> WorkflowExecution | None:
    """Send the row's Celery message, then record it: ``published_at = now`` and the
    execution PENDING/QUEUED -> QUEUED with ``queued_at = now`` (event ``dispatched`` when the
    status changed). Returns the execution as stored afterwards, or None when it had moved on
    (claimed, terminal: nothing to change). Raises what the broker raised when sending fails
    (nothing is recorded then).

    Call it inside the transaction that holds the row locked when several processes publish
    (``SELECT ... FOR UPDATE SKIP LOCKED``); ``select_related("execution")`` spares a query.
    """
    execution = dispatch.execution
    celery_app().send_task(
        dispatch.task,
        args=[str(execution.pk)],
        kwargs={"organization_id": execution.organization_id},
        queue=dispatch.queue,
        retry_policy=RETRY_POLICY,
    )
    Dispatch.objects.filter(pk=dispatch.pk, published_at__isnull=True).update(
        published_at=timezone.now()
    )
    return mark_dispatched(execution.organization_id, execution.pk)


def broker_reachable() -> bool:
    """Whether the broker takes connections now (asked after a publish failed: a broker that
    is up refused that row for the row's own sake). The embedded broker: its queue folder is
    a writable folder."""
    app = celery_app()
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        folder = app.conf.broker_transport_options["data_folder_in"]
        return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)
    try:
        with app.connection_for_write() as connection:
            connection.connect()
    except Exception:  # whatever the transport raises for a broker it cannot reach
        return False
    return True


def publish_after_commit(dispatch: Dispatch, outcome: list[WorkflowExecution]) -> None:
    """Publish ``dispatch`` once the current transaction commits, best effort: a failure is
    logged and left to ``run_lifecycle``. The execution as stored afterwards is appended to
    ``outcome`` when the publish succeeded."""

    def publish() -> None:
        try:
            with transaction.atomic():
                # Locked and still unpublished, or left alone: run_lifecycle may hold it (or
                # have published it) since the create committed; a row is published once.
                row = (
                    Dispatch.objects.select_for_update(skip_locked=True, of=("self",))
                    .select_related("execution")
                    .filter(pk=dispatch.pk, published_at__isnull=True)
                    .first()
                )
                if row is None:
                    return
                published = publish_dispatch(row)
        except Exception as exc:  # any broker or database failure: the outbox keeps the row
            logger.warning(
                "dispatch not published; run_lifecycle will publish it",
                extra={
                    "dispatch_id": dispatch.pk,
                    "execution_id": str(dispatch.execution_id),
                    "error": type(exc).__name__,
                },
            )
            return
        if published is not None:
            outcome.append(published)

    transaction.on_commit(publish)
