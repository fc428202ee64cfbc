"""Every error the backend answers, in one shape: ``{"error": "<code>", "detail": "<message>"}``.

Views raise :class:`APIError` (or DRF's own exceptions); :func:`exception_handler` turns each
into the shape above; the ``handler*`` views cover what happens outside DRF (unknown URL,
Django's own 400/403, an uncaught exception). Every error is written as JSON here, whatever
the request's ``Accept`` header or ``?format=`` asked for. A database that cannot be reached is
a 503 with ``Retry-After``, never a 500 with a stack trace. Nothing a caller sent is echoed
back except the offending field names and values of its JSON body, escaped and shortened
(:func:`printable`).

The JSON parser refuses, anywhere in a body, what no database stores: strings with NUL or an
unpaired surrogate (``"\\ud800"``) and numbers that overflow (``1e309``), as a 400 naming the
field; every endpoint gets this without declaring it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser

logger = logging.getLogger("backend.internal_api")

DB_RETRY_AFTER_SECONDS = 1
# Longest echo of a caller's field name, longest message about one field (it may quote the
# value), longest ``detail`` written.
MAX_ECHO = 100
MAX_MESSAGE = 300
MAX_DETAIL = 2000


def printable(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` safe to put in an answer or a log line: characters that are not printable
    (control characters, NUL, unpaired surrogates) as ``\\x..``/``\\u....`` escapes, and at
    most ``limit`` characters of it, ``...`` marking a cut."""
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else _escape(c) for c in head)
    return head + "..." if len(text) > limit else head


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class APIError(exceptions.APIException):
    """An error answer with an explicit HTTP status, error code and message (and headers,
    such as ``Retry-After``)."""

    def __init__(
        self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail=detail, code=code)
        self.status_code = status_code
        self.error_code = code
        self.message = detail
        self.headers = headers or {}


def json_error(
    status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> HttpResponse:
    """A plain Django response in the error shape (for middleware and non-DRF handlers)."""
    response = HttpResponse(
        json.dumps({"error": code, "detail": printable(detail, MAX_DETAIL)}),
        status=status_code,
        content_type="application/json",
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, refusing what cannot be stored and too-deep nesting (400s)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        """Parse the body; malformed or absurdly nested JSON is a ``ParseError`` (400), a
        value no database stores a ``ValidationError`` naming its field (400)."""
        try:
            data = super().parse(stream, media_type, parser_context)
            problem = _unstorable(data)
        except RecursionError:
            raise exceptions.ParseError("JSON body is nested too deeply") from None
        if problem is not None:
            path, message = problem
            raise exceptions.ValidationError({_dotted(path) or "body": [message]})
        return data


def unstorable_text(text: str) -> str | None:
    """Why ``text`` cannot be stored (NUL, an unpaired surrogate), or None when it can."""
    if "\x00" in text:
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"must not contain an unpaired surrogate ({_escape(text[exc.start])})"
    return None


def _dotted(parts: list[str]) -> str:
    """``a.b[0]`` of the path parts ``["[0]", "b", "a"]`` (innermost first)."""
    out = ""
    for part in reversed(parts):
        out += part if part.startswith("[") or not out else f".{part}"
    return out


def _unstorable(value: Any) -> tuple[list[str], str] | None:
    """The first ``(field path, reason)`` of ``value`` no database stores, else None; the
    path's parts come innermost first (they are named only once a problem is found)."""
    if isinstance(value, str):
        reason = unstorable_text(value)
        return None if reason is None else ([], reason)
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], "numbers must be finite (out of range)")
    if isinstance(value, dict):
        for key, item in value.items():
            reason = unstorable_text(key)
            problem = ([], f"field names {reason}") if reason else _unstorable(item)
            if problem is not None:
                problem[0].append(printable(key))
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problem = _unstorable(item)
            if problem is not None:
                problem[0].append(f"[{index}]")
                return problem
    return None


class StrictContentNegotiation(DefaultContentNegotiation):
    """DRF's content negotiation, with a ``?format=`` no renderer serves answered 406 naming
    the parameter (DRF answers it 404, as if the resource did not exist)."""

    def filter_renderers(self, renderers: list[Any], format: str) -> list[Any]:
        """The renderers for ``format``; 406 ``not_acceptable`` when there is none."""
        served = [renderer for renderer in renderers if renderer.format == format]
        if not served:
            available = ", ".join(sorted({renderer.format for renderer in renderers}))
            raise exceptions.NotAcceptable(
                f'format: "{printable(format)}" is not served here; available: {available}'
            )
        return served


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    """Validation messages as ``field: message`` strings (nested fields joined by dots)."""
    if isinstance(detail, dict):
        out: list[str] = []
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "non_field_errors":
                name = prefix
            out.extend(_flatten(value, name))
        return out
    if isinstance(detail, list):
        out = []
        for index, value in enumerate(detail):
            if isinstance(value, dict | list):
                out.extend(_flatten(value, f"{prefix}[{index}]"))
            else:
                out.extend(_flatten(value, prefix))
        return out
    message = printable(str(detail), MAX_MESSAGE)
    return [f"{printable(prefix)}: {message}" if prefix else message]


_DRF_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "malformed_json",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.NotAcceptable: "not_acceptable",
}


def database_unavailable() -> HttpResponse:
    """The 503 answer (with ``Retry-After``) for a database that cannot be reached."""
    logger.warning("database unavailable", extra={"error_code": "database_unavailable"})
    return json_error(
        503,
        "database_unavailable",
        "the database is unavailable; retry later",
        {"Retry-After": str(DB_RETRY_AFTER_SECONDS)},
    )


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse | None:
    """DRF exception handler: every error as ``{"error", "detail"}`` with the right status.

    The answer is plain JSON, not a DRF ``Response``: those are rendered by the negotiated
    renderer, which for ``schema/`` is YAML.
    """
    if isinstance(exc, OperationalError | InterfaceError):
        return database_unavailable()
    if isinstance(exc, APIError):
        return json_error(exc.status_code, exc.error_code, exc.message, exc.headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("not found")
    if not isinstance(exc, exceptions.APIException):
        return None
    if isinstance(exc, exceptions.ValidationError):
        code, detail = "validation_error", "; ".join(_flatten(exc.detail))
    else:
        code = next((c for t, c in _DRF_CODES.items() if isinstance(exc, t)), "bad_request")
        detail = printable(str(exc.detail), MAX_DETAIL)
    return json_error(exc.status_code, code, detail)


def handler400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's own 400 (for example a disallowed Host header)."""
    return json_error(400, "bad_request", "the request is not acceptable (check the Host header)")


def handler403(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's own 403 (CSRF on the admin, for example)."""
    return json_error(403, "forbidden", "forbidden")


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """No URL matches (including a malformed UUID in the path)."""
    return json_error(404, "not_found", f"no such resource: {request.path}")


def handler500(request: HttpRequest) -> HttpResponse:
    """An uncaught exception: 503 when the database is down, else a bare 500 without details."""
    if isinstance(sys.exc_info()[1], OperationalError | InterfaceError):
        return database_unavailable()
    return json_error(500, "internal_error", "internal server error")
