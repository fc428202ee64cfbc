"""gunicorn settings of the backend: ``gunicorn -c python:backend.internal_api.gunicorn_conf``.

``gthread`` workers keep client connections alive (the workers' pools rely on it; gunicorn's
default sync workers close every connection). gunicorn's own lines come out as the same JSON
lines as Django's; its access log is off because the request middleware writes one JSON access
line per request, with the request id. Command-line options override these values;
``GUNICORN_WORKERS``/``GUNICORN_THREADS`` set the process and thread counts.

Before any worker starts, the master connects to the database once: a ``DATABASE_URL`` that
cannot be used (no such database, host, user or password) stops the start with one line naming
it (:func:`on_starting`). The workers are :class:`ThreadWorker`: gthread workers that give the
listening port back as soon as their master is gone (``kill -9`` of the master), so that a new
backend can bind it at once while they finish the requests they are serving.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker

from backend.internal_api.logconfig import logging_config


class JsonLogger(Logger):
    """gunicorn's logger minus its access log, which the request middleware replaces.

    With ``logconfig_dict`` set, gunicorn would otherwise build its access-log fields for
    every request only to drop them.
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """No gunicorn access line: the middleware writes one, with the request id."""


class ThreadWorker(GthreadWorker):
    """gthread that closes its listening sockets as soon as its master dies.

    gthread notices a new parent within a second, but keeps listening while it finishes its
    connections (up to ``graceful_timeout``), and a new master cannot bind the port until then.
    On Linux the kernel also sends the worker SIGTERM when the master dies
    (``PR_SET_PDEATHSIG``), which wakes it at once.
    """

    def init_process(self) -> None:
        """Ask for SIGTERM at the master's death, then run as gthread does."""
        if sys.platform == "linux":
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        super().init_process()

    def is_parent_alive(self) -> bool:
        """gthread's check; when the master is gone, also stop listening right away."""
        if super().is_parent_alive():
            return True
        self.set_accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        return False


def on_starting(server: Any) -> None:
    """gunicorn hook (master, before the workers): stop with one line if the settings are bad
    or the database cannot be used; closes its connection so that no worker inherits it."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.settings")
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ImproperlyConfigured as exc:
        print(f"backend: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    from backend.internal_api.database import connection_problem

    problem = connection_problem()
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        sys.exit(1)


wsgi_app = "backend.wsgi:application"
worker_class = "backend.internal_api.gunicorn_conf.ThreadWorker"
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
