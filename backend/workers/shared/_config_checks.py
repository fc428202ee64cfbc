"""Checks of one setting's value for WorkerConfig: ValueErrors that never quote the value."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import ValidationInfo

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("structured", "simple")
MAX_URL_LENGTH = 2048
MAX_SECRET_LENGTH = 4096
_ASCII_SPACE = " \t\r\n\f\v"
_WEBHOOK_SECRET_PREFIX = "whsec_"  # Standard Webhooks' prefix (the standardwebhooks library's)


def visible_ascii_problem(text: str) -> str | None:
    """Why ``text`` is not visible ASCII (no space, no control character), by position only."""
    for position, char in enumerate(text, 1):
        if not char.isascii():
            return f"has a non-ASCII character at position {position}"
        if not char.isprintable() or char.isspace():
            return f"has a space or control character at position {position}"
    return None


def check_token(value: str, *, max_length: int) -> str:
    """A header-safe identifier: visible ASCII, at most ``max_length`` characters."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > max_length:
        raise ValueError(f"must be at most {max_length} characters")
    problem = visible_ascii_problem(value)
    if problem is not None:
        raise ValueError(f"{problem}: it goes into HTTP headers, which take visible ASCII")
    return value


def check_secret(text: str) -> None:
    """A secret fit for a header; the message names the problem, never a character of it."""
    if not text.strip():
        raise ValueError("must not be empty")
    if text != text.strip():
        raise ValueError(
            "has leading or trailing whitespace (a line break copied from a file?): remove it"
        )
    if len(text) > MAX_SECRET_LENGTH:
        raise ValueError(f"must be at most {MAX_SECRET_LENGTH} characters")
    problem = visible_ascii_problem(text)
    if problem is not None:
        raise ValueError(f"{problem} of {len(text)}: only visible ASCII can be sent")


def _split_url(value: str) -> SplitResult:
    """``value`` parsed, checked for what every URL setting needs (no secret in a message)."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    problem = visible_ascii_problem(value)
    if problem is not None:
        raise ValueError(f"{problem} (write an international host name in its xn-- form)")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (its port must be a number from 1 to 65535)") from None
    if port == 0:
        raise ValueError("has port 0: give the port the service listens on (1 to 65535)")
    return parts


def check_backend_url(value: str) -> str:
    parts = _split_url(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host, e.g. http://localhost:8000")
    root = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    if "@" in parts.netloc:
        raise ValueError(
            "must not hold a user or password (the client sends INTERNAL_SERVICE_API_KEY as "
            f"its bearer key; credentials in the URL would replace it): write {root}"
        )
    if parts.path.strip("/") or "?" in value or "#" in value:
        raise ValueError(
            f"must be the backend's root, without path, query or fragment: write {root} "
            "(the client adds /internal/v1/)"
        )
    return root


def check_transport_url(value: str, known: frozenset[str], example: str) -> str:
    """A Celery broker or result backend URL (``;`` separates failover URLs)."""
    for url in value.split(";"):
        parts = _split_url(url)
        scheme = parts.scheme.lower()
        if "://" not in url or not scheme:
            raise ValueError(f"must be a URL with a scheme, e.g. {example}")
        name = scheme.partition("+")[0]  # db+postgresql://, sqla+sqlite://, cache+memcached://
        if name not in known:
            schemes = ", ".join(f"{k}://" for k in sorted(known))
            raise ValueError(f"has scheme {name!r}, not one of {schemes}")
    return value


def broker_schemes() -> frozenset[str]:
    from kombu.transport import TRANSPORT_ALIASES  # imported only when a broker URL is set

    return frozenset(name.lower() for name in TRANSPORT_ALIASES)


#: The result backends Celery knows (``celery.app.backends.BACKEND_ALIASES``, which the tests
#: hold this equal to) and the ``db+``/``cache+`` prefixes: config imports nothing of Celery.
RESULT_BACKEND_SCHEMES = frozenset(
    (
        "arangodb", "azureblockblob", "cache", "cassandra", "consul", "cosmosdbsql",
        "couchbase", "couchdb", "database", "db", "disabled", "dynamodb", "elasticsearch",
        "file", "gs", "mongodb", "redis", "rediss", "riak", "rpc", "s3", "sentinel",
    )
)  # fmt: skip


def check_webhook_secret(text: str) -> None:
    """Standard Webhooks' form: base64, optionally prefixed with ``whsec_``."""
    check_secret(text)
    body = text.removeprefix(_WEBHOOK_SECRET_PREFIX)
    try:
        # The library pads and decodes leniently (dropping stray characters); strictly here,
        # so that what it signs with is exactly what was written.
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError(
            "must be a Standard Webhooks secret: base64 (A-Z, a-z, 0-9, +, /), optionally "
            "prefixed with whsec_"
        )


def check_data_dir(path: Path) -> Path:
    """A folder that exists and is writable, or can be created in a writable one."""
    try:
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            shown = "it is" if probe == path else f"{probe} is"
            raise ValueError(f"cannot be used as a folder: {shown} a file")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(f"is not writable ({probe} refuses new files)")
    except OSError as exc:
        raise ValueError(f"cannot be used: {exc.strerror or exc}") from None
    return path


def check_order(value: float, info: ValidationInfo, other: str, must_be: str) -> float:
    """``value`` against the setting ``other`` (validated before it, when valid):
    ``must_be`` is ``"below"``, ``"at most"`` or ``"at least"``."""
    limit = info.data.get(other)
    if limit is None:
        return value
    ok = {"below": value < limit, "at most": value <= limit, "at least": value >= limit}
    if not ok[must_be]:
        raise ValueError(f"must be {must_be} {other.upper()} ({limit:g})")
    return value


def strip_ascii(value: str) -> str:
    """``value`` without ASCII whitespace at its ends (a line break or other Unicode space
    stays, and is refused by the checks)."""
    return value.strip(_ASCII_SPACE)


def check_log_level(value: Any) -> str:
    """``LOG_LEVEL``: one of :data:`LOG_LEVELS`, any case."""
    if isinstance(value, str) and value.isascii() and strip_ascii(value).upper() in LOG_LEVELS:
        return strip_ascii(value).upper()
    raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")


def check_log_format(value: Any) -> str:
    """``LOG_FORMAT``: one of :data:`LOG_FORMATS`, any case."""
    if isinstance(value, str) and value.isascii() and strip_ascii(value).lower() in LOG_FORMATS:
        return strip_ascii(value).lower()
    raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")


def split_csv(value: Any) -> Any:
    """A comma-separated text as its stripped, non-empty items (any other value as it is)."""
    if isinstance(value, str):
        return [strip_ascii(item) for item in value.split(",") if strip_ascii(item)]
    return value
