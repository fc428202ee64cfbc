"""kombu's filesystem transport with atomic message files (the embedded default broker).

kombu writes a message straight into its final ``*.msg`` name, and a consumer polling the
folder may move and read it before the write ends: the half-written JSON kills the worker
("Unrecoverable error: JSONDecodeError"). Here a message is written to a hidden temporary
name, which the consumer never matches, and renamed into place once complete.

The folders are the whole address: the transport has no host. kombu's virtual transports claim
a default host of ``localhost``, so every connection to ``filesystem://`` (the worker's, each
producer's, each clone) logged WARNING "No hostname was supplied"; here no default host exists.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear in the queue folder whole or not at all."""

    # kombu names this argument "message" in one base class and "payload" in the other.
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(message).encode())
            os.replace(partial, final)
        except OSError as exc:
            if os.path.exists(partial):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """The filesystem transport with :class:`Channel`'s atomic writes."""

    Channel = Channel

    @property
    def default_connection_params(self) -> dict[str, Any]:
        """No default host: a ``filesystem://`` URL names none, and none is needed."""
        return {"port": self.default_port}


def celery_conf(broker_dir: Path) -> dict[str, Any]:
    """Celery settings of the embedded broker in ``broker_dir``: the one folder layout that the
    workers consume and the backend publishes to (the folders are made when missing)."""
    folders = {name: Path(broker_dir) / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_transport": f"{__name__}:Transport",
        "broker_transport_options": {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": False,
            "control_folder": str(folders["control"]),
            # kombu polls the folder once a second by default: a prefork pool then idles up
            # to a second between tasks. 0.1 s costs a directory listing.
            "polling_interval": 0.1,
        },
    }
