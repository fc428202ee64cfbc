"""The backend's logging: one JSON object per line on stderr, with the request's id in it.

Rendering is structlog's ``ProcessorFormatter`` over the standard library, so Django's,
gunicorn's and our own lines come out alike. Fields bound with
``structlog.contextvars.bind_contextvars`` (the middleware binds ``request_id``) appear in every
line written while they are bound. Only the ``extra`` names in :data:`EXTRA_FIELDS` are
rendered: a stray object passed as ``extra`` (Django passes the whole request) never reaches
the output.
"""

from __future__ import annotations

from typing import Any

import structlog

EXTRA_FIELDS = {
    "method",  # access line
    "path",
    "status",
    "duration_ms",
    "status_code",  # Django's request lines
    "error_code",  # refusals
    "idempotency",
    "deleted",  # purge of expired idempotency records
    # run_lifecycle: a repair, a pass's counts, a publish or pass that failed
    "execution_id",
    "organization_id",
    "repair",
    "lost_count",
    "attempts",
    "dispatch_id",
    "error",
    "interval",
    "signal",
    "published",
    "publish_failed",
    "requeued",
    "lost",
    "redispatched",
    "webhooks_rehanded",
}


def _formatter() -> dict[str, Any]:
    return {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
        "foreign_pre_chain": [
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(allow=EXTRA_FIELDS),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    }


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary: everything as JSON lines on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": _formatter()},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # Propagate to the root handler only; no handler of their own (no double lines).
            "django": {"handlers": [], "level": level, "propagate": True},
            # 4xx lines duplicate the access line; 5xx (ERROR) lines still come out.
            "django.request": {"handlers": [], "level": "ERROR", "propagate": True},
            "gunicorn.error": {"handlers": [], "level": level, "propagate": True},
            "gunicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
        },
    }
