"""What a replay did, per segment: entries and exits in a window, members at the end, and
the segment sizes over time on a grid of instants (``shoal replay``'s outputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

import msgspec

from protocol import Event, Transition, to_instant
from store import LoggedEvent

from ._customer import Customer
from ._replay import Replay
from ._stored import event_of
from .rules import SegmentSet

_transition_encoder = msgspec.json.Encoder()


class Replayer(Protocol):
    """What runs a :class:`ReplayTally`'s replay: a :class:`Replay`, or one split over
    processes that hands back each piece's transitions later (but in order)."""

    @property
    def customers(self) -> int:
        """How many customers the replay holds."""
        ...

    def start_from_all(self, bases: Sequence[Customer]) -> list[Transition]:
        """:meth:`Replay.start_from` each of ``bases``, in order, before any event; every
        transition they make."""
        ...

    def apply_all(self, events: Sequence[Event]) -> list[Transition]:
        """Apply ``events`` in order (:meth:`Replay.apply`); the transitions ready, in order:
        those of these events, or of earlier ones not handed back yet (the rest come with
        later calls)."""
        ...

    def advance(self, until: int) -> list[Transition]:
        """Run the clock on to ``until`` (:meth:`Replay.advance`); every transition not
        handed back yet, in order."""
        ...


@dataclass(slots=True)
class SegmentTally:
    """One segment's count of a replay."""

    entered: int = 0
    """Entries at or after the window's start."""
    exited: int = 0
    """Exits at or after the window's start."""
    members: int = 0
    """Members at the end."""


@dataclass(slots=True)
class ReplayTally:
    """A replay (:class:`Replay`) fed events in pieces, counting what it does as it goes.

    Events received after ``until`` are not applied; transitions before ``start`` make the
    state but are not counted or written. Sizes are on a grid of instants ``every`` apart
    from ``start`` (default: the first event's instant).
    """

    segments: SegmentSet
    start: int | None = None
    """The window's start (None: the first event's instant)."""
    until: int | None = None
    """Where the clock stops (None: at the last event's receive instant)."""
    every: int = 1
    """The sizes grid's step (microseconds)."""
    transitions_out: IO[bytes] | None = None
    """Where to write the counted transitions as JSON lines (the payload published)."""
    replay: Replayer | None = None
    """What replays (None: a :class:`Replay` of ``segments`` in this process)."""
    tallies: list[SegmentTally] = field(init=False)
    """Per segment, in the order of ``segments.names``."""
    index: dict[str, int] = field(init=False)
    first_at: int | None = None
    last_received: int | None = None
    events: int = 0
    """Events applied."""
    out_of_order: int = 0
    """Events received before an event applied ahead of them (in a log: imported history)."""
    transitions: int = 0
    """Transitions counted (those in the window)."""
    # Sizes: for grid step k (instant origin + k * every), the membership changes since
    # step k - 1, per segment. Sparse: only steps where something changed.
    steps: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replay is None:
            self.replay = Replay(self.segments)
        self.index = {name: i for i, name in enumerate(self.segments.names)}
        self.tallies = [SegmentTally() for _ in self.segments.names]

    @property
    def origin(self) -> int | None:
        """The instant of the sizes grid's first row (None: no event yet)."""
        return self.start if self.start is not None else self.first_at

    def start_from(self, bases: Iterable[Customer]) -> None:
        """Start from customers' states as of the log's cut (their bases, under retention:
        :func:`actors.read_bases`), before any event is fed: each is evaluated at its last
        event before the cut (:meth:`Replay.start_from`). The memberships that gives make
        the state, like transitions before ``start``: they are not counted or written."""
        bases = list(bases)
        made = self._replayer.start_from_all(bases)
        changed = {t.customer_id for t in made}
        for c in bases:
            first = c.first_at()
            if first is not None and (self.first_at is None or first < self.first_at):
                self.first_at = first
            if c.customer_id in changed and self.first_at is None:
                self.first_at = c.watermark
        for t in made:
            i = self.index[t.segment]
            delta = 1 if t.change == "entered" else -1
            self.tallies[i].members += delta
            self._add(to_instant(t.at), i, delta)

    def feed_logged(self, entries: Sequence[LoggedEvent]) -> None:
        """:meth:`feed` the events of these log entries.

        Raises:
            StoreError: an entry's body is not an event.
        """
        self.feed([event_of(e) for e in entries])

    def feed(self, events: Sequence[Event]) -> None:
        """Apply events, in order."""
        until = self.until
        applied: list[Event] = []
        for event in events:
            if until is not None and event.received > until:
                continue  # after the clock's end, as if not yet received
            if self.first_at is None:
                self.first_at = event.at  # before its transitions: the grid starts here
            if self.last_received is None or event.received > self.last_received:
                self.last_received = event.received
            elif event.received < self.last_received:
                self.out_of_order += 1
            applied.append(event)
        self.events += len(applied)
        self._emit(self._replayer.apply_all(applied))

    def finish(self) -> int | None:
        """Run the clock on to the end; return the end instant (None: no events, no end)."""
        end = self.until
        if end is None:
            end = self.last_received if self.last_received is not None else self.origin
        if end is not None:
            self._emit(self._replayer.advance(end))
        if self.transitions_out is not None:
            self.transitions_out.flush()
        return end

    @property
    def customers(self) -> int:
        """How many customers the replay holds."""
        return self._replayer.customers

    @property
    def _replayer(self) -> Replayer:
        assert self.replay is not None  # made in __post_init__
        return self.replay

    def _emit(self, transitions: list[Transition]) -> None:
        start, out = self.start, self.transitions_out
        for t in transitions:
            at = to_instant(t.at)
            i = self.index[t.segment]
            delta = 1 if t.change == "entered" else -1
            tally = self.tallies[i]
            tally.members += delta
            self._add(at, i, delta)
            if start is not None and at < start:
                continue  # before the window: it only makes the state
            if delta > 0:
                tally.entered += 1
            else:
                tally.exited += 1
            self.transitions += 1
            if out is not None:
                out.write(_transition_encoder.encode(t) + b"\n")

    def _add(self, at: int, segment: int, delta: int) -> None:
        origin = self.origin
        assert origin is not None  # known from the first event on
        # The first grid instant at or after ``at``: the change counts from that row on.
        k = max(0, -((origin - at) // self.every))
        row = self.steps.get(k)
        if row is None:
            row = self.steps[k] = [0] * len(self.tallies)
        row[segment] += delta

    def sizes(self, end: int | None) -> Iterator[tuple[int, list[int]]]:
        """Each instant of the grid up to ``end``, with the members of each segment then."""
        origin = self.origin
        if origin is None or end is None or end < origin:
            return
        every = self.every
        current = [0] * len(self.tallies)
        for k in range((end - origin) // every + 1):
            for i, d in enumerate(self.steps.get(k, ())):
                current[i] += d
            yield origin + k * every, list(current)
