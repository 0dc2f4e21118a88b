"""The customer actor: one customer's state, changed only by events and instants it is given.

It does no I/O and reads no clock. The engine hands it events (in log order) and instants
(deadlines that fell due); it returns the membership transitions they cause. Its facts are
a pure function of its event log; its memberships and version come from the transitions it
has emitted, which the engine keeps in the outbox.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import tzinfo
from types import MappingProxyType
from typing import Any

import msgspec

from protocol import (
    NEVER,
    Cause,
    DefinitionCause,
    Event,
    EventCause,
    ForgottenCause,
    TimeCause,
    Transition,
    from_instant,
    to_instant,
)

from ._errors import ActorsError
from ._time_index import NO_COUNTS, NO_INSTANTS, LocalTimes, RetainedLog, TimeIndex, empty_terms
from .rules import (
    MISSING,
    Indexed,
    LocalFilter,
    ScoreConfig,
    ScoreTerms,
    SegmentSet,
    Tracked,
)

_TIME = TimeCause()
_FORGOTTEN = ForgottenCause()


_BEFORE_ANY = -NEVER
"""The watermark of a customer with no events yet: before any instant an event can have."""
_STALE = -NEVER
"""Not after any watermark: a segment to look at again at the next evaluation."""
_DEFINITION = DefinitionCause()

SNAPSHOT_FORMAT = 1
"""The layout of :meth:`Customer.snapshot`. Change it whenever ``_State`` or the meaning of a
field changes: a snapshot of another format is ignored and its customer rebuilt from the log.

(The watermark no longer moves at a deadline that changes nothing, since late events took
their stated contract. A snapshot from before holds a watermark at or after the one it would
hold now, which is still a valid state: the format stays, so an upgrade rebuilds nothing,
and only an event stamped between the two, for such a customer, is taken as late.)"""


class Retained(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A track event kept for windows and scores: only what rules read of it (its
    properties only when a window reads them; else they are empty)."""

    at: int
    name: str | None
    properties: dict[str, Any]


