"""Retry-After parsing: both forms of RFC 9110, past dates, and values that are neither."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from backend.workers.shared._retry_after import parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("86400", 86400.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),  # IMF-fixdate
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: now
        ("Tue, 14 Nov 2023 22:13:20 GMT", 0.0),  # NOW itself
        ("Tuesday, 14-Nov-23 22:14:20 GMT", 60.0),  # obsolete RFC 850 form
        ("Tue Nov 14 22:15:20 2023", 120.0),  # obsolete asctime form (no zone: GMT)
    ],
)
def test_valid_values(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "  ", "-5", "1.5", "soon", "Mon, 99 Foo 2023",
                                   "12abc", "0x10",
                                   "\u00b2", "\u0661\u0662"])  # digits, but not ASCII ones
def test_invalid_values_are_ignored(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_default_now_is_the_current_time() -> None:
    import time

    value = formatdate(time.time() + 3600, usegmt=True)
    parsed = parse_retry_after(value)
    assert parsed is not None and 3500 < parsed <= 3600
