"""A worker whose leased tasks outlive their hard time limit, for test_hard_time_limit_live.py.

Started as ``celery -A tests.workers.hard_limit_worker worker``; every setting
(``TASK_SOFT_TIME_LIMIT``, ``TASK_TIME_LIMIT``, ...) comes from the environment.
"""

from __future__ import annotations

import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from backend.workers.shared import ExecutionTask, InternalAPIClient, WorkerConfig, WorkerLogger

config = WorkerConfig()
WorkerLogger.configure(log_level=config.log_level, worker_name=config.worker_name)
app = Celery("hard_limit_worker")
app.config_from_object(config.get_celery_config())


def outlive_the_limit() -> None:
    """Ignore the soft time limit and keep going until the hard limit kills the process."""
    while True:
        try:
            time.sleep(60)
        except SoftTimeLimitExceeded:
            continue


@app.task(bind=True, base=ExecutionTask, name="hard_limit.held", worker_config=config)
def held(self: ExecutionTask, execution_id: str, organization_id: str | None = None) -> None:
    """Hold the lease (heartbeats keep it) until the hard limit."""
    outlive_the_limit()


@app.task(bind=True, base=ExecutionTask, name="hard_limit.taken_over", worker_config=config)
def taken_over(
    self: ExecutionTask, execution_id: str, organization_id: str | None = None
) -> None:
    """Lose the lease to another worker (``other:9``, a live lease of 600 s) first, as a run
    stopped past its lease does, then run until the hard limit."""
    assert self.execution is not None and self.execution.lease is not None
    with InternalAPIClient(config, organization_id=organization_id) as client:
        client.release_execution(execution_id, self.execution.lease.epoch)
        client.claim_execution(execution_id, worker="other:9", lease_seconds=600)
    outlive_the_limit()
