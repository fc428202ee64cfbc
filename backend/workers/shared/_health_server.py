"""The HTTP server that answers probes about a worker's health (standard library sockets).

:class:`HealthServer` serves, from the main process (standard library threading server), what
the :class:`~backend.workers.shared.health.HealthChecker` finds:

=================  ==========================================================================
``/health``        runs the checks: 200 healthy or degraded, 503 unhealthy
``/health/quick``  the last report (never runs a check inline)
``/health/metrics`` system figures, task and monitored-function statistics (all children)
``/health/history`` the last 100 reports
``/livez``         the process and its server answer (never depends on backend or broker)
``/readyz``        backend reachable, its circuit breaker not open, consumer attached, not
                   every recent task failing with a permanent error (details: a
                   Redis-shared breaker running on local state)
``/metrics``       Prometheus text format, aggregated over prefork children
=================  ==========================================================================

Responses carry no secret and no configuration beyond the worker's name and version. The
public names are importable from ``backend.workers.shared`` and
``backend.workers.shared.health``.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import _metrics, _redact, _runtime
from ._timefmt import utc_now_iso
from .health import HISTORY_SIZE, HealthChecker, HealthReport, HealthStatus

log = logging.getLogger("backend.workers.shared.health")  # the server's records kept their name


class HealthServerError(OSError):
    """The health server could not listen (the message names the address and port)."""


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


def _json_body(payload: Any) -> bytes:
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


class _LastReportBody:
    """The JSON body of a checker's last report, encoded once per report: ``/health/quick``,
    the orchestrator's frequent probe, then only writes bytes."""

    def __init__(self, checker: HealthChecker) -> None:
        self._checker = checker
        self._pair: tuple[HealthReport, bytes] | None = None

    def get(self) -> tuple[HealthReport, bytes] | None:
        """The last report and its body, or None before the first report."""
        report = self._checker.last_report
        if report is None:
            return None
        pair = self._pair
        if pair is None or pair[0] is not report:
            pair = self._pair = (report, _json_body(report.to_dict()))
        return pair


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


class _Handler(BaseHTTPRequestHandler):
    """Routes probe requests; one thread per connection, sockets time out.

    Requests are read here, strictly and within bounds (:data:`MAX_REQUEST_LINE`,
    :data:`MAX_HEADER_BYTES`, :data:`MAX_HEADERS`, :data:`MAX_BODY`): a body announced by
    ``Content-Length`` is read and dropped, so it is never taken for the next request on a
    kept-alive connection; a request whose end cannot be known for sure (``Transfer-Encoding``,
    a duplicated or malformed ``Content-Length``, a malformed line) is answered with a JSON
    error and the connection is closed. Every answer is JSON, except ``/metrics``.
    """

    protocol_version = "HTTP/1.1"
    timeout = 5.0  # a silent client holds only its own thread, and not for long
    # Headers and body leave in one send (flushed after each request), without Nagle's
    # delay: two small writes would otherwise wait for the client's delayed ACK (~40 ms).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "worker-health"
    sys_version = ""
    checker: HealthChecker  # set on the per-server subclass
    last_body: _LastReportBody  # likewise

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
        self._send(status, _json_body({"error": code, "detail": detail}), extra=extra)

    def do_GET(self) -> None:
        """Answer a probe (``HEAD`` too: the same answer without its body)."""
        if self.path == "/health/quick":  # the hot path: the orchestrator's frequent probe
            self.quick({})
            return
        try:
            parts = urlsplit(self.path)
        except ValueError:  # e.g. an absolute-form target with a broken [IPv6] host
            self._error(400, "bad_request_target", "the request target is not a URL")
            return
        found = _ROUTES.get(parts.path.rstrip("/") or "/")
        if found is None:
            self._error(404, "not_found", f"no endpoint {_shown(parts.path)}")
            return
        route, accepted = found
        try:
            query = parse_qs(
                parts.query, keep_blank_values=True, errors="strict", max_num_fields=10
            )
        except (UnicodeDecodeError, ValueError):
            self._error(
                400,
                "bad_query",
                "the query string is not valid percent-encoded UTF-8 with at most 10 parameters",
            )
            return
        for name, values in query.items():
            if name not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                self._error(
                    400,
                    "unknown_parameter",
                    f"{parts.path} takes no parameter {_shown(name)} (accepted: {known})",
                )
                return
            if len(values) > 1:
                self._error(400, "repeated_parameter", f"parameter {name!r} given twice")
                return
        try:
            route(self, query)
        except Exception:
            log.exception("health endpoint %s failed", parts.path)
            self._error(500, "internal_error", "the health endpoint failed; see the worker log")

    def _not_allowed(self) -> None:
        self._error(
            405,
            "method_not_allowed",
            f"{_shown(self.command)} is not allowed; use GET",
            extra={"Allow": _ALLOWED},
        )

    # --- endpoints ---------------------------------------------------------------
    def health(self, _query: dict[str, list[str]]) -> None:
        """``/health``: run the checks now."""
        report = self.checker.run_checks()
        self._send(report.http_status, _json_body(report.to_dict()))

    def quick(self, _query: dict[str, list[str]]) -> None:
        """``/health/quick``: the last report as it was."""
        last = self.last_body.get()
        if last is None:
            self._send(
                503,
                _json_body(
                    {
                        "status": HealthStatus.UNHEALTHY.value,
                        "timestamp": utc_now_iso(),
                        "uptime_seconds": self.checker.uptime_seconds(),
                        "worker_name": self.checker.config.worker_name,
                        "checks": {},
                        "message": "no health report yet",
                    }
                ),
            )
            return
        self._send(last[0].http_status, last[1])

    def metrics_json(self, _query: dict[str, list[str]]) -> None:
        """``/health/metrics``: system figures and statistics."""
        self._send(200, _json_body(self.checker.metrics()))

    def history(self, query: dict[str, list[str]]) -> None:
        """``/health/history``: past reports, oldest first (``?limit=N`` for the last N)."""
        reports = self.checker.history()
        if "limit" in query:
            text = query["limit"][0]
            digits = text.lstrip("0")
            if not (text.isascii() and text.isdigit() and digits):
                self._error(
                    400, "bad_limit", f"limit must be a positive integer, got {_shown(text)}"
                )
                return
            # More than the history holds means all of it (no int() of a 5000-digit text).
            limit = HISTORY_SIZE if len(digits) > len(str(HISTORY_SIZE)) else int(digits)
            reports = reports[-limit:]
        self._send(
            200,
            _json_body(
                {
                    "worker_name": self.checker.config.worker_name,
                    "count": len(reports),
                    "history": [r.to_dict() for r in reports],
                }
            ),
        )

    def livez(self, _query: dict[str, list[str]]) -> None:
        """``/livez``: this process and its server answer."""
        self._send(
            200,
            _json_body(
                {
                    "status": "alive",
                    "pid": os.getpid(),
                    "uptime_seconds": self.checker.uptime_seconds(),
                }
            ),
        )

    def readyz(self, _query: dict[str, list[str]]) -> None:
        """``/readyz``: 200 when ready to take work, else 503 with the failed parts."""
        ready, checks = self.checker.readiness()
        self._send(
            200 if ready else 503,
            _json_body({"status": "ready" if ready else "not_ready", "checks": checks}),
        )

    def prometheus(self, _query: dict[str, list[str]]) -> None:
        """``/metrics``: Prometheus text exposition."""
        body, content_type = _metrics.render()
        self._send(200, body, content_type)


