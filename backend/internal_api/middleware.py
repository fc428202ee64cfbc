"""Request middleware: request ids and access lines, authentication, body limit, idempotency.

Order in ``settings.MIDDLEWARE`` (outermost first):

1. :class:`RequestContextMiddleware` takes ``X-Request-ID`` from the request (or makes one),
   binds it to every log line written while serving, echoes it, and writes one access line.
2. :class:`InternalAuthMiddleware` guards everything under ``/internal/``: bearer key (401),
   then the 1 MiB body limit (413). Nothing of the ``Authorization`` header is logged or echoed.
3. :class:`IdempotencyMiddleware` gives POSTs carrying ``Idempotency-Key`` their replay
   semantics (see its docstring).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import structlog
from django.conf import settings
from django.core.signals import request_finished
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from backend.internal_api.auth import AuthProblem, authenticate
from backend.internal_api.errors import json_error
from backend.internal_api.models import IdempotencyRecord

access_logger = logging.getLogger("backend.access")
logger = logging.getLogger("backend.internal_api")

INTERNAL_PREFIX = "/internal/"
REQUEST_ID_HEADER = "X-Request-ID"
REPLAY_HEADER = "Idempotent-Replayed"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_MAX_IDEMPOTENCY_KEY = 255
# A refused body up to this size is read and dropped; a bigger one closes the connection.
DRAIN_LIMIT = 16 * 1024 * 1024

GetResponse = Callable[[HttpRequest], HttpResponse]


class RequestContextMiddleware:
    """Request id in, request id out, request id in every log line; one access line each."""

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Serve the request with ``request_id`` bound to the logging context."""
        started = time.perf_counter()
        presented = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = presented if _REQUEST_ID.fullmatch(presented) else uuid.uuid4().hex
        # Unbound when the response is closed (``request_finished``), so that Django's own
        # lines written after the middleware returns still carry the id.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        if not response.streaming and not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        access_logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return response


def _unbind_request_id(**kwargs: object) -> None:
    structlog.contextvars.unbind_contextvars("request_id")


request_finished.connect(_unbind_request_id, dispatch_uid="backend.unbind_request_id")


