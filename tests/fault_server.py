"""Real misbehaving servers on loopback for resilience tests (no mocks of our own code).

:class:`FaultServer` is an HTTP/1.1 server whose answers a test scripts, one action per
request: answer with any status, headers (``Retry-After`` in either form) and body (malformed
ones included), stall, reset the connection, drop it without answering, cut a response short,
or forward the request to a real upstream (the live backend) and then relay or drop the
answer. :class:`TcpProxy` is a TCP proxy that counts the connections it accepts and can
reset, stall or refuse them on demand.

Both bind a free port on 127.0.0.1, run in daemon threads, and are context managers::

    with FaultServer(default=Respond(200, {"status": "healthy"})) as server:
        server.push(Respond(503, headers={"Retry-After": "1"}), Drop())
        ...  # the client's first request gets 503, the second a dropped connection
        assert [r.path for r in server.requests] == [...]

Only loopback addresses are ever served or contacted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import socketserver
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class Respond:
    """Answer with ``status``; ``body`` may be bytes, text, or JSON-able; ``delay`` stalls first."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def encoded(self) -> tuple[bytes, str]:
        """The body's bytes and its default content type."""
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"


@dataclass(frozen=True)
class Stall:
    """Read the request, send nothing for ``seconds`` (or until the server stops), then close."""

    seconds: float = 3600.0


@dataclass(frozen=True)
class Drop:
    """Read the request and close the connection cleanly without answering."""


@dataclass(frozen=True)
class Reset:
    """Read the request and abort the connection with a TCP reset."""


@dataclass(frozen=True)
class Truncate:
    """Send the status line and a ``Content-Length`` larger than the body, then close."""

    status: int = 200
    body: bytes = b'{"id": "trunc'


@dataclass(frozen=True)
class Forward:
    """Forward the request to ``upstream`` (``http://host:port``); relay its answer, or with
    ``drop_response`` let the upstream apply it and close the client's connection unanswered;
    ``hold`` keeps the applied request's answer back that many seconds (or until the server
    stops) before relaying it."""

    upstream: str
    drop_response: bool = False
    hold: float = 0.0


Action = Respond | Stall | Drop | Reset | Truncate | Forward


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fault server received it (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.server.owner._connection_opened(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        owner = self.server.owner
        recorded = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            connection=self.connection_number,
        )
        action = owner._next_action(recorded)
        if isinstance(action, Respond):
            self._respond(action)
        elif isinstance(action, Stall):
            owner._stopping.wait(action.seconds)
            self.close_connection = True
        elif isinstance(action, Drop):
            self.close_connection = True
        elif isinstance(action, Reset):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif isinstance(action, Truncate):
            self.send_response(action.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(action.body) + 100))
            self.end_headers()
            self.wfile.write(action.body)
            self.close_connection = True
        else:
            self._forward(action, recorded)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def _respond(self, action: Respond) -> None:
        if action.delay:
            self.server.owner._stopping.wait(action.delay)
        body, content_type = action.encoded()
        self.send_response(action.status)
        headers = {"Content-Type": content_type, **action.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, action: Forward, recorded: RecordedRequest) -> None:
        parts = urlsplit(action.upstream)
        upstream = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                              timeout=60)
        try:
            headers = {k: v for k, v in recorded.headers.items() if k not in _HOP_BY_HOP}
            upstream.request(recorded.method, recorded.path, body=recorded.body or None,
                             headers=headers)
            answer = upstream.getresponse()
            body = answer.read()
        finally:
            upstream.close()
        self.server.owner._answered(recorded, answer.status, body)
        if action.hold:
            self.server.owner._stopping.wait(action.hold)
        if action.drop_response:
            self.close_connection = True
            return
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FaultServer


class FaultServer:
    """A scriptable HTTP server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, default: Action | None = None) -> None:
        self.default: Action = default if default is not None else Respond(200, {"ok": True})
        self.requests: list[RecordedRequest] = []
        # What the upstream answered to each forwarded request: (request, status, body).
        self.answers: list[tuple[RecordedRequest, int, bytes]] = []
        self.connections_accepted = 0
        self._queue: deque[Action] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Its base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def push(self, *actions: Action) -> None:
        """Queue actions for the next requests, in order; afterwards ``default`` applies."""
        with self._lock:
            self._queue.extend(actions)

    def reset(self, default: Action | None = None) -> None:
        """Forget queued actions and recorded requests; optionally set a new default."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.answers.clear()
            if default is not None:
                self.default = default

    def close_client_connections(self) -> None:
        """Shut every open client connection (the next request must open a new one)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop serving, wake stalled handlers and close every connection."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self.close_client_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _connection_opened(self, sock: socket.socket) -> int:
        with self._lock:
            self.connections_accepted += 1
            self._sockets.append(sock)
            return self.connections_accepted

    def _answered(self, request: RecordedRequest, status: int, body: bytes) -> None:
        with self._lock:
            self.answers.append((request, status, body))

    def _next_action(self, request: RecordedRequest) -> Action:
        with self._lock:
            self.requests.append(request)
            return self._queue.popleft() if self._queue else self.default


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to a loopback upstream whose ``mode`` cuts the line on demand.

    Modes (set :attr:`mode` any time):

    * ``"forward"``: relay bytes both ways.
    * ``"reset"``: abort every connection, new and already open, with a TCP reset.
    * ``"stall"``: accept new connections and keep every connection open, but drop every
      byte, so a client waits for an answer that never comes.
    * ``"refuse"``: close new connections at once; connections already open keep working.

    ``connections_accepted`` counts every connection the proxy accepted, whatever the mode.
    """

    MODES = ("forward", "reset", "stall", "refuse")

    def __init__(self, upstream_host: str, upstream_port: int, *, scheme: str = "http") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.scheme = scheme
        self.connections_accepted = 0
        self._mode = "forward"
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stopping = threading.Event()
        self._relays: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``<scheme>://127.0.0.1:PORT`` of the proxy."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        """How the proxy treats connections now: one of :attr:`MODES`."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; expected one of {self.MODES}")
        self._mode = mode

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopping.set()
        self._accept_thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            relays = list(self._relays)
        for thread in relays:
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections_accepted += 1
            if self._mode == "reset":
                self._abort(client)
            elif self._mode == "refuse":
                client.close()
            else:
                thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
                with self._lock:
                    self._relays.append(thread)
                thread.start()

    def _relay(self, client: socket.socket) -> None:
        """Pipe ``client`` to the upstream until either side closes, the proxy stops, or the
        mode turns to "reset" (checked at least every 0.2 s and before relaying any bytes)."""
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            self._abort(client)
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peers = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                events = selector.select(timeout=0.2)
                if self._mode == "reset":
                    self._abort(client)
                    self._abort(server)
                    return
                for key, _ in events:
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                        if data and self._mode != "stall":
                            peers[source].sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        client.close()
                        server.close()
                        return
        client.close()
        server.close()
