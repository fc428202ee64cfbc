"""logging_utils: the one JSON/simple pipeline, log context, redaction, Celery task context."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backend.workers.shared import _redact
from backend.workers.shared.config import WorkerConfig
from backend.workers.shared.logging_utils import (
    WorkerLogger,
    current_context,
    log_context,
)

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    WorkerLogger.configure(log_level="DEBUG", log_format="structured", worker_name="test-worker",
                           stream=buffer)
    try:
        yield buffer
    finally:
        WorkerLogger.reset()
        logging.getLogger().setLevel(logging.WARNING)


@pytest.fixture
def lines(stream: io.StringIO) -> Lines:
    return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structured_line_has_every_core_field(lines: Lines) -> None:
    WorkerLogger.get_logger("svc").info("hello", execution_id="e-1")
    (record,) = lines()
    assert list(record)[:6] == ["timestamp", "level", "logger", "message", "worker_name", "pid"]
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]
    assert record["level"] == "INFO"
    assert record["logger"] == "svc"
    assert record["message"] == "hello"
    assert record["worker_name"] == "test-worker"
    assert record["pid"] == os.getpid()
    assert record["execution_id"] == "e-1"


def test_fstrings_percent_args_fields_and_exc_info(lines: Lines) -> None:
    log = WorkerLogger.get_logger("svc")
    count = 3
    log.info(f"processed {count} files")
    log.warning("%s of %d failed", "one", 3)
    try:
        raise KeyError("missing")
    except KeyError:
        log.error("lookup failed", exc_info=True, key="k")
        log.exception("again")
    first, second, third, fourth = lines()
    assert first["message"] == "processed 3 files"
    assert second["message"] == "one of 3 failed" and second["level"] == "WARNING"
    assert third["exception"]["type"] == "KeyError"
    assert third["exception"]["message"] == "'missing'"
    assert "raise KeyError" in third["exception"]["traceback"]
    assert third["key"] == "k"
    assert fourth["level"] == "ERROR" and fourth["exception"]["type"] == "KeyError"


def test_stdlib_and_third_party_lines_share_the_format(lines: Lines) -> None:
    logging.getLogger("kombu.connection").warning("plain %s", "text",
                                                   extra={"attempt": 2, "endpoint": "/x"})
    logging.getLogger("celery.app.trace").info("Task %(name)s[%(id)s] succeeded",
                                               {"name": "t.add", "id": "tid-1"})
    plain, celery = lines()
    assert plain["logger"] == "kombu.connection" and plain["message"] == "plain text"
    assert plain["attempt"] == 2 and plain["endpoint"] == "/x"
    assert celery["message"] == "Task t.add[tid-1] succeeded"
    assert celery["task_id"] == "tid-1" and celery["task_name"] == "t.add"


def test_configure_twice_keeps_one_handler(stream: io.StringIO, lines: Lines) -> None:
    WorkerLogger.configure(log_level="INFO", worker_name="again", stream=stream)
    WorkerLogger.configure(log_level="INFO", worker_name="again", stream=stream)
    WorkerLogger.get_logger("svc").info("once")
    assert [r["message"] for r in lines()] == ["once"]
    assert lines()[0]["worker_name"] == "again"


def test_logger_made_before_configure_follows_it(stream: io.StringIO, lines: Lines) -> None:
    WorkerLogger.reset()
    early = WorkerLogger.get_logger("early")
    early.info("before")  # no handler of ours: goes to stdlib as text
    WorkerLogger.configure(log_level="INFO", stream=stream)
    early.info("after", n=1)
    assert [(r["message"], r.get("n")) for r in lines()] == [("after", 1)]


def test_level_filters(stream: io.StringIO, lines: Lines) -> None:
    WorkerLogger.configure(log_level="WARNING", stream=stream)
    log = WorkerLogger.get_logger("svc")
    log.info("hidden")
    logging.getLogger("other").info("hidden too")
    log.warning("shown")
    assert [r["message"] for r in lines()] == ["shown"]


def test_simple_format_is_one_readable_line() -> None:
    buffer = io.StringIO()
    WorkerLogger.configure(log_level="INFO", log_format="simple", worker_name="w", stream=buffer)
    try:
        with log_context(task_id="t-9"):
            WorkerLogger.get_logger("svc").info("done", files=2)
    finally:
        WorkerLogger.reset()
    (line,) = buffer.getvalue().splitlines()
    assert " INFO " in line and "svc" in line and "[w pid=" in line
    assert line.endswith("done task_id=t-9 files=2")


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"log_level": "LOUD"}, "log_level"),
    ({"log_format": "xml"}, "log_format"),
    ({"worker_name": " "}, "worker_name"),
])
def test_configure_rejects_bad_values(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        WorkerLogger.configure(**kwargs)


# --- context ---------------------------------------------------------------------------


def test_nested_context_restores_outer_values_also_on_error(lines: Lines) -> None:
    log = WorkerLogger.get_logger("svc")
    with log_context(task_id="outer", execution_id="e"):
        with pytest.raises(RuntimeError), log_context(task_id="inner", step=1):
            log.info("inside")
            assert current_context() == {"task_id": "inner", "execution_id": "e", "step": 1}
            raise RuntimeError("boom")
        log.info("after")
        assert current_context() == {"task_id": "outer", "execution_id": "e"}
    log.info("outside")
    assert current_context() == {}
    inside, after, outside = lines()
    assert (inside["task_id"], inside["step"]) == ("inner", 1)
    assert after["task_id"] == "outer" and "step" not in after
    assert "task_id" not in outside


def test_keyword_fields_win_over_context(lines: Lines) -> None:
    with log_context(execution_id="ctx"):
        WorkerLogger.get_logger("svc").info("x", execution_id="explicit")
    assert lines()[0]["execution_id"] == "explicit"


def test_threads_never_see_each_others_fields(lines: Lines) -> None:
    log = WorkerLogger.get_logger("svc")
    barrier = threading.Barrier(8)

    def run(n: int) -> None:
        with log_context(task_id=f"t{n}"):
            barrier.wait()
            for _ in range(20):
                log.info("tick", n=n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = lines()
    assert len(records) == 160
    assert all(r["task_id"] == f"t{r['n']}" for r in records)


def test_asyncio_tasks_never_see_each_others_fields(lines: Lines) -> None:
    log = WorkerLogger.get_logger("svc")

    async def job(n: int) -> None:
        with log_context(task_id=f"a{n}"):
            for _ in range(5):
                await asyncio.sleep(0)
                log.info("step", n=n)

    async def main() -> None:
        await asyncio.gather(*(job(n) for n in range(4)))

    asyncio.run(main())
    records = [r for r in lines() if r["logger"] == "svc"]
    assert len(records) == 20
    assert all(r["task_id"] == f"a{r['n']}" for r in records)


# --- redaction --------------------------------------------------------------------------


def test_sensitive_field_names_are_masked(lines: Lines) -> None:
    WorkerLogger.get_logger("svc").info(
        "call", authorization="Bearer abc", api_key="k", access_token="t", password="p",
        webhook_signing_secret="s", total_tokens=12,
        headers={"X-API-Key": "k2", "Accept": "json"},
    )
    logging.getLogger("std").info("std", extra={"client_secret": "cs"})
    first, second = lines()
    for key in ("authorization", "api_key", "access_token", "password", "webhook_signing_secret"):
        assert first[key] == "**********"
    assert first["total_tokens"] == 12
    assert first["headers"] == {"X-API-Key": "**********", "Accept": "json"}
    assert second["client_secret"] == "**********"


def test_configured_secrets_are_scrubbed_from_text(stream: io.StringIO, lines: Lines) -> None:
    key = "swi-test-key-7Q2xK9-scrubme-1"
    secret = "whsec_c2VjcmV0LXZhbHVlLWZvci1zY3J1Yg=="
    WorkerConfig(internal_service_api_key=key, webhook_signing_secret=secret)
    log = WorkerLogger.get_logger("svc")
    log.info(f"sending with {key}", note=f"secret={secret}")
    logging.getLogger("lib").warning("header was Bearer %s", key)
    try:
        raise ValueError(f"bad key {key}")
    except ValueError:
        log.exception("failed")
    text = stream.getvalue()
    assert key not in text and secret not in text
    first, second, third = lines()
    assert first["message"] == "sending with **********"
    assert first["note"] == "secret=**********"
    assert second["message"] == "header was Bearer **********"
    assert third["exception"]["message"] == "bad key **********"


def test_environment_secrets_are_scrubbed_without_a_config(
        stream: io.StringIO, lines: Lines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNAL_SERVICE_API_KEY", "env-only-secret-value-42,rotated-key-0042")
    WorkerLogger.configure(log_level="INFO", stream=stream)  # reads the environment
    WorkerLogger.get_logger("svc").info("keys env-only-secret-value-42 and rotated-key-0042")
    assert lines()[0]["message"] == "keys ********** and **********"


def test_sensitive_key_rules() -> None:
    for key in ("Authorization", "x-api-key", "apiKey", "refresh_token", "db-password",
                "AWS_SECRET_ACCESS_KEY", "cookie"):
        assert _redact.is_sensitive_key(key.replace("apiKey", "apikey")), key
    for key in ("task_id", "total_tokens", "tokens_used", "author", "execution_id"):
        assert not _redact.is_sensitive_key(key), key


# --- Celery task context (real Celery tracing, in this process) ---------------------------


def test_celery_task_binds_and_clears_task_context(lines: Lines) -> None:
    from celery import Celery

    from backend.workers.shared import _celery

    _celery.install()
    app = Celery("ctx-test", set_as_current=False)
    log = WorkerLogger.get_logger("task")
    seen: list[dict[str, Any]] = []

    @app.task(bind=True, name="ctx.run")
    def run(self: Any, execution_id: str, organization_id: str | None = None) -> str:
        seen.append(current_context())
        log.info("in task")
        return execution_id

    with log_context(request="outer"):
        result = run.apply(args=("exec-7",), kwargs={"organization_id": "org-3"})
        assert current_context() == {"request": "outer"}
    assert result.get() == "exec-7"
    (context,) = seen
    assert context["task_id"] == result.id
    assert context["task_name"] == "ctx.run"
    assert context["execution_id"] == "exec-7"
    assert context["organization_id"] == "org-3"
    assert context["request"] == "outer"
    in_task = next(r for r in lines() if r["message"] == "in task")
    assert in_task["task_id"] == result.id and in_task["execution_id"] == "exec-7"
