"""Wire types: what producers publish, what shoal publishes, and what the log keeps."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Literal

import msgspec

from ._subjects import escape_token
from ._time import from_instant, to_instant


class EventCause(msgspec.Struct, frozen=True, kw_only=True, tag="event", tag_field="kind"):
    """The membership changed because this event was applied."""

    message_id: str


class TimeCause(msgspec.Struct, frozen=True, kw_only=True, tag="time", tag_field="kind"):
    """The membership changed because time passed (a rule's deadline was reached)."""


class DefinitionCause(
    msgspec.Struct, frozen=True, kw_only=True, tag="definition", tag_field="kind"
):
    """The membership changed because the segment definitions changed."""


Cause = EventCause | TimeCause | DefinitionCause

Change = Literal["entered", "exited"]


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A change of one customer's membership in one segment, as published on
    ``shoal.segments.<segment>.<change>``.

    ``at`` is the instant the rule became true or false (for a time-based change, the
    computed instant, not when the engine noticed). ``version`` counts the customer's
    transitions over all segments, starting at 1, with no gaps.
    """

    customer_id: str
    segment: str
    change: Change
    at: datetime
    cause: Cause
    version: int

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id`` header value: ``<customer>:<segment>:<version>``.

        The customer part is its subject token with non-ASCII bytes percent-escaped too,
        because header values must be ASCII.
        """
        return f"{header_token(self.customer_id)}:{self.segment}:{self.version}"


class Event(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """A validated event: what the log keeps and what actors apply.

    ``at`` is the event's effective instant (its timestamp, or its receive time when it has
    none or is stamped ahead of it); ``received`` is when the broker stored it. Both are
    microseconds since the epoch, UTC. ``message_id`` is the producer's ``messageId``, or one
    derived from the broker's stream sequence when the producer gave none.
    """

    kind: Literal["track", "identify"]
    customer_id: str
    name: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    at: int
    received: int
    message_id: str


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Published on ``shoal.rejected`` for an event that was not applied.

    ``payload`` is the original payload when it is UTF-8 text, else ``payload_base64`` holds it.
    """

    reason: str
    subject: str
    received_at: datetime
    stream_sequence: int | None
    payload: str | None = None
    payload_base64: str | None = None

    @classmethod
    def of(
        cls, *, reason: str, subject: str, data: bytes, received: int, stream_sequence: int | None
    ) -> Rejection:
        """The rejection of the inbound message ``data`` received on ``subject``."""
        try:
            text: str | None = data.decode("utf-8")
            b64 = None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(data).decode("ascii")
        return cls(
            reason=reason,
            subject=subject,
            received_at=from_instant(received),
            stream_sequence=stream_sequence,
            payload=text,
            payload_base64=b64,
        )

    @property
    def msg_id(self) -> str | None:
        """Its message id (the broker drops a repeat), when it has a stream position."""
        if self.stream_sequence is None:
            return None
        return f"rejected:{self.stream_sequence}:{to_instant(self.received_at)}"


def header_token(customer_id: str) -> str:
    """``customer_id`` as a subject token with non-ASCII bytes percent-escaped (ASCII only)."""
    token = escape_token(customer_id)
    if token.isascii():
        return token
    return "".join(
        ch if ch.isascii() else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in token
    )
