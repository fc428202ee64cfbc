"""_metrics: names and labels, breaker and retry hooks, multiprocess aggregation over forks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from backend.workers.shared import _metrics, retry_utils


def _text() -> str:
    return _metrics.render()[0].decode()


def test_recorded_values_appear_with_their_labels() -> None:
    tag = uuid.uuid4().hex[:8]
    _metrics.api_request("GET", f"/e/{tag}/", 200, 0.02)
    _metrics.api_request("GET", f"/e/{tag}/", 503, 0.5)
    _metrics.api_retry("GET", f"/e/{tag}/", "status_503")
    _metrics.task_finished(f"t.{tag}", "success", 1.5)
    text = _text()
    assert f'worker_api_requests_total{{endpoint="/e/{tag}/",method="GET",status="200"}} 1.0' \
        in text
    assert f'worker_api_requests_total{{endpoint="/e/{tag}/",method="GET",status="503"}} 1.0' \
        in text
    assert (f'worker_api_request_duration_seconds_count{{endpoint="/e/{tag}/",method="GET"}} 2.0'
            in text)
    assert (f'worker_api_retries_total{{endpoint="/e/{tag}/",method="GET",reason="status_503"}}'
            f" 1.0") in text
    assert f'worker_tasks_total{{outcome="success",task="t.{tag}"}} 1.0' in text
    assert f'worker_task_duration_seconds_sum{{task="t.{tag}"}} 1.5' in text
    content_type = _metrics.render()[1]
    assert content_type.startswith("text/plain")


def test_breaker_state_values_and_a_bad_state() -> None:
    name = f"b-{uuid.uuid4().hex[:8]}"
    _metrics.breaker_state(name, "half_open")
    assert f'worker_circuit_breaker_state{{breaker="{name}"}} 1.0' in _text()
    with pytest.raises(ValueError, match="unknown circuit breaker state 'ajar'"):
        _metrics.breaker_state(name, "ajar")


def test_breaker_labels_never_carry_urls() -> None:
    tag = uuid.uuid4().hex[:8]
    _metrics.breaker_state(f"api-{tag} https://user:pw@backend.internal:8443/internal/v1", "open")
    text = _text()
    assert f'worker_circuit_breaker_state{{breaker="api-{tag}"}} 2.0' in text
    assert "backend.internal" not in text and "pw@" not in text
    assert _metrics.breaker_label("http://only-a-url/") == "breaker"


def test_real_breakers_and_retries_are_recorded_through_listeners() -> None:
    _metrics.subscribe_resilience()
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    breaker = retry_utils.get_breaker(name, failure_threshold=1, recovery_timeout=60)

    def boom() -> None:
        raise OSError("down")

    with pytest.raises(OSError):
        breaker.call(boom)
    assert f'worker_circuit_breaker_state{{breaker="{name}"}} 2.0' in _text()

    attempts = []

    @retry_utils.retry(max_attempts=3, base_delay=0.0, jitter=False)
    def flaky_metrics_probe() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("again")
        return "ok"

    assert flaky_metrics_probe() == "ok"
    function_label = next(line for line in _text().splitlines()
                          if line.startswith("worker_retries_total")
                          and "flaky_metrics_probe" in line)
    assert function_label.endswith(" 2.0")


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from backend.workers.shared import _metrics

    _metrics.enable_multiprocess(sys.argv[1])
    _metrics.task_finished("parent.task", "success", 0.1)  # the parent counts too
    children = []
    ready_r, ready_w = os.pipe()
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            for _ in range(n + 1):
                _metrics.task_finished("child.task", "success", 0.2)
            _metrics.breaker_state("api", "open" if n == 0 else "closed")
            if n == 2:  # says it is done, then stays alive until killed
                os.write(ready_w, b"x")
                time.sleep(30)
            os._exit(0)
        children.append(pid)
    os.read(ready_r, 1)
    for pid in children[:2]:
        os.waitpid(pid, 0)
    for pid in children[:2]:
        _metrics.mark_process_dead(pid)
    text = _metrics.render()[0].decode()
    os.kill(children[2], 9)
    os.waitpid(children[2], 0)
    after = _metrics.render()[0].decode()
    print(json.dumps({"text": text, "after": after}))
""")


def test_multiprocess_mode_sums_forked_children(tmp_path: Path) -> None:
    stale = tmp_path / "counter_999999.db"
    stale.write_bytes(b"left over from a previous run")
    result = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    out = json.loads(result.stdout)
    assert not stale.exists()  # the directory was cleaned at start
    text, after = out["text"], out["after"]
    assert 'worker_tasks_total{outcome="success",task="child.task"} 6.0' in text
    assert 'worker_tasks_total{outcome="success",task="parent.task"} 1.0' in text
    # Breaker gauge: worst state among live processes (the "open" child has exited).
    assert 'worker_circuit_breaker_state{breaker="api"} 0.0' in text
    # Counters of exited children stay; a killed child's live gauge goes with it.
    assert 'worker_tasks_total{outcome="success",task="child.task"} 6.0' in after
    assert 'breaker="api"' not in after


CREATING_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from backend.workers.shared import _metrics

    _metrics.enable_multiprocess(sys.argv[1])
    _metrics.task_finished("parent.task", "success", 0.1)
    # A process creating its value file at this moment: it exists, still empty.
    (Path(sys.argv[1]) / "counter_4242.db").touch()
    print(_metrics.render()[0].decode())
""")


def test_a_value_file_being_created_does_not_break_metrics(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CREATING_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'worker_tasks_total{outcome="success",task="parent.task"} 1.0' in result.stdout


def test_enable_multiprocess_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        _metrics.enable_multiprocess(target)


FORK_WHILE_RECORDING_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from backend.workers.shared import _metrics

    _metrics.enable_multiprocess(sys.argv[1])

    def record():  # another thread of the forking process (the health checks' API calls)
        n = 0
        while True:
            n += 1
            _metrics.api_request("GET", f"health/{n % 50}", 200, 0.01)

    threading.Thread(target=record, daemon=True).start()
    time.sleep(0.2)
    hung = 0
    for _ in range(int(sys.argv[2])):
        pid = os.fork()
        if pid == 0:
            _metrics.task_finished("child.task", "success", 0.1)  # the child's first record
            os._exit(0)
        deadline = time.monotonic() + 3
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:  # stuck on a lock that was held at the fork
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                hung += 1
                break
            time.sleep(0.005)
    print(hung)
""")


def test_a_fork_while_another_thread_records_leaves_the_child_able_to_record(
    tmp_path: Path,
) -> None:
    forks = 20
    result = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_RECORDING_SCRIPT, str(tmp_path), str(forks)],
        capture_output=True, text=True, timeout=240, check=True,
    )
    assert result.stdout.split() == ["0"], f"children stuck after fork: {result.stdout}"


def test_the_first_record_publishes_the_breakers_and_returns() -> None:
    script = textwrap.dedent("""
        from backend.workers.shared import _metrics, retry_utils

        retry_utils.CircuitBreaker("first-record")
        _metrics.api_request("GET", "health/", 200, 0.01)  # builds, then subscribes
        print(_metrics.render()[0].decode())
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert 'worker_circuit_breaker_state{breaker="first-record"} 0.0' in result.stdout
    assert 'worker_api_requests_total{endpoint="health/",method="GET",status="200"} 1.0' in (
        result.stdout
    )
