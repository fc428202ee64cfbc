"""The backend as it runs for real: gunicorn (gthread) on a loopback port, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from tests.live_backend import REPO_ROOT, LiveBackend, backend_python, make_test_key


@pytest.fixture
def http(live_backend: LiveBackend) -> Iterator[httpx2.Client]:
    """A client for the SQLite live backend, with its key and organization."""
    with httpx2.Client(base_url=f"{live_backend.url}/internal/v1", timeout=30) as client:
        client.headers.update(live_backend.headers())
        yield client


@pytest.fixture
def org(live_backend: LiveBackend) -> str:
    """A fresh organization on the live backend."""
    return live_backend.create_organization(f"org-{uuid.uuid4().hex[:10]}")


def error_of(response: httpx2.Response) -> tuple[int, str]:
    """Status and error code, after checking the error shape."""
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    return response.status_code, str(body["error"])


def create(client: httpx2.Client, org_id: str | None = None, **fields: Any) -> dict[str, Any]:
    headers = {"X-Organization-ID": org_id} if org_id else {}
    response = client.post(
        "/workflow-executions/", json={"workflow_id": "wf", **fields}, headers=headers
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_authentication_over_http(live_backend: LiveBackend) -> None:
    url = f"{live_backend.url}/internal/v1/health/"
    key = live_backend.api_key
    cases = [
        ({}, "authentication_required"),
        ({"Authorization": key}, "invalid_authorization"),
        ({"Authorization": f"Token {key}"}, "invalid_authorization"),
        ({"Authorization": f"Bearer {key}x"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {key[:-1]}"}, "invalid_api_key"),
    ]
    for headers, code in cases:
        response = httpx2.get(url, headers=headers)
        assert error_of(response) == (401, code)
        assert key[:8] not in response.text and "Bearer " + key not in response.text
    assert httpx2.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_key_rotation_restart() -> None:
    old, new = make_test_key(), make_test_key()
    with LiveBackend(api_keys=[new, old], threads=2) as backend:
        url = f"{backend.url}/internal/v1/health/"
        for key in (old, new):
            assert httpx2.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        backend.stop()
        backend.api_keys = [new]
        backend.start()  # the old key is retired
        assert httpx2.get(url, headers={"Authorization": f"Bearer {new}"}).status_code == 200
        response = httpx2.get(url, headers={"Authorization": f"Bearer {old}"})
        assert error_of(response) == (401, "invalid_api_key")


def test_scoping_over_http(http: httpx2.Client, org: str) -> None:
    execution = create(http, org)
    path = f"/workflow-executions/{execution['id']}/"
    assert http.get(path, headers={"X-Organization-ID": org}).status_code == 200
    assert error_of(http.get(path)) == (404, "not_found")  # the fixture's default org
    no_org = {k: v for k, v in http.headers.items() if k.lower() != "x-organization-id"}
    response = httpx2.get(http.base_url.join("/internal/v1/workflow-executions/"), headers=no_org)
    assert error_of(response) == (400, "organization_required")
    response = http.get("/workflow-executions/", headers={"X-Organization-ID": "nobody"})
    assert error_of(response) == (404, "organization_not_found")


def test_transitions_over_http(http: httpx2.Client) -> None:
    execution = create(http)
    status_path = f"/workflow-executions/{execution['id']}/status/"
    running = http.post(status_path, json={"status": "IN_PROGRESS", "attempts": 1}).json()
    assert running["status"] == "IN_PROGRESS" and running["started_at"]
    again = http.post(status_path, json={"status": "IN_PROGRESS"})
    assert again.status_code == 200 and again.json()["started_at"] == running["started_at"]
    done = http.post(status_path, json={"status": "COMPLETED", "execution_time": 2.5}).json()
    assert done["status"] == "COMPLETED" and done["finished_at"]
    assert http.post(status_path, json={"status": "COMPLETED"}).json() == done
    response = http.post(status_path, json={"status": "IN_PROGRESS"})
    assert error_of(response) == (409, "illegal_transition")


def test_idempotency_over_http(http: httpx2.Client) -> None:
    key = {"Idempotency-Key": f"live-{uuid.uuid4()}"}
    first = http.post("/workflow-executions/", json={"workflow_id": "a"}, headers=key)
    again = http.post("/workflow-executions/", json={"workflow_id": "a"}, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = http.post("/workflow-executions/", json={"workflow_id": "b"}, headers=key)
    assert error_of(other) == (422, "idempotency_key_reused")


def test_request_id_echoed_and_logged(http: httpx2.Client, live_backend: LiveBackend) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    response = http.get("/workflow-executions/?status=NOPE", headers={"X-Request-ID": request_id})
    assert response.status_code == 400 and response.headers["X-Request-ID"] == request_id
    generated = http.get("/health/").headers["X-Request-ID"]
    assert generated
    lines = [json.loads(line) for line in live_backend.logs().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert mine and all(line["path"] == "/internal/v1/workflow-executions/" for line in mine)
    assert any(line.get("request_id") == generated for line in lines)


def test_errors_have_the_shape_over_http(http: httpx2.Client) -> None:
    json_type = {"Content-Type": "application/json"}
    response = http.post("/workflow-executions/", content=b"{nope", headers=json_type)
    assert error_of(response) == (400, "malformed_json")
    big = b'{"workflow_id": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = http.post(
        "/workflow-executions/", content=big, headers={"Content-Type": "application/json"}
    )
    assert error_of(response) == (413, "payload_too_large")
    assert error_of(http.get("/workflow-executions/123/")) == (404, "not_found")
    assert error_of(http.patch("/health/", json={})) == (405, "method_not_allowed")


def test_connections_are_kept_alive(live_backend: LiveBackend) -> None:
    request = (
        f"GET /internal/v1/health/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {live_backend.api_key}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", live_backend.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, "the server closed a kept-alive connection"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200")
            headers, _, body = head.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(body) < length:
                body += sock.recv(4096)


def test_data_survives_a_restart(live_backend: LiveBackend, http: httpx2.Client) -> None:
    execution = create(http)
    port = live_backend.port
    live_backend.stop()
    live_backend.start()
    assert live_backend.port == port
    with httpx2.Client(base_url=f"{live_backend.url}/internal/v1") as fresh:
        fresh.headers.update(live_backend.headers())
        assert fresh.get(f"/workflow-executions/{execution['id']}/").json() == execution


def test_refuses_to_start_without_a_key(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INTERNAL_SERVICE_API_KEY"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3", BACKEND_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [backend_python(), "manage.py", "check"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "INTERNAL_SERVICE_API_KEY" in done.stderr
    served = subprocess.run(
        [
            backend_python(), "-m", "gunicorn", "-c", "python:backend.internal_api.gunicorn_conf",
            "--bind", "127.0.0.1:0", "--workers", "1",
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode != 0
    assert "backend: INTERNAL_SERVICE_API_KEY is not set" in served.stderr


def test_no_part_of_the_key_is_ever_logged(tmp_path: Any) -> None:
    """Every code path at DEBUG level, including refused near-miss keys: the key stays out."""
    key = make_test_key()
    with LiveBackend(api_keys=[key], log_level="DEBUG", threads=2) as backend:
        base = f"{backend.url}/internal/v1"
        good = backend.headers()
        for headers in (
            {},
            {"Authorization": f"Bearer {key}x"},
            {"Authorization": key},
            {"Authorization": f"Bearer {key[:8]}"},
        ):
            httpx2.get(f"{base}/health/", headers=headers)
        execution = httpx2.post(
            f"{base}/workflow-executions/", json={"workflow_id": "w"}, headers=good
        ).json()
        httpx2.post(
            f"{base}/workflow-executions/{execution['id']}/status/",
            json={"status": "X"},
            headers=good,
        )
        httpx2.post(f"{base}/workflow-executions/", content=b"{", headers=good)
        httpx2.get(f"{base}/nothing/", headers=good)
        httpx2.get(f"{base}/schema/", headers=good)
        backend.stop()
        logs = backend.logs()
    assert '"level": "debug"' in logs or '"level": "info"' in logs
    assert key not in logs and key[:8] not in logs
    assert key[8:24] not in logs


# --- PostgreSQL: races and requests in flight ------------------------------------------------


@pytest.fixture
def pg_http(live_backend_pg: LiveBackend) -> Iterator[httpx2.Client]:
    """A client for the PostgreSQL live backend."""
    yield from _client(live_backend_pg)


@pytest.fixture(
    params=["live_backend", pytest.param("live_backend_pg", marks=pytest.mark.postgres)]
)
def any_http(request: pytest.FixtureRequest) -> Iterator[httpx2.Client]:
    """A client for the SQLite live backend, then for the PostgreSQL one."""
    yield from _client(request.getfixturevalue(request.param))


def _client(backend: LiveBackend) -> Iterator[httpx2.Client]:
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx2.Client(base_url=f"{backend.url}/internal/v1", timeout=60, limits=limits) as client:
        client.headers.update(backend.headers())
        yield client


def test_racing_terminal_transitions_exactly_one_wins(any_http: httpx2.Client) -> None:
    pg_http = any_http
    targets = ["COMPLETED", "ERROR", "STOPPED"] * 8 + ["IN_PROGRESS", "QUEUED"] * 2
    for _ in range(4):
        execution = create(pg_http)
        path = f"/workflow-executions/{execution['id']}/status/"
        assert pg_http.post(path, json={"status": "IN_PROGRESS"}).status_code == 200
        barrier = threading.Barrier(len(targets))

        def send(target: str, path: str = path, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait()
            return target, pg_http.post(path, json={"status": target})

        with ThreadPoolExecutor(len(targets)) as pool:
            answers = list(pool.map(send, targets))
        final = pg_http.get(f"/workflow-executions/{execution['id']}/").json()
        assert final["status"] in ("COMPLETED", "ERROR", "STOPPED")
        finished_at = {
            r.json()["finished_at"]
            for t, r in answers
            if r.status_code == 200 and t == final["status"]
        }
        assert finished_at == {final["finished_at"]}
        for target, response in answers:
            if target == final["status"]:
                assert response.status_code == 200, (target, response.text)
            elif target == "IN_PROGRESS" and response.status_code == 200:
                continue  # a no-op that came before the terminal status
            else:
                assert error_of(response) == (409, "illegal_transition"), (target, final)


def test_patch_and_transition_do_not_lose_each_other(any_http: httpx2.Client) -> None:
    pg_http = any_http
    for _ in range(5):
        execution = create(pg_http)
        base = f"/workflow-executions/{execution['id']}/"
        with ThreadPoolExecutor(3) as pool:
            patched = pool.submit(
                pg_http.patch, base, json={"result": {"n": 1}, "successful_files": 7}
            )
            moved = pool.submit(pg_http.post, base + "status/", json={"status": "IN_PROGRESS"})
            assert patched.result().status_code == 200 and moved.result().status_code == 200
        final = pg_http.get(base).json()
        assert (final["status"], final["result"], final["successful_files"]) == (
            "IN_PROGRESS",
            {"n": 1},
            7,
        )


def test_same_key_from_many_threads_creates_once(any_http: httpx2.Client) -> None:
    key = {"Idempotency-Key": f"herd-{uuid.uuid4()}"}
    workflow = f"wf-{uuid.uuid4().hex}"
    barrier = threading.Barrier(16)

    def send(_: int) -> httpx2.Response:
        barrier.wait()
        return any_http.post("/workflow-executions/", json={"workflow_id": workflow}, headers=key)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    created = [r for r in answers if r.status_code == 201]
    assert created and all(r.json() == created[0].json() for r in created)
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in created) == 1
    for response in answers:
        if response.status_code != 201:
            assert error_of(response) == (409, "idempotency_in_flight")
    listed = any_http.get(f"/workflow-executions/?workflow_id={workflow}").json()["results"]
    assert [row["id"] for row in listed] == [created[0].json()["id"]]


@pytest.mark.postgres
def test_idempotency_key_in_flight_is_409(
    live_backend_pg: LiveBackend, pg_http: httpx2.Client
) -> None:
    import psycopg

    execution = create(pg_http)
    path = f"/workflow-executions/{execution['id']}/status/"
    key = {"Idempotency-Key": f"flight-{uuid.uuid4()}"}
    with psycopg.connect(live_backend_pg.database_url) as lock:
        # Hold the execution's row lock: the first request takes the key, then waits.
        lock.execute(
            "SELECT id FROM internal_api_workflowexecution WHERE id = %s FOR UPDATE",
            [execution["id"]],
        )
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(pg_http.post, path, json={"status": "IN_PROGRESS"}, headers=key)
            with psycopg.connect(live_backend_pg.database_url, autocommit=True) as probe:
                for _ in range(600):  # until the first request holds the key's lock
                    held = probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database())"
                    ).fetchone()
                    if held and held[0]:
                        break
                    time.sleep(0.05)
            second = pg_http.post(path, json={"status": "IN_PROGRESS"}, headers=key)
            assert error_of(second) == (409, "idempotency_in_flight")
            assert second.headers["Retry-After"] == "1"
            lock.rollback()  # let the first one finish
            assert first.result().status_code == 200
    replay = pg_http.post(path, json={"status": "IN_PROGRESS"}, headers=key)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.result().json()


def test_live_backend_imports_without_django() -> None:
    code = "import sys, tests.live_backend; assert 'django' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.postgres
def test_database_gone_is_503_with_retry_after_never_500() -> None:
    import psycopg

    from tests.conftest import POSTGRES_ADMIN_URL

    with LiveBackend.postgres(threads=2) as backend:
        client = httpx2.Client(base_url=f"{backend.url}/internal/v1", headers=backend.headers())
        with client:
            execution = create(client)
            name = backend.database_url.rsplit("/", 1)[1]
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            assert client.get("/health/").status_code == 200  # liveness needs no database
            status_path = f"/workflow-executions/{execution['id']}/status/"
            keyed = {"Idempotency-Key": "db-gone"}
            for _ in range(2):  # the broken connection, then a failed reconnect
                for response in (
                    client.get(f"/workflow-executions/{execution['id']}/"),
                    client.post(status_path, json={"status": "QUEUED"}),
                    client.post(status_path, json={"status": "QUEUED"}, headers=keyed),
                    client.post("/workflow-executions/", json={"workflow_id": "w"}),
                ):
                    assert error_of(response) == (503, "database_unavailable")
                    assert response.headers["Retry-After"] == "1"
            logs = backend.logs()
        assert "database unavailable" in logs and "Traceback" not in logs


def test_the_shared_backend_never_logged_its_key(live_backend: LiveBackend) -> None:
    """Defined last: by now the session's SQLite backend has served every test above."""
    logs = live_backend.logs()
    assert '"logger": "backend.access"' in logs
    assert live_backend.api_key not in logs and live_backend.api_key[:8] not in logs


