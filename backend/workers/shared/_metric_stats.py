"""Task and function statistics (``/health/metrics``) computed from the Prometheus metrics.

The metrics are the one record of task and call timings: :func:`statistics` reads the duration
histograms, the outcome counts and the max gauges of :mod:`._metrics` (aggregated over every
process of a prefork worker, exited ones included) and sums them up per name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from . import _metrics

# Per kind of statistics: the duration histogram, its name label, the sample whose values
# with an outcome other than "success" are the errors, and the max gauge.
_SUMMARIES = {
    "tasks": (
        "worker_task_duration_seconds",
        "task",
        "worker_tasks_total",
        "worker_task_max_duration_seconds",
    ),
    "functions": (
        "worker_function_duration_seconds",
        "function",
        "worker_function_duration_seconds_count",
        "worker_function_max_duration_seconds",
    ),
}


def statistics() -> dict[str, dict[str, dict[str, Any]]]:
    """The ``tasks`` and ``functions`` statistics of ``/health/metrics``, from the metrics.

    Per name: count, errors (outcome other than ``success``), total_ms, mean_ms, max_ms
    (exact, from the max gauge) and p95_ms, estimated from the histogram's buckets
    (:func:`bucket_quantile`) and never above max_ms. Under a prefork pool (multiprocess
    mode) the figures are those of every process of the worker, exited ones included."""
    samples = _metrics.samples()
    return {kind: _summarize(samples, *spec) for kind, spec in _SUMMARIES.items()}


def _summarize(
    samples: Iterable[Any], histogram: str, label: str, errors_sample: str, max_gauge: str
) -> dict[str, dict[str, Any]]:
    count: dict[str, float] = {}
    total: dict[str, float] = {}
    errors: dict[str, float] = {}
    longest: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for sample in samples:
        name = sample.labels.get(label)
        if name is None:
            continue
        if sample.name == errors_sample and sample.labels.get("outcome") != "success":
            errors[name] = errors.get(name, 0.0) + sample.value
        if sample.name == f"{histogram}_count":
            count[name] = count.get(name, 0.0) + sample.value
        elif sample.name == f"{histogram}_sum":
            total[name] = total.get(name, 0.0) + sample.value
        elif sample.name == f"{histogram}_bucket":
            bound = float(sample.labels["le"])
            per_bound = buckets.setdefault(name, {})
            per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
        elif sample.name == max_gauge:
            longest[name] = max(longest.get(name, 0.0), sample.value)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(count):
        n, seconds, top = int(count[name]), total.get(name, 0.0), longest.get(name)
        p95 = bucket_quantile(0.95, sorted(buckets.get(name, {}).items()))
        out[name] = {
            "count": n,
            "errors": int(errors.get(name, 0.0)),
            "total_ms": round(seconds * 1000, 3),
            "mean_ms": round(seconds / n * 1000, 3) if n else 0.0,
            "max_ms": round((top or 0.0) * 1000, 3),
            "p95_ms": round((p95 if top is None else min(p95, top)) * 1000, 3),
        }
    return out


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The ``q`` quantile estimated from cumulative histogram ``buckets`` ((upper bound,
    count) by rising bound, the last +Inf), as PromQL's ``histogram_quantile``: linear
    interpolation inside the bucket that holds the rank (the first from 0); the highest
    finite bound when the rank lies in the +Inf bucket; 0.0 without any sample. The bounds
    are positive (durations) and ``0 < q <= 1``."""
    if len(buckets) < 2 or buckets[-1][1] <= 0:
        return 0.0
    rank = q * buckets[-1][1]
    index = next(i for i, (_bound, seen) in enumerate(buckets) if seen >= rank)
    if index == len(buckets) - 1:
        return buckets[-2][0]
    upper, seen = buckets[index]
    lower, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
    return lower + (upper - lower) * (rank - below) / (seen - below)
