"""health: checks bounded in time, report shapes and codes over real HTTP, probes, errors."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared.config import ConfigurationError, WorkerConfig
from backend.workers.shared.health import (
    HealthChecker,
    HealthCheckResult,
    HealthServer,
    HealthStatus,
    worst,
)
from backend.workers.shared.logging_utils import WorkerLogger
from tests.conftest import free_port
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.timeout(120)
README_KEYS = ["status", "timestamp", "uptime_seconds", "worker_name", "checks"]


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


def get_json(url: str) -> tuple[int, Any]:
    status, _, body = get(url)
    return status, json.loads(body)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., WorkerConfig]:
    def make(backend_url: str = "http://127.0.0.1:9", api_key: str = "swi-test-key-health-1",
             **values: Any) -> WorkerConfig:
        values.setdefault("health_check_timeout", 3.0)
        return WorkerConfig(internal_service_api_key=api_key, django_app_backend_url=backend_url,
                            worker_name="health-test", worker_data_dir=tmp_path,
                            api_retry_attempts=0, _env_file=None, **values)
    return make


@pytest.fixture
def live_config(live_backend: LiveBackend, make_config: Callable[..., WorkerConfig]
                ) -> WorkerConfig:
    return make_config(live_backend.url, live_backend.api_key)


@pytest.fixture
def serve() -> Iterator[Callable[[HealthChecker], HealthServer]]:
    servers: list[HealthServer] = []

    def start(checker: HealthChecker) -> HealthServer:
        server = HealthServer(checker, port=0, host="127.0.0.1")
        server.start()
        assert server.running and server.port != 0
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_result_and_status_basics() -> None:
    result = HealthCheckResult("custom", "degraded", "slow")  # type: ignore[arg-type]
    assert result.status is HealthStatus.DEGRADED
    assert result.timestamp.endswith("Z") and result.details is None
    with pytest.raises(ValueError, match="status must be one of healthy, degraded, unhealthy"):
        HealthCheckResult("custom", "fine", "?")  # type: ignore[arg-type]
    assert worst([HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.DEGRADED]) \
        is HealthStatus.UNHEALTHY
    assert worst([]) is HealthStatus.HEALTHY


def test_health_against_the_live_backend(live_config: WorkerConfig,
                                         serve: Callable[[HealthChecker], HealthServer]) -> None:
    checker = HealthChecker(live_config)

    def custom_check() -> HealthCheckResult:
        return HealthCheckResult("custom", HealthStatus.HEALTHY, "OK")

    checker.add_custom_check("custom", custom_check)
    server = serve(checker)
    status, body = get_json(server.url + "/health")
    assert status == 200, body
    assert list(body) == README_KEYS
    assert body["worker_name"] == "health-test"
    assert list(body["checks"]) == ["api_connectivity", "system_resources", "worker_process",
                                    "custom"]
    api = body["checks"]["api_connectivity"]
    assert api["status"] == "healthy" and api["message"] == "API connectivity OK"
    assert body["checks"]["worker_process"]["details"]["celery_worker"] is False
    assert body["checks"]["custom"]["message"] == "OK"
    assert all(c["duration_ms"] >= 0 and c["timestamp"] for c in body["checks"].values())
    assert get_json(server.url + "/readyz") == (200, {"status": "ready", "checks": {
        "backend": {"ok": True, "message": "API connectivity OK"},
        "circuit_breaker": {"ok": True, "state": "closed"}}})


def test_backend_down_is_unhealthy_but_alive(make_config: Callable[..., WorkerConfig],
                                            serve: Callable[[HealthChecker], HealthServer]
                                            ) -> None:
    checker = HealthChecker(make_config(f"http://127.0.0.1:{free_port()}",
                                        circuit_breaker_failure_threshold=1))
    server = serve(checker)
    status, body = get_json(server.url + "/health")
    assert status == 503
    api = body["checks"]["api_connectivity"]
    assert api["status"] == "unhealthy"
    assert api["message"].startswith("backend unreachable (")
    status, ready = get_json(server.url + "/readyz")
    assert status == 503 and ready["status"] == "not_ready"
    assert ready["checks"]["backend"]["ok"] is False
    assert ready["checks"]["circuit_breaker"] == {"ok": False, "state": "open"}
    assert get_json(server.url + "/livez")[0] == 200


def test_statuses_of_custom_checks(make_config: Callable[..., WorkerConfig]) -> None:
    checker = HealthChecker(make_config())
    checker.remove_check("api_connectivity")

    def raises() -> bool:
        raise RuntimeError("disk on fire")

    checker.add_custom_check("false", lambda: False)
    checker.add_custom_check("true", lambda: True)
    checker.add_custom_check("raises", raises)
    checker.add_custom_check("weird", lambda: "yes")  # type: ignore[arg-type,return-value]
    checker.add_custom_check("degraded", lambda: HealthCheckResult(
        "other-name", HealthStatus.DEGRADED, "slow disk", {"latency_ms": 50}))
    report = checker.run_checks()
    checks = report.checks
    assert checks["true"].status is HealthStatus.HEALTHY
    assert (checks["false"].status, checks["false"].message) == (
        HealthStatus.UNHEALTHY, "check returned False")
    assert checks["raises"].message == "check raised RuntimeError: disk on fire"
    assert checks["weird"].message == "check returned str, expected HealthCheckResult or bool"
    assert checks["degraded"].name == "degraded"
    assert checks["degraded"].details == {"latency_ms": 50}
    assert report.status is HealthStatus.UNHEALTHY and report.http_status == 503
    for name in ("false", "raises", "weird"):
        checker.remove_check(name)
    assert checker.run_checks().status is HealthStatus.DEGRADED
    assert checker.run_checks().http_status == 200


def test_hanging_check_is_answered_within_its_bound(
        make_config: Callable[..., WorkerConfig],
        serve: Callable[[HealthChecker], HealthServer]) -> None:
    release = threading.Event()
    calls = []

    def hangs() -> bool:
        calls.append(1)
        release.wait(60)
        return True

    checker = HealthChecker(make_config())
    checker.remove_check("api_connectivity")
    checker.add_custom_check("hangs", hangs, timeout=0.5)
    server = serve(checker)
    try:
        status, body = get_json(server.url + "/health")
        assert status == 503
        assert body["checks"]["hangs"]["status"] == "unhealthy"
        assert body["checks"]["hangs"]["message"].startswith("check did not finish within 0.5 s")
        assert body["checks"]["system_resources"]["status"] in ("healthy", "degraded")
        # Still hung: the next run reports it without starting a second copy.
        status, body = get_json(server.url + "/health")
        assert status == 503 and "running for" in body["checks"]["hangs"]["message"]
        assert len(calls) == 1
        assert get_json(server.url + "/livez")[0] == 200
    finally:
        release.set()


def test_quick_never_runs_checks(make_config: Callable[..., WorkerConfig],
                                 serve: Callable[[HealthChecker], HealthServer]) -> None:
    calls = []
    checker = HealthChecker(make_config(health_check_interval=3600))
    checker.remove_check("api_connectivity")
    checker.add_custom_check("count", lambda: calls.append(1) is None)
    server = serve(checker)  # the background thread runs the checks once at start
    for _ in range(50):
        status, body = get_json(server.url + "/health/quick")
        if body.get("checks"):
            break
    for _ in range(20):
        status, body = get_json(server.url + "/health/quick")
        assert status == 200 and list(body) == README_KEYS
    assert len(calls) == 1


def test_history_metrics_and_prometheus(make_config: Callable[..., WorkerConfig],
                                        serve: Callable[[HealthChecker], HealthServer]) -> None:
    checker = HealthChecker(make_config(health_check_interval=3600))
    checker.remove_check("api_connectivity")
    server = serve(checker)
    for _ in range(3):
        get(server.url + "/health")
    status, history = get_json(server.url + "/health/history")
    assert status == 200 and history["count"] >= 3
    assert all(list(report) == README_KEYS for report in history["history"])
    assert get_json(server.url + "/health/history?limit=2")[1]["count"] == 2
    status, error = get_json(server.url + "/health/history?limit=zero")
    assert status == 400 and error["error"] == "bad_limit"
    status, metrics = get_json(server.url + "/health/metrics")
    assert status == 200
    assert set(metrics) >= {"system", "process", "tasks", "functions", "worker_name"}
    status, headers, text = get(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE worker_tasks_total counter" in text


def test_history_keeps_the_last_hundred(make_config: Callable[..., WorkerConfig]) -> None:
    checker = HealthChecker(make_config())
    checker.remove_check("api_connectivity")
    checker.remove_check("system_resources")
    for _ in range(105):
        checker.run_checks()
    history = checker.history()
    assert len(history) == 100 and history[-1] is checker.last_report


def test_unknown_paths_and_methods_get_json_errors(
        make_config: Callable[..., WorkerConfig],
        serve: Callable[[HealthChecker], HealthServer]) -> None:
    server = serve(HealthChecker(make_config()))
    status, _, body = get(server.url + "/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, headers, body = get(server.url + "/health", method="POST")
    assert status == 405 and json.loads(body)["error"] == "method_not_allowed"
    assert headers["Allow"] == "GET, HEAD"


def test_a_silent_client_does_not_block_probes(
        make_config: Callable[..., WorkerConfig],
        serve: Callable[[HealthChecker], HealthServer]) -> None:
    server = serve(HealthChecker(make_config()))
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    try:
        silent[0].sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # never finishes
        for _ in range(5):
            assert get_json(server.url + "/livez")[0] == 200
    finally:
        for sock in silent:
            sock.close()


def test_port_in_use_is_a_clear_error_and_nothing_stops(
        make_config: Callable[..., WorkerConfig]) -> None:
    buffer = io.StringIO()
    WorkerLogger.configure(log_level="INFO", stream=buffer)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = HealthServer(HealthChecker(make_config()), port=port, host="127.0.0.1")
            server.start()  # returns: the worker keeps running
            assert not server.running
            assert server.error is not None
            assert f"127.0.0.1:{port}" in str(server.error)
            assert "in use" in str(server.error)
    finally:
        WorkerLogger.reset()
        logging.getLogger().setLevel(logging.WARNING)
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    warned = [r for r in records if f"cannot listen on 127.0.0.1:{port}" in r["message"]]
    assert len(warned) == 1 and warned[0]["level"] == "WARNING"  # the process runs on
    assert "METRICS_PORT=0" in warned[0]["message"] and warned[0]["port"] == port
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]


def test_an_ephemeral_port_is_logged_as_bound(make_config: Callable[..., WorkerConfig]) -> None:
    buffer = io.StringIO()
    WorkerLogger.configure(log_level="INFO", stream=buffer)
    server = HealthServer(HealthChecker(make_config()), port=0, host="127.0.0.1")
    try:
        server.start()
        bound = server.port
    finally:
        server.stop()
        WorkerLogger.reset()
        logging.getLogger().setLevel(logging.WARNING)
    assert bound != 0
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    listening = [r for r in records if r["message"].startswith("health server listening")]
    assert [r["port"] for r in listening] == [bound]
    assert listening[0]["message"].endswith(f":{bound}")


def test_stop_releases_the_port(make_config: Callable[..., WorkerConfig]) -> None:
    server = HealthServer(HealthChecker(make_config()), port=0, host="127.0.0.1")
    server.start()
    port = server.port
    server.stop()
    assert not server.running
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_no_secret_in_any_response(make_config: Callable[..., WorkerConfig],
                                   serve: Callable[[HealthChecker], HealthServer]) -> None:
    key = "swi-test-key-7Q2xK9-never-shown"
    backend_address = f"127.0.0.1:{free_port()}"  # down: its breaker opens and is exported
    checker = HealthChecker(make_config(f"http://{backend_address}", api_key=key,
                                        circuit_breaker_failure_threshold=1))
    checker.add_custom_check("leaky", lambda: HealthCheckResult(
        "leaky", HealthStatus.DEGRADED, f"tried key {key}", {"key": key}))
    server = serve(checker)
    for path in ("/health", "/health/quick", "/health/history", "/health/metrics", "/readyz",
                 "/livez", "/metrics"):
        _, _, body = get(server.url + path)
        assert key.encode() not in body, path
        assert backend_address.encode() not in body, path  # no configuration values
    _, _, metrics = get(server.url + "/metrics")
    assert b'worker_circuit_breaker_state{breaker="internal-api"} 2.0' in metrics


def test_resource_thresholds(make_config: Callable[..., WorkerConfig]) -> None:
    checker = HealthChecker(make_config(health_memory_degraded_percent=0.01,
                                        health_disk_degraded_percent=0.01,
                                        health_disk_unhealthy_percent=0.02))
    result = checker.run_check("system_resources")
    assert result.status is HealthStatus.UNHEALTHY
    assert "memory" in result.message and "disk" in result.message
    assert set(result.details or {}) == {"memory_percent", "disk_percent", "cpu_percent"}
    with pytest.raises(ConfigurationError, match="HEALTH_DISK_DEGRADED_PERCENT"):
        HealthChecker(make_config(health_disk_degraded_percent=90,
                                  health_disk_unhealthy_percent=80))


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"port": -1}, "port"), ({"port": 70000}, "port"), ({"host": ""}, "host"),
])
def test_server_arguments_are_checked(make_config: Callable[..., WorkerConfig],
                                      kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        HealthServer(HealthChecker(make_config()), **kwargs)


def test_a_forked_child_does_not_hold_the_port(make_config: Callable[..., WorkerConfig]) -> None:
    import os

    server = HealthServer(HealthChecker(make_config()), port=0, host="127.0.0.1")
    server.start()
    port = server.port
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a prefork child: lives on after the main process stops its server
        os.close(read_end)
        os.write(write_end, b"up")
        time.sleep(10)
        os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 2) == b"up"
        server.stop()
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))  # EADDRINUSE if the child still held it
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def _shared_breaker(check: dict[str, Any], label: str) -> dict[str, Any]:
    (found,) = [b for b in check["details"]["circuit_breakers"]
                if b["breaker"] == label and "shared_state_ok" in b]
    return dict(found)


@pytest.mark.redis
def test_a_shared_breaker_that_lost_redis_is_reported(
        live_backend: LiveBackend, make_config: Callable[..., WorkerConfig],
        serve: Callable[[HealthChecker], HealthServer]) -> None:
    """The backend's breaker shares its state through Redis behind a real proxy; when the
    proxy cuts the line the breaker runs on local state, and /health, /readyz and /metrics
    say so (by the breaker's name without its URL); when the line returns, so does health."""
    from tests.fault_server import TcpProxy

    proxy = TcpProxy("127.0.0.1", 6379, scheme="redis")
    # "localhost": a breaker name of its own (the session's other tests use 127.0.0.1).
    config = make_config(live_backend.url.replace("127.0.0.1", "localhost"),
                         live_backend.api_key, circuit_breaker_redis_url=proxy.url)
    checker = HealthChecker(config)
    checker.remove_check("system_resources")  # this machine's load is not the subject
    server = serve(checker)
    key = "worker:breaker:internal-api " + config.internal_api_base_url
    try:
        # /readyz first: it makes the backend's breaker (the checks of one /health run are
        # concurrent, so worker_process may look before api_connectivity made it).
        ready = get_json(server.url + "/readyz")
        assert ready == (200, {"status": "ready", "checks": {
            "backend": {"ok": True, "message": "API connectivity OK"},
            "circuit_breaker": {"ok": True, "state": "closed", "shared_state_ok": True}}})
        status, body = get_json(server.url + "/health")
        assert status == 200 and body["status"] == "healthy", body
        process = body["checks"]["worker_process"]
        assert process["status"] == "healthy"
        assert _shared_breaker(process, "internal-api") == {
            "breaker": "internal-api", "state": "closed", "shared_state_ok": True}

        proxy.mode = "reset"
        status, body = get_json(server.url + "/health")
        assert status == 200 and body["status"] == "degraded", body
        process = body["checks"]["worker_process"]
        assert process["status"] == "degraded"
        assert process["message"] == ("circuit breaker internal-api: shared state (Redis) "
                                      "unreachable, running on this process's local state")
        assert _shared_breaker(process, "internal-api")["shared_state_ok"] is False
        status, ready = get_json(server.url + "/readyz")
        assert status == 200  # still protected, locally: not a reason to stop taking work
        assert ready["checks"]["circuit_breaker"]["shared_state_ok"] is False
        assert "internal-api" in ready["checks"]["breaker_shared_state"][
            "running_on_local_state"]
        metrics = get(server.url + "/metrics")[2].decode()
        assert 'worker_circuit_breaker_shared_state{breaker="internal-api"} 0.0' in metrics
        for _, _, raw in (get(server.url + path) for path in ("/health", "/readyz", "/metrics")):
            text = raw.decode()
            assert "localhost:" not in text and live_backend.api_key not in text
            assert proxy.url not in text

        proxy.mode = "forward"
        deadline = time.monotonic() + 15  # the breaker asks Redis again after 1 s
        while get_json(server.url + "/health")[1]["status"] != "healthy":
            assert time.monotonic() < deadline, "the breaker never found Redis again"
            time.sleep(0.2)
        metrics = get(server.url + "/metrics")[2].decode()
        assert 'worker_circuit_breaker_shared_state{breaker="internal-api"} 1.0' in metrics
    finally:
        proxy.stop()
        import redis

        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        client.delete(key)
        client.close()
