"""A worker built the module README's Quick Start way, run by tests/e2e/test_observability.py.

Started as ``celery -A observability_worker worker`` with this folder on PYTHONPATH; every
setting comes from the environment the test prepares.
"""

from __future__ import annotations

import gc
import logging
import os
import time

from celery import Celery

from backend.workers.shared import (
    HealthChecker,
    HealthServer,
    InternalAPIClient,
    WorkerConfig,
    WorkerLogger,
    monitor_performance,
)

if os.getenv("OBS_SKIP_CONFIGURE") != "1":  # else the Celery wiring configures from the env
    WorkerLogger.configure(
        log_level=os.getenv("LOG_LEVEL", "INFO"), log_format="structured",
        worker_name="obs-worker",
    )
logger = WorkerLogger.get_logger(__name__)
config = WorkerConfig()

app = Celery("observability_worker")
app.config_from_object(config.get_celery_config())

health_checker = HealthChecker(config)
health_server = HealthServer(health_checker, port=config.metrics_port, host="127.0.0.1")
health_server.start()


@app.task(bind=True)
@monitor_performance
def work(self: object, execution_id: str, organization_id: str | None = None,
         fail: bool = False, pause: float = 0.0, call_backend: bool = False) -> dict[str, int]:
    """Log in every way a task can, optionally call the backend once and fail; returns the
    child's pid. The start line tells how many objects the pool's fork left frozen."""
    logger.info(f"processing execution {execution_id}", step="start",
                frozen_objects=gc.get_freeze_count())
    if call_backend:
        with InternalAPIClient(config) as client:
            client.health_check()
    logging.getLogger("plain.stdlib").info("stdlib line %s", "with args", extra={"kind": "extra"})
    print("a line printed by the task")
    time.sleep(pause)
    if fail:
        raise ValueError(f"requested failure of {execution_id}")
    return {"pid": os.getpid()}
