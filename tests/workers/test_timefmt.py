"""The one time format (``_timefmt.utc_iso``): what log lines and health reports carry."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from backend.workers.shared._timefmt import utc_iso, utc_now_iso


def reference(when: float) -> str:
    moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.mark.parametrize(
    "when",
    [0.0, 0.0005, 0.9994, 59.999, 86_399.999, 951_782_400.5, 1_796_215_546.773, 4_102_444_799.999],
)
def test_utc_iso_is_iso_8601_with_milliseconds_and_z(when: float) -> None:
    assert utc_iso(when) == reference(when)


def test_a_second_boundary_is_crossed_both_ways() -> None:
    # The formatted second is cached: going back to an earlier second must not reuse it.
    moments = (10.5, 11.25, 10.75)
    assert [utc_iso(t) for t in moments] == [reference(t) for t in moments]


def test_threads_formatting_different_seconds_never_mix_them() -> None:
    seconds = [1_700_000_000 + n for n in range(8)]
    wrong: list[tuple[float, str]] = []

    def format_many(second: int) -> None:
        for _ in range(5_000):
            text = utc_iso(second + 0.5)
            if text != reference(second + 0.5):
                wrong.append((second, text))

    threads = [threading.Thread(target=format_many, args=(s,)) for s in seconds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_now_is_parsable_and_utc() -> None:
    text = utc_now_iso()
    assert text.endswith("Z") and len(text) == len("2026-12-03T11:45:46.773Z")
    assert datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None
