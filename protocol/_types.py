"""Wire types: what producers publish, what shoal publishes, and what the log keeps."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Any, Literal

import msgspec

from ._subjects import escape_token
from ._time import from_instant, to_instant


class EventCause(
    msgspec.Struct, frozen=True, kw_only=True, tag="event", tag_field="kind", gc=False
):
    """The membership changed because this event was applied."""

    message_id: str


class TimeCause(msgspec.Struct, frozen=True, kw_only=True, tag="time", tag_field="kind"):
    """The membership changed because time passed (a rule's deadline was reached)."""


class DefinitionCause(
    msgspec.Struct, frozen=True, kw_only=True, tag="definition", tag_field="kind"
):
    """The membership changed because the segment definitions changed: a catch-up
    transition, whose ``true_since`` comes from replaying the customer's log under the new
    definitions."""


class ImportCause(msgspec.Struct, frozen=True, kw_only=True, tag="import", tag_field="kind"):
    """The membership changed because imported history was applied (``shoal import``): a
    catch-up transition, published when the engine applied the end of the import, whose
    ``true_since`` comes from replaying the customer's log with the imported events."""


class ForgottenCause(msgspec.Struct, frozen=True, kw_only=True, tag="forgotten", tag_field="kind"):
    """The customer was forgotten (``shoal forget``): an ``exited`` transition for each
    segment it was in, published before its data is erased, so that campaigns stop. These
    exits are the one record of the customer that erasure keeps."""


Cause = EventCause | TimeCause | DefinitionCause | ImportCause | ForgottenCause

Change = Literal["entered", "exited"]


# Untracked by the cyclic GC (gc=False): no field can hold a container, so a transition is
# never part of a cycle; engines make them by the hundred thousand, each counted toward the
# next collection when tracked.
class Transition(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A change of one customer's membership in one segment, as published on
    ``shoal.segments.<segment>.<change>``.

    ``at`` is the instant the change took effect: for causes ``event`` and ``time``, the
    instant the rule became true or false (for a time-based change, the computed instant,
    not when the engine noticed); for the catch-up causes ``import`` and ``definition``, the
    instant the engine applied the end of the import or the definitions change.

    ``true_since`` is the instant the change it reports became true by the rules: equal to
    ``at`` for causes ``event`` and ``time``; for a catch-up transition, the instant a replay
    of the customer's log says the rule became true (``entered``) or stopped holding
    (``exited``; ``at`` when the replay never had it in the segment). Transitions stored
    before shoal had it decode with ``true_since`` equal to ``at``.

    ``version`` counts the customer's transitions over all segments, starting at 1, with no
    gaps.
    """

    customer_id: str
    segment: str
    change: Change
    at: datetime
    cause: Cause
    version: int
    true_since: datetime = None  # type: ignore[assignment]  # set from ``at`` when absent

    def __post_init__(self) -> None:
        if self.true_since is None:
            msgspec.structs.force_setattr(self, "true_since", self.at)

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
    ``payload_bytes`` is the original payload's size and ``payload_sha256`` the hex SHA-256 of
    its bytes. A rejection that would not fit in one message (the broker's maximum payload) is
    cut: ``truncated`` is true and the payload holds only its beginning (and the reason and
    the subject too, should they alone not fit). ``subject`` shows bytes that are not UTF-8
    as ``\\xNN``. The last three fields are absent from rejections published before shoal
    had them.
    """

    reason: str
    subject: str
    received_at: datetime
    stream_sequence: int | None
    payload: str | None = None
    payload_base64: str | None = None
    payload_bytes: int | None = None
    payload_sha256: str | None = None
    truncated: bool = False

    @classmethod
    def of(
        cls, *, reason: str, subject: str, data: bytes, received: int, stream_sequence: int | None
    ) -> Rejection:
        """The rejection of the inbound message ``data`` received on ``subject`` (uncut)."""
        try:
            text: str | None = data.decode("utf-8")
            b64 = None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(data).decode("ascii")
        return cls(
            reason=reason,
            subject=shown_subject(subject),
            received_at=from_instant(received),
            stream_sequence=stream_sequence,
            payload=text,
            payload_base64=b64,
            payload_bytes=len(data),
            payload_sha256=hashlib.sha256(data).hexdigest(),
        )

    @property
    def msg_id(self) -> str | None:
        """Its message id (the broker drops a repeat), when it has a stream position."""
        if self.stream_sequence is None:
            return None
        return f"rejected:{self.stream_sequence}:{to_instant(self.received_at)}"


_rejection_encoder = msgspec.json.Encoder()
NATS_MAX_PAYLOAD = 1024 * 1024
"""The NATS server's default maximum payload (``max_payload``), in bytes."""
REJECTION_HEADROOM = 256
"""Bytes of the broker's maximum payload left for a rejection's headers (the broker counts
them in): a rejection's JSON is cut to the maximum payload less this."""
_ELLIPSIS = "..."


def encode_rejection(
    *,
    reason: str,
    subject: str,
    data: bytes,
    received: int,
    stream_sequence: int | None,
    max_bytes: int,
) -> tuple[Rejection, bytes]:
    """The :class:`Rejection` of an inbound message and its JSON, cut to at most
    ``max_bytes`` (what every sink publishes: the cut is the same on each).

    What does not fit is cut from the payload first (``truncated`` turns true; the original's
    size and hash stay), then from the reason, then from the subject.
    """
    full = Rejection.of(
        reason=reason,
        subject=subject,
        data=data,
        received=received,
        stream_sequence=stream_sequence,
    )
    body = _rejection_encoder.encode(full)
    if len(body) <= max_bytes:
        return full, body
    text = full.payload
    cut = msgspec.structs.replace(
        full,
        payload=None if text is None else "",
        payload_base64=None if text is not None else "",
        truncated=True,
    )
    excess = len(_rejection_encoder.encode(cut)) - max_bytes
    for field in ("reason", "subject"):
        if excess > 0:
            cut = msgspec.structs.replace(cut, **{field: _cut(getattr(cut, field), excess)})
            excess = len(_rejection_encoder.encode(cut)) - max_bytes
    room = max(0, -excess)
    if text is not None:
        # The longest beginning whose JSON fits (a character takes 1 to 6 bytes of it).
        lo, hi = 0, min(len(text), room)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(_rejection_encoder.encode(text[:mid])) - 2 <= room:
                lo = mid
            else:
                hi = mid - 1
        head = text[:lo]
        cut = msgspec.structs.replace(cut, payload=head)
    elif room > 0:
        # Base64 needs no escaping: 4 characters for each 3 bytes.
        cut = msgspec.structs.replace(
            cut, payload_base64=base64.b64encode(data[: room // 4 * 3]).decode("ascii")
        )
    return cut, _rejection_encoder.encode(cut)


def _cut(text: str, excess: int) -> str:
    """``text`` shortened by at least ``excess`` characters, marked as cut."""
    keep = len(text) - excess - len(_ELLIPSIS)
    return text[:keep] + _ELLIPSIS if keep > 0 else ""


def shown_subject(subject: str) -> str:
    """``subject`` as text that can be written anywhere: bytes that are not UTF-8 (which
    arrive surrogate-escaped) are shown as ``\\xNN``."""
    if subject.isascii():
        return subject
    try:
        raw = subject.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make
        return subject.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def header_token(customer_id: str) -> str:
    """``customer_id`` as a subject token with non-ASCII bytes percent-escaped (ASCII only)."""
    token = escape_token(customer_id)
    if token.isascii():
        return token
    return "".join(
        ch if ch.isascii() else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in token
    )
