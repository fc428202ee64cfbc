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
``backend.workers.shared.health``. Requests are read, within bounds, by
``_strict_http.StrictHandler``; this module routes them to the checker.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import _metrics, _runtime
from ._strict_http import (
    MAX_BODY as MAX_BODY,
    MAX_HEADER_BYTES as MAX_HEADER_BYTES,
    MAX_HEADERS as MAX_HEADERS,
    MAX_REQUEST_LINE as MAX_REQUEST_LINE,
    StrictHandler,
    json_body,
    shown,
)
from ._timefmt import utc_now_iso
from .health import HISTORY_SIZE, HealthChecker, HealthReport, HealthStatus

log = logging.getLogger("backend.workers.shared.health")  # the server's records kept their name


class HealthServerError(OSError):
    """The health server could not listen (the message names the address and port)."""


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
            pair = self._pair = (report, json_body(report.to_dict()))
        return pair


class _Handler(StrictHandler):
    """Routes probe requests to what the checker finds; every answer is JSON, except
    ``/metrics``."""

    checker: HealthChecker  # set on the per-server subclass
    last_body: _LastReportBody  # likewise

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
            self._error(404, "not_found", f"no endpoint {shown(parts.path)}")
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
                    f"{parts.path} takes no parameter {shown(name)} (accepted: {known})",
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

    # --- endpoints ---------------------------------------------------------------
    def health(self, _query: dict[str, list[str]]) -> None:
        """``/health``: run the checks now."""
        report = self.checker.run_checks()
        self._send(report.http_status, json_body(report.to_dict()))

    def quick(self, _query: dict[str, list[str]]) -> None:
        """``/health/quick``: the last report as it was."""
        last = self.last_body.get()
        if last is None:
            self._send(
                503,
                json_body(
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
        self._send(200, json_body(self.checker.metrics()))

    def history(self, query: dict[str, list[str]]) -> None:
        """``/health/history``: past reports, oldest first (``?limit=N`` for the last N)."""
        reports = self.checker.history()
        if "limit" in query:
            text = query["limit"][0]
            digits = text.lstrip("0")
            if not (text.isascii() and text.isdigit() and digits):
                self._error(
                    400, "bad_limit", f"limit must be a positive integer, got {shown(text)}"
                )
                return
            # More than the history holds means all of it (no int() of a 5000-digit text).
            limit = HISTORY_SIZE if len(digits) > len(str(HISTORY_SIZE)) else int(digits)
            reports = reports[-limit:]
        self._send(
            200,
            json_body(
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
            json_body(
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
            json_body({"status": "ready" if ready else "not_ready", "checks": checks}),
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
