"""A worker whose task outlives its hard time limit, for tests of ExecutionTask in a real worker.

Started as ``celery -A tests.e2e.rules_worker worker`` by tests/e2e/test_workers.py; every
setting (``TASK_SOFT_TIME_LIMIT``, ``TASK_TIME_LIMIT``, ...) comes from the environment.
"""

from __future__ import annotations

import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from backend.workers.shared import ExecutionTask, WorkerConfig, WorkerLogger

config = WorkerConfig()
WorkerLogger.configure(log_level=config.log_level, worker_name=config.worker_name)
app = Celery("rules_worker")
app.config_from_object(config.get_celery_config())


@app.task(bind=True, base=ExecutionTask, name="rules.runaway", worker_config=config)
def runaway(self: ExecutionTask, execution_id: str, organization_id: str | None = None) -> None:
    """Ignore the soft time limit and keep going until the hard limit kills the process."""
    while True:
        try:
            time.sleep(60)
        except SoftTimeLimitExceeded:
            continue
