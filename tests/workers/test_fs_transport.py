"""The embedded filesystem broker delivers every message whole, even to a fast poller."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from kombu import Connection

from backend.workers.shared import WorkerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 120
SIZE = 1_000_000  # large payloads keep each write open long enough for a poller to race it


def _options(folder: Path) -> dict[str, object]:
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.001,
    }


def _connection(folder: Path) -> Connection:
    conf = WorkerConfig(internal_service_api_key="k", worker_data_dir=folder).get_celery_config()
    return Connection(
        conf["broker_url"], transport=conf["broker_transport"], transport_options=_options(folder)
    )


def _produce(folder: Path) -> None:
    with _connection(folder) as conn:
        queue = conn.SimpleQueue("race")
        for index in range(MESSAGES):
            queue.put({"index": index, "blob": "x" * SIZE})
        queue.close()


def test_a_polling_consumer_never_reads_a_half_written_message(tmp_path: Path) -> None:
    producer = multiprocessing.get_context("spawn").Process(target=_produce, args=(tmp_path,))
    producer.start()
    received = []
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("race")
        for _ in range(MESSAGES):
            message = queue.get(timeout=60)  # a partial file would raise a JSON error here
            received.append(message.payload["index"])
            assert len(message.payload["blob"]) == SIZE
            message.ack()
        queue.close()
    producer.join(timeout=60)
    assert producer.exitcode == 0
    assert sorted(received) == list(range(MESSAGES))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_embedded_broker_uses_the_atomic_transport(tmp_path: Path) -> None:
    conf = WorkerConfig(internal_service_api_key="k", worker_data_dir=tmp_path).get_celery_config()
    assert conf["broker_url"] == "filesystem://"
    assert conf["broker_transport"] == "backend.workers.shared._fs_transport:Transport"


EMBEDDED_WORKER = """
from celery import Celery
from backend.workers.shared import WorkerConfig, WorkerLogger

WorkerLogger.configure(log_level="INFO", log_format="structured", worker_name="quiet")
app = Celery("quiet_worker")
app.config_from_object(WorkerConfig().get_celery_config())
"""


def test_a_worker_on_the_embedded_broker_starts_without_kombu_warnings(tmp_path: Path) -> None:
    (tmp_path / "quiet_worker.py").write_text(EMBEDDED_WORKER)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CELERY_")},
        "INTERNAL_SERVICE_API_KEY": "k",
        "ENV_FILE": os.devnull,
        "WORKER_NAME": "quiet",
        "WORKER_DATA_DIR": str(tmp_path / ".data"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "quiet_worker",
            "worker",
            "--pool=solo",
            "-Q",
            "quiet",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert worker.stdout is not None
    try:
        for line in worker.stdout:  # the worker runs until it says it is ready
            lines.append(line)
            if "ready." in line:
                break
    finally:
        worker.terminate()
        rest, _ = worker.communicate(timeout=30)
    output = "".join(lines) + rest
    assert "ready." in output, output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    kombu = [r for r in records if r["logger"].startswith("kombu") and r["level"] != "INFO"]
    assert kombu == [], kombu
    assert "No hostname was supplied" not in output
