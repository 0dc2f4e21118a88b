"""A customer's index is pruned of what its rules can no longer read (window instants older
than the longest window, score terms older than the longest ``score_at``, folded): that
changes no answer. Pruning after every event gives the same transitions, deadlines and
watermarks as never pruning, on generated rules and histories with late events (some older
than every window when they arrive), deadlines fired in between, and snapshots taken and
restored part way (a restored customer builds its index afresh and prunes it again)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import actors._time_index
from actors import Customer, Replay, parse_segments
from protocol import DAY, HOUR, Event, Transition, to_instant

from .test_language_property import histories, segment_files
from .test_snapshots import SEGMENTS, Op, operations, run


@contextmanager
def pruning_from(events: int) -> Iterator[None]:
    """Customers' indexes pruned from ``events`` retained events on."""
    before = actors._time_index.PRUNE_FROM
    actors._time_index.PRUNE_FROM = events
    try:
        yield
    finally:
        actors._time_index.PRUNE_FROM = before


NEVER_PRUNED = 1 << 40


def stretched(events: list[Event], days: int) -> list[Event]:
    """The events spread ``days`` times as far apart: histories longer than the windows."""
    if not events:
        return events
    t0 = min(e.at for e in events)
    return [
        Event(
            kind=e.kind,
            customer_id=e.customer_id,
            name=e.name,
            properties=e.properties,
            traits=e.traits,
            at=t0 + (e.at - t0) * days,
            received=t0 + (e.received - t0) * days,
            message_id=e.message_id,
        )
        for e in events
    ]


def replayed(
    text: str, events: list[Event], end: int
) -> tuple[list[Transition], list[tuple[str, int | None, int]]]:
    segments = parse_segments(text)
    r = Replay(segments)
    out: list[Transition] = []
    for e in events:
        out += r.apply(e)
    out += r.advance(end)
    ids = sorted({e.customer_id for e in events})
    ends = []
    for cid in ids:
        c = r.customer(cid)
        assert c is not None
        ends.append((cid, c.deadline, c.watermark))
    return out, ends


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=segment_files(), history=histories(), days=st.sampled_from([1, 5, 30]))
def test_pruning_changes_no_transition_of_generated_rules(
    text: str, history: tuple[list[Event], int], days: int
) -> None:
    events = stretched(history[0], days)
    end = max((e.received for e in events), default=0) + 120 * DAY
    note(text)
    with pruning_from(NEVER_PRUNED):
        expected = replayed(text, events, end)
    with pruning_from(1):
        assert replayed(text, events, end) == expected


def test_a_term_folded_as_it_is_added_counts_in_the_exact_score() -> None:
    # Pruned after the first event (of weight 0), the score's cut is that instant; the next
    # event, at the same instant, is folded as it is added. The exact sum must still count
    # it: else the score reads 0 once the estimate no longer settles the sign (60
    # half-lives on), not where every term underflows (1,074 half-lives).
    text = '[score]\nweights = { "Visit" = 0.0 }\n[segments.alpha]\nrule = "score() > 0"\n'
    t0 = 1_772_323_200_000_000
    events = [
        Event(
            kind="track",
            customer_id="c1",
            name=name,
            properties={},
            traits={},
            at=t0,
            received=t0,
            message_id=f"m{i}",
        )
        for i, name in enumerate(["Visit", "Email Opened"])
    ]
    end = t0 + 100 * 365 * DAY
    with pruning_from(NEVER_PRUNED):
        expected = replayed(text, events, end)
    with pruning_from(1):
        assert replayed(text, events, end) == expected
    exits = [t.at for t in expected[0] if t.change == "exited"]
    assert len(exits) == 1 and (to_instant(exits[0]) - t0) > 1_000 * 14 * DAY


@settings(max_examples=300, deadline=None)
@given(ops=operations(), data=st.data())
def test_pruning_and_snapshots_change_no_transition_of_the_default_segments(
    ops: list[Op], data: st.DataObject
) -> None:
    with pruning_from(NEVER_PRUNED):
        full = Customer("ann")
        expected = run(full, ops)
    with pruning_from(1):
        cut = data.draw(st.integers(0, len(ops)))
        first = Customer("ann")
        before = run(first, ops[:cut])
        restored = Customer.from_snapshot("ann", first.snapshot())
        after = run(restored, ops[cut:])
    assert before + after == expected
    assert (restored.deadline, restored.watermark) == (full.deadline, full.watermark)
    assert restored.snapshot() == full.snapshot()
    # A late event far older than every window still counts where rules read it.
    assert SEGMENTS.needs.window is not None
    late = Event(
        kind="track",
        customer_id="ann",
        name="Order Completed",
        properties={"amount": 120},
        traits={},
        at=full.watermark - SEGMENTS.needs.window - 10 * DAY,
        received=full.watermark + HOUR,
        message_id="late",
    )
    with pruning_from(NEVER_PRUNED):
        expected = full.apply(late, SEGMENTS)
    with pruning_from(1):
        assert restored.apply(late, SEGMENTS) == expected
    assert restored.count("Order Completed") == full.count("Order Completed")
