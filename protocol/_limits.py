"""The limits every inbound event is decoded under, in one place, and the checks of the
values an event carries (its ``properties`` and ``traits``) against them.

An event outside these limits is rejected with its reason (see :mod:`protocol._inbound`):
whatever is accepted can be logged, applied, exported and queried, so no single message can
stop the engine.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime
from typing import Any, Literal

from ._time import to_instant

DEFAULT_MAX_EVENT_BYTES = 64 * 1024
"""The largest payload accepted, in bytes (``EngineConfig.max_event_bytes`` changes it)."""
MAX_DEPTH = 32
"""How deep JSON may nest: the event object is level 1, its ``properties`` level 2."""
MAX_ID_CHARS = 256
"""The longest customer id (``userId``) and ``messageId``, in characters."""
MAX_NAME_CHARS = 256
"""The longest event name, and key of an object in ``properties`` or ``traits``."""
MAX_STRING_CHARS = 16 * 1024
"""The longest string value in ``properties`` or ``traits``, in characters."""
MAX_KEYS = 1_000
"""The most keys of one object in ``properties`` or ``traits`` (themselves included)."""
MAX_ITEMS = 10_000
"""The most items of one array in ``properties`` or ``traits``."""
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
"""Integers are signed 64-bit: what the log, SQLite and most consumers hold exactly."""
MAX_TIMESTAMP_CHARS = 64
"""The longest ``timestamp`` text."""
EARLIEST = to_instant(datetime(1900, 1, 1, tzinfo=UTC))
"""The earliest instant an event may be stamped with (1900-01-01T00:00:00Z)."""
LATEST = to_instant(datetime(3000, 1, 1, tzinfo=UTC))
"""The instant every event must be stamped before (3000-01-01T00:00:00Z): any instant in
between can be written in every time zone, and a rule's duration added to it."""
TIMEZONE_TRAIT = "timezone"
"""The identify trait read as the customer's IANA time zone: it must name one ``zoneinfo``
knows (or be null)."""

# Limits are enforced on what is kept; floats need no check: the JSON decoder refuses a
# number it cannot hold as a finite float ("Number out of range"), and JSON has no NaN.


LimitKind = Literal["depth", "integer", "length"]
"""The class of a limit a value exceeded (a :data:`~protocol._inbound.RejectionKind`)."""


class LimitExceeded(Exception):
    """A value is outside the limits; ``path`` is where, innermost last once unwound."""

    def __init__(self, what: str, kind: LimitKind) -> None:
        super().__init__(what)
        self.what = what
        self.kind: LimitKind = kind
        self.path: list[str | int] = []

    def at(self, root: str) -> str:
        """The reason, with where, as msgspec writes it: ``... - at `$.traits.a[2]```."""
        where = "$." + root
        for step in reversed(self.path):
            where += f"[{step}]" if isinstance(step, int) else f".{step}"
        return f"{self.what} - at `{where}`"


def check_values(obj: dict[str, Any], depth: int = 2) -> None:
    """Check the ``properties`` or ``traits`` of an event (an object at level ``depth``).

    Raises:
        LimitExceeded: a key, string, integer, object or array is outside the limits, or
            they nest deeper than :data:`MAX_DEPTH`.
    """
    if len(obj) > MAX_KEYS:
        raise LimitExceeded(f"object has {len(obj)} keys, over the limit of {MAX_KEYS}", "length")
    for key, value in obj.items():
        t = type(value)
        # The hot path: a key and a scalar within the limits, checked without a call.
        if len(key) <= MAX_NAME_CHARS and (
            (t is str and len(value) <= MAX_STRING_CHARS)
            or (t is int and MIN_INT <= value <= MAX_INT)
            or t is float
            or t is bool
            or value is None
        ):
            continue
        try:
            if len(key) > MAX_NAME_CHARS:
                raise LimitExceeded(
                    f"key of {len(key)} characters, over the limit of {MAX_NAME_CHARS}",
                    "length",
                )
            _check(value, depth)
        except LimitExceeded as e:
            e.path.append(key if len(key) <= MAX_NAME_CHARS else key[:16] + "...")
            raise


def _check_array(items: list[Any], depth: int) -> None:
    if len(items) > MAX_ITEMS:
        raise LimitExceeded(
            f"array has {len(items)} items, over the limit of {MAX_ITEMS}", "length"
        )
    for i, value in enumerate(items):
        try:
            _check(value, depth)
        except LimitExceeded as e:
            e.path.append(i)
            raise


def _check(value: Any, depth: int) -> None:
    """``value`` sits inside a container at nesting level ``depth``."""
    t = type(value)
    if t is str:
        if len(value) > MAX_STRING_CHARS:
            raise LimitExceeded(
                f"string of {len(value)} characters, over the limit of {MAX_STRING_CHARS}",
                "length",
            )
    elif t is int:
        if not MIN_INT <= value <= MAX_INT:
            # Not the number itself: it may have thousands of digits.
            raise LimitExceeded(
                f"integer out of range: integers must fit in 64 bits ({MIN_INT} to {MAX_INT})",
                "integer",
            )
    elif t is dict or t is list:
        if depth >= MAX_DEPTH:
            raise LimitExceeded(_too_deep(), "depth")
        if t is dict:
            check_values(value, depth + 1)
        else:
            _check_array(value, depth + 1)


def _too_deep() -> str:
    return f"JSON nested deeper than the limit of {MAX_DEPTH} levels"


TOO_DEEP = _too_deep()
"""The reason for JSON nested too deep to decode at all."""


@functools.cache
def known_timezones() -> frozenset[str]:
    """The IANA time zone names ``zoneinfo`` knows here (read once: it lists files)."""
    return frozenset(zoneinfo.available_timezones())
