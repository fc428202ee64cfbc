"""A ``celery worker`` process is not ready while its app module is still loading.

The module README's Quick Start starts its health server when the module is imported, before
Celery has made the worker: ``/readyz`` must not answer 200 in that window (a rollout would take
the worker for ready before its consumer exists). The probe module below stands for such a
module: run by a real ``celery`` command, it reports what the health checks say at import time
and exits. Each of the three ways the Quick Start installs the Celery wiring
(``get_celery_config()``, ``WorkerLogger.configure()``, ``HealthServer.start()``) is enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os
from celery import Celery
from backend.workers.shared import HealthChecker, HealthServer, WorkerConfig, WorkerLogger

config = WorkerConfig()
app = Celery('probe')
checker = HealthChecker(config)
{trigger}
process = checker.check_worker_process()
print('PROBE ' + json.dumps({
    'status': process.status.value, 'message': process.message,
    'consumer_listed': 'consumer' in checker.readiness()[1],
    'consumer_ok': checker.readiness()[1].get('consumer', {}).get('ok'),
}), flush=True)
os._exit(0)
"""


CELERY_CONFIG = "app.config_from_object({'broker_url': 'memory://', **config.get_celery_config()})"
TRIGGERS = {
    "get_celery_config": CELERY_CONFIG,
    "WorkerLogger.configure": "WorkerLogger.configure()",
    "HealthServer.start": "HealthServer(checker, port=0, host='127.0.0.1').start()",
}


def probe(tmp_path: Path, *command: str, trigger: str = CELERY_CONFIG) -> dict[str, Any]:
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE).replace("{trigger}", trigger))
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "ENV_FILE")}
    env.update({
        "INTERNAL_SERVICE_API_KEY": "test-key-starting",
        # Nothing listens here: the backend check fails fast, the consumer check is the point.
        "DJANGO_APP_BACKEND_URL": "http://127.0.0.1:9",
        "WORKER_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
    })
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "probe", *command],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stdout + done.stderr
    return dict(json.loads(lines[0].removeprefix("PROBE ")))


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_celery_worker_is_starting_until_its_worker_exists(tmp_path: Path, trigger: str) -> None:
    seen = probe(tmp_path, "worker", "--pool", "solo", trigger=TRIGGERS[trigger])
    assert seen == {"status": "degraded", "message": "celery worker starting",
                    "consumer_listed": True, "consumer_ok": False}


@pytest.mark.parametrize("command", [("inspect", "ping"), ("status",)])
def test_other_celery_commands_run_no_worker(tmp_path: Path, command: tuple[str, ...]) -> None:
    seen = probe(tmp_path, *command)
    assert seen["consumer_listed"] is False
    assert seen["message"] == "Worker process healthy"
