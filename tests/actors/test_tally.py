"""actors.ReplayTally: what a replay did per segment, and the segment sizes over time."""

from __future__ import annotations

import io

import msgspec

from actors import ReplayTally, SegmentTally, logged_event
from protocol import DAY, HOUR, Event, Transition, format_instant, parse_timestamp
from tests.helpers import segments

SEGMENTS = segments(
    """
[segments.active]
rule = "since_last('Visit') < '1d'"

[segments.idle]
rule = "since_last('Visit') >= '2d'"
"""
)
T0 = parse_timestamp("2026-01-01T00:00:00Z")


def visit(user: str, at: int, received: int | None = None) -> Event:
    return Event(
        kind="track",
        customer_id=user,
        name="Visit",
        properties={},
        traits={},
        at=at,
        received=at if received is None else received,
        message_id=f"{user}@{at}",
    )


def test_counts_in_a_window_and_sizes_on_a_grid() -> None:
    out = io.BytesIO()
    tally = ReplayTally(
        SEGMENTS, start=T0 + DAY, until=T0 + 5 * DAY, every=DAY, transitions_out=out
    )
    tally.feed([visit("ann", T0 + 10 * HOUR)])
    tally.feed([visit("bob", T0 + 2 * DAY), visit("cat", T0 + 6 * DAY)])  # cat: after until
    end = tally.finish()
    assert end == T0 + 5 * DAY
    assert (tally.events, tally.out_of_order, tally.customers) == (2, 0, 2)
    # ann's entry into active came before the window: state, not counted.
    assert tally.tallies == [
        SegmentTally(entered=1, exited=2, members=0),
        SegmentTally(entered=2, exited=0, members=2),
    ]
    assert tally.transitions == 5
    written = [msgspec.json.decode(x, type=Transition) for x in out.getvalue().splitlines()]
    assert [(t.customer_id, t.segment, t.change) for t in written] == [
        ("ann", "active", "exited"),
        ("bob", "active", "entered"),
        ("ann", "idle", "entered"),
        ("bob", "active", "exited"),
        ("bob", "idle", "entered"),
    ]
    assert [(format_instant(i), row) for i, row in tally.sizes(end)] == [
        ("2026-01-02T00:00:00Z", [1, 0]),
        ("2026-01-03T00:00:00Z", [1, 0]),
        ("2026-01-04T00:00:00Z", [0, 1]),
        ("2026-01-05T00:00:00Z", [0, 2]),
        ("2026-01-06T00:00:00Z", [0, 2]),
    ]


def test_log_entries_received_out_of_order_are_counted() -> None:
    tally = ReplayTally(SEGMENTS, every=DAY)
    entries = [logged_event(visit("ann", T0 + DAY)), logged_event(visit("bob", T0))]
    tally.feed_logged(entries)
    assert (tally.events, tally.out_of_order, tally.first_at) == (2, 1, T0 + DAY)
    assert tally.finish() == T0 + DAY  # the last receive instant: the clock never goes back
    assert list(ReplayTally(SEGMENTS).sizes(None)) == []
