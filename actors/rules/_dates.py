"""Durations, dates and local time: how rules write and read instants."""

from __future__ import annotations

import functools
import re
import zoneinfo
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from protocol import DAY, HOUR, MINUTE, SECOND

from ._limits import MAX_DURATION

_US = {"s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class LocalFilter:
    """Which local times (``weekday * 24 + hour``, Monday 0) a window with ``days`` or
    ``hours`` lets in."""

    __slots__ = ("ok",)

    def __init__(self, days: frozenset[int] | None, hours: frozenset[int] | None) -> None:
        self.ok = tuple(
            int((not days or d in days) and (not hours or h in hours))
            for d in range(7)
            for h in range(24)
        )

    def complement(self) -> LocalFilter:
        """The filter letting in the local times this one keeps out."""
        out = LocalFilter(None, None)
        out.ok = tuple(1 - x for x in self.ok)
        return out

    def lets_in(self, at: int, zone: tzinfo) -> bool:
        """Whether an event at ``at`` is in, in ``zone``."""
        return bool(self.ok[local_time(at, zone)])


def local_time(at: int, zone: tzinfo) -> int:
    """``weekday * 24 + hour`` (Monday 0) of instant ``at`` in ``zone``."""
    if zone is UTC:
        days, rest = divmod(at, _US["d"])
        return (days + 3) % 7 * 24 + rest // _US["h"]  # 1970-01-01 was a Thursday
    local = (EPOCH + timedelta(microseconds=at)).astimezone(zone)
    return local.weekday() * 24 + local.hour


def parse_duration(text: str) -> int:
    """Microseconds of a duration such as ``'90s'``, ``'14d'``, ``'1d12h'`` or ``'-1d'``.

    Raises:
        ValueError: the text is not a duration, or is longer than 100 years either way
            (:data:`~actors.rules._limits.MAX_DURATION`).
    """
    compact = text.replace(" ", "")
    sign = -1 if compact.startswith("-") else 1
    if sign < 0:
        compact = compact[1:]
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration: write numbers with units s, m, h or d, "
            "like '90s', '14d' or '1d12h'"
        )
    units = [u for _, u in parts]
    if units != sorted(set(units), key="dhms".index):
        raise ValueError(f"{text!r}: give each unit once, largest first, like '1d12h'")
    total = sum((Decimal(n) * _US[u] for n, u in parts), Decimal(0))
    if total > MAX_DURATION:
        raise ValueError(
            f"{text!r} is longer than the longest duration, {MAX_DURATION // DAY}d (100 years)"
        )
    if total != total.to_integral_value():
        raise ValueError(f"{text!r} is finer than a microsecond")
    return sign * int(total)


def to_instant_value(value: Any) -> int | None:
    """The instant of a date or date-time text (date alone: 00:00 UTC; no offset: UTC)."""
    if not isinstance(value, str):
        return None
    return _instant_of_text(value)


@functools.lru_cache(maxsize=4096)
def _instant_of_text(value: str) -> int | None:
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return (datetime(d.year, d.month, d.day, tzinfo=UTC) - EPOCH) // timedelta(
                microseconds=1
            )
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


@functools.cache
def _known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@functools.lru_cache(maxsize=1024)
def zone_of(name: Any) -> tzinfo:
    """The time zone of a ``timezone`` trait value; UTC for anything that is not the name of
    a zone zoneinfo knows.

    A trait value is a customer's data (and logs written by older versions may hold any
    text): it is looked up among the known names first, so it never makes zoneinfo open a
    path of its choosing (``'America'`` is a directory, a long name is too long a path).
    """
    if isinstance(name, str) and name in _known_zones():
        try:
            return ZoneInfo(name)
        except (OSError, ValueError, KeyError):  # the tz database changed since
            pass
    return UTC
