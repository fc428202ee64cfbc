"""Parsing of the HTTP ``Retry-After`` header, in both of its forms (RFC 9110, 10.2.3).

``Retry-After: 120`` (delay in seconds) and ``Retry-After: Wed, 21 Oct 2015 07:28:00 GMT``
(an HTTP date) both become a number of seconds from now. A date in the past means "now" (0).
A value that is neither form is ignored (``None``) rather than crashing the caller: the
normal backoff then applies.
"""

from __future__ import annotations

import time
from datetime import UTC
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or ``None`` when absent or invalid.

    ``now`` (a POSIX timestamp) defaults to the current time; it only matters for the date form.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():  # not "²", which isdigit() accepts
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates carry no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
