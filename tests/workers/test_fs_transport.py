"""The embedded filesystem broker delivers every message whole, even to a fast poller."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from kombu import Connection

from backend.workers.shared import WorkerConfig

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
