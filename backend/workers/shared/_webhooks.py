"""Webhook delivery from the worker: SSRF guard, Standard Webhooks signing, one POST with retries.

The guard resolves the URL's host, refuses it unless every address it resolves to is a public
one, and then connects to the address it checked (the request goes to the IP literal with the
original ``Host`` header and TLS server name), so a second DNS answer cannot swap in an
internal address. A host that is a number but not a plain dotted quad (``0177.0.0.1``,
``0x7f.1``, ``2130706433``, ``127.1``) is refused: parsers disagree on what it means.
Redirects are followed by hand, at most :data:`MAX_REDIRECTS`, each target checked the same
way; a ``Location`` that is not a valid URL, names no host, or carries ``user:password@`` is
refused too. A refused redirect (or one too many) raises :class:`WebhookURLRefusedError` after
the delivery is recorded as ``blocked`` (the first hop did receive the webhook). Hosts named in
``WEBHOOK_ALLOWED_HOSTS`` skip the address check (local development), never the scheme check;
an entry is a host name or address, or ``host:port`` to exempt one port only.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._http import shared_ssl_context
from ._retry_after import parse_retry_after
from .errors import WebhookError, WebhookURLRefusedError, one_line

if TYPE_CHECKING:
    import httpx2

    from .retry_utils import RetryPolicy

logger = logging.getLogger(__name__)

#: Redirects followed for one delivery attempt; each target passes the guard again.
MAX_REDIRECTS = 3
#: Most bytes of the receiver's answer that are read; the rest is discarded unread.
MAX_RESPONSE_BYTES = 64 * 1024
_REDIRECTS = (301, 302, 307, 308)
#: The caller's headers not sent on to another origin when a redirect leads there.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
#: The last label of a host that WHATWG URL parsers read as an IPv4 address (decimal or hex).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def refusal_reason(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused (``None`` when it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = refusal_reason(embedded)
            if inner is not None:
                return f"IPv6 address embedding {embedded} ({inner})"
        if address.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address (use the IPv4 address itself)"
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_unspecified, "unspecified address"),
        (address.is_loopback, "loopback address"),
        (address.is_link_local, "link-local address (cloud metadata lives here)"),
        (address.is_multicast, "multicast address"),
        (
            isinstance(address, ipaddress.IPv4Address) and address in _SHARED,
            "shared address space (100.64.0.0/10)",
        ),
        (
            isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL,
            "unique-local address",
        ),
        (address.is_private, "private address"),
        (address.is_reserved, "reserved address"),
        (not address.is_global, "not a globally routable address"),
    )
    for refused, reason in checks:
        if refused:
            return reason
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:  # IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(address))
    return None


@dataclass(frozen=True)
class CheckedTarget:
    """A URL that passed the guard, and the address it will be connected to."""

    url: httpx2.URL
    host: str
    address: str
    allow_listed: bool

    def connect_url(self) -> httpx2.URL:
        """The URL with the checked address as host (no second name resolution)."""
        return self.url.copy_with(host=self.address)

    def host_header(self) -> str:
        """The ``Host`` header of the original URL."""
        return self.url.netloc.decode("ascii")

    def extensions(self) -> dict[str, Any]:
        """Request extensions: the original name as TLS server name, so certificates match."""
        return {"sni_hostname": self.host} if self.url.scheme == "https" else {}


def check_url(url: str | httpx2.URL, allowed_hosts: list[str] | tuple[str, ...]) -> CheckedTarget:
    """Resolve and check ``url``; raise :class:`WebhookURLRefusedError` when it is not allowed."""
    import httpx2

    if not isinstance(url, str | httpx2.URL):
        raise WebhookURLRefusedError(f"webhook URL refused: expected a string, got {type(url)}")
    try:
        parsed = httpx2.URL(url) if isinstance(url, str) else url
    except (httpx2.InvalidURL, TypeError, ValueError) as exc:
        raise WebhookURLRefusedError(f"webhook URL refused: not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookURLRefusedError(
            f"webhook URL refused: scheme {parsed.scheme!r} is not http or https"
        )
    host = parsed.host.lower().rstrip(".")
    if not host:
        raise WebhookURLRefusedError("webhook URL refused: it has no host")
    _check_numeric_host(host)
    if parsed.port is not None and not 0 < parsed.port <= 65535:
        raise WebhookURLRefusedError(f"webhook URL refused: port {parsed.port} is out of range")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    allow_listed = host in allowed_hosts or f"{host}:{port}" in allowed_hosts
    addresses = _resolve(host, port)
    if not allow_listed:
        for address in addresses:
            reason = refusal_reason(address)
            if reason is not None:
                raise WebhookURLRefusedError(
                    f"webhook URL refused: host {host!r} resolves to {address}, a {reason}"
                    " (list the host in WEBHOOK_ALLOWED_HOSTS to allow it in development)"
                )
    return CheckedTarget(
        url=parsed, host=host, address=str(addresses[0]), allow_listed=allow_listed
    )


def _check_numeric_host(host: str) -> None:
    """Refuse a host that reads as an IPv4 address in a form other than ``a.b.c.d``."""
    if ":" in host or not _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return
    try:
        canonical = str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        canonical = False
    if not canonical:
        raise WebhookURLRefusedError(
            f"webhook URL refused: host {host[:80]!r} is a number but not a dotted-quad IPv4 "
            "address (octal, hex, short or integer forms are ambiguous)"
        )


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse a header that cannot be sent as given (the message names it, not its value)."""
    if not isinstance(headers, Mapping):
        raise WebhookError(f"webhook headers must be a mapping, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise WebhookError(f"webhook header name {name!r} is not a valid HTTP token")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            raise WebhookError(
                f"webhook header {name!r} must be a string of printable ASCII (no control "
                "characters or line breaks)"
            )


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise WebhookURLRefusedError(
            f"webhook URL refused: host {host!r} does not resolve ({exc})"
        ) from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0])
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise WebhookURLRefusedError(f"webhook URL refused: host {host!r} has no address")
    return addresses


