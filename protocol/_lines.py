"""History as JSON lines: one Segment Spec event per line, to and from :class:`Event`.

A line of history is validated as the engine validates a live event (:func:`decode_event`),
except that it must carry its ``timestamp``: a file has no broker receive time, so the
timestamp is both the event's instant and its receive instant. ``shoal import``, ``shoal
replay FILE`` and ``shoal export`` read and write these lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from ._inbound import InvalidEvent, decode_event
from ._subjects import event_subject
from ._time import format_instant, to_instant
from ._types import Event


class _Head(msgspec.Struct, kw_only=True, rename="camel"):
    """The fields read before validating the whole line."""

    user_id: Any = None
    timestamp: Any = None
    message_id: Any = None


_head_decoder = msgspec.json.Decoder(_Head)
_NOBODY = event_subject("-")
"""The subject to validate a line against when its ``userId`` is missing or not text: the
event is refused before its customer is compared with the subject's."""
_END_OF_TIME = to_instant(datetime(9999, 12, 31, tzinfo=UTC))
"""The "now" a file's lines are read at: a file replays its own time, none of it ahead."""


def _content_id(line: bytes) -> str:
    """``import:`` and a hash of the line's JSON with its keys sorted: the same content,
    however spaced or ordered, gets the same id."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(line), order="sorted")
    except (msgspec.MsgspecError, RecursionError):
        canonical = line.strip()
    return "import:" + hashlib.sha256(canonical).hexdigest()[:32]


def event_from_line(line: bytes, *, now: int) -> Event:
    """Validate one line of history (Segment Spec JSON) as a live event, and return it.

    Unlike a live event, it must carry its ``timestamp``: history has no broker receive
    time, so the timestamp is both its instant and its receive instant. Its message id is
    its ``messageId``, or else ``import:`` and a hash of its content, so importing the same
    line twice gives one event (two identical lines without ``messageId`` are one event).

    Args:
        line: one JSON line.
        now: the current instant (microseconds since the epoch). A timestamp more than
            :data:`MAX_FUTURE_SKEW` ahead of it is refused, and one less far ahead
            counts from ``now``, as a live event stamped ahead counts from its receipt.

    Raises:
        InvalidEvent: the line cannot be read as an event; ``reason`` says why, in the
            words the engine uses for a live event where it has them.
    """
    try:
        head = _head_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError):
        # Not a JSON object: decode_event says so in its own words.
        decode_event(line, _NOBODY, received=now, default_message_id="-")
        raise InvalidEvent("invalid JSON") from None  # not reached: it refuses the line
    user = head.user_id
    if user == "":
        raise InvalidEvent("invalid `userId`: a customer id cannot be empty")
    event = decode_event(
        line,
        event_subject(user) if isinstance(user, str) else _NOBODY,
        received=now,
        default_message_id="" if head.message_id else _content_id(line),
    )
    if head.timestamp is None:
        raise InvalidEvent(
            "missing required field `timestamp` (a file has no receive time: each event "
            "needs its instant)"
        )
    return msgspec.structs.replace(event, received=event.at)


def _ignore(number: int, detail: Any) -> None:
    pass


def events_from_lines(
    lines: Iterable[bytes],
    *,
    on_skip: Callable[[int, str], None] = _ignore,
    on_repeat: Callable[[int, int], None] = _ignore,
) -> list[Event]:
    """The valid events of a file of history, in timestamp order (stable: equal timestamps
    keep their file order). Blank lines are ignored.

    Each line is read by :func:`event_from_line` at the end of time: a file replays its own
    time, and none of it is "ahead". So a file replayed gives the transitions the same file
    imported (``shoal import``) then replayed gives.

    Args:
        lines: the file's lines, numbered from 1.
        on_skip: called with the number and the reason of each line that is not a valid
            event.
        on_repeat: called with the number of each event of a customer with the message id
            of an earlier line, and that line's number: the engine applies an event once,
            so the repeat is left out.
    """
    events: list[Event] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            event = event_from_line(line, now=_END_OF_TIME)
        except InvalidEvent as e:
            on_skip(number, e.reason)
            continue
        first = seen.setdefault((event.customer_id, event.message_id), number)
        if first != number:
            on_repeat(number, first)
            continue
        events.append(event)
    events.sort(key=lambda e: e.received)
    return events


class _Line(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """One written event: Segment Spec fields, plus when it was received."""

    type: str
    user_id: str
    event: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    timestamp: str
    message_id: str
    received_at: str


_line_encoder = msgspec.json.Encoder()


def event_line(event: Event) -> bytes:
    """One event as a Segment Spec JSON line (no newline), which :func:`event_from_line`
    reads back: ``type``, ``userId``, ``event`` and ``properties`` or ``traits``,
    ``timestamp`` (its instant), ``messageId`` and ``receivedAt``."""
    track = event.kind == "track"
    return _line_encoder.encode(
        _Line(
            type=event.kind,
            user_id=event.customer_id,
            event=event.name if track else None,
            properties=event.properties if track else None,
            traits=None if track else event.traits,
            timestamp=format_instant(event.at),
            message_id=event.message_id,
            received_at=format_instant(event.received),
        )
    )
