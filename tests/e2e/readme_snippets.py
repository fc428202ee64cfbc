"""What the module README's snippets need around them: its code blocks, a path-mapping proxy, TLS.

- :func:`spec_blocks` finds the specification's fenced blocks in the module README, where they
  stand verbatim: each is known by the SHA-256 of its text (:data:`SPEC_BLOCKS`, computed from
  the specification when it was adopted), so an edited block is a missing block.
- :class:`PlaceholderProxy` is a loopback reverse proxy to the real backend that maps the
  README's placeholder execution id (the literal ``execution-id``) in request paths to a real
  execution's id; everything else passes through untouched.
- :func:`self_signed_certificate` makes a certificate for a host name (``example.com``) with
  the ``openssl`` command, so a local HTTPS receiver can stand in for that host.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import subprocess
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.e2e.harness import REPO_ROOT, serve_in_thread, stop_server

MODULE_README = REPO_ROOT / "backend" / "workers" / "shared" / "README.md"
# The specification's code blocks, in its order: a name for each, and the SHA-256 of its text
# (as `code_blocks` returns it: the list item's indentation removed, one final newline).
SPEC_BLOCKS = {
    "client usage": "5c350a2fe0e39005bdce2f6d9d799405c62e56ae2312e7fbf4ab2ed38e0cfd57",
    "config usage": "e158e488acfd460e67e49efbae68964a96e436e2a2fb42787baaa558db4fab37",
    "retry usage": "69520c5ed5ec954c9a6f52553c76a2e66fad9a7d44682cd6700ad6adce4d3070",
    "logging usage": "8008ef11f3bee2198bf4f18559541ff220fd18348be523874d3e7bf6c12ce3ed",
    "health usage": "92292d5544d4b100fb7deca3b733a0d1a9ca14e39012c0422b5ae198e731f5c6",
    "quick start environment": "1e670ce50623f6ca736ef8f3e78567d1389a563741306c0d7407533b6111ba4b",
    "quick start worker": "d33d320d99c29aa2f4161a4865f46cd4def2f9a1dd08e0442d76241baf902439",
    "run command": "f1d94424ebce25eed1b2bdff4dfb82b8f24c029d1b4ddd84ae30afacd14d7a3b",
    "health response": "359b9acbbaa59b1a511522ed0284a41a1fbd482100cf21992c841f0ea87e17af",
    "testing: example worker": "2013dcff4e67f423ed1892b5bf80638a743bdab7250acfb535153151cc5079d3",
    "testing: curl": "8ab3eacf8d4e07bc6a24f0453e1faf1f09d63ee526cf1bc2167247be43c9d784",
}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of the module README: its language, text and first line number."""

    language: str
    text: str
    line: int


def code_blocks(path: Path = MODULE_README) -> list[Block]:
    """Every fenced code block of a Markdown file (the module README by default), in order."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"^([ \t]*)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = match.group(1)
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in match.group(3).splitlines()
        )
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match.group(2), body + "\n", line))
    return blocks


def block_hash(block: Block) -> str:
    """The SHA-256 of a block's text, as :data:`SPEC_BLOCKS` holds it."""
    return hashlib.sha256(block.text.encode()).hexdigest()


def spec_blocks(blocks: list[Block]) -> dict[str, Block]:
    """The specification's blocks found among ``blocks``, by name (a changed one is absent)."""
    by_hash = {block_hash(b): b for b in reversed(blocks)}
    return {name: by_hash[digest] for name, digest in SPEC_BLOCKS.items() if digest in by_hash}


def env_assignments(block: Block) -> dict[str, str]:
    """The ``NAME=value`` lines of a shell block (comments and blanks skipped)."""
    pairs = {}
    for line in block.text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            pairs[name.strip()] = value.strip()
    return pairs


class PlaceholderProxy:
    """Reverse proxy on 127.0.0.1 to ``upstream`` that rewrites placeholder path segments."""

    def __init__(self, upstream: str, mapping: dict[str, str]) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.mapping = mapping
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy (use it as ``DJANGO_APP_BACKEND_URL``)."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def rewrite(self, path: str) -> str:
        """``path`` with every mapped placeholder segment replaced."""
        segments = path.split("/")
        return "/".join(self.mapping.get(s, s) for s in segments)

    def start(self) -> PlaceholderProxy:
        """Serve in a background thread."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = proxy.rewrite(self.path)
                proxy.requests.append((self.command, self.path))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                upstream = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=60
                )
                try:
                    upstream.request(self.command, path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in HOP_HEADERS:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = serve_in_thread(Handler, name="proxy")
        return self

    def stop(self) -> None:
        """Stop serving."""
        stop_server(self._server)
        self._server = None


def self_signed_certificate(host: str, folder: Path) -> tuple[Path, Path]:
    """A certificate and key for ``host`` (its own CA), made by ``openssl``."""
    cert, key = folder / f"{host}.crt", folder / f"{host}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={host}",
            "-addext",
            f"subjectAltName=DNS:{host}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
