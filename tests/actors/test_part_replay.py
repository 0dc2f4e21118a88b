"""A replay split by customer (``PartReplay``, ``merge_parts``) gives exactly one replay's
transitions in one replay's order: for any definitions, any split of the customers, any
pieces, and logs out of receive order."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import (
    NO_CLOCK,
    Customer,
    PartReplay,
    Replay,
    SegmentSet,
    load_segments,
    merge_parts,
    parse_segments,
    replay,
)
from actors.population import generate, history_end
from protocol import Event, Transition

from .test_language_property import histories, segment_files


def split_replay(
    events: Sequence[Event],
    segments: SegmentSet,
    part_of: dict[str, int],
    parts: int,
    piece: int,
    until: int | None,
    bases: Sequence[Customer] = (),
) -> list[Transition]:
    """Replay ``events`` (after ``bases``) as ``parts`` parts, in pieces of ``piece`` items."""
    replays = [PartReplay(segments) for _ in range(parts)]
    items: list[tuple[int, Event | Customer]] = [(NO_CLOCK, b) for b in bases]
    items += [(e.received - 1, e) for e in events]
    if until is not None:
        items.append((until, None))  # type: ignore[arg-type]  # a step of the clock alone
    out: list[Transition] = []
    for first in range(0, len(items), piece):
        chunk = items[first : first + piece]
        clocks = [clock for clock, _ in chunk]
        owns: list[list[tuple[int, Event | Customer]]] = [[] for _ in range(parts)]
        for step, (_, item) in enumerate(chunk, first):
            if item is not None:
                owns[part_of[item.customer_id]].append((step, item))
        out += merge_parts(r.feed(first, clocks, own) for r, own in zip(replays, owns, strict=True))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=segment_files(),
    history=histories(),
    parts=st.integers(1, 4),
    piece=st.integers(1, 20),
    data=st.data(),
)
def test_a_split_replay_is_the_replay(
    text: str, history: tuple[list[Event], int], parts: int, piece: int, data: st.DataObject
) -> None:
    events, end = history
    segments = parse_segments(text)
    if data.draw(st.booleans()):
        # A log out of receive order (imported history): the clock goes back and forth.
        events = data.draw(st.permutations(events))
    customers = sorted({e.customer_id for e in events})
    part_of = {c: data.draw(st.integers(0, parts - 1)) for c in customers}
    until = data.draw(st.one_of(st.none(), st.just(end)))
    expected = list(replay(events, segments, until=until))
    assert split_replay(events, segments, part_of, parts, piece, until) == expected


def test_a_split_replay_of_a_generated_history_is_the_replay() -> None:
    segments = load_segments()
    events = list(generate(60, 120, seed=3))
    end = history_end(120)
    expected = list(replay(events, segments, until=end))
    part_of = {e.customer_id: hash(e.customer_id) % 3 for e in events}
    got = split_replay(events, segments, part_of, 3, 997, end)
    assert len(got) > 500
    assert got == expected


def test_bases_start_the_parts_as_they_start_one_replay() -> None:
    segments = load_segments()
    events = list(generate(30, 90, seed=5))
    cut = events[len(events) // 2].received
    before = [e for e in events if e.received <= cut]
    after = [e for e in events if e.received > cut]
    bases: dict[str, Customer] = {}
    for e in before:
        c = bases.setdefault(e.customer_id, Customer(e.customer_id))
        c.fold(e, segments)
    # Copies: a base is taken over by the replay that starts from it.
    copies = [Customer.from_snapshot(c.customer_id, c.snapshot()) for c in bases.values()]
    one = Replay(segments)
    expected = one.start_from_all(list(bases.values()))
    assert expected  # the bases are in segments at the cut
    expected += one.apply_all(after)
    expected += one.advance(history_end(90))
    part_of = {c: i % 2 for i, c in enumerate(sorted(bases))}
    part_of.update({e.customer_id: 0 for e in after if e.customer_id not in part_of})
    got = split_replay(after, segments, part_of, 2, 50, history_end(90), copies)
    assert got == expected


def test_an_item_outside_the_steps_is_refused() -> None:
    part = PartReplay(load_segments())
    event = next(iter(generate(1, 2, seed=1)))
    with pytest.raises(ValueError, match="outside steps 0 to 0"):
        part.feed(0, [event.received - 1], [(5, event)])
