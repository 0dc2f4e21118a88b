"""The customer actor: one customer's state, changed only by events and instants it is given.

It does no I/O and reads no clock. The engine hands it events (in log order) and instants
(deadlines that fell due); it returns the membership transitions they cause. Its facts are
a pure function of its event log; its memberships and version come from the transitions it
has emitted, which the engine keeps in the outbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from protocol import (
    Cause,
    DefinitionCause,
    Event,
    EventCause,
    TimeCause,
    Transition,
    from_instant,
    to_instant,
)

from ._errors import ActorsError
from ._rules import MISSING, Tracked, earliest
from ._segments import Segment, SegmentSet

_TIME = TimeCause()


_BEFORE_ANY = -(1 << 62)
"""The watermark of a customer with no events yet: before any instant an event can have."""
_DEFINITION = DefinitionCause()

SNAPSHOT_FORMAT = 1
"""The layout of :meth:`Customer.snapshot`. Change it whenever ``_State`` or the meaning of a
field changes: a snapshot of another format is ignored and its customer rebuilt from the log."""


class Retained(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A track event kept for windows and scores: only what rules read of it."""

    at: int
    name: str | None
    properties: dict[str, Any]


class _State(msgspec.Struct, array_like=True, gc=False):
    """A customer's whole state, as a snapshot stores it (format ``SNAPSHOT_FORMAT``)."""

    first: int | None
    last: list[tuple[str | None, int]]
    counts: list[tuple[str | None, int]]
    traits: list[tuple[str, int, Any]]
    tracked: list[Retained]
    members: dict[str, int]
    version: int
    watermark: int
    deadline: int | None


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(_State)


class SnapshotError(ActorsError):
    """A snapshot cannot be read: its customer must be rebuilt from the log."""

    def __init__(self, customer_id: str, problem: str) -> None:
        super().__init__(f"snapshot of customer {customer_id!r} is unreadable: {problem}")
        self.customer_id = customer_id
        self.problem = problem


