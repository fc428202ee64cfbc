"""What gunicorn answers itself, before Django sees the request (its HTML, not our JSON).

Raw requests over a socket to the real backend (gunicorn started as ``make backend`` starts
it); each limit is probed on both sides: the largest accepted request reaches Django (JSON),
one byte or one header more is gunicorn's HTML answer. ``backend/internal_api/README.md``
documents this table.
"""

from __future__ import annotations

import socket

import pytest

from tests.live_backend import LiveBackend

HOST = b"Host: 127.0.0.1\r\n"
HEALTH = b"/internal/v1/health/"


def _request_line(length: int) -> bytes:
    """A GET whose request line (without its CRLF) is ``length`` bytes."""
    target = b"/" + b"a" * (length - len(b"GET / HTTP/1.1"))
    return b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n"


def _header_line(length: int) -> bytes:
    """A GET with one header line (``name: value``, without its CRLF) of ``length`` bytes."""
    field = b"X-Big: " + b"a" * (length - len(b"X-Big: "))
    return b"GET " + HEALTH + b" HTTP/1.1\r\n" + HOST + field + b"\r\n\r\n"


def _headers(count: int) -> bytes:
    """A GET with ``count`` header lines in all (Host included)."""
    extra = b"".join(b"X-H%d: v\r\n" % number for number in range(count - 1))
    return b"GET " + HEALTH + b" HTTP/1.1\r\n" + HOST + extra + b"\r\n"


def _get_with(header: bytes) -> bytes:
    return b"GET " + HEALTH + b" HTTP/1.1\r\n" + HOST + header + b"\r\n\r\n"


def _post_with(headers: bytes, body: bytes) -> bytes:
    return b"POST /internal/v1/workflow-executions/ HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


# (case, raw request, status, who answers: "django" (our JSON) or "gunicorn" (HTML))
CASES: list[tuple[str, bytes, int, str]] = [
    ("request line of 4094 bytes", _request_line(4094), 404, "django"),
    ("request line of 4095 bytes", _request_line(4095), 414, "gunicorn"),
    ("header line of 8188 bytes", _header_line(8188), 401, "django"),
    ("header line of 8189 bytes", _header_line(8189), 431, "gunicorn"),
    ("100 header lines", _headers(100), 401, "django"),
    ("101 header lines", _headers(101), 431, "gunicorn"),
    ("request line without method and version", b"GARBAGE\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("control character in the method", b"G\x01T / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("lower-case method", b"get / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("HTTP/9.9", b"GET / HTTP/9.9\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("not HTTP", b"GET / HTXP/1.1\r\n" + HOST + b"\r\n", 400, "gunicorn"),
    ("NUL in a header value", _get_with(b"X-A: a\x00b"), 400, "gunicorn"),
    ("control character in a header value", _get_with(b"X-A: a\x01b"), 400, "gunicorn"),
    ("DEL in a header value", _get_with(b"X-A: a\x7fb"), 400, "gunicorn"),
    ("Latin-1 byte in a header value (passed on)", _get_with(b"X-A: a\xe9b"), 401, "django"),
    (
        "Content-Length with Transfer-Encoding",
        _post_with(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
        "gunicorn",
    ),
    ("Transfer-Encoding: gzip", _post_with(b"Transfer-Encoding: gzip\r\n", b""), 400, "gunicorn"),
    (
        "Transfer-Encoding: identity",
        _post_with(b"Transfer-Encoding: identity\r\n", b""),
        400,
        "gunicorn",
    ),
    (
        "Transfer-Encoding: chunked, gzip",
        _post_with(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
        400,
        "gunicorn",
    ),
    (
        "Transfer-Encoding: gzip, chunked (passed on)",
        _post_with(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        401,
        "django",
    ),
]


def _answer(live_backend: LiveBackend, raw: bytes) -> tuple[int, str]:
    """Status and Content-Type of the answer to ``raw``."""
    with socket.create_connection(("127.0.0.1", live_backend.port), timeout=30) as conn:
        conn.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    content_type = {name.lower(): value.strip() for name, value in fields.items()}
    return status, content_type.get("content-type", "")


@pytest.mark.parametrize(("case", "raw", "status", "who"), CASES, ids=[c[0] for c in CASES])
def test_gunicorn_answers_before_django(
    case: str, raw: bytes, status: int, who: str, live_backend: LiveBackend
) -> None:
    answered, content_type = _answer(live_backend, raw)
    assert answered == status
    assert content_type == ("application/json" if who == "django" else "text/html")