# --- chunked bodies, database URLs, a master killed with -9 ----------------------------------


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request (it asks the server to close) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _chunked(method: str, path: str, backend: LiveBackend, chunks: list[bytes]) -> bytes:
    head = (
        f"{method} /internal/v1/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {backend.api_key}\r\nX-Organization-ID: {backend.org_id}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return head + body + b"0\r\n\r\n"


def test_a_chunked_body_is_read_with_the_same_limit(
    live_backend: LiveBackend, http: httpx2.Client
) -> None:
    port = live_backend.port
    workflow = f"wf-chunked-{uuid.uuid4().hex}"
    status, _, body = _exchange(
        port,
        _chunked(
            "POST",
            "workflow-executions/",
            live_backend,
            [b'{"workflow_id"', f': "{workflow}"}}'.encode()],
        ),
    )
    assert status == 201, body
    created = json.loads(body)
    assert created["workflow_id"] == workflow
    path = f"workflow-executions/{created['id']}/"
    status, _, body = _exchange(
        port, _chunked("PATCH", path, live_backend, [b'{"total_files": 7,', b' "result": [1]}'])
    )
    assert status == 200 and json.loads(body)["total_files"] == 7
    assert http.get(f"/{path}").json()["result"] == [1]
    big = [b'{"task_id": "', b"x" * (1024 * 1024), b'"}']
    status, _, body = _exchange(port, _chunked("PATCH", path, live_backend, big))
    assert (status, json.loads(body)["error"]) == (413, "payload_too_large")
    broken = _chunked("PATCH", path, live_backend, [b'{"task_id": "t"}']).replace(
        b"10\r\n", b"3\r\n"
    )
    status, _, body = _exchange(port, broken)
    assert (status, json.loads(body)["error"]) == (400, "bad_request")
    assert http.get(f"/{path}").json()["task_id"] == ""


SECRET = "s3cr3t-pw-Zq"
BAD_DATABASE_URLS = [
    pytest.param(
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/no_such_db_i9",
        "no_such_db_i9",
        marks=pytest.mark.postgres,
        id="missing-database",
    ),
    pytest.param(f"postgresql://app:{SECRET}@127.0.0.1:1/appdb", "appdb", id="refused"),
    pytest.param(f"postgresql://app:{SECRET}@no-such-host.invalid/appdb", "appdb", id="no-host"),
    pytest.param(f"mysqlx://app:{SECRET}@db/appdb", "scheme", id="bad-scheme"),
    pytest.param(f"postgresql://app:{SECRET}@db:port/appdb", "not a valid URL", id="bad-url"),
    pytest.param("sqlite:////no/such/dir/db.sqlite3", "/no/such/dir/db.sqlite3", id="sqlite"),
]


@pytest.mark.parametrize("command", ["migrate", "gunicorn"])
@pytest.mark.parametrize(("database_url", "named"), BAD_DATABASE_URLS)
def test_a_database_url_that_cannot_be_used_is_one_line(
    tmp_path: Any, database_url: str, named: str, command: str
) -> None:
    env = dict(os.environ, DATABASE_URL=database_url, BACKEND_DATA_DIR=str(tmp_path))
    env["INTERNAL_SERVICE_API_KEY"] = make_test_key()
    argv = {
        "migrate": [backend_python(), "manage.py", "migrate", "--noinput"],
        "gunicorn": [
            backend_python(), "-m", "gunicorn", "-c", "python:backend.internal_api.gunicorn_conf",
            "--bind", "127.0.0.1:0", "--workers", "1",
        ],
    }[command]  # fmt: skip
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, done.stderr
    assert "DATABASE_URL" in lines[0] and named in lines[0]
    assert SECRET not in done.stderr + done.stdout


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_new_backend_binds_the_port_right_after_kill_9_of_the_master(tmp_path: Any) -> None:
    backend = LiveBackend(workers=2, threads=4, data_dir=tmp_path)
    backend.start()
    stop = threading.Event()

    def keep_calling() -> None:  # kept-alive connections busy while the master dies
        with httpx2.Client(base_url=backend.url, headers=backend.headers(), timeout=5) as client:
            while not stop.is_set():
                try:
                    client.get("/internal/v1/health/")
                except httpx2.HTTPError:
                    time.sleep(0.01)

    callers = [threading.Thread(target=keep_calling) for _ in range(4)]
    try:
        for caller in callers:
            caller.start()
        time.sleep(0.5)
        master = backend.pid
        assert master is not None
        orphans = _children(master)
        assert len(orphans) == 2
        log_start = len(backend.logs())
        os.kill(master, signal.SIGKILL)
        assert backend._process is not None
        backend._process.wait(timeout=10)
        backend.start()  # at once, on the same port: gunicorn would retry a busy port
        restarted = backend.logs()[log_start:]
        assert "Connection in use" not in restarted, restarted[-2000:]
        with httpx2.Client(base_url=backend.url, headers=backend.headers()) as fresh:
            assert fresh.get("/internal/v1/health/").status_code == 200
        stop.set()
        for orphan in orphans:  # and the orphans end by themselves
            for _ in range(300):
                if not os.path.exists(f"/proc/{orphan}") or _is_zombie(orphan):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"orphaned worker {orphan} still running")
    finally:
        stop.set()
        for caller in callers:
            caller.join()
        backend.close()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
