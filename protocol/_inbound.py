"""Decoding and validating what producers publish on ``shoal.events.<customer>``.

Every reason an event is rejected is written here, so that the README, the tests and the
``shoal.rejected`` messages agree on its exact text.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from ._errors import ProtocolError, SubjectError
from ._subjects import customer_of_event_subject
from ._time import SECOND, format_instant, to_instant
from ._types import Event

DEFAULT_MAX_EVENT_BYTES = 64 * 1024
MAX_FUTURE_SKEW = 300 * SECOND
"""How far ahead of its receive time an event may be stamped (5 minutes)."""


class InvalidEvent(ProtocolError, ValueError):
    """An inbound event cannot be applied; ``reason`` says why, for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Wire(msgspec.Struct, kw_only=True, rename="camel"):
    """The Segment Spec fields shoal reads; other fields (``context``, ...) are ignored.

    ``type`` and ``timestamp`` are read as text so the reasons for rejecting them can be
    precise.
    """

    type: str | None = None
    user_id: str | None = None
    event: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    timestamp: str | None = None
    message_id: str | None = None


_decoder = msgspec.json.Decoder(_Wire)


def _seconds(us: int) -> str:
    """Exact seconds of a duration in microseconds, without trailing zeros: 300.000001, 3600."""
    whole, frac = divmod(us, SECOND)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


def parse_timestamp(text: str) -> int:
    """The instant of an ISO-8601 timestamp that carries a UTC offset.

    Raises:
        InvalidEvent: the text is not such a timestamp.
    """
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        dt = None
    if dt is None or dt.tzinfo is None:
        raise InvalidEvent(
            f"timestamp {text!r} is not an ISO-8601 date and time with a UTC offset "
            "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)"
        )
    return to_instant(dt)


def decode_event(
    data: bytes,
    subject: str,
    *,
    received: int,
    default_message_id: str,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Event:
    """Validate one inbound payload and return the :class:`Event` to log and apply.

    Args:
        data: the message payload (Segment Spec JSON).
        subject: the subject it was published on (``shoal.events.<customer>``).
        received: when the broker received it (microseconds since the epoch); the event's
            instant when it has no timestamp, and the reference for "too far in the future".
        default_message_id: the message id to use when the payload has no ``messageId``.
        max_bytes: the largest payload accepted.

    Raises:
        InvalidEvent: the event cannot be applied; its ``reason`` is one line for a person.
    """
    if len(data) > max_bytes:
        raise InvalidEvent(f"payload is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        customer_id = customer_of_event_subject(subject)
    except SubjectError as e:
        raise InvalidEvent(str(e)) from e
    try:
        wire = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise InvalidEvent(f"invalid event: {e}") from e
    except msgspec.DecodeError as e:
        raise InvalidEvent(f"invalid JSON: {e}") from e

    if wire.type is None:
        raise InvalidEvent("missing required field `type` ('track' or 'identify')")
    if wire.type not in ("track", "identify"):
        raise InvalidEvent(f"unknown type {wire.type!r}: expected 'track' or 'identify'")
    if wire.user_id is None:
        raise InvalidEvent("missing required field `userId`")
    if wire.user_id != customer_id:
        raise InvalidEvent(
            f"userId {wire.user_id!r} does not match the customer {customer_id!r} "
            f"of subject {subject!r}"
        )
    if wire.type == "track":
        if wire.event is None:
            raise InvalidEvent("missing required field `event` (the event name) on a track event")
        if not wire.event:
            raise InvalidEvent("field `event` (the event name) must not be empty")
    if wire.message_id is not None and not wire.message_id:
        raise InvalidEvent("field `messageId` must not be empty when given")

    at = received
    if wire.timestamp is not None:
        stamped = parse_timestamp(wire.timestamp)
        ahead = stamped - received
        if ahead > MAX_FUTURE_SKEW:
            raise InvalidEvent(
                f"timestamp {wire.timestamp!r} is {_seconds(ahead)} s ahead of the time the "
                f"event was received ({format_instant(received)}); at most "
                f"{MAX_FUTURE_SKEW // SECOND} s ahead is allowed"
            )
        # A timestamp a little ahead of the broker's clock is skew, not the future: the
        # event counts from when it was received, so no rule sees an instant not yet reached.
        at = min(stamped, received)

    return Event(
        kind=wire.type,  # type: ignore[arg-type]  # checked above
        customer_id=customer_id,
        name=wire.event if wire.type == "track" else None,
        properties=(wire.properties or {}) if wire.type == "track" else {},
        traits=(wire.traits or {}) if wire.type == "identify" else {},
        at=at,
        received=received,
        message_id=wire.message_id or default_message_id,
    )
