"""Versions of what the API answers: strong ETags (the hash of a body, or one given), 304 on
a current ``If-None-Match``, 412 on a stale ``If-Match``."""

from __future__ import annotations

import hashlib
from typing import Any

from django.http import HttpResponse
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request

from backend.internal_api.errors import APIError

_RENDERER = JSONRenderer()


def etag_of(body: bytes) -> str:
    """The strong ETag of an answer's body."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def render(data: Any) -> bytes:
    """``data`` as the JSON body the API answers (the bytes its ETag is the hash of)."""
    return bytes(_RENDERER.render(data))


def _tags(header: str) -> set[str]:
    return {tag.strip() for tag in header.split(",") if tag.strip()}


def not_modified(request: Request, etag: str) -> HttpResponse | None:
    """The 304 (no body) when ``If-None-Match`` names ``etag`` or ``*`` (a weak ``W/`` tag
    matches its strong twin, as RFC 9110 compares for GET), else None."""
    presented = request.headers.get("If-None-Match")
    if presented is None:
        return None
    tags = {tag.removeprefix("W/") for tag in _tags(presented)}
    if "*" not in tags and etag not in tags:
        return None
    response = HttpResponse(status=304)
    del response["Content-Type"]  # a 304 has no body, hence no type
    response["ETag"] = etag
    return response


def versioned(
    request: Request, data: Any, status: int = 200, etag: str | None = None
) -> HttpResponse:
    """The JSON answer with its ``ETag`` (given, or the hash of the body); for a GET (or HEAD),
    the 412 when ``If-Match`` does not name it, the 304 when ``If-None-Match`` does."""
    body = render(data)
    etag = etag or etag_of(body)
    if status == 200 and request.method in ("GET", "HEAD"):
        check_if_match(request, etag)
        unchanged = not_modified(request, etag)
        if unchanged is not None:
            return unchanged
    response = HttpResponse(body, status=status, content_type="application/json")
    response["ETag"] = etag
    return response


def check_if_match(request: Request, etag: str) -> None:
    """412 ``precondition_failed`` when ``If-Match`` is given and names neither ``*`` nor
    ``etag``, the object's as stored (strong comparison). Call it while holding the row's
    lock, so that nothing changes between the check and the write."""
    presented = request.headers.get("If-Match")
    if presented is None:
        return
    tags = _tags(presented)
    if "*" not in tags and etag not in tags:
        raise APIError(
            412,
            "precondition_failed",
            "If-Match: the object changed since that version was read; read it again",
        )
