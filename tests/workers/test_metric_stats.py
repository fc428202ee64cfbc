"""_metric_stats: the task and function statistics of ``/health/metrics`` computed from the
Prometheus metrics: the bucket p95 estimate, exact maxima and errors, in one process and over
real forked children writing multiprocess files (exited and killed ones included)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared import _metric_stats, _metrics
from backend.workers.shared.logging_utils import performance_stats

BOUNDS = (0.1, 0.5, 1.0, math.inf)


def cumulative(values: list[float]) -> list[tuple[float, float]]:
    """The cumulative buckets of ``values`` over :data:`BOUNDS` (``le`` is inclusive)."""
    return [(bound, float(sum(v <= bound for v in values))) for bound in BOUNDS]


@pytest.mark.parametrize(
    ("case", "buckets", "expected"),
    [
        ("no bucket at all", [], 0.0),
        ("no sample", cumulative([]), 0.0),
        ("one sample in the first bucket", cumulative([0.05]), 0.095),
        ("one sample inside a bucket", cumulative([0.3]), 0.1 + 0.4 * 0.95),
        ("all on the first bucket's edge", cumulative([0.1] * 20), 0.095),
        ("all on a higher bucket's edge", cumulative([0.5] * 20), 0.1 + 0.4 * 0.95),
        ("rank on a bucket's edge", cumulative([0.05] * 19 + [0.7]), 0.1),
        ("rank inside a higher bucket", cumulative([0.05] * 90 + [0.7] * 10), 0.75),
        ("all in the +Inf bucket", cumulative([5.0, 7.0]), 1.0),
        ("the rank in the +Inf bucket", cumulative([0.05] * 90 + [9.0] * 10), 1.0),
    ],
)
def test_the_p95_is_interpolated_inside_its_bucket(
    case: str, buckets: list[tuple[float, float]], expected: float
) -> None:
    assert _metric_stats.bucket_quantile(0.95, buckets) == pytest.approx(expected), case


def _name() -> str:
    return f"stats.{uuid.uuid4().hex[:8]}"


# Durations recorded for one name (the metrics' own buckets: ..., 0.005, 0.01, 0.025, ...,
# 0.05, 0.1, 0.25, 0.5, ..., 2.5, 5.0, ..., 600, +Inf) and the p95 expected in ms.
P95_CASES = [
    ("one sample: the estimate is capped at the exact max", [0.2], 200.0),
    ("on a bucket's edge", [0.1] * 20, 97.5),
    ("rank exactly at a bucket's edge", [0.01] * 19 + [1.0], 10.0),
    ("interpolated inside a higher bucket", [0.3] * 90 + [5.0] * 10, 3750.0),
    ("all beyond the last finite bucket", [700.0, 800.0], 600_000.0),
]


@pytest.mark.parametrize(("case", "durations", "p95_ms"), P95_CASES)
def test_function_statistics_come_from_the_histogram(
    case: str, durations: list[float], p95_ms: float
) -> None:
    name = _name()
    for i, seconds in enumerate(durations):
        _metrics.function_call(name, seconds, ok=i != 0)
    stats = _metric_stats.statistics()["functions"][name]
    assert stats == performance_stats()[name]
    assert stats["count"] == len(durations) and stats["errors"] == 1, case
    assert stats["max_ms"] == pytest.approx(max(durations) * 1000)
    assert stats["total_ms"] == pytest.approx(sum(durations) * 1000)
    assert stats["mean_ms"] == pytest.approx(sum(durations) / len(durations) * 1000)
    assert stats["p95_ms"] == pytest.approx(p95_ms), case


def test_a_task_is_an_error_unless_it_succeeded() -> None:
    name = _name()
    outcomes = ["success", "success", "failure", "retry", "ignored", "rejected", "unknown"]
    for seconds, outcome in enumerate(outcomes, start=1):
        _metrics.task_finished(name, outcome, seconds / 10)
    stats = _metric_stats.statistics()["tasks"][name]
    assert stats["count"] == 7 and stats["errors"] == 5
    assert stats["max_ms"] == pytest.approx(700.0)
    assert stats["total_ms"] == pytest.approx(2800.0)


def test_a_smaller_duration_leaves_the_max() -> None:
    name = _name()
    for seconds in (0.3, 0.9, 0.2):
        _metrics.task_finished(name, "success", seconds)
    assert _metric_stats.statistics()["tasks"][name]["max_ms"] == pytest.approx(900.0)
    text = _metrics.render()[0].decode()
    assert f'worker_task_max_duration_seconds{{task="{name}"}} 0.9' in text


PID_REUSE_SCRIPT = textwrap.dedent("""
    import json, sys
    from backend.workers.shared import _metric_stats, _metrics

    _metrics.enable_multiprocess(sys.argv[1])
    _metrics.function_call("work", 2.0, True)
    # A later process with this pid writes into the same value file with nothing recorded yet
    # of its own: what prometheus_client and the maxima hold per process starts empty.
    with _metrics._state.lock:
        _metrics._state.children = {}
        _metrics._state.maxima = {}
    _metrics.function_call("work", 0.5, True)
    print(json.dumps(_metric_stats.statistics()["functions"]["work"]))
