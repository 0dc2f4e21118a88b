"""A replay split by customer: each part replays some customers against the whole log's clock,
and the parts' transitions merge back into the order one :class:`Replay` gives.

Customers are independent: a customer's transitions depend on its own events and on the
instants the clock reaches, never on another customer. What ties the parts together is the
order. One replay makes its transitions in *steps*, one per item of the log (a customer's
base, or an event): the step fires every deadline at or before the event's receive instant
less one, instant by instant and, within an instant, in customer id order (the timer queue's
order), then applies the event. So a transition's place is given by its step, then whether a
deadline made it (first) or the step's own item, then the deadline's instant and customer id.
Each part's transitions come in that order too, and only one customer makes transitions of
one step's item, or at one instant of one step: merging the parts by that key gives exactly
the one replay's order (ties are one customer's, which one part holds in order).

Nothing here does I/O; the processes that run the parts are the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from heapq import merge

from protocol import Event, Transition

from ._customer import Customer
from ._replay import Replay
from .rules import SegmentSet

NO_CLOCK = -(2**63)
"""The clock of a step that fires no deadline (a customer's base: its state as of the log's
cut, before any event)."""

Keyed = tuple[int, int, datetime | None, Transition]
"""A transition with its place: (step, 0 for a deadline or 1 for the step's own item,
the deadline's instant or None, the transition)."""


class PartReplay:
    """One part of a replay: the customers of some of the log's items, replayed against the
    clock of every step (:func:`merge_parts` puts the parts' transitions back in order).

    Give it, piece by piece and in log order, every step's clock (the receive instant of
    its event less one, or :data:`NO_CLOCK`) and this part's own items of the piece.
    """

    __slots__ = ("_replay",)

    def __init__(self, segments: SegmentSet) -> None:
        self._replay = Replay(segments)

    @property
    def customers(self) -> int:
        """How many customers this part holds."""
        return self._replay.customers

    def feed(
        self,
        first: int,
        clocks: Sequence[int],
        own: Sequence[tuple[int, Event | Customer]],
    ) -> list[Keyed]:
        """Run steps ``first`` to ``first + len(clocks) - 1``: at each, fire what is due by its
        clock, then apply this part's item of that step, if any (``own``: (step, item) in step
        order; an item is an event, or a customer's base). Return the transitions keyed by
        their place, in order."""
        r = self._replay
        partition = r._partition
        out: list[Keyed] = []
        mine = iter(own)
        nxt = next(mine, None)
        due = partition.next_due()
        for step, clock in enumerate(clocks, first):
            if due is not None and clock >= due:
                # As Replay.apply, before the event: every deadline at or before the clock.
                for t in r.advance(clock):
                    out.append((step, 0, t.at, t))
                due = partition.next_due()
            if nxt is not None and nxt[0] == step:
                item = nxt[1]
                made = r.apply(item) if isinstance(item, Event) else r.start_from(item)
                for t in made:
                    out.append((step, 1, None, t))
                nxt = next(mine, None)
                due = partition.next_due()
        if nxt is not None:
            raise ValueError(f"an item of step {nxt[0]} is outside steps {first} to {step}")
        return out


def _key(k: Keyed) -> tuple[int, int, datetime | None, str]:
    return k[0], k[1], k[2], k[3].customer_id


def merge_parts(parts: Iterable[Sequence[Keyed]]) -> Iterator[Transition]:
    """The transitions of the parts' :meth:`PartReplay.feed` of the same steps, in the order
    one replay of every part's items gives them."""
    for k in merge(*parts, key=_key):
        yield k[3]
