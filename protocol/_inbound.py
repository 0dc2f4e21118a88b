"""Decoding and validating what producers publish on ``shoal.events.<customer>`` (and
``SHOAL_EVENTS`` stores as ``shoal.events.<partition>.<customer>``).

Every reason an event is rejected is written here, so that the README, the tests and the
``shoal.rejected`` messages agree on its exact text. The limits an event is decoded under are
in :mod:`protocol._limits`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from ._errors import ProtocolError, SubjectError
from ._limits import DEFAULT_MAX_EVENT_BYTES as DEFAULT_MAX_EVENT_BYTES
from ._limits import (
    EARLIEST,
    LATEST,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_TIMESTAMP_CHARS,
    TIMEZONE_TRAIT,
    TOO_DEEP,
    LimitExceeded,
    check_values,
    known_timezones,
)
from ._subjects import customer_of_event_subject, event_subject
from ._time import SECOND, format_instant, to_instant
from ._types import Event, shown_subject

MAX_FUTURE_SKEW = 300 * SECOND
"""How far ahead of its receive time an event may be stamped (5 minutes)."""


RejectionKind = Literal[
    "too_large",
    "subject",
    "json",
    "invalid",
    "type",
    "user_id",
    "event",
    "message_id",
    "timestamp",
    "future",
    "depth",
    "integer",
    "length",
    "timezone",
    "quarantined",
    "suppressed",
    "forget",
]
"""The class of a rejection reason: a short, stable name for counting them (metrics)."""

_SHOWN_CHARS = 64
"""How much of a rejected text a reason quotes."""


def _shown(text: str) -> str:
    """``text``, cut to what a one-line reason can quote."""
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


class InvalidEvent(ProtocolError, ValueError):
    """An inbound event cannot be applied; ``reason`` says why, for a person.

    ``kind`` is the class of the reason, for counting. ``customer_id`` and ``message_id``
    are those of the event as far as they could be read (None when not).
    """

    def __init__(
        self,
        reason: str,
        *,
        kind: RejectionKind = "invalid",
        customer_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: RejectionKind = kind
        self.customer_id = customer_id
        self.message_id = message_id


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
    """The instant of an ISO-8601 timestamp that carries a UTC offset, within the range
    shoal accepts (:data:`~protocol._limits.EARLIEST` to before
    :data:`~protocol._limits.LATEST`).

    Raises:
        InvalidEvent: the text is not such a timestamp.
    """
    try:
        dt = datetime.fromisoformat(text) if len(text) <= MAX_TIMESTAMP_CHARS else None
    except ValueError:
        dt = None
    if dt is None or dt.tzinfo is None:
        raise InvalidEvent(
            f"timestamp {_shown(text)!r} is not an ISO-8601 date and time with a UTC offset "
            "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
            kind="timestamp",
        )
    try:
        at = to_instant(dt)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first datetime
        at = EARLIEST - 1
    if not EARLIEST <= at < LATEST:
        raise InvalidEvent(
            f"timestamp {text!r} is out of range: events must be stamped from "
            f"{format_instant(EARLIEST)} to before {format_instant(LATEST)}",
            kind="timestamp",
        )
    return at


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
        subject: the subject it was stored under (``shoal.events.<partition>.<customer>``),
            or published on (``shoal.events.<customer>``: what ``shoal publish`` and a history
            line are checked with); bytes that are not UTF-8 arrive surrogate-escaped, and
            are refused. The literal ``shoal.events.*`` or ``shoal.events.>`` names no
            customer: it is refused.
        received: when the broker received it (microseconds since the epoch); the event's
            instant when it has no timestamp, and the reference for "too far in the future".
        default_message_id: the message id to use when the payload has no ``messageId``.
        max_bytes: the largest payload accepted.

    Raises:
        InvalidEvent: the event cannot be applied; its ``reason`` is one line for a person.
    """
    customer_id: str | None = None
    message_id = default_message_id
    try:
        if len(data) > max_bytes:
            raise InvalidEvent(
                f"payload is {len(data)} bytes, over the limit of {max_bytes} bytes",
                kind="too_large",
            )
        if not subject.isascii():
            _check_utf8(subject)
        try:
            customer_id = customer_of_event_subject(subject)
        except SubjectError as e:
            raise InvalidEvent(str(e), kind="subject") from e
        if len(customer_id) > MAX_ID_CHARS:
            raise InvalidEvent(
                f"customer id of {len(customer_id)} characters, over the limit of {MAX_ID_CHARS}",
                kind="length",
            )
        try:
            wire = _decoder.decode(data)
        except msgspec.ValidationError as e:
            raise InvalidEvent(f"invalid event: {e}") from e
        except msgspec.DecodeError as e:
            raise InvalidEvent(f"invalid JSON: {e}", kind="json") from e
        except RecursionError:
            raise InvalidEvent(TOO_DEEP, kind="depth") from None
        message_id = wire.message_id or default_message_id
        return _checked(wire, customer_id, received, message_id)
    except InvalidEvent as e:
        # So whoever logs or counts the rejection can say whose event it was.
        e.customer_id, e.message_id = customer_id, message_id
        raise


