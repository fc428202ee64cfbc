"""Reading one HTTP/1.x probe request strictly, within bounds, and answering it in JSON."""

from __future__ import annotations

import email.utils
import functools
import http.client
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from . import _redact

log = logging.getLogger("backend.workers.shared.health")  # the server's records kept their name

_PHRASES = {code: HTTPStatus(code).phrase for code in (200, 400, 404, 405, 500, 503)}
_DEBUG_ON = functools.partial(log.isEnabledFor, logging.DEBUG)
_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The ``Date`` header's value, formatted once per second."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = email.utils.formatdate(now, usegmt=True)
        _date = (now, text)
    return text


def json_body(payload: Any) -> bytes:
    """``payload`` as a JSON answer's body, every configured secret scrubbed from it."""
    return _redact.scrub(json.dumps(payload, default=str)).encode()


#: Bounds of one request: longer lines, more headers or a bigger body are refused.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024
_LINGER_BYTES = 1024 * 1024  # read and dropped after a refusal, so the answer is not reset
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (methods, header names)
_VERSION = re.compile(r"HTTP/([0-9])\.[0-9]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ALLOWED = "GET, HEAD"


class _Refused(Exception):
    """The request cannot be served: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class _Gone(Exception):
    """The client closed its side in the middle of a request: nothing to answer."""


def _first_bad(text: str, allowed: re.Pattern[str]) -> str:
    """Where ``text`` leaves ``allowed``: "character 0x.. at position n" (never the text)."""
    for index, char in enumerate(text):
        if not allowed.fullmatch(char):
            return f"character {ord(char):#04x} at position {index}"
    return "it is empty"


_PRINTABLE = re.compile(r"[\x21-\x7e]")
_TARGET = re.compile(r"[\x21-\x7e]+")


class StrictHandler(BaseHTTPRequestHandler):
    """Reads probe requests; one thread per connection, sockets time out.

    Requests are read here, strictly and within bounds (:data:`MAX_REQUEST_LINE`,
    :data:`MAX_HEADER_BYTES`, :data:`MAX_HEADERS`, :data:`MAX_BODY`): a body announced by
    ``Content-Length`` is read and dropped, so it is never taken for the next request on a
    kept-alive connection; a request whose end cannot be known for sure (``Transfer-Encoding``,
    a duplicated or malformed ``Content-Length``, a malformed line) is answered with a JSON
    error and the connection is closed. ``GET`` and ``HEAD`` go to the subclass's ``do_GET``,
    any other method is answered 405.
    """

    protocol_version = "HTTP/1.1"
    timeout = 5.0  # a silent client holds only its own thread, and not for long
    # Headers and body leave in one send (flushed after each request), without Nagle's
    # delay: two small writes would otherwise wait for the client's delayed ACK (~40 ms).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "worker-health"
    sys_version = ""
    do_GET: Callable[[], None]  # answers GET and HEAD: set on the subclass

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health request: " + format, *args)

    # --- reading a request ----------------------------------------------------------
    def handle_one_request(self) -> None:
        """Read one request within bounds and answer it exactly once."""
        self.close_connection = True
        self.command, self.path, self.requestline = "", "", ""
        self.request_version = "HTTP/1.1"
        started = False
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: one empty line before a request
                line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                return  # the client closed an idle connection
            started = True
            self._read_request(line)
        except _Refused as refusal:
            self.close_connection = True
            self._error(refusal.status, refusal.code, refusal.detail)
            self._linger()
            return
        except _Gone:
            self.close_connection = True
            return
        except TimeoutError:
            self.close_connection = True
            if started:
                self._error(408, "request_timeout", "the request did not arrive in time")
                self._linger()
            return
        if self.command in ("GET", "HEAD"):
            self.do_GET()
        else:
            self._not_allowed()
        self.wfile.flush()

    def _read_request(self, line: bytes) -> None:
        if len(line) > MAX_REQUEST_LINE:
            raise _Refused(414, "uri_too_long", f"request line over {MAX_REQUEST_LINE} bytes")
        if not line.endswith(b"\n"):
            raise _Gone
        text = line.decode("latin-1").removesuffix("\n").removesuffix("\r")
        self.requestline = text
        parts = text.split(" ")
        if len(parts) != 3:
            raise _Refused(
                400, "bad_request_line", "the request line must be 'METHOD TARGET HTTP/1.x'"
            )
        method, target, version = parts
        match = _VERSION.fullmatch(version)
        if match is None:
            raise _Refused(
                400, "bad_request_line", "the request line must end with HTTP/1.0 or HTTP/1.1"
            )
        if match.group(1) != "1":
            raise _Refused(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1")
        if not _TOKEN.fullmatch(method):
            raise _Refused(
                400, "bad_method", f"the method is not a token: {_first_bad(method, _TOKEN)}"
            )
        if not _TARGET.fullmatch(target):
            raise _Refused(
                400,
                "bad_request_target",
                "the request target must be printable ASCII (percent-encode the rest): "
                + _first_bad(target, _PRINTABLE),
            )
        self.command, self.request_version = method, version
        self.path = "/" + target.lstrip("/") if target.startswith("//") else target
        headers = self._read_headers()
        self.headers = headers
        connection = {
            t.strip().lower() for t in ",".join(headers.get_all("Connection", [])).split(",")
        }
        if version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        self._read_body(headers)

    def _read_headers(self) -> http.client.HTTPMessage:
        headers = http.client.HTTPMessage()
        total = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise _Refused(
                    431, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes"
                )
            if not line.endswith(b"\n"):
                raise _Gone
            if line in (b"\r\n", b"\n"):
                return headers
            if len(headers) >= MAX_HEADERS:
                raise _Refused(431, "too_many_headers", f"more than {MAX_HEADERS} headers")
            text = line.decode("latin-1").removesuffix("\n").removesuffix("\r")
            name, colon, value = text.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _Refused(
                    400,
                    "bad_header",
                    f"header line {len(headers) + 1} is not 'Name: value' (a token name, "
                    "no space before the colon, no folded line)",
                )
            value = value.strip(" \t")
            if _CONTROL.search(value):
                raise _Refused(400, "bad_header", f"header {name!r} holds a control character")
            headers[name] = value

    def _read_body(self, headers: http.client.HTTPMessage) -> None:
        """Read and drop the body, so that it is never taken for the next request."""
        lengths = headers.get_all("Content-Length", [])
        if headers.get_all("Transfer-Encoding"):
            if lengths:
                raise _Refused(400, "bad_framing", "Transfer-Encoding and Content-Length together")
            raise _Refused(
                411,
                "length_required",
                "Transfer-Encoding is not accepted: send no body, or a Content-Length",
            )
        if not lengths:
            return
        if len(lengths) > 1:
            raise _Refused(400, "bad_content_length", "more than one Content-Length header")
        text = lengths[0]
        if not text or not text.isascii() or not text.isdigit():
            raise _Refused(
                400, "bad_content_length", "Content-Length must be a non-negative integer"
            )
        stripped = text.lstrip("0")
        if len(stripped) > len(str(MAX_BODY)) or int(stripped or "0") > MAX_BODY:
            raise _Refused(
                413, "payload_too_large", f"Content-Length over {MAX_BODY} bytes (probes send none)"
            )
        size = int(stripped or "0")
        if size and headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        if len(self.rfile.read(size)) < size:
            raise _Gone

    def _linger(self) -> None:
        """After a refusal: send the answer, stop writing, and drop what the client still
        sends for a moment (closing with unread input would reset the answer away)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = _LINGER_BYTES
            while left > 0:
                chunk = self.connection.recv(64 * 1024)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client is gone: nothing left to protect

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's error page, as the documented JSON error instead."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase
        self._error(code, phrase.lower().replace(" ", "_"), message or phrase)

    # --- answering ------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        # The status line and headers are built as one string (send_response/send_header
        # cost a method call, a format and a buffer append per line) and leave with the
        # body in one write; the request line is logged only when DEBUG is on.
        head = (
            f"HTTP/1.1 {status} {_PHRASES.get(status) or HTTPStatus(status).phrase}\r\n"
            f"Server: worker-health\r\nDate: {_http_date()}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
        )
        if self.close_connection:
            head += "Connection: close\r\n"
        elif self.request_version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
        if extra:
            head += "".join(f"{key}: {value}\r\n" for key, value in extra.items())
        data = (head + "\r\n").encode("latin-1")
        self.wfile.write(data if self.command == "HEAD" else data + body)
        if _DEBUG_ON():
            self.log_request(status, len(body))

    def _error(
        self, status: int, code: str, detail: str, extra: dict[str, str] | None = None
    ) -> None:
        self._send(status, json_body({"error": code, "detail": detail}), extra=extra)

    def _not_allowed(self) -> None:
        self._error(
            405,
            "method_not_allowed",
            f"{shown(self.command)} is not allowed; use GET",
            extra={"Allow": _ALLOWED},
        )


def shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message: escaped, and cut to ``limit`` characters."""
    return ascii(text if len(text) <= limit else text[:limit] + "...")
