"""Instants on the command line: read from options (``--from``, ``--until``, ``--at``), and
shown to people to the millisecond.

JSON output keeps the wire's RFC 3339 text (:func:`protocol.format_instant`, to the
microsecond when there are some); tables and readable lines use :func:`human_instant`, so
that ``10:00:00.000Z`` is not ``10:00:00.000123Z`` here and ``10:00:00Z`` there.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from protocol import from_instant, to_instant

from ._errors import UsageError


def human_instant(at: int | datetime | str) -> str:
    """An instant (microseconds since the epoch, an aware datetime, or RFC 3339 text) as
    people read it: UTC to the millisecond, ``2026-11-22T10:00:00.000Z``. Text that is not
    an instant is returned as it is."""
    if isinstance(at, str):
        try:
            dt = datetime.fromisoformat(at)
        except ValueError:
            return at
        if dt.tzinfo is None:
            return at
        at = dt
    if isinstance(at, int):
        at = from_instant(at)
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def now() -> int:
    """The current instant, in microseconds since the epoch."""
    return time.time_ns() // 1000


def parse_instant(text: str, flag: str, *, allow_now: bool = False) -> int:
    """The instant of an option's value: an ISO-8601 date, or date and time (no offset:
    UTC), or with ``allow_now`` the word ``now``.

    Raises:
        UsageError: ``text`` is none of these.
    """
    if allow_now and text == "now":
        return now()
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        also = ", or 'now'" if allow_now else ""
        raise UsageError(
            f"{flag} {text!r} is not a date (2026-01-31) or an ISO-8601 date and time "
            f"(2026-01-31T09:00:00Z){also}"
        ) from None
    return to_instant(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))
