"""Replay: events through the engine's actors on a virtual clock, no I/O.

The clock follows the events' receive instants, as the live engine's time floor does: before
an event is applied, every deadline before its receive instant fires (each at its own
instant), then the event is applied. This is the code path of the live engine without NATS
and SQLite, so it is what backtests and property tests hold to the specification.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from protocol import Event, Transition

from ._customer import Customer
from ._segments import SegmentSet
from ._timers import TimerQueue

_ALL = 1 << 62


def replay(
    events: Iterable[Event], segments: SegmentSet, *, until: int | None = None
) -> Iterator[Transition]:
    """The transitions that ``events`` (in log order) cause under ``segments``.

    Args:
        events: validated events in the order they were received.
        segments: the definitions to evaluate.
        until: after the last event, run the clock on to this instant (microseconds since the
            epoch), firing the deadlines due by then.

    Yields:
        Transitions in the order a live engine would publish them.
    """
    customers: dict[str, Customer] = {}
    timers = TimerQueue()

    def fire(upto: int) -> Iterator[Transition]:
        while due := timers.pop_due(upto, _ALL):
            for customer_id in due:
                c = customers[customer_id]
                yield from c.advance(upto, segments)
                timers.set(customer_id, c.deadline)

    for event in events:
        # A deadline at the event's very instant is evaluated together with the event.
        yield from fire(event.received - 1)
        c = customers.get(event.customer_id)
        if c is None:
            c = customers[event.customer_id] = Customer(event.customer_id)
        yield from c.apply(event, segments)
        timers.set(c.customer_id, c.deadline)
    if until is not None:
        yield from fire(until)
