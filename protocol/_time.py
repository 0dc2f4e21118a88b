"""Instants on the wire and inside shoal.

Inside shoal an instant is an ``int`` of microseconds since the Unix epoch, UTC: exact,
cheap to compare and to store. On the wire it is RFC 3339 text in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
NEVER = 1 << 62
"""The instant after every instant shoal handles: "no deadline", stored as an int."""


def to_instant(dt: datetime) -> int:
    """Microseconds since the epoch of an aware ``datetime`` (exact, no float rounding)."""
    if dt.tzinfo is None:
        raise ValueError("a naive datetime has no instant; give it a UTC offset")
    return (dt - EPOCH) // _ONE_US


def from_instant(instant: int) -> datetime:
    """The aware UTC ``datetime`` of an instant in microseconds since the epoch."""
    return EPOCH + _ONE_US * instant  # (exact: integer microseconds; half the cost of timedelta())


def format_instant(instant: int) -> str:
    """RFC 3339 text in UTC, ``Z``-suffixed, with microseconds only when there are some."""
    dt = from_instant(instant)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
