"""Replay: events through the engine's actors on a virtual clock, no I/O.

The clock follows the events' receive instants, as the live engine's time floor does: before
an event is applied, every deadline before its receive instant fires (each at its own
instant, all customers' deadlines in time order), then the event is applied. Replay runs the
live engine's core (:class:`actors.engine.Partition`) without ports and store, so it is what
backtests and property tests hold to the specification.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from protocol import DefinitionCause, Event, Transition

from ._customer import Customer
from .engine._partition import Partition
from .rules import SegmentSet

_DEFINITION = DefinitionCause()


class Replay:
    """A replay under way: feed it events in log order, and it returns their transitions.

    :func:`replay` is the one-call form. Use this class when events arrive in pieces (read
    from a store, say) or to look at the state between events. Nothing is read from a clock:
    the replay's clock is the latest receive instant it was given, or the instant it was
    advanced to.

    The transitions of one customer are exactly those a live engine publishes for the same
    log: same segments, changes, ``at``, causes and versions. Across customers they come in
    the replay's order: each event's own, and deadlines in time order between events.
    Customers of static lists who have no events are not replayed (the live engine adds
    them when it starts, with cause ``definition``).
    """

    __slots__ = ("_partition", "_now")

    def __init__(self, segments: SegmentSet) -> None:
        self._partition = Partition(segments)
        self._now: int | None = None

    @property
    def segments(self) -> SegmentSet:
        """The definitions replayed."""
        return self._partition.segments

    @property
    def now(self) -> int | None:
        """The clock: up to here every deadline has fired (None before the first event)."""
        return self._now

    @property
    def customers(self) -> int:
        """How many customers the replay holds."""
        return len(self._partition.customers)

    def customer(self, customer_id: str) -> Customer | None:
        """The actor of ``customer_id``, if it has had an event (read it, don't change it)."""
        return self._partition.customers.get(customer_id)

    def start_from(self, base: Customer) -> list[Transition]:
        """Take a customer from its state as of the log's cut (its base, under retention:
        facts folded from its events before the cut, no memberships) and evaluate it at its
        watermark (its last event before the cut), as the replay of its events before the
        cut would have left it; return the transitions (cause ``definition``).

        What no replay from there can give back: memberships begun before the cut start at
        that watermark (``true_since``), and a segment whose membership depends on its past
        (an exit rule, ``min_dwell``) starts from what its rules say then.
        """
        p = self._partition
        p.customers[base.customer_id] = base
        out = base.evaluate(p.segments, _DEFINITION)
        p.arm(base.customer_id, base.deadline)
        return out

    def start_from_all(self, bases: Sequence[Customer]) -> list[Transition]:
        """:meth:`start_from` each of ``bases`` in order; all their transitions."""
        out: list[Transition] = []
        for base in bases:
            out += self.start_from(base)
        return out

    def apply_all(self, events: Sequence[Event]) -> list[Transition]:
        """:meth:`apply` each of ``events`` in order; all their transitions."""
        out: list[Transition] = []
        for event in events:
            out += self.apply(event)
        return out

    def apply(self, event: Event) -> list[Transition]:
        """Fire the deadlines before ``event.received``, then apply the event.

        A deadline at the event's very instant is evaluated together with the event, as the
        live engine does (SEGMENTS.md). An event received before the clock (logs may hold a
        few out of receive order) does not move it back.
        """
        out = self._fire(event.received - 1)
        out += self._partition.apply(event)
        return out

    def advance(self, until: int) -> list[Transition]:
        """Run the clock on to ``until`` (microseconds since the epoch), firing every
        deadline at or before it, each at its own instant."""
        return self._fire(until)

    def _fire(self, upto: int) -> list[Transition]:
        if self._now is None or upto > self._now:
            self._now = upto
        return self._partition.fire_due(upto)


def replay(
    events: Iterable[Event], segments: SegmentSet, *, until: int | None = None
) -> Iterator[Transition]:
    """The transitions that ``events`` (in log order) cause under ``segments``.

    It runs the live engine's actor and rule code on a virtual clock that follows the
    events' receive instants: before each event, every deadline before its receive instant
    fires at its own instant; then the event applies. For an event log a live engine
    ingested, each customer's transitions equal those the engine published, except ones
    whose ``at`` is past both the last event and ``until``. The same events and definitions
    give the same transitions in the same order, in any process.

    Args:
        events: validated events in the order they were received (for a log:
            ``msgspec.msgpack.Decoder(protocol.Event)`` over ``LoggedEvent.body`` in log
            order).
        segments: the definitions to evaluate.
        until: after the last event, run the clock on to this instant (microseconds since the
            epoch), firing the deadlines due by then. None: stop at the last event.

    Yields:
        Transitions as the clock reaches them: each event's own, and between events the
        deadlines that fell due, in time order. See :class:`Replay` to feed events in pieces.
    """
    r = Replay(segments)
    for event in events:
        yield from r.apply(event)
    if until is not None:
        yield from r.advance(until)
