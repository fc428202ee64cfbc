"""What must never be printed: sensitive field names, configured secret values, URL passwords.

Kept free of heavy imports so that ``WorkerConfig`` can register its secrets here on
construction. The log pipeline masks fields whose name looks sensitive and scrubs every
registered secret value from the text it writes; the client's error texts are scrubbed the
same way; every URL that is shown (``check``, ``repr``, errors, breaker names, webhook
records) goes through :func:`redact_url` first.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "**********"
# Environment variables whose values are secrets even when no WorkerConfig was built.
SECRET_ENV_VARS = ("INTERNAL_SERVICE_API_KEY", "WEBHOOK_SIGNING_SECRET")
# Shorter values are too likely to occur by chance in ordinary text to be scrubbed.
MIN_SECRET_LENGTH = 4
_SENSITIVE_WORDS = frozenset(
    {
        "authorization",
        "auth",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "apikey",
        "cookie",
        "credential",
        "credentials",
        "signature",
    }
)
_SENSITIVE_PAIRS = ("api_key", "access_key", "private_key", "secret_key", "client_secret")
_WORD_SPLIT = re.compile(r"[_\-.\s]+")

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
KEY_CACHE: dict[str, bool] = {}  # field name -> sensitive, filled by is_sensitive_key


def is_sensitive_key(key: str) -> bool:
    """True for a field name like ``authorization``, ``api_key``, ``x-auth-token``, ``password``."""
    cached = KEY_CACHE.get(key)
    if cached is None:
        norm = _WORD_SPLIT.sub("_", key.lower()).strip("_")
        cached = any(pair in norm for pair in _SENSITIVE_PAIRS) or any(
            word in _SENSITIVE_WORDS for word in norm.split("_")
        )
        if len(KEY_CACHE) < 4096:
            KEY_CACHE[key] = cached
    return cached


def register_secrets(values: Iterable[str | None]) -> None:
    """Add secret values to scrub from every log line (comma-separated keys count one by one)."""
    global _secrets
    found: set[str] = set()
    for value in values:
        if not value:
            continue
        for candidate in (value, *value.split(",")):
            candidate = candidate.strip()
            if len(candidate) >= MIN_SECRET_LENGTH:
                found.add(candidate)
                escaped = json.dumps(candidate)[1:-1]
                if escaped != candidate:
                    found.add(escaped)
    with _lock:
        merged = set(_secrets) | found
        # Longest first, so a key that contains another is replaced whole.
        _secrets = tuple(sorted(merged, key=len, reverse=True))


def register_from_environment() -> None:
    """Register the secrets found in the process environment."""
    register_secrets(os.environ.get(name) for name in SECRET_ENV_VARS)


def scrub(text: str) -> str:
    """``text`` with every registered secret value replaced by the mask."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_fields(fields: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A copy of ``fields`` with sensitive names masked, nested mappings included."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(key, str) and is_sensitive_key(key):
            out[key] = MASK if value is not None else None
        elif isinstance(value, dict) and depth < 4:
            out[key] = redact_fields(value, depth + 1)
        else:
            out[key] = value
    return out


def redact_url(url: str) -> str:
    """``url`` fit to show: a ``user:password@`` part becomes ``**********@`` and the value of a
    query parameter named like a secret (``?password=...``) the mask. A ``;``-separated list
    (Celery's failover form) is redacted URL by URL. Never raises, whatever the text."""
    return ";".join(_redact_one_url(part) for part in str(url).split(";"))


def _redact_one_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    tail, hash_sign, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if query:
        pairs = []
        for pair in query.split("&"):
            name, equals, _value = pair.partition("=")
            pairs.append(f"{name}={MASK}" if equals and is_sensitive_key(unquote(name)) else pair)
        query = "&".join(pairs)
    return f"{scheme}{sep}{authority}{path}{question}{query}{hash_sign}{fragment}"