class Customer:
    """One customer: facts the rules read, segment memberships, and the next deadline."""

    __slots__ = (
        "customer_id",
        "_first",
        "_last",
        "_counts",
        "_traits",
        "_tracked",
        "members",
        "version",
        "watermark",
        "deadline",
    )

    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        self._first: int | None = None
        self._last: dict[str | None, int] = {}
        self._counts: dict[str | None, int] = {}
        self._traits: dict[str, tuple[int, Any]] = {}
        self._tracked: list[Retained] = []  # track events windows and scores read, in log order
        self.members: dict[str, int] = {}
        """Segment name -> the instant the customer entered it."""
        self.version = 0
        """How many transitions the customer has had (the last one's ``version``)."""
        self.watermark = _BEFORE_ANY
        """The instant up to which the customer's state has been evaluated."""
        self.deadline: int | None = None
        """The next instant a segment can change without an event (always > watermark)."""

    # Facts, as the rules read them ------------------------------------------------------

    def first_at(self) -> int | None:
        return self._first

    def last_at(self, name: str | None) -> int | None:
        return self._last.get(name)

    def count(self, name: str | None) -> int:
        return self._counts.get(name, 0)

    def trait(self, key: str) -> Any:
        entry = self._traits.get(key)
        return MISSING if entry is None or entry[1] is None else entry[1]

    def tracked(self) -> Sequence[Tracked]:
        return self._tracked

    def member(self, segment: str) -> bool:
        return segment in self.members

    # Changes ----------------------------------------------------------------------------

    def fold(self, event: Event, segments: SegmentSet) -> None:
        """Add an event to the facts and the watermark, without evaluating segments."""
        at = event.at
        if at > self.watermark:
            self.watermark = at
        if self._first is None or at < self._first:
            self._first = at
        needs = segments.needs
        if event.kind == "track":
            retained = needs.retained
            if retained and (None in retained or event.name in retained):
                self._tracked.append(Retained(at, event.name, event.properties))
            for key in (None, event.name):
                if key in needs.event_names:
                    if at > self._last.get(key, at - 1):
                        self._last[key] = at
                    self._counts[key] = self._counts.get(key, 0) + 1
        else:
            for key, value in event.traits.items():
                if key in needs.trait_keys:
                    # The latest event time wins; at equal times the later in the log does.
                    old = self._traits.get(key)
                    if old is None or at >= old[0]:
                        self._traits[key] = (at, value)

    def apply(self, event: Event, segments: SegmentSet) -> list[Transition]:
        """Apply one event: first fire deadlines due before its instant, then evaluate after it.

        A deadline at exactly the event's instant is evaluated together with the event, so a
        visit at the very instant a customer would have lapsed keeps it in, with no exit and
        re-entry at the same instant.
        """
        out = self.advance(event.at - 1, segments)
        self.fold(event, segments)
        out += self.evaluate(segments, EventCause(message_id=event.message_id))
        return out

    def advance(self, until: int, segments: SegmentSet) -> list[Transition]:
        """Fire, in order, every deadline at or before ``until``, each at its own instant."""
        out: list[Transition] = []
        while self.deadline is not None and self.deadline <= until:
            self.watermark = self.deadline
            out += self.evaluate(segments, _TIME)
        return out

    def evaluate(self, segments: SegmentSet, cause: Cause) -> list[Transition]:
        """Evaluate every segment at the watermark; return the changes and set the deadline.

        Segments go in evaluation order, so a reference sees the membership of the same
        instant. With a definition cause, memberships of segments no longer defined end too.
        """
        now = self.watermark
        out: list[Transition] = []
        nxt: int | None = None
        for seg in segments.order:
            entered = self.members.get(seg.name)
            if entered is None:
                holds, when = seg.rule.evaluate(self, now)
                if holds and seg.exit is not None:
                    # Not in while the exit condition holds: rule and exit overlapping would
                    # otherwise flap in and out every microsecond.
                    leaving, exit_when = seg.exit.evaluate(self, now)
                    holds, when = not leaving, earliest(when, exit_when)
                if not holds:
                    nxt = earliest(nxt, when)
                    continue
                out.append(self._change(seg.name, True, now, cause))
                entered = now
            leave, when = self._leave_condition(seg, now)
            first_out = entered + max(1, seg.min_dwell)  # never out at the instant it came in
            if leave and now >= first_out:
                out.append(self._change(seg.name, False, now, cause))
                holds, when = seg.rule.evaluate(self, now)
                if holds and seg.exit is not None:
                    holds = False  # the exit condition holds right now
                    when = earliest(when, self._leave_condition(seg, now)[1])
                # Back in at the next instant at the soonest: one change per instant.
                nxt = earliest(nxt, now + 1 if holds else when)
            else:
                nxt = earliest(nxt, when)
                if leave:
                    nxt = earliest(nxt, first_out)
        if isinstance(cause, DefinitionCause):
            defined = set(segments.names)
            for name in [m for m in self.members if m not in defined]:
                out.append(self._change(name, False, now, cause))
        self.deadline = nxt
        return out

    def _leave_condition(self, seg: Segment, now: int) -> tuple[bool, int | None]:
        if seg.exit is not None:
            return seg.exit.evaluate(self, now)
        holds, when = seg.rule.evaluate(self, now)
        return not holds, when

    def _change(self, segment: str, entered: bool, at: int, cause: Cause) -> Transition:
        if entered:
            self.members[segment] = at
        else:
            del self.members[segment]
        self.version += 1
        return Transition(
            customer_id=self.customer_id,
            segment=segment,
            change="entered" if entered else "exited",
            at=from_instant(at),
            cause=cause,
            version=self.version,
        )

    def restore(self, transitions: Iterable[Transition]) -> None:
        """Take memberships, version and watermark from the customer's past transitions
        (in version order), as published; used by rebuild after :meth:`fold`."""
        for t in transitions:
            at = to_instant(t.at)
            if t.change == "entered":
                self.members[t.segment] = at
            else:
                self.members.pop(t.segment, None)
            self.version = t.version
            if at > self.watermark:
                self.watermark = at

    # Snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state, encoded (format :data:`SNAPSHOT_FORMAT`); :meth:`from_snapshot`
        gives back an equal actor."""
        return _state_encoder.encode(
            _State(
                first=self._first,
                last=list(self._last.items()),
                counts=list(self._counts.items()),
                traits=[(k, at, v) for k, (at, v) in self._traits.items()],
                tracked=self._tracked,
                members=self.members,
                version=self.version,
                watermark=self.watermark,
                deadline=self.deadline,
            )
        )

    @classmethod
    def from_snapshot(cls, customer_id: str, body: bytes) -> Customer:
        """The actor a :meth:`snapshot` of format :data:`SNAPSHOT_FORMAT` describes.

        Raises:
            SnapshotError: ``body`` is not such a snapshot (corrupt, or another format).
        """
        try:
            state = _state_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise SnapshotError(customer_id, str(e)) from e
        if state.deadline is not None and state.deadline <= state.watermark:
            raise SnapshotError(customer_id, "its deadline is not after its watermark")
        c = cls(customer_id)
        c._first = state.first
        c._last = dict(state.last)
        c._counts = dict(state.counts)
        c._traits = {k: (at, v) for k, at, v in state.traits}
        c._tracked = state.tracked
        c.members = state.members
        c.version = state.version
        c.watermark = state.watermark
        c.deadline = state.deadline
        return c