class InternalAuthMiddleware:
    """401 for any ``/internal/`` request without a valid bearer key; 413 above 1 MiB."""

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Authenticate, check the declared body size, then serve."""
        if not request.path.startswith(INTERNAL_PREFIX):
            return self.get_response(request)
        try:
            authenticate(request.headers.get("Authorization"), tuple(settings.INTERNAL_API_KEYS))
        except AuthProblem as problem:
            logger.warning("authentication failed", extra={"error_code": problem.code})
            return json_error(401, problem.code, problem.detail, {"WWW-Authenticate": "Bearer"})
        length = request.META.get("CONTENT_LENGTH") or "0"
        if not length.isdigit() or int(length) > settings.MAX_REQUEST_BODY:
            response = json_error(
                413,
                "payload_too_large",
                f"the request body exceeds {settings.MAX_REQUEST_BODY} bytes",
            )
            if not _discard_body(request, int(length) if length.isdigit() else -1):
                response["Connection"] = "close"
            return response
        return self.get_response(request)


def _discard_body(request: HttpRequest, length: int) -> bool:
    """Read and drop a refused body of moderate size, so that a client still sending it gets
    the 413 instead of a reset connection. False when the body is too big to bother with."""
    if not 0 <= length <= DRAIN_LIMIT:
        return False
    stream = request.META["wsgi.input"]
    remaining = length
    while remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)
    return True


class IdempotencyMiddleware:
    """``Idempotency-Key`` on a POST: one execution per key, replays for 24 hours.

    The key (≤ 255 printable characters) is scoped by the ``X-Organization-ID`` header. The
    first request claims it with an in-flight record (committed at once), then runs the view
    and stores the response in the same transaction as the view's writes. Afterwards:

    - same key, same method, path and body: the stored response again, with
      ``Idempotent-Replayed: true``;
    - same key, anything else different: 422 ``idempotency_key_reused``;
    - while the first request still runs: 409 ``idempotency_in_flight`` with ``Retry-After``.

    A 5xx answer is not stored (the claim is released, so a retry runs again); an in-flight
    claim older than ``IDEMPOTENCY_IN_FLIGHT_TIMEOUT`` belongs to a request that died and is
    taken over. Expired records are deleted lazily (at most every few minutes per process) and
    by ``manage.py purge_idempotency_records``.
    """

    PURGE_INTERVAL = 300.0

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self._last_purge = 0.0
        self._purge_lock = threading.Lock()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Serve a POST under the key's rules; anything else passes straight through."""
        key = request.headers.get("Idempotency-Key")
        if key is None or request.method != "POST" or not request.path.startswith(INTERNAL_PREFIX):
            return self.get_response(request)
        if not key or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isprintable():
            return json_error(
                400,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} printable characters",
            )
        self._purge_expired()
        scope = request.headers.get("X-Organization-ID", "")
        key_hash = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        digest = hashlib.sha256(f"{request.method}\0{request.path}\0".encode())
        digest.update(request.body)
        fingerprint = digest.hexdigest()

        answer = self._claim(key_hash, fingerprint)
        if answer is not None:
            return answer
        try:
            with transaction.atomic():
                response = self.get_response(request)
                if response.status_code >= 500:
                    transaction.set_rollback(True)
                else:
                    IdempotencyRecord.objects.filter(pk=key_hash).update(
                        response_status=response.status_code,
                        response_body=bytes(response.content),
                        response_content_type=response.get("Content-Type", ""),
                    )
        except BaseException:
            self._release(key_hash)
            raise
        if response.status_code >= 500:
            self._release(key_hash)
        return response

    def _claim(self, key_hash: str, fingerprint: str) -> HttpResponse | None:
        """None when this request now owns the key, else the answer to give instead."""
        for _ in range(3):
            now = timezone.now()
            if _insert_claim(key_hash, fingerprint, now):
                return None
            record = IdempotencyRecord.objects.filter(pk=key_hash).first()
            if record is None:
                continue
            if record.expires_at <= now:
                IdempotencyRecord.objects.filter(pk=key_hash, expires_at__lte=now).delete()
                continue
            if record.fingerprint != fingerprint:
                logger.info("idempotency key reused", extra={"idempotency": "mismatch"})
                return json_error(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with another request "
                    "(method, path or body differ)",
                )
            if record.response_status is None:
                stale = now - timedelta(seconds=settings.IDEMPOTENCY_IN_FLIGHT_TIMEOUT)
                if record.created_at < stale and IdempotencyRecord.objects.filter(
                    pk=key_hash, response_status__isnull=True, created_at=record.created_at
                ).update(created_at=now):
                    return None
                return json_error(
                    409,
                    "idempotency_in_flight",
                    "a request with this Idempotency-Key is still being processed",
                    {"Retry-After": "1"},
                )
            logger.info("idempotent replay", extra={"idempotency": "replay"})
            replay = HttpResponse(
                bytes(record.response_body or b""),
                status=record.response_status,
                content_type=record.response_content_type or "application/json",
            )
            replay[REPLAY_HEADER] = "true"
            return replay
        return json_error(
            409,
            "idempotency_in_flight",
            "a request with this Idempotency-Key is contended; retry",
            {"Retry-After": "1"},
        )

    @staticmethod
    def _release(key_hash: str) -> None:
        IdempotencyRecord.objects.filter(pk=key_hash, response_status__isnull=True).delete()

    def _purge_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < self.PURGE_INTERVAL or not self._purge_lock.acquire(False):
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


def _insert_claim(key_hash: str, fingerprint: str, now: object) -> bool:
    """Insert an in-flight record unless the key exists; True when this call inserted it."""
    table = IdempotencyRecord._meta.db_table
    ops = connection.ops
    expires = now + timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)  # type: ignore[operator]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (key_hash, fingerprint, response_content_type, created_at, "
            "expires_at) VALUES (%s, %s, '', %s, %s) ON CONFLICT (key_hash) DO NOTHING "
            "RETURNING key_hash",
            [
                key_hash,
                fingerprint,
                ops.adapt_datetimefield_value(now),
                ops.adapt_datetimefield_value(expires),
            ],
        )
        return cursor.fetchone() is not None