def _check_utf8(subject: str) -> None:
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(
            f"subject '{shown_subject(subject)}' is not valid UTF-8 (bytes that are not are "
            "shown as \\xNN)",
            kind="subject",
        ) from None


def _checked(wire: _Wire, customer_id: str, received: int, message_id: str) -> Event:
    if wire.type is None:
        raise InvalidEvent("missing required field `type` ('track' or 'identify')", kind="type")
    if wire.type not in ("track", "identify"):
        raise InvalidEvent(
            f"unknown type {_shown(wire.type)!r}: expected 'track' or 'identify'", kind="type"
        )
    if wire.user_id is None:
        raise InvalidEvent("missing required field `userId`", kind="user_id")
    if wire.user_id != customer_id:
        # The subject its producer published on, not the one the stream stored it under
        # (with a partition): the producer knows the first.
        raise InvalidEvent(
            f"userId {_shown(wire.user_id)!r} does not match the customer {customer_id!r} "
            f"of subject {event_subject(customer_id)!r}",
            kind="user_id",
        )
    track = wire.type == "track"
    if track:
        if wire.event is None:
            raise InvalidEvent(
                "missing required field `event` (the event name) on a track event", kind="event"
            )
        if not wire.event:
            raise InvalidEvent("field `event` (the event name) must not be empty", kind="event")
        if len(wire.event) > MAX_NAME_CHARS:
            raise InvalidEvent(
                f"field `event` (the event name) has {len(wire.event)} characters, over the "
                f"limit of {MAX_NAME_CHARS}",
                kind="length",
            )
    if wire.message_id is not None and not wire.message_id:
        raise InvalidEvent("field `messageId` must not be empty when given", kind="message_id")
    if len(message_id) > MAX_ID_CHARS:
        raise InvalidEvent(
            f"message id of {len(message_id)} characters, over the limit of {MAX_ID_CHARS}",
            kind="length",
        )

    at = received
    if wire.timestamp is not None:
        stamped = parse_timestamp(wire.timestamp)
        ahead = stamped - received
        if ahead > MAX_FUTURE_SKEW:
            raise InvalidEvent(
                f"timestamp {wire.timestamp!r} is {_seconds(ahead)} s ahead of the time the "
                f"event was received ({format_instant(received)}); at most "
                f"{MAX_FUTURE_SKEW // SECOND} s ahead is allowed",
                kind="future",
            )
        # A timestamp a little ahead of the broker's clock is skew, not the future: the
        # event counts from when it was received, so no rule sees an instant not yet reached.
        at = min(stamped, received)

    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    try:
        if track:
            if wire.properties:
                properties = wire.properties
                check_values(properties)
        elif wire.traits:
            traits = wire.traits
            check_values(traits)
            zone = traits.get(TIMEZONE_TRAIT)
            if zone is not None:
                _check_zone(zone)
    except LimitExceeded as e:
        raise InvalidEvent(e.at("properties" if track else "traits"), kind=e.kind) from None

    return Event(
        kind=wire.type,  # type: ignore[arg-type]  # checked above
        customer_id=customer_id,
        name=wire.event if track else None,
        properties=properties,
        traits=traits,
        at=at,
        received=received,
        message_id=message_id,
    )


def _check_zone(zone: object) -> None:
    if isinstance(zone, str) and zone in known_timezones():
        return
    shown = repr(_shown(zone)) if isinstance(zone, str) else f"of type {type(zone).__name__}"
    raise InvalidEvent(
        f"trait `{TIMEZONE_TRAIT}` {shown} is not a time zone name zoneinfo knows: give an "
        "IANA name such as 'Europe/London', or null",
        kind="timezone",
    )
