"""Every error the backend answers, in one shape: ``{"error": "<code>", "detail": "<message>"}``.

Views raise :class:`APIError` (or DRF's own exceptions); :func:`exception_handler` turns each
into the shape above; the ``handler*`` views cover what happens outside DRF (unknown URL,
Django's own 400/403, an uncaught exception). A database that cannot be reached is a 503 with
``Retry-After``, never a 500 with a stack trace. Nothing a caller sent is echoed back except
the offending field names and values of its JSON body.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response

logger = logging.getLogger("backend.internal_api")

DB_RETRY_AFTER_SECONDS = 1


class APIError(exceptions.APIException):
    """An error answer with an explicit HTTP status, error code and message."""

    def __init__(self, status_code: int, code: str, detail: str) -> None:
        super().__init__(detail=detail, code=code)
        self.status_code = status_code
        self.error_code = code
        self.message = detail


def json_error(
    status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> HttpResponse:
    """A plain Django response in the error shape (for middleware and non-DRF handlers)."""
    response = HttpResponse(
        json.dumps({"error": code, "detail": detail}),
        status=status_code,
        content_type="application/json",
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, also turning too-deep nesting into a 400 instead of a crash."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        """Parse the body; malformed or absurdly nested JSON is a ``ParseError`` (400)."""
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON body is nested too deeply") from None


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
    return [f"{prefix}: {detail}" if prefix else str(detail)]


_DRF_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "malformed_json",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.NotAcceptable: "not_acceptable",
}


def _database_unavailable() -> tuple[dict[str, str], dict[str, str]]:
    logger.warning("database unavailable", extra={"error_code": "database_unavailable"})
    return (
        {"error": "database_unavailable", "detail": "the database is unavailable; retry later"},
        {"Retry-After": str(DB_RETRY_AFTER_SECONDS)},
    )


def database_unavailable() -> HttpResponse:
    """The 503 answer (with ``Retry-After``) for a database that cannot be reached."""
    body, headers = _database_unavailable()
    return json_error(503, body["error"], body["detail"], headers)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler: every error as ``{"error", "detail"}`` with the right status."""
    if isinstance(exc, OperationalError | InterfaceError):
        body, headers = _database_unavailable()
        return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)
    if isinstance(exc, APIError):
        return Response({"error": exc.error_code, "detail": exc.message}, status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("not found")
    if not isinstance(exc, exceptions.APIException):
        return None
    if isinstance(exc, exceptions.ValidationError):
        code, detail = "validation_error", "; ".join(_flatten(exc.detail))
    else:
        code = next((c for t, c in _DRF_CODES.items() if isinstance(exc, t)), "bad_request")
        detail = str(exc.detail)
    return Response({"error": code, "detail": detail}, status=exc.status_code)


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
