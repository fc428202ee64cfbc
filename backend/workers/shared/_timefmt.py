"""The one time format of the worker package: UTC, milliseconds, ``Z``
(``2026-12-03T11:45:46.773Z``), for log lines, health reports and their history."""

from __future__ import annotations

import time

_cache: tuple[int, str] = (-1, "")  # (whole second, its formatted prefix), swapped as one


def utc_iso(when: float) -> str:
    """``when`` (seconds since the epoch) as UTC ISO 8601 with milliseconds and ``Z``."""
    global _cache
    second, micros = divmod(round(when * 1_000_000), 1_000_000)  # as datetime rounds it
    cached_second, prefix = _cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cache = (second, prefix)
    return f"{prefix}.{micros // 1000:03d}Z"


def utc_now_iso() -> str:
    """Now, as :func:`utc_iso` writes it."""
    return utc_iso(time.time())
