"""Request middleware: request ids and access lines, authentication, body limit, idempotency.

Order in ``settings.MIDDLEWARE`` (outermost first):

1. :class:`RequestContextMiddleware` takes ``X-Request-ID`` from the request (or makes one),
   binds it to every log line written while serving, echoes it, and writes one access line.
2. :class:`InternalAuthMiddleware` checks the Host header against ``ALLOWED_HOSTS`` (400)
   and guards everything under ``/internal/``: bearer key (401), then no header or query
   parameter holding what no database stores (NUL, an unpaired surrogate: 400 naming it),
   then the 1 MiB body limit (413), also for a body sent ``Transfer-Encoding: chunked``,
   which it reads here (Django itself reads only ``Content-Length`` bytes). Nothing of the
   ``Authorization`` header is logged or echoed.
3. ``idempotency.IdempotencyMiddleware`` gives POSTs carrying ``Idempotency-Key`` their
   replay semantics (see there).
"""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from django.conf import settings
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponse
from gunicorn.http.errors import ParseException

from backend.internal_api.auth import AuthProblem, authenticate
from backend.internal_api.errors import json_error, printable, unstorable_text

access_logger = logging.getLogger("backend.access")
logger = logging.getLogger("backend.internal_api")

INTERNAL_PREFIX = "/internal/"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
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
        # A 304 must not state a length other than its 200's, a 204 has none (RFC 9110).
        bodiless = response.status_code in (204, 304)
        if not response.streaming and not bodiless and not response.has_header("Content-Length"):
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
        """Check the Host header, authenticate, check the declared body size, then serve."""
        request.get_host()  # DisallowedHost (not in ALLOWED_HOSTS) becomes Django's 400
        if not request.path.startswith(INTERNAL_PREFIX):
            return self.get_response(request)
        try:
            authenticate(request.headers.get("Authorization"), tuple(settings.INTERNAL_API_KEYS))
        except AuthProblem as problem:
            logger.warning("authentication failed", extra={"error_code": problem.code})
            return json_error(401, problem.code, problem.detail, {"WWW-Authenticate": "Bearer"})
        refused = _unstorable_parameter(request)
        if refused is not None:
            return json_error(400, *refused)
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            return self._serve_chunked(request)
        raw_length = request.META.get("CONTENT_LENGTH") or "0"
        if not (raw_length.isascii() and raw_length.isdigit()):
            response = json_error(
                400, "bad_request", "the Content-Length header is not a number of bytes"
            )
            response["Connection"] = "close"  # where the body ends is unknown
            return response
        length = int(raw_length)
        if length > settings.MAX_REQUEST_BODY:
            response = _too_large()
            stream = request.META["wsgi.input"]
            if length > DRAIN_LIMIT or _drain(stream, length) < length:
                response["Connection"] = "close"
            return response
        return self.get_response(request)

    def _serve_chunked(self, request: HttpRequest) -> HttpResponse:
        """Read a chunked body (the server has de-chunked ``wsgi.input``) up to the limit and
        serve it as if it had come with a ``Content-Length``; 413 above the limit."""
        try:
            body = request.META["wsgi.input"].read(settings.MAX_REQUEST_BODY + 1)
        except (ParseException, OSError):
            response = json_error(400, "bad_request", "the chunked request body is malformed")
            response["Connection"] = "close"
            return response
        if len(body) > settings.MAX_REQUEST_BODY:
            response = _too_large()
            try:
                ended = _drain(request.META["wsgi.input"], DRAIN_LIMIT + 1) <= DRAIN_LIMIT
            except (ParseException, OSError):
                ended = False
            if not ended:
                response["Connection"] = "close"
            return response
        request.META["CONTENT_LENGTH"] = str(len(body))
        request._stream = io.BytesIO(body)  # what Django's request.read() reads from
        return self.get_response(request)


def _unstorable_parameter(request: HttpRequest) -> tuple[str, str] | None:
    """``(code, detail)`` for the first query parameter or header no database stores."""
    for name, values in request.GET.lists():
        for text in (name, *values):
            reason = unstorable_text(text)
            if reason is not None:
                return "validation_error", f"{printable(name)}: {reason}"
    for name, value in request.headers.items():
        reason = unstorable_text(value)
        if reason is not None:
            return "bad_request", f"the {printable(name)} header {reason}"
    return None


def _too_large() -> HttpResponse:
    return json_error(
        413, "payload_too_large", f"the request body exceeds {settings.MAX_REQUEST_BODY} bytes"
    )


def _drain(stream: Any, limit: int) -> int:
    """Read and drop at most ``limit`` bytes of a refused body (so that a client still sending
    it gets the 413 instead of a reset connection); returns how many there were."""
    dropped = 0
    while dropped < limit:
        chunk = stream.read(min(limit - dropped, 65536))
        if not chunk:
            break
        dropped += len(chunk)
    return dropped
