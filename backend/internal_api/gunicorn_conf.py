"""gunicorn settings of the backend: ``gunicorn -c python:backend.internal_api.gunicorn_conf``.

``gthread`` workers keep client connections alive (the workers' pools rely on it; gunicorn's
default sync workers close every connection). gunicorn's own lines come out as the same JSON
lines as Django's; its access log is off because the request middleware writes one JSON access
line per request, with the request id. Command-line options override these values;
``GUNICORN_WORKERS``/``GUNICORN_THREADS`` set the process and thread counts.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.glogging import Logger

from backend.internal_api.logconfig import logging_config


class JsonLogger(Logger):
    """gunicorn's logger minus its access log, which the request middleware replaces.

    With ``logconfig_dict`` set, gunicorn would otherwise build its access-log fields for
    every request only to drop them.
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """No gunicorn access line: the middleware writes one, with the request id."""


wsgi_app = "backend.wsgi:application"
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
keepalive = 75
graceful_timeout = 10
accesslog = None
logger_class = JsonLogger
# gunicorn's control socket has one fixed path per user: several servers on one machine (tests
# run side by side) would fight over it, and nothing here uses it.
control_socket_disable = True
logconfig_dict = logging_config(os.environ.get("LOG_LEVEL", "INFO").upper())