_Route = Callable[[_Handler, dict[str, list[str]]], None]
#: Each endpoint and the query parameters it accepts (any other is a 400).
_ROUTES: dict[str, tuple[_Route, frozenset[str]]] = {
    "/health": (_Handler.health, frozenset()),
    "/health/quick": (_Handler.quick, frozenset()),
    "/health/metrics": (_Handler.metrics_json, frozenset()),
    "/health/history": (_Handler.history, frozenset({"limit"})),
    "/livez": (_Handler.livez, frozenset()),
    "/readyz": (_Handler.readyz, frozenset()),
    "/metrics": (_Handler.prometheus, frozenset()),
}


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message: escaped, and cut to ``limit`` characters."""
    return ascii(text if len(text) <= limit else text[:limit] + "...")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection (socketserver would print a raw traceback to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("health client %s went away: %s", client_address[0], exc)
        else:
            log.error("health request from %s failed", client_address[0], exc_info=True)


class HealthServer:
    """HTTP server of the health endpoints, in a daemon thread of the main process."""

    def __init__(
        self, health_checker: HealthChecker, port: int = 8080, host: str = "0.0.0.0"
    ) -> None:
        if not isinstance(health_checker, HealthChecker):
            raise TypeError(f"health_checker must be a HealthChecker, got {health_checker!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        self.health_checker = health_checker
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.error: HealthServerError | None = None
        _SERVERS.get().add(self)

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before, 0 meaning any free one)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:8080``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server thread serves requests."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Listen and serve in a daemon thread, and start the background checks; returns at
        once, after logging the port actually bound. When the port cannot be bound, logs a
        warning naming it and what to do, keeps ``error`` and returns: the process runs on."""
        if self.running:
            return
        handler = type(
            "HealthHandler",
            (_Handler,),
            {"checker": self.health_checker, "last_body": _LastReportBody(self.health_checker)},
        )
        try:
            server = _Server((self.host, self._requested_port), handler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self.error = HealthServerError(
                exc.errno,
                f"health server cannot listen on {self.host}:{self._requested_port}: {reason}",
            )
            # A warning: the process runs on. The usual cause is a second HealthServer, e.g.
            # a sender script importing the worker module that starts one at import.
            log.warning(
                "%s; this process runs on without health endpoints. If another process (or "
                "another HealthServer in this one) holds port %s, give this one another port "
                "(METRICS_PORT=0 or HealthServer(port=0) for an ephemeral one)",
                self.error.strerror,
                self._requested_port,
                extra={"port": self._requested_port, "host": self.host},
            )
            return
        self.error = None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="health-server",
            daemon=True,
        )
        self._thread.start()
        self.health_checker.start_background()
        _runtime.install_celery(if_imported=True)
        log.info(
            "health server listening on %s:%s",
            self.host,
            self.port,
            extra={"port": self.port, "host": self.host},
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and stop the background checks."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        self.health_checker.stop_background(timeout)
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout)

    def _close_in_child(self) -> None:
        # A forked child must not hold the listening socket (the port would outlive us).
        server, self._server, self._thread = self._server, None, None
        if server is not None:
            server.socket.close()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close_in_child(servers: weakref.WeakSet[HealthServer]) -> weakref.WeakSet[HealthServer]:
    """A forked child holds no health server's socket, and no server of its own."""
    for server in list(servers):
        server._close_in_child()
    return weakref.WeakSet()


_SERVERS: _runtime.Part[weakref.WeakSet[HealthServer]] = _runtime.part(
    "health servers", weakref.WeakSet, _close_in_child
)
