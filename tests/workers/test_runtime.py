"""The process's runtime (``_runtime``): every part of the per-process state in one place, one
after-fork reset, and scoped runtimes for isolation.

The fork tests fork this test process for real and have the child report what it sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backend.workers.shared import (
    _breaker,
    _breaker_store,
    _celery,
    _health_server,
    _heartbeat,
    _http,
    _performance,
    _policy,
    _runtime,
    _stats,
    retry_utils,
)
from backend.workers.shared.config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]

EXPECTED_PARTS = {
    "http pools", "circuit breakers", "breaker redis clients", "retry budgets",
    "client guards", "recent task outcomes", "health servers", "rss reader",
    "worker main process", "child heartbeat", "celery wiring", "conditional GET cache",
}


def in_child(report: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child runs ``report`` and sends its JSON back; the child's answer. A child
    stuck (on a lock the fork left held) is ended by an alarm and reports nothing."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        signal.alarm(20)
        try:
            os.close(read)
            os.write(write, json.dumps(report()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer, "the child reported nothing"
    return dict(json.loads(answer))


def test_every_per_process_state_is_a_declared_part() -> None:
    assert set(_runtime.parts()) >= EXPECTED_PARTS
    assert len(_runtime.parts()) == len(set(_runtime.parts()))
    with pytest.raises(ValueError, match="already declared"):
        _runtime.part("recent task outcomes", dict)


def test_a_child_forked_while_other_threads_hold_every_lock_gets_fresh_ones() -> None:
    locks = [_http._POOLS.get().lock, _breaker.REGISTRY.get().lock,
             _breaker_store._CLIENTS.get().lock]
    budget = retry_utils.RetryBudget()
    locks.append(budget._lock)
    held, release = threading.Event(), threading.Event()

    def hold_all() -> None:
        for lock in locks:
            lock.acquire()
        held.set()
        release.wait(10)
        for lock in locks:
            lock.release()

    holder = threading.Thread(target=hold_all)
    holder.start()
    held.wait(10)
    try:
        def report() -> dict[str, Any]:
            _breaker.get_breaker("fork-fresh-lock")  # would hang on the parent's held lock
            _http.close_all()
            budget.record_call()
            return {"breakers": [b.name for b in _breaker.all_breakers()]}

        answer = in_child(report)
    finally:
        release.set()
        holder.join()
    assert "fork-fresh-lock" in answer["breakers"]


def test_a_child_keeps_the_breakers_and_their_state_and_builds_the_rest_anew() -> None:
    breaker = _breaker.get_breaker("fork-kept", failure_threshold=1, recovery_timeout=60)
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    config = WorkerConfig(internal_service_api_key="k", _env_file=None)
    policy = _policy.retry_policy(config, retry_if=_policy.should_retry_read)
    _stats.recent().record("parent.task", None)
    _http.get_pool("http://127.0.0.1:9")
    parent_pages = _performance._RSS.get().pages()  # opens the parent's /proc entry

    def report() -> dict[str, Any]:
        return {
            "state": _breaker.get_breaker("fork-kept").state.value,
            "same_policy": _policy.retry_policy(config, retry_if=_policy.should_retry_read)
            is policy,
            "recent": _stats.recent().snapshot(),
            "pools": _http.pool_count(),
            "servers": len(_health_server._SERVERS.get()),
            "rss_fd": _performance._RSS.get().fd,  # the parent's fd is not read here
            "rss_pages": _performance._RSS.get().pages() > 0,
        }

    assert in_child(report) == {"state": "open", "same_policy": False, "recent": [],
                                "pools": 0, "servers": 0, "rss_fd": None, "rss_pages": True}
    assert parent_pages > 0
    assert _http.pool_count() >= 1 and _stats.recent().snapshot()[0][1] == "parent.task"


def test_a_scoped_runtime_builds_the_named_parts_anew_and_restores_them() -> None:
    outer_breaker = _breaker.get_breaker("scoped-outer")
    outer_pools = _http._POOLS.get()
    with _runtime.scoped(_breaker.REGISTRY):
        assert "scoped-outer" not in [b.name for b in _breaker.all_breakers()]
        _breaker.get_breaker("scoped-inner")
        assert _http._POOLS.get() is outer_pools  # not named: shared
    names = [b.name for b in _breaker.all_breakers()]
    assert "scoped-outer" in names and "scoped-inner" not in names
    assert _breaker.get_breaker("scoped-outer") is outer_breaker
    with _runtime.scoped() as fresh:
        assert _http._POOLS.get() is not outer_pools and fresh is _runtime.current()
    assert _http._POOLS.get() is outer_pools


def test_a_part_first_used_in_a_scope_that_does_not_name_it_outlives_the_scope() -> None:
    with _runtime.scoped():  # a runtime of its own, like a test run outside the suite's
        with _runtime.scoped(_breaker.REGISTRY):
            pools = _http._POOLS.get()  # built in the enclosing runtime, not in this one
            _http.get_pool("http://127.0.0.1:9")

            def report() -> dict[str, Any]:  # a fork inside the scope resets that one too
                return {"pools": _http.pool_count()}

            assert in_child(report) == {"pools": 0}
        assert _http._POOLS.get() is pools and _http.pool_count() == 1
        _http.close_all()


def test_a_prefork_child_keeps_the_heartbeat_directory_and_not_the_main_process_state(
    tmp_path: Path,
) -> None:
    with _runtime.scoped(_heartbeat._MAIN, _heartbeat._CHILD):
        _heartbeat.expect_worker()
        _heartbeat._MAIN.get().worker = SimpleNamespace(pool=None)  # a stand-in WorkController
        _heartbeat._MAIN.get().heartbeat_dir = tmp_path
        _heartbeat.set_ready(True)

        def report() -> dict[str, Any]:
            _heartbeat.start_child()  # as on worker_process_init: beats where the main reads
            return {
                "attached": _heartbeat.worker_attached(),
                "ready": _heartbeat.consumer_ready(),
                "beat": (tmp_path / f"{os.getpid()}.json").exists(),
            }

        assert in_child(report) == {"attached": False, "ready": False, "beat": True}
        assert _heartbeat.worker_attached() and _heartbeat.consumer_ready()
    assert _heartbeat._MAIN.get().heartbeat_dir != tmp_path  # the scope's state went with it


def test_a_child_forked_by_a_running_task_keeps_the_wiring_but_not_the_task() -> None:
    from celery import Celery

    app = Celery("runtime-fork", set_as_current=False)
    with _runtime.scoped(_celery._WIRING):
        _celery.install()

        @app.task(name="runtime.fork")
        def fork_in_task(execution_id: str) -> dict[str, Any]:
            def report() -> dict[str, Any]:
                wiring = _celery._WIRING.get()
                return {"installed": wiring.installed, "running": list(wiring.running)}

            return {"child": in_child(report), "parent": list(_celery._WIRING.get().running)}

        result = fork_in_task.apply(args=("exec-1",))
        assert result.get() == {
            "child": {"installed": True, "running": []},
            "parent": [result.id],
        }
        assert _celery._WIRING.get().running == {}


def test_outside_celery_the_modules_that_install_the_wiring_load_none_of_it() -> None:
    # config, logging and the health server reach the wiring through the runtime, which
    # loads it only when Celery is imported (get_celery_config() installs it in any case).
    code = (
        "import json, sys\n"
        "from backend.workers.shared import HealthChecker, HealthServer, WorkerConfig, "
        "WorkerLogger\n"
        "config = WorkerConfig(internal_service_api_key='k', _env_file=None,\n"
        "                      celery_result_backend='redis://127.0.0.1:9/1')\n"
        "WorkerLogger.configure()\n"
        "with HealthServer(HealthChecker(config), port=0, host='127.0.0.1'):\n"
        "    pass\n"
        "loaded = lambda: [m in sys.modules for m in ('celery', "
        "'backend.workers.shared._celery')]\n"
        "before = loaded()\n"
        "config.get_celery_config()\n"
        "print('LOADED ' + json.dumps([before, loaded()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ENV_FILE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    assert json.loads(line.removeprefix("LOADED ")) == [[False, False], [True, True]]


def test_equal_settings_share_one_guards_and_a_child_or_a_scope_builds_its_own() -> None:
    config = WorkerConfig(internal_service_api_key="k", _env_file=None)
    guards = _policy.guards(config)
    assert _policy.guards(WorkerConfig(internal_service_api_key="k2", _env_file=None)) is guards
    assert _policy.backend_breaker(config) is guards.breaker
    assert _policy.retry_policy(config, retry_if=_policy.should_retry_read).budget is guards.budget

    def report() -> dict[str, Any]:
        child = _policy.guards(config)
        return {"guards": child is guards, "breaker": child.breaker is guards.breaker,
                "budget": child.budget is guards.budget}

    # The breaker and its state are kept (the registry's), the budget is the child's own.
    assert in_child(report) == {"guards": False, "breaker": True, "budget": False}
    with _runtime.scoped(_breaker.REGISTRY):  # the guards follow the breakers' registry
        assert _policy.guards(config) is not guards
        assert _policy.backend_breaker(config) is not guards.breaker
    assert _policy.guards(config) is guards
