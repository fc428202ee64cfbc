"""Settings of the Django project ``backend``, all read from the environment here.

Variables:

- ``INTERNAL_SERVICE_API_KEY`` (required): the bearer key(s) workers present; several keys
  separated by commas are all accepted, which allows rotation. A key is printable ASCII
  without spaces (``!`` to ``~``); any other character stops the start with an error that
  names the variable and the key's position, never the value.
- ``DATABASE_URL``: default ``sqlite:///<BACKEND_DATA_DIR>/backend.sqlite3``; PostgreSQL as
  ``postgresql://user@host:5432/name``. Connections are persistent (``CONN_MAX_AGE``).
- ``BACKEND_DATA_DIR``: where the default SQLite file lives (default ``<repo>/.data``).
- ``DEBUG``: off unless ``true``/``1``/``yes``.
- ``ALLOWED_HOSTS``: comma-separated (default ``localhost,127.0.0.1,[::1]``).
- ``DJANGO_SECRET_KEY``: signs admin sessions; when unset it is derived from the API key.
- ``LOG_LEVEL``: level of the JSON log lines on stderr (default ``INFO``).
- ``CONN_MAX_AGE``: seconds a database connection is kept (default 600).
- ``DATABASE_PREPARE_THRESHOLD``: PostgreSQL only; after this many runs on a connection a
  statement is kept prepared (default 5; ``off`` disables, as a transaction-pooling proxy
  needs).

Execution lifecycle (``lifecycle``, ``publish``; DESIGN.md "Execution lifecycle"):

- ``CELERY_BROKER_URL``: where the backend publishes executions' Celery messages (default
  ``filesystem://``: the embedded broker in ``WORKER_DATA_DIR/broker``, the workers' folders
  and transport).
- ``WORKER_DATA_DIR``: the workers' data folder (default ``.data``), for the embedded broker.
- ``EXECUTION_MAX_ATTEMPTS``: losses (leases run out, or unleased timeouts) before a lost
  execution ends ERROR (default 5); claims given back by their holder (a transient re-queue)
  do not count.
- ``DISPATCH_TIMEOUT``: seconds a QUEUED execution may wait for its claim before it is
  dispatched again (default 30); it doubles with each dispatch nobody claimed, up to
  ``DISPATCH_TIMEOUT_MAX``.
- ``DISPATCH_TIMEOUT_MAX``: the largest wait between two unclaimed dispatches (default 600).
- ``EXECUTION_MAX_DISPATCHES``: dispatches without a claim before the execution ends ERROR
  "never claimed: task X on queue Y" (default 10).
- ``DISPATCH_MAX_FAILURES``: publishes of one outbox row a reachable broker refuses before the
  row is given up and its execution ends ERROR "cannot be dispatched: ..." (default 5).
- ``UNLEASED_TIMEOUT``: seconds an IN_PROGRESS execution without a lease (a plain task) is
  left alone (default 3600).
- ``WEBHOOK_DUE_TIMEOUT``: seconds a due webhook handed to a worker may stay unrecorded
  before it is handed again (default 60).
- ``WEBHOOK_MAX_ATTEMPTS``: hand-outs of a due webhook (the finisher's, then each claim's)
  without a ``delivered`` record before it is given up as failed for good (default 5); a
  ``blocked`` record gives it up at once.
- ``LIFECYCLE_INTERVAL``: seconds between two passes of ``run_lifecycle`` (default 2).
- ``LEASE_MAX_SECONDS``: the largest ``lease_seconds`` a claim may ask for (default 3600).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from backend.internal_api.logconfig import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
_TRUE = ("1", "true", "yes", "on")
_ASCII_SPACE = " \t\n\r\x0b\x0c"
# What a bearer key can be: a header value's visible ASCII (a space would end the token).
_API_KEY = re.compile(r"[!-~]+")


def _csv(value: str) -> list[str]:
    """The comma-separated items of ``value``, ASCII whitespace around each removed."""
    return [item.strip(_ASCII_SPACE) for item in value.split(",") if item.strip(_ASCII_SPACE)]


def _number(name: str, default: float, low: float, high: float) -> float:
    """The environment variable ``name`` as a number from ``low`` to ``high`` (seconds)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw) if raw.isascii() else float("nan")
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ImproperlyConfigured(f"{name}: must be a number from {low:g} to {high:g}")
    return value


