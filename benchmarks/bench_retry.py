"""Success-path cost of @retry, @circuit_breaker (local) and ResilientExecutor.

Compared in one run against a bare call and against plain tenacity (the same function under
``tenacity.retry`` with 3 attempts and exponential jittered waits). Also shown: one failure
then success (both without sleeping), and a Redis-shared breaker when Redis is up.
Figures are the best of several repeats, in microseconds per call.

Run: ``.venv/bin/python benchmarks/bench_retry.py`` (or ``make bench``).
"""

from __future__ import annotations

import logging
import socket
import timeit
import uuid
from collections.abc import Callable

import tenacity

from backend.workers.shared import retry_utils
from backend.workers.shared.retry_utils import (
    CircuitBreaker,
    ResilientExecutor,
    circuit_breaker,
    retry,
    set_testing,
)

NUMBER = 200_000
REPEAT = 7
TARGET_US = 2.0


def per_call_us(fn: Callable[[], object], number: int = NUMBER) -> float:
    """Best per-call time in microseconds over REPEAT runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e6


def work(x: int = 1) -> int:
    return x


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    ours_retry = retry(max_attempts=3)(work)
    ours_breaker = circuit_breaker(name=f"bench-{uuid.uuid4().hex[:8]}")(work)
    executor = ResilientExecutor(
        {"max_attempts": 3}, circuit_breaker=CircuitBreaker(f"bench-{uuid.uuid4().hex[:8]}")
    )
    ours_executor = executor(work)
    plain_tenacity = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential_jitter(initial=1, max=60),
        reraise=True,
    )(work)

    bare = per_call_us(lambda: work(1))
    rows = {
        "bare call": bare,
        "tenacity.retry": per_call_us(lambda: plain_tenacity(1), NUMBER // 10),
        "@retry": per_call_us(lambda: ours_retry(1)),
        "@circuit_breaker (local)": per_call_us(lambda: ours_breaker(1)),
        "@ResilientExecutor": per_call_us(lambda: ours_executor(1)),
        "executor.execute(fn)": per_call_us(lambda: executor.execute(work, 1)),
    }
    tenacity_overhead = rows["tenacity.retry"] - bare
    print(f"success path, best of {REPEAT} (us per call; overhead = minus the bare call)")
    print(f"{'':28}{'per call':>10}{'overhead':>10}{'vs tenacity':>13}")
    for label, value in rows.items():
        overhead = value - bare
        ratio = overhead / tenacity_overhead if label != "bare call" else 0.0
        print(f"{label:28}{value:10.3f}{overhead:10.3f}{ratio:12.3f}x")
    print(f"tenacity overhead / @retry overhead: "
          f"{tenacity_overhead / max(rows['@retry'] - bare, 1e-9):.1f}x")
    for label in ("@retry", "@circuit_breaker (local)", "@ResilientExecutor"):
        verdict = "ok" if rows[label] - bare <= TARGET_US else "OVER TARGET"
        print(f"target <= {TARGET_US} us overhead: {label}: {verdict}")

    # One failure, then success; no sleeping on either side, and our retry log line silenced
    # (tenacity logs nothing by default), so the two retry machineries are compared.
    set_testing(True)
    logging.getLogger(retry_utils.__name__).setLevel(logging.ERROR)
    state = {"n": 0}

    def flaky() -> int:
        state["n"] += 1
        if state["n"] % 2:
            raise ConnectionError("once")
        return 1

    ours_flaky = retry(max_attempts=3)(flaky)
    tenacity_flaky = tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(),
                                    reraise=True)(flaky)
    ours_fail = per_call_us(ours_flaky, 3_000)
    ten_fail = per_call_us(tenacity_flaky, 3_000)
    print(f"\none failure then success (us per call): @retry {ours_fail:.2f}, "
          f"tenacity {ten_fail:.2f}, ratio {ours_fail / ten_fail:.2f}x")
    set_testing(False)

    if redis_up():
        shared = CircuitBreaker(
            f"bench-{uuid.uuid4().hex[:8]}",
            redis_url="redis://127.0.0.1:6379/0",
            key_prefix=f"bench:{uuid.uuid4().hex}:",
        )
        shared_us = per_call_us(lambda: shared.call(work, 1), 5_000)
        print(f"Redis-shared breaker (one Lua round trip per call): {shared_us:.1f} us per call")
        shared.reset()
    else:
        print("Redis-shared breaker: skipped (no Redis on 127.0.0.1:6379)")


if __name__ == "__main__":
    main()
