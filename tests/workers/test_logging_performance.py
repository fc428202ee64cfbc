"""monitor_performance: bare and with arguments, sync and async, lines, statistics, histogram."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from backend.workers.shared import _metrics
from backend.workers.shared.logging_utils import (
    WorkerLogger,
    monitor_performance,
    performance_stats,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    WorkerLogger.configure(log_level="DEBUG", stream=buffer)
    try:
        yield buffer
    finally:
        WorkerLogger.reset()
        logging.getLogger().setLevel(logging.WARNING)


def _perf_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [r for r in records if r["logger"].endswith("logging_utils.performance")]


def _unique() -> str:
    return f"fn_{uuid.uuid4().hex[:8]}"


def test_bare_decorator_logs_one_debug_line_per_call(stream: io.StringIO) -> None:
    @monitor_performance
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert add(1, b=2) == 3
    (line,) = _perf_lines(stream)
    assert line["level"] == "DEBUG"
    assert line["function"].endswith("add") and line["outcome"] == "success"
    assert line["duration_ms"] >= 0 and line["cpu_ms"] >= 0
    assert isinstance(line["rss_delta_bytes"], int)
    assert line["slow"] is False


def test_arguments_name_and_slow_threshold(stream: io.StringIO) -> None:
    name = _unique()

    @monitor_performance(name=name, slow_threshold_ms=0)
    def quick() -> str:
        return "ok"

    quick()
    (line,) = _perf_lines(stream)
    assert line["function"] == name
    assert line["level"] == "WARNING" and line["slow"] is True


def test_memory_change_is_measured(stream: io.StringIO) -> None:
    keep: list[bytearray] = []

    @monitor_performance
    def allocate() -> None:
        chunk = bytearray(64 * 1024 * 1024)
        chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page
        keep.append(chunk)

    allocate()
    assert _perf_lines(stream)[0]["rss_delta_bytes"] >= 32 * 1024 * 1024


def test_exception_passes_through_untouched_and_counts_as_error(stream: io.StringIO) -> None:
    name = _unique()
    error = LookupError("nope")

    @monitor_performance(name=name)
    def fail() -> None:
        raise error

    with pytest.raises(LookupError) as caught:
        fail()
    assert caught.value is error
    assert _perf_lines(stream)[0]["outcome"] == "failure"
    assert performance_stats()[name]["errors"] == 1


def test_signature_and_metadata_are_preserved() -> None:
    def original(execution_id: str, *, retries: int = 3) -> dict[str, str]:
        """Doc."""
        return {}

    wrapped = monitor_performance(original)
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert wrapped.__name__ == "original" and wrapped.__doc__ == "Doc."
    assert inspect.getfullargspec(wrapped).args == ["execution_id"]  # what Celery reads


def test_async_functions_are_measured(stream: io.StringIO) -> None:
    name = _unique()

    @monitor_performance(name=name)
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(21)) == 42
    assert _perf_lines(stream)[0]["function"] == name
    assert performance_stats()[name]["count"] == 1


def test_statistics_and_histogram() -> None:
    name = _unique()

    @monitor_performance(name=name)
    def maybe(fail: bool) -> None:
        if fail:
            raise ValueError("x")

    for i in range(10):
        with contextlib.suppress(ValueError):
            maybe(i % 5 == 0)
    stats = performance_stats()[name]
    assert stats["count"] == 10 and stats["errors"] == 2
    assert stats["max_ms"] >= stats["p95_ms"] >= 0
    assert stats["total_ms"] == pytest.approx(stats["mean_ms"] * 10, rel=1e-2, abs=1e-2)
    text = _metrics.render()[0].decode()
    assert (f'worker_function_duration_seconds_count{{function="{name}",outcome="success"}} 8.0'
            in text)
    assert (f'worker_function_duration_seconds_count{{function="{name}",outcome="failure"}} 2.0'
            in text)


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"slow_threshold_ms": -1}, "slow_threshold_ms"),
    ({"slow_threshold_ms": "fast"}, "slow_threshold_ms"),
    ({"name": ""}, "name"),
])
def test_bad_arguments_are_named(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        monitor_performance(**kwargs)