def signature_headers(secret: str, message_id: str, body: str) -> dict[str, str]:
    """The Standard Webhooks headers signing ``body`` with ``secret`` (base64, ``whsec_`` ok)."""
    from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

    try:
        signer = Webhook(secret)
    except (EmptyWebhookSecretError, ValueError) as exc:
        raise WebhookError(
            "WEBHOOK_SIGNING_SECRET is not a usable Standard Webhooks secret "
            "(expected base64, optionally prefixed with whsec_)"
        ) from exc
    now = datetime.now(tz=UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(message_id, now, body),
    }


def new_message_id() -> str:
    """A fresh Standard Webhooks message id (kept across the retries of one delivery)."""
    return f"msg_{uuid.uuid4().hex}"


@dataclass
class DeliveryReport:
    """What happened to one delivery, attempts and redirects included."""

    outcome: str = "failed"
    status_code: int | None = None
    attempts: int = 0
    duration: float = 0.0
    error: str | None = None
    response_body: bytes = b""
    #: Set when a redirect was refused (``outcome`` "blocked"): raised once recorded.
    refused: WebhookURLRefusedError | None = None


class AttemptFailed(Exception):
    """One delivery attempt failed; ``transient`` says whether another attempt may succeed."""

    def __init__(
        self, reason: str, *, status: int | None, transient: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after


def deliver(
    *,
    url: str,
    body: str,
    headers: dict[str, str],
    message_id: str,
    secret: str | None,
    timeout: float,
    allowed_hosts: list[str],
    policy: RetryPolicy,
) -> DeliveryReport:
    """POST ``body`` to ``url`` under ``policy``: the guard first, then attempts until success,
    a permanent answer (a 4xx such as 410 Gone), or the policy gives up."""
    import httpx2

    check_url(url, allowed_hosts)  # refuse before anything is sent
    report = DeliveryReport()
    payload = body.encode("utf-8")
    started = time.monotonic()

    def attempt(client: httpx2.Client) -> None:
        report.attempts += 1
        sent = dict(headers)
        sent["content-type"] = "application/json"
        # Uncompressed, so the 64 KiB bound is on the bytes received (no decompression bomb).
        sent.setdefault("accept-encoding", "identity")
        if secret is not None:
            sent.update(signature_headers(secret, message_id, body))
        status, response_body, final_url, retry_after = _post_following_redirects(
            client, url, payload, sent, timeout, allowed_hosts, report
        )
        report.status_code = status
        report.response_body = response_body
        log = {
            "webhook_host": httpx2.URL(final_url).host,
            "status": status,
            "attempt": report.attempts,
            "message_id": message_id,
        }
        if 200 <= status < 300:
            logger.debug("webhook delivered", extra=log)
            return
        logger.warning("webhook attempt failed", extra=log)
        if status == 410:
            raise AttemptFailed(
                "receiver answered 410 Gone: not retried", status=status, transient=False
            )
        transient = status == 429 or status >= 500
        raise AttemptFailed(
            f"receiver answered {status}",
            status=status,
            transient=transient,
            retry_after=retry_after,
        )

    client = httpx2.Client(verify=shared_ssl_context(), trust_env=False, follow_redirects=False)
    try:
        policy.call(_attempt_mapping_transport_errors, attempt, client)
        report.outcome = "delivered"
    except AttemptFailed as exc:
        report.outcome = "failed"
        report.error = str(exc)
    except WebhookURLRefusedError as exc:  # a redirect target: the first hop was sent to
        report.outcome = "blocked"
        report.error = str(exc)
        report.refused = exc
    finally:
        client.close()
        report.duration = time.monotonic() - started
    return report


def _attempt_mapping_transport_errors(fn: Any, client: httpx2.Client) -> None:
    import httpx2

    try:
        fn(client)
    except httpx2.TimeoutException as exc:
        logger.warning("webhook attempt timed out", extra={"error": type(exc).__name__})
        raise AttemptFailed(
            f"timed out ({type(exc).__name__})", status=None, transient=True
        ) from None
    except httpx2.TransportError as exc:
        logger.warning("webhook attempt could not connect", extra={"error": type(exc).__name__})
        raise AttemptFailed(
            f"connection failed ({type(exc).__name__}: {one_line(str(exc), 120)})",
            status=None,
            transient=True,
        ) from None
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
        # Nothing of httpx2 leaves a delivery unwrapped: the rest is a failed attempt.
        logger.warning("webhook attempt failed", extra={"error": type(exc).__name__})
        raise AttemptFailed(
            f"request failed ({type(exc).__name__}: {one_line(str(exc), 120)})",
            status=None,
            transient=False,
        ) from None


def _post_following_redirects(
    client: httpx2.Client,
    url: str,
    payload: bytes,
    headers: dict[str, str],
    timeout: float,
    allowed_hosts: list[str],
    report: DeliveryReport,
) -> tuple[int, bytes, str, float | None]:
    import httpx2

    current = httpx2.URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        target = check_url(current, allowed_hosts)
        request_headers = {**headers, "host": target.host_header()}
        with client.stream(
            "POST",
            target.connect_url(),
            content=payload,
            headers=request_headers,
            timeout=timeout,
            extensions=target.extensions(),
        ) as response:
            body = _read_bounded(response)
            status = response.status_code
            location = response.headers.get("location")
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status in _REDIRECTS and location:
            report.status_code = status
            following = _redirect_target(current, location)
            if _origin(following) != _origin(current):
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            current = following
            continue
        return status, body, str(current), retry_after
    raise WebhookURLRefusedError(
        f"webhook URL refused: more than {MAX_REDIRECTS} redirects (the last to host "
        f"{current.host[:80]!r})"
    )


def _redirect_target(current: httpx2.URL, location: str) -> httpx2.URL:
    """The URL a ``Location`` leads to from ``current``, or :class:`WebhookURLRefusedError`
    when it is no valid URL, names no host, or carries credentials."""
    import httpx2

    if not location.isascii() or not location.isprintable() or "\\" in location:
        raise WebhookURLRefusedError(
            "webhook URL refused: the redirect's Location is not a printable ASCII URL "
            "(or holds a backslash)"
        )
    scheme = _SCHEME.match(location)
    rest = location[scheme.end() :] if scheme else location
    if scheme and not rest.startswith("//"):  # "http:/x", "http:x": parsers disagree
        raise WebhookURLRefusedError(
            "webhook URL refused: the redirect's Location has a scheme but no //host"
        )
    if rest.startswith("//") and not re.split(r"[/?#]", rest[2:], maxsplit=1)[0]:
        raise WebhookURLRefusedError("webhook URL refused: the redirect's Location names no host")
    try:
        following = current.join(location)
    except (httpx2.InvalidURL, UnicodeError, ValueError) as exc:
        raise WebhookURLRefusedError(
            f"webhook URL refused: the redirect's Location is not a valid URL "
            f"({one_line(str(exc), 120)})"
        ) from None
    if following.userinfo:
        raise WebhookURLRefusedError(
            f"webhook URL refused: the redirect to host {following.host[:80]!r} carries "
            "credentials (user:password@)"
        )
    return following


def _origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _read_bounded(response: httpx2.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        chunks.append(chunk[: MAX_RESPONSE_BYTES - size])
        size += len(chunks[-1])
        if size >= MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)
