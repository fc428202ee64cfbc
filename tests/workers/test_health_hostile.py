"""The health server under hostile input, over raw sockets to a real HealthServer.

Table-driven over methods, request targets, query strings, headers and bodies. Every case is
sent on a kept-alive connection followed by a sentinel ``GET /livez`` (``Connection: close``).
Asserted for each: never a 5xx (beyond the checks' own 503 and a 505 for HTTP/2+), every
answer but ``/metrics``' is JSON, errors are ``{"error", "detail"}``, no traceback or secret in
any answer, and exactly one answer per request: either the case's answer with
``Connection: close`` and nothing after it, or the case's answer and then the sentinel's.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.workers.shared.config import WorkerConfig
from backend.workers.shared.health import (
    MAX_BODY,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    HealthChecker,
    HealthServer,
)

pytestmark = pytest.mark.timeout(300)
API_KEY = "swi-test-key-hostile-Zq81"
SENTINEL = b"GET /livez HTTP/1.1\r\nHost: sentinel\r\nConnection: close\r\n\r\n"
STATUS_ENDPOINTS = ("/health", "/health/quick", "/readyz")  # 503 there is a finding


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    expect: int | None = None  # the status this case must get, when it is known
    head: bool = False  # the case is a HEAD request: its answer has no body


def request(method: bytes = b"GET", target: bytes = b"/livez", version: bytes = b"HTTP/1.1",
            headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
            host: bool = True) -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: health.test")
    lines += [name + b": " + value for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, raw: bytes, expect: int | None = None, head: bool = False) -> None:
        cases.append(Case(name, raw, expect, head))

    # Methods: only GET and HEAD are served; everything else is a JSON 405 with Allow.
    for method in (b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT",
                   b"PROPFIND", b"get", b"Get", b"head", b"FOO", b"M-SEARCH", b"X" * 200):
        add(f"method {method[:12]!r}", request(method), 405)
    for method in (b"G\x00T", b"GE(T", b"G\xc3\x89T", b"\xed\xa0\x80", b"G\x7fT", b"G\x01T",
                   b"GET\x0b"):
        add(f"bad method {method!r}", request(method), 400)
    add("HEAD /livez", request(b"HEAD"), 200, head=True)
    add("HEAD unknown path", request(b"HEAD", b"/nope"), 404, head=True)
    add("HEAD bad limit", request(b"HEAD", b"/health/history?limit=%C2%B2"), 400, head=True)

    # Endpoints and paths.
    for path in (b"/livez", b"/livez/", b"/health/history", b"/health/metrics", b"/metrics",
                 b"//livez", b"http://health.test/livez", b"/health/history?", b"/livez#x"):
        add(f"path {path!r}", request(target=path), 200)
    for path in (b"/health", b"/health/quick", b"/readyz"):
        add(f"status path {path!r}", request(target=path))
    for path in (b"/", b"/nope", b"/livez%00", b"/%ED%A0%80", b"/..%2F..%2Fetc%2Fpasswd",
                 b"/health/../livez", b"*", b"/" + b"a" * 7000, b"/health%2Fquick",
                 b"/LIVEZ", b"/livez.json"):
        add(f"unknown path {path[:24]!r}", request(target=path), 404)
    for path in (b"/liv\x00ez", b"/liv\x01ez", b"/liv\x7fez", b"/h\xc3\xa9alth",
                 b"/\xed\xa0\x80", b"/\xff\xfe", b"/livez\x1b[31m", b"/a\x85b", b"/a\xa0b"):
        add(f"raw byte target {path!r}", request(target=path), 400)
    add("target http://[::1", request(target=b"http://[::1/livez"), 400)

    # Query strings: every parameter is checked.
    for query in (b"limit=%C2%B2", b"limit=\xc2\xb2", b"limit=%D9%A1%D9%A2", b"limit=-1",
                  b"limit=0", b"limit=000", b"limit=", b"limit", b"limit=1e3", b"limit=+1",
                  b"limit=%201", b"limit=1.0", b"limit=0x10", b"limit=%FF", b"limit=%ED%A0%80",
                  b"limit=%00", b"limit=1%00", b"limit=%ZZ", b"limit=1&limit=2", b"limit=abc",
                  b"limit=%EF%BC%91", b"other=1", b"limit=1&x=2", b"%ED%A0%80=1", b"%00=1",
                  b"&".join(b"p%d=1" % n for n in range(11)), b"limit=1;x=1"):
        add(f"history query {query[:30]!r}", request(target=b"/health/history?" + query), 400)
    for query in (b"limit=1", b"limit=100", b"limit=007", b"limit=101",
                  b"limit=99999999999999999999", b"limit=" + b"9" * 5000):
        add(f"good history query {query[:30]!r}", request(target=b"/health/history?" + query),
            200)
    for path in (b"/livez", b"/metrics", b"/health/metrics"):
        add(f"parameter on {path!r}", request(target=path + b"?limit=1"), 400)
    for path in (b"/health", b"/health/quick", b"/health/metrics", b"/livez", b"/readyz",
                 b"/metrics"):
        for query in (b"%ED%A0%80", b"x=%00", b"x=\xff", b"\xc2\xb2=1", b"x=%C0%AF"):
            add(f"query {query!r} on {path!r}", request(target=path + b"?" + query), 400)

    # Request lines.
    add("HTTP/1.0", request(version=b"HTTP/1.0"), 200)
    add("HTTP/1.0 keep-alive", request(version=b"HTTP/1.0",
                                       headers=[(b"Connection", b"keep-alive")]), 200)
    add("HTTP/2.0", request(version=b"HTTP/2.0"), 505)
    add("HTTP/3.0", request(version=b"HTTP/3.0"), 505)
    for version in (b"HTTP/1.1x", b"http/1.1", b"HTTP/1", b"HTTP/1.\xc2\xb9", b"HTTP/11.1",
                    b"HTTP/1.1 extra", b"HTTP/\xd9\xa1.1", b"HTTPS/1.1", b""):
        add(f"version {version!r}", request(version=version), 400)
    add("HTTP/0.9 line", b"GET /livez\r\n", 400)
    add("two spaces", b"GET  /livez HTTP/1.1\r\nHost: x\r\n\r\n", 400)
    add("tabs", b"GET\t/livez\tHTTP/1.1\r\nHost: x\r\n\r\n", 400)
    add("bare LF line ends", b"GET /livez HTTP/1.1\nHost: x\n\n", 200)
    add("leading empty line", b"\r\n" + request(), 200)
    add("request line too long", request(target=b"/" + b"a" * MAX_REQUEST_LINE), 414)
    add("only spaces", b"   \r\n\r\n", 400)
    add("binary garbage", bytes(range(256)) + b"\r\n\r\n", 400)
    add("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n", 400)
    add("no Host", request(host=False), 200)

    # Headers.
    for value in (b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb", b"\x1b[2J"):
        add(f"control in value {value!r}", request(headers=[(b"X-Test", value)]), 400)
    for name in (b"Host", b"Connection", b"Expect", b"X-Request-ID", b"Authorization",
                 b"Cookie", b"Transfer-Encoding", b"Content-Type"):
        for value in (b"a\x00b", b"\x01", b"a\rb", b"\x7f"):
            add(f"control in {name.decode()} {value!r}", request(headers=[(name, value)]), 400)
    for value in (b"\xff\xfe", b"\xed\xa0\x80", b"caf\xc3\xa9", b"a\tb", b"", b" padded "):
        add(f"odd but legal value {value!r}", request(headers=[(b"X-Test", value)]), 200)
    for line in (b"No-Colon", b"Name : value", b" folded: line", b"\tfolded", b"N\xc3\xa4me: v",
                 b"Na\x00me: v", b": empty-name", b"Na(me): v"):
        add(f"bad header line {line!r}",
            b"GET /livez HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n", 400)
    add("obs-fold after Content-Length",
        b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n 0\r\n\r\nhello", 400)
    add("too many headers", request(headers=[(b"X-H%d" % n, b"v") for n in range(MAX_HEADERS + 1)]),
        431)
    add("as many headers as allowed",
        request(headers=[(b"X-H%d" % n, b"v") for n in range(MAX_HEADERS - 1)]), 200)
    add("one huge header", request(headers=[(b"X-Big", b"v" * MAX_HEADER_BYTES)]), 431)
    add("headers too large in sum",
        request(headers=[(b"X-H%d" % n, b"v" * 400) for n in range(90)]), 431)
    add("Connection: close", request(headers=[(b"Connection", b"close")]), 200)
    add("Connection: keep-alive, close", request(headers=[(b"Connection", b"keep-alive, Close")]),
        200)
    add("Authorization echoed nowhere",
        request(target=b"/nope", headers=[(b"Authorization", b"Bearer " + API_KEY.encode())]),
        404)

    # Content-Length and bodies.
    smuggled = b"GET /health/history HTTP/1.1\r\nHost: x\r\n\r\n"
    for method in (b"GET", b"POST", b"HEAD", b"DELETE", b"TRACE"):
        add(f"{method.decode()} with a body",
            request(method, headers=[(b"Content-Length", b"%d" % len(smuggled))], body=smuggled),
            200 if method in (b"GET", b"HEAD") else 405, head=method == b"HEAD")
    add("GET with Content-Length: 0", request(headers=[(b"Content-Length", b"0")]), 200)
    add("GET with Content-Length: 000", request(headers=[(b"Content-Length", b"000")]), 200)
    add("body of the largest size", request(b"POST", headers=[
        (b"Content-Length", b"%d" % MAX_BODY)], body=b"x" * MAX_BODY), 405)
    add("Expect: 100-continue", request(b"POST", headers=[
        (b"Content-Length", b"5"), (b"Expect", b"100-continue")], body=b"hello"), 405)
    for value in (b"abc", b"-1", b"+5", b"1e3", b"0x10", b"5.0", b"\xc2\xb2", b"\xd9\xa1",
                  b"5, 5", b"5 5", b"", b"\x00", b"%35"):
        add(f"Content-Length {value!r}",
            request(headers=[(b"Content-Length", value)], body=b"hello"), 400)
    for value in (b"%d" % (MAX_BODY + 1), b"9" * 30, b"9" * 5000, b"%d" % (2**63),
                  b"%d" % (2**64 + 5)):
        add(f"Content-Length {value[:20]!r} ({len(value)} digits)",
            request(b"POST", headers=[(b"Content-Length", value)], body=b"hello"), 413)
    add("two equal Content-Lengths", request(headers=[
        (b"Content-Length", b"5"), (b"Content-Length", b"5")], body=b"hello"), 400)
    add("two different Content-Lengths", request(headers=[
        (b"Content-Length", b"5"), (b"Content-Length", b"0")], body=b"hello" + smuggled), 400)
    add("content-length in lower case", request(headers=[(b"content-length", b"5")],
                                                body=b"hello"), 200)
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    for te in (b"chunked", b"gzip, chunked", b"identity", b"Chunked", b"chunked\x0b", b"xchunked"):
        add(f"Transfer-Encoding {te!r}",
            request(headers=[(b"Transfer-Encoding", te)], body=chunked), 400 if b"\x0b" in te
            else 411)
    add("Transfer-Encoding and Content-Length", request(b"POST", headers=[
        (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], body=chunked), 400)
    add("two Transfer-Encodings", request(headers=[
        (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity")], body=chunked),
        411)
    add("chunked smuggling a request", request(b"POST", headers=[
        (b"Transfer-Encoding", b"chunked")], body=b"0\r\n\r\n" + smuggled), 411)
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealthServer]:
    config = WorkerConfig(internal_service_api_key=API_KEY,
                          django_app_backend_url="http://127.0.0.1:9", worker_name="hostile",
                          worker_data_dir=Path(tmp_path_factory.mktemp("hostile")),
                          api_retry_attempts=0, health_check_timeout=2.0, _env_file=None)
    checker = HealthChecker(config)
    checker.run_checks()  # /health/quick has a report to show
    health = HealthServer(checker, port=0, host="127.0.0.1")
    health.start()
    yield health
    health.stop()


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, stop writing, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def parse_answers(data: bytes, head_first: bool) -> list[Answer]:
    """Split a byte stream into HTTP answers (interim 1xx answers left out)."""
    answers: list[Answer] = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end > 0, f"not an HTTP answer: {data[:200]!r}"
        lines = data[:end].decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        data = data[end + 4:]
        if int(status) < 200:
            continue
        size = 0 if head_first and not answers else int(headers["content-length"])
        answers.append(Answer(int(status), headers, data[:size]))
        data = data[size:]
    return answers


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(server: HealthServer, case: Case) -> None:
    answers = parse_answers(exchange(server.port, case.raw + SENTINEL), case.head)
    assert answers, "no answer at all"
    first = answers[0]
    if first.headers.get("connection") == "close":
        assert len(answers) == 1, f"answers after Connection: close: {answers[1:]}"
    else:
        assert len(answers) == 2, f"one request, {len(answers) - 1} answers: {answers}"
        assert answers[1].status == 200 and json.loads(answers[1].body)["status"] == "alive"
    if case.expect is not None:
        assert first.status == case.expect, first
    assert first.status < 500 or first.status == 505 or (
        first.status == 503 and any(p.encode() in case.raw for p in STATUS_ENDPOINTS)), first
    for answer in answers:
        text = answer.body.decode("utf-8")
        assert "Traceback" not in text and API_KEY not in text
        assert API_KEY not in json.dumps(answer.headers)
        if answer.headers["content-type"].startswith("text/plain"):
            assert answer.status == 200 and b"/metrics" in case.raw
            continue
        assert answer.headers["content-type"] == "application/json"
        if answer is first and case.head:
            continue
        payload = json.loads(text)
        if answer.status >= 400 and answer.status != 503:  # 503: a report, not an error
            assert set(payload) == {"error", "detail"}, payload
            assert payload["error"].isidentifier() and payload["detail"]
    if first.status == 405:
        assert first.headers["allow"] == "GET, HEAD"


def test_the_suite_is_wide() -> None:
    assert len(CASES) >= 200, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


def test_pipelined_requests_get_one_answer_each(server: HealthServer) -> None:
    body = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (request() + request(b"POST", headers=[(b"Content-Length", b"%d" % len(body))],
                               body=body) + request(target=b"/health/history?limit=1")
           + request(b"TRACE") + SENTINEL)
    answers = parse_answers(exchange(server.port, raw), head_first=False)
    assert [a.status for a in answers] == [200, 405, 200, 405, 200]


def test_a_body_cut_short_gets_no_answer_and_no_desync(server: HealthServer) -> None:
    raw = request(headers=[(b"Content-Length", b"100")], body=b"GET /livez HTTP/1.1\r\n\r\n")
    assert exchange(server.port, raw) == b""  # the client went away mid-body: nothing to say


def test_a_stalled_request_gets_a_json_408(server: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    answers = parse_answers(received, head_first=False)
    assert [a.status for a in answers] == [408]
    assert json.loads(answers[0].body)["error"] == "request_timeout"
    assert answers[0].headers["connection"] == "close"