def _integer(name: str, default: int, low: int, high: int) -> int:
    """The environment variable ``name`` as a whole number from ``low`` to ``high``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and low <= int(raw) <= high):
        raise ImproperlyConfigured(f"{name}: must be a whole number from {low} to {high}")
    return int(raw)


def _api_keys(value: str) -> tuple[str, ...]:
    """The keys of ``INTERNAL_SERVICE_API_KEY``; ImproperlyConfigured (never showing a key)
    when there is none or one holds a character no ``Authorization`` header can carry."""
    keys = tuple(_csv(value))
    if not keys:
        raise ImproperlyConfigured(
            "INTERNAL_SERVICE_API_KEY is not set: the backend refuses to start without an API key"
        )
    for number, key in enumerate(keys, 1):
        if not _API_KEY.fullmatch(key):
            raise ImproperlyConfigured(
                f"INTERNAL_SERVICE_API_KEY: key {number} of {len(keys)} holds a space, a control "
                "character or a character that is not ASCII; a key is printable ASCII "
                "(! to ~) (the value is not shown)"
            )
    return keys


INTERNAL_API_KEYS = _api_keys(os.environ.get("INTERNAL_SERVICE_API_KEY", ""))

DEBUG = os.environ.get("DEBUG", "").strip().lower() in _TRUE
ALLOWED_HOSTS = _csv(os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]"))
SECRET_KEY = (
    os.environ.get("DJANGO_SECRET_KEY")
    or hashlib.sha256(b"backend-django-secret-key\0" + INTERNAL_API_KEYS[0].encode()).hexdigest()
)

DATA_DIR = Path(os.environ.get("BACKEND_DATA_DIR") or BASE_DIR / ".data")
_default_db = f"sqlite:///{DATA_DIR / 'backend.sqlite3'}"
_conn_max_age = int(os.environ.get("CONN_MAX_AGE", "600"))
_database_url = os.environ.get("DATABASE_URL") or _default_db
try:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=_conn_max_age)}
except dj_database_url.UnknownSchemeError:
    _scheme = _database_url.partition(":")[0][:20]
    raise ImproperlyConfigured(
        f"DATABASE_URL: unknown scheme {_scheme!r}: use postgresql://user@host:5432/name "
        "or sqlite:////absolute/path.sqlite3"
    ) from None
except ValueError:
    raise ImproperlyConfigured(
        "DATABASE_URL is not a valid URL (percent-encode special characters in the password)"
    ) from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Parameters bound by the server, and statements a connection has run a few times kept
    # prepared (no parse and plan per request). Behind a transaction-pooling proxy such as
    # PgBouncer, set DATABASE_PREPARE_THRESHOLD=off.
    _threshold = os.environ.get("DATABASE_PREPARE_THRESHOLD", "5").strip().lower()
    DATABASES["default"]["OPTIONS"] = {
        "server_side_binding": True,
        "prepare_threshold": None if _threshold in ("", "off", "none") else int(_threshold),
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if DATABASES["default"]["NAME"] == str(DATA_DIR / "backend.sqlite3"):
        DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        # Writers wait for each other instead of failing; WAL lets readers run beside them.
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "backend.internal_api",
]

MIDDLEWARE = [
    "backend.internal_api.middleware.RequestContextMiddleware",
    "backend.internal_api.middleware.InternalAuthMiddleware",
    "backend.internal_api.idempotency.IdempotencyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "backend.urls"
WSGI_APPLICATION = "backend.wsgi.application"
APPEND_SLASH = False
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Requests above 1 MiB are refused with 413 by the middleware before the body is read.
MAX_REQUEST_BODY = 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
ORGANIZATION_CACHE_SECONDS = 60.0

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["backend.internal_api.errors.StrictJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "backend.internal_api.errors.StrictContentNegotiation",
    "EXCEPTION_HANDLER": "backend.internal_api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "backend.internal_api.schema.ContractAutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Internal API",
    "DESCRIPTION": "The backend API that lightweight workers call over HTTP.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": [],
    "APPEND_COMPONENTS": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    "SECURITY": [{"bearerAuth": []}],
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "backend.internal_api.schema.state_enforced_constraints",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ExecutionStatusEnum": "backend.internal_api.models.ExecutionStatus",
        "DeliveryOutcomeEnum": "backend.internal_api.models.DeliveryOutcome",
        "FileStatusEnum": "backend.internal_api.models.FileStatus",
    },
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "").strip() or "filesystem://"
WORKER_DATA_DIR = Path(os.environ.get("WORKER_DATA_DIR", "").strip() or ".data")
EXECUTION_MAX_ATTEMPTS = _integer("EXECUTION_MAX_ATTEMPTS", 5, 1, 1000)
DISPATCH_TIMEOUT = _number("DISPATCH_TIMEOUT", 30.0, 0.1, 86400.0)
DISPATCH_TIMEOUT_MAX = max(DISPATCH_TIMEOUT, _number("DISPATCH_TIMEOUT_MAX", 600.0, 0.1, 86400.0))
EXECUTION_MAX_DISPATCHES = _integer("EXECUTION_MAX_DISPATCHES", 10, 1, 1000)
DISPATCH_MAX_FAILURES = _integer("DISPATCH_MAX_FAILURES", 5, 1, 1000)
UNLEASED_TIMEOUT = _number("UNLEASED_TIMEOUT", 3600.0, 1.0, 30 * 86400.0)
WEBHOOK_DUE_TIMEOUT = _number("WEBHOOK_DUE_TIMEOUT", 60.0, 0.1, 86400.0)
WEBHOOK_MAX_ATTEMPTS = _integer("WEBHOOK_MAX_ATTEMPTS", 5, 1, 1000)
LIFECYCLE_INTERVAL = _number("LIFECYCLE_INTERVAL", 2.0, 0.05, 3600.0)
LEASE_MAX_SECONDS = _integer("LEASE_MAX_SECONDS", 3600, 1, 2**31 - 1)

LOGGING = logging_config(os.environ.get("LOG_LEVEL", "INFO").upper())
