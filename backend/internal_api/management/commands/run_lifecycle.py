"""``manage.py run_lifecycle [--once] [--interval S]``: publish the outbox and repair executions.

Runs :func:`backend.internal_api.lifecycle.run_pass` every ``--interval`` seconds (default
``LIFECYCLE_INTERVAL``) until SIGTERM or SIGINT, which stop it once the current pass is done.
``--once`` runs one pass and prints what it did as one JSON line. Several may run at once on
PostgreSQL. A broker it cannot use at start (``CELERY_BROKER_URL``) is one line on stderr and
exit 2; a broker or database that fails later is logged and tried again next pass.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from argparse import ArgumentParser, ArgumentTypeError
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections, connection

from backend.internal_api.lifecycle import run_pass
from backend.internal_api.publish import celery_app
from backend.workers.shared._redact import redact_url

logger = logging.getLogger("backend.lifecycle")

# How often the wait between passes looks at the stop flag (seconds).
_TICK = 0.05


def _interval(text: str) -> float:
    try:
        value = float(text) if text.isascii() else float("nan")
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 3600:
        raise ArgumentTypeError(f"must be a number of seconds from 0.01 to 3600, not {text!r}")
    return value


def broker_problem() -> str | None:
    """Connect to ``CELERY_BROKER_URL`` once: None when it answers, else one line saying why
    not, with the URL shown without its password."""
    url: str = settings.CELERY_BROKER_URL
    try:
        with celery_app().connection_for_write() as broker:
            broker.connect()
    except Exception as exc:  # whatever the kind of failure, it is the one line
        # kombu names an unknown scheme in a KeyError, whose str() is quoted.
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        reason = " ".join(text.split()) or type(exc).__name__
        password = urlsplit(url).password if "://" in url else None
        if password:
            reason = reason.replace(password, "***")
        return f"CELERY_BROKER_URL: cannot use {redact_url(url)}: {reason}"
    return None


class Command(BaseCommand):
    """The lifecycle process: one pass every interval until asked to stop."""

    help = "Publish executions' dispatches and repair lost executions, every interval."

    def add_arguments(self, parser: ArgumentParser) -> None:
        """``--once`` and ``--interval``."""
        parser.add_argument("--once", action="store_true", help="run one pass and exit")
        parser.add_argument(
            "--interval",
            type=_interval,
            default=None,
            help="seconds between passes (default: LIFECYCLE_INTERVAL, 2)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Check the broker, then run passes."""
        problem = broker_problem()
        if problem is not None:
            self.stderr.write(f"run_lifecycle: {problem}")
            sys.exit(2)
        if options["once"]:
            self.stdout.write(json.dumps(run_pass().as_dict()))
            return
        interval = options["interval"] or settings.LIFECYCLE_INTERVAL
        stopping: list[int] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            stopping.append(signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logger.info("run_lifecycle started", extra={"interval": interval})
        while not stopping:
            started = time.monotonic()
            self._pass()
            while not stopping and time.monotonic() - started < interval:
                time.sleep(_TICK)
        logger.info("run_lifecycle stopped", extra={"signal": signal.Signals(stopping[0]).name})

    def _pass(self) -> None:
        """One pass; a database failure is logged and the next pass reconnects."""
        close_old_connections()
        try:
            result = run_pass()
        except DatabaseError as exc:
            logger.error(
                "lifecycle pass failed: database error; retried next pass",
                extra={"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]},
            )
            connection.close()
            return
        counts = {name: value for name, value in result.as_dict().items() if value}
        if counts:
            logger.info("lifecycle pass", extra=counts)