""")


def test_a_process_reusing_a_pid_keeps_the_maximum_in_its_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PID_REUSE_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    figures = json.loads(done.stdout)
    assert (figures["count"], figures["max_ms"]) == (2, 2000.0)


CHILDREN_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from backend.workers.shared import _metric_stats, _metrics

    _metrics.enable_multiprocess(sys.argv[1])
    _metrics.function_call("work", 0.4, True)  # the parent counts too, before the fork
    _metrics.task_finished("job", "success", 0.4)
    # Per child: its function calls and tasks (seconds, ok / outcome).
    plans = [
        ([(2.0, False)], [(3.0, "failure")]),  # the longest: exits before the figures are read
        ([(0.3, True)], [(0.3, "retry")]),  # below the inherited max of its parent
        ([(0.9, True), (0.1, True)], [(1.5, "success")]),  # stays alive until killed
    ]
    ready_r, ready_w = os.pipe()
    children = []
    for n, (calls, tasks) in enumerate(plans):
        pid = os.fork()
        if pid == 0:
            for seconds, ok in calls:
                _metrics.function_call("work", seconds, ok)
            for seconds, outcome in tasks:
                _metrics.task_finished("job", outcome, seconds)
            if n == 2:
                os.write(ready_w, b"x")
                time.sleep(30)
            os._exit(0)
        children.append(pid)
    os.read(ready_r, 1)
    for pid in children[:2]:
        os.waitpid(pid, 0)
        _metrics.mark_process_dead(pid)
    before = _metric_stats.statistics()
    os.kill(children[2], 9)
    os.waitpid(children[2], 0)
    _metrics.mark_process_dead(children[2])
    print(json.dumps({"before": before, "after": _metric_stats.statistics(),
                      "text": _metrics.render()[0].decode()}))
""")


def test_maxima_and_counts_span_forked_children_dead_or_alive(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILDREN_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out: dict[str, Any] = json.loads(result.stdout)
    for moment in ("before", "after"):
        work = out[moment]["functions"]["work"]
        assert (work["count"], work["errors"]) == (5, 1), moment
        assert work["max_ms"] == pytest.approx(2000.0)
        assert work["total_ms"] == pytest.approx(3700.0)
        assert work["p95_ms"] <= work["max_ms"]
        job = out[moment]["tasks"]["job"]
        assert (job["count"], job["errors"]) == (4, 2), moment
        assert job["max_ms"] == pytest.approx(3000.0)
    assert 'worker_function_max_duration_seconds{function="work"} 2.0' in out["text"]
    assert 'worker_task_max_duration_seconds{task="job"} 3.0' in out["text"]