class _State(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """A customer's whole state, as a snapshot stores it (format ``SNAPSHOT_FORMAT``); and,
    after it, the outcomes it kept (``_Kept.encode``), if stored with them. A snapshot
    without outcomes is an array of the state alone, as before they were stored."""

    first: int | None
    last: list[tuple[str | None, int]]
    counts: list[tuple[str | None, int]]
    traits: list[tuple[str, int, Any]]
    tracked: list[Retained]
    members: dict[str, int]
    version: int
    watermark: int
    deadline: int | None
    kept: bytes | None = None


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(_State)


class _Published(msgspec.Struct, array_like=True, gc=False):
    """The leading fields of a ``_State`` up to its watermark, the facts left undecoded:
    what the customer's transitions made of it. The rest of the array is ignored."""

    first: msgspec.Raw
    last: msgspec.Raw
    counts: msgspec.Raw
    traits: msgspec.Raw
    tracked: msgspec.Raw
    members: dict[str, int]
    version: int
    watermark: int


_published_decoder = msgspec.msgpack.Decoder(_Published)


class SnapshotError(ActorsError):
    """A snapshot cannot be read: its customer must be rebuilt from the log."""

    def __init__(self, customer_id: str, problem: str) -> None:
        super().__init__(f"snapshot of customer {customer_id!r} is unreadable: {problem}")
        self.customer_id = customer_id
        self.problem = problem


class _StoredKept(msgspec.Struct, array_like=True, gc=False):
    """Kept outcomes as a snapshot stores them: instants as offsets from ``at`` (None:
    never; a negative ``until``: stale), and ``nexts`` None where each is its ``until``
    (most often so), but for the stale, which say nothing."""

    tag: int
    at: int
    untils: list[int | None]
    nexts: list[int | None] | None


_kept_encoder = msgspec.msgpack.Encoder()
_kept_decoder = msgspec.msgpack.Decoder(_StoredKept)


class _Kept:
    """The outcomes a customer keeps under one set of definitions: by the steps of
    ``Plan.steps``, when to look at the segment again (``_STALE``: at the next evaluation;
    the facts its rules read changed), and its next instant (``NEVER``: None)."""

    __slots__ = ("segments", "untils", "nexts", "at")

    def __init__(self, segments: SegmentSet) -> None:
        n = len(segments.plan.steps)
        self.segments = segments
        self.untils = [_STALE] * n
        self.nexts = [NEVER] * n
        self.at = _BEFORE_ANY
        """The latest instant they were computed at: they say nothing about earlier ones."""

    def encode(self) -> bytes:
        """These outcomes as a snapshot stores them, named by their definitions' tag."""
        at, untils, nexts = self.at, self.untils, self.nexts
        # An until not after ``at`` is stale for every evaluation to come (none is
        # earlier than ``at``), and a stale step's next is computed afresh.
        stored = [None if u >= NEVER else u - at if u > at else -1 for u in untils]
        stored_nexts = None
        if nexts != untils and any(n != u for u, n in zip(untils, nexts, strict=True) if u > at):
            stored_nexts = [
                None if u <= at or n >= NEVER else n - at
                for u, n in zip(untils, nexts, strict=True)
            ]
        return _kept_encoder.encode(_StoredKept(self.segments.tag, at, stored, stored_nexts))

    @classmethod
    def decode(cls, blob: bytes, segments: SegmentSet) -> _Kept | None:
        """The outcomes ``blob`` (:meth:`encode`) holds, or None if they were computed
        under other definitions (or cannot be read: they are only there to save work)."""
        try:
            stored = _kept_decoder.decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        n = len(segments.plan.steps)
        untils, nexts = stored.untils, stored.nexts
        if (
            stored.tag != segments.tag
            or len(untils) != n
            or (nexts is not None and len(nexts) != n)
        ):
            return None
        at = stored.at
        kept = cls.__new__(cls)
        kept.segments = segments
        kept.at = at
        kept.untils = [NEVER if u is None else _STALE if u < 0 else at + u for u in untils]
        if nexts is None:
            kept.nexts = [u if u > at else NEVER for u in kept.untils]
        else:
            kept.nexts = [NEVER if x is None else at + x for x in nexts]
        return kept


# Most customers have some of these empty: they share one empty collection, never written
# (a customer makes its own at its first write), to stay small. Those loaded from snapshots
# and never evaluated keep nothing else but their state.
_NO_TRACKED: list[Retained] = []
_NO_PROPS: dict[str, Any] = {}  # never written
_NO_MEMBERS: Mapping[str, int] = MappingProxyType({})

_SHAPES: dict[tuple[str, ...], dict[str, int]] = {}
"""The trait keys a customer has, in order -> where each value is in its ``_traits``: the
shape is first, then ``value, at`` per key. Customers with the same keys share one shape
(the rules read few keys), as CPython's split dicts share their keys."""


def _shape(keys: tuple[str, ...]) -> dict[str, int]:
    shape = _SHAPES.get(keys)
    if shape is None:
        shape = _SHAPES[keys] = {k: 1 + 2 * j for j, k in enumerate(keys)}
    return shape


_NO_TRAITS: tuple[Any, ...] = (_shape(()),)

_NAME_SHAPES: dict[tuple[str | None, ...], dict[str | None, int]] = {}
"""The same for the event names a customer counts (None: any track event): its ``_named``
is a list of its shape, then ``last instant, count`` per name."""


def _by_name(name: str | None) -> tuple[bool, str]:
    return (name is not None, name or "")


def _name_shape(names: Iterable[str | None]) -> dict[str | None, int]:
    key = tuple(sorted(set(names), key=_by_name))
    shape = _NAME_SHAPES.get(key)
    if shape is None:
        shape = _NAME_SHAPES[key] = {k: 1 + 2 * j for j, k in enumerate(key)}
    return shape


_NO_NAMED: list[Any] = [_name_shape(())]


def _named_with(named: list[Any], name: str | None) -> list[Any]:
    """A new ``named`` with a place for ``name`` (no instant, count 0)."""
    old: dict[str | None, int] = named[0]
    shape = _name_shape((*old, name))
    out: list[Any] = [shape, *(None, 0) * len(shape)]
    for k, i in old.items():
        j = shape[k]
        out[j], out[j + 1] = named[i], named[i + 1]
    return out


def _with_key(traits: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    """``traits`` with a place for ``key`` (value and instant None)."""
    old: dict[str, int] = traits[0]
    shape = _shape(tuple(sorted((*old, key))))
    out: list[Any] = [shape, *(None,) * (2 * len(shape))]
    for k, i in old.items():
        j = shape[k]
        out[j], out[j + 1] = traits[i], traits[i + 1]
    return tuple(out)


def _retained(log: RetainedLog, start: int) -> list[Retained]:
    """The logged events from ``start`` on, as rules and snapshots read them."""
    names, props = log.names, log.props
    return [
        Retained(log.ats[i], names[log.codes[i]], _NO_PROPS if props is None else props[i])
        for i in range(start, len(log))
    ]


def _share(value: Any) -> Any:
    """A short string value as one object for all customers (plans, zones, dates repeat)."""
    if type(value) is str and len(value) <= 64:
        return sys.intern(value)
    return value


class _Derived(Indexed):
    """What a customer keeps besides its state, to save work: the outcome of each segment
    and until when it holds (the earliest instant at which an answer of its rules can
    change, ``Rule.evaluate_until``), dropped when a fact its rules read changes; and its
    retained events indexed by instant, pruned of what its rules can no longer read (see
    :class:`TimeIndex`).

    Not part of the state (:data:`Customer.__slots__` lists the state alone): a snapshot
    holds the outcomes only if asked to (``snapshot(outcomes=True)``, as the engine stores
    them), and never the index. It changes no result: an outcome is used only where
    evaluating again would give the same one.
    """

    __slots__ = ("_kept", "_index")


class Customer(_Derived):
    """One customer: facts the rules read, segment memberships, and the next deadline."""

    __slots__ = (
        "customer_id",
        "_first",
        "_named",
        "_traits",
        "_log",
        "members",
        "version",
        "watermark",
        "deadline",
    )

    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        self._first: int | None = None
        self._named = _NO_NAMED  # last instant and count of each event name rules count
        self._traits = _NO_TRAITS  # its shape (see _SHAPES), then value, at, value, at, ...
        self._log: RetainedLog | None = None  # track events windows and scores read
        self.members = _NO_MEMBERS
        """Segment name -> the instant the customer entered it."""
        self.version = 0
        """How many transitions the customer has had (the last one's ``version``)."""
        self.watermark = _BEFORE_ANY
        """The customer's latest instant: the latest of its events' own instants (those not
        late) and of its membership changes (SEGMENTS.md, "Late events"). Its next event
        takes effect at its own instant if that is not before this one."""
        self.deadline: int | None = None
        """The next instant a segment can change without an event (always > watermark)."""
        self._kept: _Kept | bytes | None = None
        """Its kept outcomes; or as a snapshot stored them, decoded when first used."""
        self._index: TimeIndex | None = None

    def _kept_for(self, segments: SegmentSet) -> _Kept | None:
        """The outcomes it keeps under ``segments``, if any (those of others are dropped)."""
        kept = self._kept
        if isinstance(kept, bytes):
            kept = self._kept = _Kept.decode(kept, segments)  # checks the definitions
        elif kept is not None and kept.segments is not segments:
            kept = self._kept = None
        return kept

    @property
    def _untils(self) -> list[int] | None:
        kept = self._kept
        return kept.untils if isinstance(kept, _Kept) else None

    @_untils.setter
    def _untils(self, value: None) -> None:
        """Forget every kept outcome (tests set it to None)."""
        self._kept = None

    # Facts, as the rules read them ------------------------------------------------------

    def first_at(self) -> int | None:
        return self._first

    def last_at(self, name: str | None) -> int | None:
        named = self._named
        i = named[0].get(name)
        return None if i is None else named[i]

    def count(self, name: str | None) -> int:
        named = self._named
        i = named[0].get(name)
        return 0 if i is None else named[i + 1]

    def trait(self, key: str) -> Any:
        traits = self._traits
        i = traits[0].get(key)
        if i is None:
            return MISSING
        value = traits[i]
        return MISSING if value is None else value

    def tracked(self) -> Sequence[Tracked]:
        log = self._log
        if log is None:
            return _NO_TRACKED
        # Made once and kept up to date, in the index: rules that read properties (sum,
        # where) read them on each evaluation. Other rules never call it.
        ix = self._index
        if ix is None:
            ix = self._index = TimeIndex()
        events = ix.events
        if events is None:
            events = ix.events = []
        if len(events) < len(log):
            events += _retained(log, len(events))
        return events

    def member(self, segment: str) -> bool:
        return segment in self.members

    def instants(self, name: str | None) -> Sequence[int]:
        ix = self._index
        log = self._log
        if log is None:
            return NO_INSTANTS  # no index at all for a customer without track events
        if ix is not None and ix.upto == len(log.ats):
            ats = ix.times.get(name)
            if ats is not None:
                return ats
        if ix is None:
            ix = self._index = TimeIndex()
        return ix.instants(log, name)

    def local_counts(self, name: str | None, zone: tzinfo, where: LocalFilter) -> Sequence[int]:
        if self._log is None:
            return NO_COUNTS
        ats = self.instants(name)
        ix = self._index
        assert ix is not None
        loc = ix.local.get(name)
        if loc is None or loc.zone is not zone:
            loc = ix.local[name] = LocalTimes(zone, ats)
        return loc.count(where)

    def score_terms(self, config: ScoreConfig) -> ScoreTerms:
        log = self._log
        if log is None:
            return empty_terms(config)
        ix = self._index
        if ix is not None:
            terms = ix.terms
            if terms is not None and terms.config is config and ix.terms_upto == len(log.ats):
                return terms
        else:
            ix = self._index = TimeIndex()
        return ix.score_terms(log, config)

    # Changes ----------------------------------------------------------------------------

    def fold(self, event: Event, segments: SegmentSet) -> None:
        """Add an event to the facts, without evaluating segments; one that is not late
        (not before the watermark) moves the watermark to its instant.

        A late event moves it only by the changes it makes (:meth:`apply`). So folding a
        customer's events and then restoring its transitions (a rebuild from the log) gives
        the watermark the live actor had: the latest of its events' instants that were not
        late and of its changes. (An event folded as not late that was late live has an
        instant before that.)"""
        at = event.at
        if at >= self.watermark:
            self.watermark = at
        kept = self._kept_for(segments) if self._kept is not None else None
        untils = None if kept is None else kept.untils
        plan = segments.plan
        if self._first is None or at < self._first:
            self._first = at
            if untils is not None:
                for j in plan.by_first:
                    untils[j] = _STALE
        needs = segments.needs
        if event.kind == "track":
            retained = needs.retained
            if retained and (None in retained or event.name in retained):
                log = self._log
                if log is None:
                    log = self._log = RetainedLog(needs.properties)
                if needs.properties and log.props is None:
                    log.props = [_NO_PROPS] * len(log)  # restored without: all were empty
                log.add(at, event.name, event.properties)
                ix = self._index
                if ix is not None and len(log.ats) >= ix.next_prune:
                    # Amortised: the index has grown by as much as it kept last time.
                    if ix.fits(needs):
                        ix.prune(log, self.watermark, needs)
                    else:
                        self._index = None  # pruned for other rules: made again
            for key in (None, event.name):
                if key in needs.event_names:
                    named = self._named
                    i = named[0].get(key)
                    if i is None:
                        named = self._named = _named_with(named, key)
                        i = named[0][key]
                    last = named[i]
                    if last is None or at > last:
                        named[i] = at
                    named[i + 1] += 1
            if untils is not None:
                for j in plan.by_name.get(event.name, plan.by_any_name):
                    untils[j] = _STALE
        else:
            for key, value in event.traits.items():
                if key in needs.trait_keys:
                    # The latest event time wins; at equal times the later in the log does.
                    traits = self._traits
                    i = traits[0].get(key)
                    if i is None:
                        traits = _with_key(traits, key)
                        i = traits[0][key]
                    old = traits[i + 1]
                    if old is None or at >= old:
                        self._traits = (*traits[:i], _share(value), at, *traits[i + 2 :])
                        if untils is not None:
                            for j in plan.by_trait[key]:
                                untils[j] = _STALE

    def apply(self, event: Event, segments: SegmentSet) -> list[Transition]:
        """Apply one event: first fire the deadlines due before its receive instant, then
        evaluate at the instant it takes effect (:meth:`fold`).

        Firing up to the receive instant, not the event's own, makes the result independent
        of whether the engine fired them before it took the event: live and replay alike, a
        deadline fires once every event received before it has been applied (the time
        floor). A deadline at exactly the event's instant (received then) is evaluated
        together with the event, so a visit at the very instant a customer would have lapsed
        keeps it in, with no exit and re-entry at the same instant.
        """
        out = self.advance(event.received - 1, segments)
        latest = self.watermark
        self.fold(event, segments)
        if event.at >= latest:
            out += self.evaluate(segments, EventCause(message_id=event.message_id))
            return out
        # Late: in effect from its receive instant (or the latest instant, for a log not in
        # receive order). Changing nothing, it leaves the latest instant where it was.
        self.watermark = max(event.received, latest)
        made = self.evaluate(segments, EventCause(message_id=event.message_id))
        if made:
            out += made
        else:
            self.watermark = latest
        return out

    def advance(self, until: int, segments: SegmentSet) -> list[Transition]:
        """Fire, in order, every deadline at or before ``until``, each at its own instant."""
        out: list[Transition] = []
        while self.deadline is not None and self.deadline <= until:
            latest = self.watermark
            self.watermark = self.deadline
            made = self.evaluate(segments, _TIME)
            if made:
                out += made
            else:
                # Nothing changed: the watermark stays where an event or a change put it.
                # A deadline can be only where a rule looks again, so counting it would make
                # whether a later event is late depend on the rules' internals.
                self.watermark = latest
        return out

    def forget(self, at: int, segments: SegmentSet) -> list[Transition]:
        """The customer is being forgotten at instant ``at``: fire its deadlines up to it
        (time-based changes due before it happen first, as for an event), then exit every
        segment it is in, in segment-name order, each with cause ``forgotten``. The actor is
        to be dropped after this."""
        out = self.advance(at, segments)
        if self.members:
            now = max(at, self.watermark)
            for segment in sorted(self.members):
                out.append(self._change(segment, False, now, _FORGOTTEN))
        self.deadline = None
        return out

    def evaluate(self, segments: SegmentSet, cause: Cause) -> list[Transition]:
        """Evaluate every segment at the watermark; return the changes and set the deadline.

        Segments go in evaluation order, so a reference sees the membership of the same
        instant. With a definition cause, memberships of segments no longer defined end too,
        and every rule is evaluated afresh.
        """
        now = self.watermark
        plan = segments.plan
        ix = self._index
        if ix is not None and ix.needs is not segments.needs and not ix.fits(segments.needs):
            self._index = None  # pruned for rules that read less far back
        kept = self._kept_for(segments) if self._kept is not None else None
        definition = isinstance(cause, DefinitionCause)
        if kept is None or definition or now < kept.at:
            # (Earlier than last time: an event at or after the watermark but before where a
            # deadline that changed nothing was evaluated.)
            kept = self._kept = _Kept(segments)
        kept.at = now
        untils, nexts = kept.untils, kept.nexts
        out: list[Transition] = []
        # Each segment whose outcome ran out (see Plan.run): a segment whose rules' answers
        # all still hold, at an instant before the one it must be looked at again, would
        # come out the same, with no change and the same next instant.
        plan.run(self, now, untils, nexts, self.members, self._change, cause, out)
        if definition:
            defined = set(segments.names)
            for name in [m for m in self.members if m not in defined]:
                out.append(self._change(name, False, now, cause))
        nxt = min(nexts, default=NEVER)
        # No instant shoal handles is at or past NEVER: a next there is none.
        self.deadline = None if nxt >= NEVER else nxt
        return out

    def _own_members(self) -> dict[str, int]:
        members = self.members
        if not isinstance(members, dict):
            members = self.members = dict(members)
        return members

    def _change(self, segment: str, entered: bool, at: int, cause: Cause) -> Transition:
        if entered:
            self._own_members()[segment] = at
        else:
            del self._own_members()[segment]
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
        (in version order), as published; used by rebuild after :meth:`fold`. A membership
        holds the instant it truly began (``true_since``)."""
        self._kept = None  # memberships change
        for t in transitions:
            at = to_instant(t.at)
            if t.change == "entered":
                # The instant it truly entered: min_dwell counts from it (a catch-up
                # transition's ``at`` is only when the engine published it).
                self._own_members()[t.segment] = to_instant(t.true_since)
            elif t.segment in self.members:
                del self._own_members()[t.segment]
            self.version = t.version
            if at > self.watermark:
                self.watermark = at

    def restore_published(self, snapshot: bytes) -> None:
        """Take memberships, version and watermark from a :meth:`snapshot` of this customer,
        whatever facts it kept, as :meth:`restore` takes them from the transitions that
        made them; the facts stay as folded. For a customer whose earliest transitions this
        store does not hold (its partition taken over from another engine): the snapshot
        the takeover wrote stands for them, and :meth:`restore` goes on with the later
        ones.

        Raises:
            SnapshotError: ``snapshot`` is not one of format :data:`SNAPSHOT_FORMAT`.
        """
        try:
            state = _published_decoder.decode(snapshot)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise SnapshotError(self.customer_id, str(e)) from e
        self._kept = None  # memberships change
        self.members = dict(state.members) if state.members else _NO_MEMBERS
        self.version = state.version
        if state.watermark > self.watermark:
            self.watermark = state.watermark

    # Snapshots ----------------------------------------------------------------------------

    def snapshot(self, *, outcomes: bool = False) -> bytes:
        """The whole state, encoded (format :data:`SNAPSHOT_FORMAT`); :meth:`from_snapshot`
        gives back an equal actor.

        With ``outcomes``, also the outcomes it keeps, if any, so that the actor loaded from
        it does not evaluate every segment afresh (the first evaluation of one loaded
        without them costs several times a later one). They are what evaluating gave on the
        way to this state, so two actors of equal state can store different ones: the state
        alone, without them, is what compares equal.
        """
        kept = self._kept if outcomes else None
        traits, named = self._traits, self._named
        shape: dict[str, int] = traits[0]
        names: dict[str | None, int] = named[0]
        return _state_encoder.encode(
            _State(
                first=self._first,
                last=[(k, named[i]) for k, i in names.items() if named[i] is not None],
                counts=[(k, named[i + 1]) for k, i in names.items()],
                traits=[(k, traits[i + 1], traits[i]) for k, i in shape.items()],
                tracked=_NO_TRACKED if self._log is None else _retained(self._log, 0),
                members=dict(self.members),
                version=self.version,
                watermark=self.watermark,
                deadline=self.deadline,
                kept=kept.encode() if isinstance(kept, _Kept) else kept,
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
        # Equal instants as one object each (an identify sets the first instant and its
        # traits alike; a segment is often entered then).
        same: dict[int, int] = {}
        c = cls(customer_id)
        if state.first is not None:
            c._first = same.setdefault(state.first, state.first)
        if state.last or state.counts:
            names = _name_shape([k for k, _ in state.last] + [k for k, _ in state.counts])
            named: list[Any] = [names, *(None, 0) * len(names)]
            for k, at in state.last:
                named[names[k]] = same.setdefault(at, at)
            for k, n in state.counts:
                named[names[k] + 1] = n
            c._named = named
        if state.traits:
            shape = _shape(tuple(sorted({k for k, _, _ in state.traits})))
            traits: list[Any] = [shape, *(None,) * (2 * len(shape))]
            for k, at, v in state.traits:
                i = shape[k]
                traits[i] = _share(v)
                traits[i + 1] = same.setdefault(at, at)
            c._traits = tuple(traits)
        if state.tracked:
            log = c._log = RetainedLog(any(e.properties for e in state.tracked))
            for r in state.tracked:
                log.add(r.at, r.name, r.properties)
        if state.members:
            c.members = {k: same.setdefault(at, at) for k, at in state.members.items()}
        c.version = state.version
        c.watermark = same.setdefault(state.watermark, state.watermark)
        if state.deadline is not None:
            c.deadline = same.setdefault(state.deadline, state.deadline)
        # Decoded at the first evaluation, if under the definitions they name: most
        # customers loaded are not evaluated for a while, and the encoded form is smaller.
        c._kept = state.kept
        return c
