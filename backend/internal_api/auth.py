"""Bearer-key authentication of ``/internal/``: constant-time, several keys for rotation.

Keys come from ``settings.INTERNAL_API_KEYS`` (``INTERNAL_SERVICE_API_KEY``, comma-separated).
The presented key is hashed and compared with every configured key's hash using
``hmac.compare_digest``, without stopping at the first match, so neither the position of a
match nor a key's length shows in the timing. No key, nor any part of one, is ever logged or
put in a response.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache


@lru_cache(maxsize=8)
def _digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(key.encode()).digest() for key in keys)


class AuthProblem(Exception):
    """Why a request is not authenticated: ``code`` and ``detail`` for the 401 body."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def authenticate(header: str | None, keys: tuple[str, ...]) -> None:
    """Accept an ``Authorization`` header carrying one of ``keys``, else raise AuthProblem."""
    if not header:
        raise AuthProblem("authentication_required", "the Authorization header is missing")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthProblem(
            "invalid_authorization", "the Authorization header must be 'Bearer <api key>'"
        )
    presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    matched = 0
    for digest in _digests(keys):
        matched |= hmac.compare_digest(presented, digest)
    if not matched:
        raise AuthProblem("invalid_api_key", "the API key is not valid")
