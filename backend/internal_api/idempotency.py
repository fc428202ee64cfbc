"""``Idempotency-Key`` on POSTs under ``/internal/``: one execution per key, replays for 24 h.

The key (1 to 255 printable characters) is scoped by the ``X-Organization-ID`` header. A
keyed POST runs in one transaction that

1. takes a transaction-scoped lock on the key (PostgreSQL ``pg_try_advisory_xact_lock``; it
   never waits) and, in the same statement, looks the key up;
2. answers from the record when one exists (unexpired): the stored response (status, body,
   ``Content-Type`` and the ``REPLAYED_HEADERS`` it had, such as its ``ETag``) with
   ``Idempotent-Replayed: true`` when method, path and body are the same, else 422
   ``idempotency_key_reused``;
3. otherwise runs the view and, when it succeeded (2xx), inserts the record with its
   response, committing both together: a response is stored exactly when the view's writes
   are.

A request that finds the key locked answers 409 ``idempotency_in_flight`` with
``Retry-After``: another request with that key is running. On SQLite, whose writers are
serialized by the database lock, the second request waits for the first and then gets the
replay. Refusals (4xx: bad input, unknown organization, illegal transition) are not stored
and 5xx answers are rolled back, so a retry with the same key runs again and sees the state
of the moment. A lock dies with
its transaction, so a crashed request never leaves its key blocked. Expired records are
deleted lazily (at most every ``PURGE_INTERVAL`` seconds per process) and by
``manage.py purge_idempotency_records``.

Cost over a plain POST: BEGIN, the lock-and-look-up statement, the INSERT and COMMIT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from backend.internal_api.errors import database_unavailable, json_error
from backend.internal_api.models import IdempotencyRecord

logger = logging.getLogger("backend.internal_api")

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Headers of the first answer a replay repeats (Content-Type is stored on its own).
REPLAYED_HEADERS = ("ETag",)
PURGE_INTERVAL = 300.0
_TABLE = IdempotencyRecord._meta.db_table


class _LostRace(Exception):
    """Another request committed the same key between our look-up and our insert."""


class IdempotencyMiddleware:
    """Replay semantics for POSTs that carry an ``Idempotency-Key`` (module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self._last_purge = 0.0
        self._purge_lock = threading.Lock()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Serve a keyed POST under the key's rules; anything else passes straight through."""
        key = request.headers.get(HEADER)
        if key is None or request.method != "POST" or not request.path.startswith("/internal/"):
            return self.get_response(request)
        if "If-Match" in request.headers or "If-None-Match" in request.headers:
            # The view refuses a precondition on a POST (``contract.InternalView``): a replay
            # must not answer past that refusal, and a 400 is never stored.
            return self.get_response(request)
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            return json_error(
                400,
                "invalid_idempotency_key",
                f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable characters",
            )
        scope = request.headers.get("X-Organization-ID", "")
        key_digest = hashlib.sha256(f"{scope}\0{key}".encode()).digest()
        fingerprint = hashlib.sha256(f"{request.method}\0{request.path}\0".encode())
        fingerprint.update(request.body)
        try:
            self._purge_expired()
            for _ in range(3):
                try:
                    return self._serve(request, key_digest, fingerprint.hexdigest())
                except _LostRace:
                    continue
        except (OperationalError, InterfaceError):
            return database_unavailable()
        return _in_flight()

    def _serve(self, request: HttpRequest, key_digest: bytes, fingerprint: str) -> HttpResponse:
        key_hash = key_digest.hex()
        now = timezone.now()
        with transaction.atomic():
            locked, record = _lock_and_look_up(key_digest, key_hash, now)
            if not locked:
                return _in_flight()
            if record is not None:
                return _answer_from(record, fingerprint)
            response = self.get_response(request)
            if response.status_code >= 500:
                transaction.set_rollback(True)
            elif response.status_code < 400 and not _insert(key_hash, fingerprint, response, now):
                raise _LostRace  # leaving the block by an exception rolls the view back
            return response

    def _purge_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < PURGE_INTERVAL or not self._purge_lock.acquire(False):
            return
        try:
            self._last_purge = now
            deleted = purge_expired_records()
            if deleted:
                logger.info("expired idempotency records purged", extra={"deleted": deleted})
        finally:
            self._purge_lock.release()


def purge_expired_records() -> int:
    """Delete idempotency records past their expiry; returns how many were deleted."""
    deleted, _ = IdempotencyRecord.objects.filter(expires_at__lte=timezone.now()).delete()
    return deleted


def _in_flight() -> HttpResponse:
    return json_error(
        409,
        "idempotency_in_flight",
        f"a request with this {HEADER} is still being processed",
        {"Retry-After": "1"},
    )


def _answer_from(record: tuple[Any, ...], fingerprint: str) -> HttpResponse:
    stored_fingerprint, status, body, content_type, headers = record
    if stored_fingerprint != fingerprint:
        logger.info("idempotency key reused", extra={"idempotency": "mismatch"})
        return json_error(
            422,
            "idempotency_key_reused",
            f"this {HEADER} was used with another request (method, path or body differ)",
        )
    logger.info("idempotent replay", extra={"idempotency": "replay"})
    replay = HttpResponse(bytes(body), status=status, content_type=content_type)
    for name, value in json.loads(headers).items():
        replay[name] = value
    replay[REPLAY_HEADER] = "true"
    return replay


def _lock_and_look_up(
    key_digest: bytes, key_hash: str, now: datetime
) -> tuple[bool, tuple[Any, ...] | None]:
    """Lock the key (without waiting) and read its unexpired record, in one statement.

    An expired record is deleted here. The look-up's snapshot may predate the lock; a record
    committed in between shows up as a conflict at insert time (``_LostRace``).
    """
    if connection.vendor == "postgresql":
        lock = "pg_try_advisory_xact_lock(%s)"
    else:
        lock = "%s IS NOT NULL"  # SQLite: the transaction already holds the write lock
    lock_id = int.from_bytes(key_digest[:8], "big", signed=True)
    ops = connection.ops
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {lock}, r.fingerprint, r.response_status, r.response_body, "
            f"r.response_content_type, r.response_headers, r.expires_at > %s "
            f"FROM (SELECT 1 AS one) AS o "
            f"LEFT JOIN {_TABLE} AS r ON r.key_hash = %s",
            [lock_id, ops.adapt_datetimefield_value(now), key_hash],
        )
        locked, fingerprint, status, body, content_type, headers, fresh = cursor.fetchone()
        if not locked:
            return False, None
        if fingerprint is None:
            return True, None
        if not fresh:
            cursor.execute(f"DELETE FROM {_TABLE} WHERE key_hash = %s", [key_hash])
            return True, None
    return True, (fingerprint, status, body, content_type, headers)


def _insert(key_hash: str, fingerprint: str, response: HttpResponse, now: datetime) -> bool:
    """Store the response under the key; False if the key was committed meanwhile."""
    ops = connection.ops
    body = IdempotencyRecord._meta.get_field("response_body").get_db_prep_value(
        bytes(response.content), connection
    )
    expires = now + timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
    headers = {name: response[name] for name in REPLAYED_HEADERS if response.has_header(name)}
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_TABLE} (key_hash, fingerprint, response_status, response_body, "
            "response_content_type, response_headers, created_at, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (key_hash) DO NOTHING RETURNING key_hash",
            [
                key_hash,
                fingerprint,
                response.status_code,
                body,
                response.get("Content-Type", "application/json"),
                json.dumps(headers),
                ops.adapt_datetimefield_value(now),
                ops.adapt_datetimefield_value(expires),
            ],
        )
        return cursor.fetchone() is not None
