"""The webhook SSRF guard: a table of hostile URLs, every one refused before anything is sent.

URLs that would reach this machine point at a live decoy server's port: a guard that let one
through would show up as a connection to the decoy. The "backend" is a fault server too, to
prove a refused webhook records nothing. No test here sends traffic off loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, strategies as st

from backend.workers.shared._webhooks import check_url, refusal_reason
from backend.workers.shared.api_client import (
    InternalAPIClient,
    WebhookError,
    WebhookURLRefusedError,
)
from backend.workers.shared.config import WorkerConfig
from tests.fault_server import FaultServer, Respond

HOSTILE = [
    # loopback in every spelling (these point at the decoy's port)
    "http://127.0.0.1:{port}/hook",
    "http://127.1:{port}/",
    "http://127.255.255.254:{port}/",
    "http://2130706433:{port}/",  # decimal
    "http://0x7f000001:{port}/",  # hexadecimal
    "http://0x7f.0.0.1:{port}/",
    "http://0177.0.0.1:{port}/",  # octal
    "http://017700000001:{port}/",
    "http://localhost:{port}/",  # a name resolving to loopback
    "http://LocalHost.:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped
    "http://[::ffff:7f00:1]:{port}/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",  # NAT64 embedding loopback
    "http://[2002:7f00:1::1]:{port}/",  # 6to4 embedding loopback
    "http://0:{port}/",  # unspecified, reaches the local host
    "http://0.0.0.0:{port}/",
    "http://[::]:{port}/",
    "http://user:pass@127.0.0.1:{port}/",
    "http://example.com@127.0.0.1:{port}/",
    "https://127.0.0.1:{port}/",
    # link-local and cloud metadata
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    # private, shared, reserved, multicast, documentation, unique-local
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # shared address space (carrier-grade NAT)
    "http://224.0.0.1/",
    "http://239.255.255.250:1900/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://192.0.2.10/",
    "http://198.18.0.1/",
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    # not http(s), no host, no such host
    "file:///etc/passwd",
    "ftp://127.0.0.1/",
    "gopher://127.0.0.1:{port}/_",
    "http:///no-host",
    "http://does-not-exist.invalid/",
    "not a url at all",
]


pytestmark = pytest.mark.usefixtures("no_sleep")  # retries run without sleeping


@pytest.fixture(scope="module")
def decoy() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(200, {"leaked": True})) as server:
        yield server


@pytest.fixture(scope="module")
def backend() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(201, {"id": "d-1", "url": "x", "outcome": "delivered"})) as s:
        yield s


def make_client(backend: FaultServer, **overrides: Any) -> InternalAPIClient:
    values: dict[str, Any] = {
        "internal_service_api_key": "swi-test-key-7Q2xK9-ssrf",
        "django_app_backend_url": backend.url,
        "organization_id": "org-a",
        "api_retry_base_delay": 0.01,
        "api_retry_max_delay": 0.05,
        "_env_file": None,
    }
    values.update(overrides)
    return InternalAPIClient(WorkerConfig(**values))


def test_table_is_big_enough() -> None:
    assert len(HOSTILE) >= 25


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_url_is_refused_and_nothing_is_sent_or_recorded(
    template: str, decoy: FaultServer, backend: FaultServer
) -> None:
    url = template.format(port=decoy.port)
    before = decoy.connections_accepted
    backend.reset()
    client = make_client(backend)
    with pytest.raises(WebhookURLRefusedError) as info:
        client.send_webhook(url, {"data": "test"})
    message = str(info.value)
    assert message.startswith("webhook URL refused:") and "\n" not in message
    assert decoy.connections_accepted == before
    assert backend.requests == []


def test_refusal_names_the_reason(backend: FaultServer) -> None:
    client = make_client(backend)
    with pytest.raises(WebhookURLRefusedError, match=r"169\.254\.169\.254, a link-local"):
        client.send_webhook("http://169.254.169.254/latest/", {})
    with pytest.raises(WebhookURLRefusedError, match=r"embedding 127\.0\.0\.1"):
        client.send_webhook("http://[::ffff:127.0.0.1]/", {})
    with pytest.raises(WebhookURLRefusedError, match="WEBHOOK_ALLOWED_HOSTS"):
        client.send_webhook("http://localhost/", {})
    with pytest.raises(WebhookURLRefusedError, match="scheme 'file'"):
        client.send_webhook("file:///etc/passwd", {})


REFUSED_REDIRECTS = [
    # odd IPv4 spellings (httpx2 raised a raw InvalidURL for the octal one)
    "http://0177.0.0.1:{port}/", "http://0x7f.1:{port}/", "http://0x7f000001:{port}/",
    "http://2130706433:{port}/", "http://127.1:{port}/", "http://0:{port}/",
    "http://1.2.3.4.5/", "http://256.0.0.1/", "http://017700000001:{port}/",
    # refused addresses
    "http://127.0.0.1:{port}/inner", "http://169.254.169.254/latest/",
    "http://[::ffff:127.0.0.1]:{port}/", "http://[::1]:{port}/", "http://10.0.0.1/",
    "http://[fe80::1%25eth0]/",
    # credentials, other schemes, no host
    "http://user:pw@localhost:{port}/", "http://localhost@127.0.0.1:{port}/",
    "http://:@localhost:{port}/", "file:///etc/passwd", "gopher://localhost:{port}/_",
    "ftp://localhost/", "javascript:alert(1)", "data:text/plain,x", "http:///x", "///x", "//",
    "http://", "http:/localhost:{port}/", "http:localhost", "/\\127.0.0.1/", "\\\\evil/",
    # not URLs, IDN oddities, ports out of range
    "http://[::1/", "http://[not-ipv6]/", "http://l\xf3calhost:{port}/", "http://m\xfcnchen.de/",
    "http://xn--/", "http://exa mple.com/", "http://localhost:99999/", "http://localhost:-1/",
    "http://localhost:0/", "http://" + "a" * 64 + ".invalid/", "http://a..b/",
]


def test_redirect_table_is_wide() -> None:
    assert len(REFUSED_REDIRECTS) >= 40


@pytest.mark.parametrize("template", REFUSED_REDIRECTS)
def test_a_refused_redirect_is_raised_and_recorded_as_blocked(
        template: str, decoy: FaultServer, backend: FaultServer) -> None:
    client = make_client(backend, webhook_allowed_hosts="localhost")
    location = template.format(port=decoy.port)
    with FaultServer(default=Respond(302, b"", {"Location": location})) as hop:
        before = decoy.connections_accepted
        backend.reset()
        with pytest.raises(WebhookURLRefusedError) as info:
            client.send_webhook(f"http://localhost:{hop.port}/start", {"a": 1})
        assert len(hop.requests) == 1  # the allowed first hop was asked, once (no retry)
        assert decoy.connections_accepted == before  # the redirect target never was
    message = str(info.value)
    assert message.startswith("webhook URL refused:") and "\n" not in message
    assert "pw" not in message
    recorded = [r.json() for r in backend.requests if r.method == "POST"]
    assert len(recorded) == 1 and recorded[0]["outcome"] == "blocked", recorded
    assert recorded[0]["status_code"] == 302 and recorded[0]["attempts"] == 1
    assert recorded[0]["error_message"] == message
    assert info.value.result is not None and info.value.result.outcome == "blocked"
    assert info.value.result.delivery_id == "d-1"


@pytest.mark.parametrize("headers", [
    ["X-Bad", "v"], "X-Bad: v", {5: "v"},
    {"X-Bad": "a\nb"}, {"X-Bad": "a\r\nInjected: 1"}, {"X-Bad": "nul\x00"},
    {"X-Bad": "caf\xe9"}, {"X-Bad": "\ud800"}, {"Bad Name": "v"}, {"X-Bad:": "v"},
    {"": "v"}, {"X-Bad": 5},
])
def test_headers_that_cannot_be_sent_are_a_webhook_error_naming_them(
        headers: Any, decoy: FaultServer, backend: FaultServer) -> None:
    client = make_client(backend, webhook_allowed_hosts="localhost")
    backend.reset()
    before = decoy.connections_accepted
    with pytest.raises(WebhookError, match="webhook header") as info:
        client.send_webhook(f"http://localhost:{decoy.port}/h", {"a": 1}, headers=headers)
    assert not isinstance(info.value, WebhookURLRefusedError)
    assert decoy.connections_accepted == before and backend.requests == []


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "2a00:1450:4001:82b::200e"],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None
    host = f"[{address}]" if ":" in address else address
    target = check_url(f"https://{host}/hook", [])  # checked only: nothing is sent
    assert target.address == address and not target.allow_listed
    assert target.extensions() == {"sni_hostname": address}


def test_allow_listed_name_connects_to_the_checked_address() -> None:
    target = check_url("http://LOCALHOST:8123/x?y=1", ["localhost"])
    assert target.allow_listed and target.address == "127.0.0.1"
    assert str(target.connect_url()) == "http://127.0.0.1:8123/x?y=1"
    assert target.host_header() == "localhost:8123"


@given(st.ip_addresses(v=4))
def test_ipv6_embedding_a_refused_ipv4_is_refused(address: ipaddress.IPv4Address) -> None:
    inner = refusal_reason(address)
    for wrapped in (
        ipaddress.IPv6Address(f"::ffff:{address}"),  # IPv4-mapped
        ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address)),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | 1),  # 6to4
    ):
        outer = refusal_reason(wrapped)
        if inner is not None or wrapped.ipv4_mapped is not None:  # mapped: always refused
            assert outer is not None, wrapped


@given(st.ip_addresses(network="10.0.0.0/8") | st.ip_addresses(network="172.16.0.0/12")
       | st.ip_addresses(network="192.168.0.0/16") | st.ip_addresses(network="127.0.0.0/8")
       | st.ip_addresses(network="169.254.0.0/16") | st.ip_addresses(network="100.64.0.0/10")
       | st.ip_addresses(network="fc00::/7") | st.ip_addresses(network="fe80::/10")
       | st.ip_addresses(network="ff00::/8") | st.ip_addresses(network="224.0.0.0/4"))
def test_every_address_of_the_blocked_ranges_is_refused(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert refusal_reason(address) is not None


def test_allow_list_entry_with_a_port_exempts_that_port_only() -> None:
    assert check_url("http://localhost:8123/", ["localhost:8123"]).allow_listed
    with pytest.raises(WebhookURLRefusedError, match="loopback"):
        check_url("http://localhost:8124/", ["localhost:8123"])


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e999, True, "5"])
def test_a_bad_timeout_is_a_value_error_naming_it(timeout: Any, backend: FaultServer) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        make_client(backend).send_webhook("http://localhost/", {}, timeout=timeout)


BAD_SECONDS = [0, -1, float("nan"), float("inf"), float("-inf"), 1e999, True, "5", [1]]


@pytest.mark.parametrize("name", ["timeout", "deadline"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_a_call_with_a_bad_timeout_or_deadline_is_refused_before_sending(
    name: str, value: Any, backend: FaultServer
) -> None:
    backend.reset()
    client = make_client(backend)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        client._call("GET", "health/", None, **{name: value})
    assert backend.requests == []


@pytest.mark.parametrize("url", [None, b"http://localhost/", 5, ["http://localhost/"]])
def test_a_url_that_is_not_a_string_is_refused(url: Any, backend: FaultServer) -> None:
    backend.reset()
    with pytest.raises(WebhookURLRefusedError, match="expected a string"):
        make_client(backend).send_webhook(url, {})
    assert backend.requests == []
