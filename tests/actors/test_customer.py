"""The customer actor: memberships changed by events, by time (at the exact instant), and by
definition changes; versions, watermark and deadline."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Customer, SegmentSet, load_segments, parse_segments
from actors.rules import MISSING
from protocol import (
    DAY,
    HOUR,
    DefinitionCause,
    Event,
    EventCause,
    TimeCause,
    Transition,
    from_instant,
    to_instant,
)

T0 = to_instant(datetime(2026, 1, 1, tzinfo=UTC))
CID = "alice"
# The actor is tested against a fixed file of its own, not the shipped defaults, which change.
DEFAULT = parse_segments(
    """
[segments.new_customer]
description = "In the first 30 days since their first event"
rule = "since_first() < '30d'"

[segments.active]
description = "Visited in the last 7 days"
rule = "since_last('Visit') < '7d'"

[segments.lapsing]
description = "No visit for 14 days, but one within 30"
rule = "'14d' <= since_last('Visit') < '30d'"

[segments.inactive]
description = "No visit for 30 days or more"
rule = "since_last('Visit') >= '30d'"

[segments.never_visited]
description = "Known for a week or more and has never visited"
rule = "count('Visit') = 0 and since_first() >= '7d'"

[segments.premium]
description = "On a premium plan"
rule = "trait('plan') in ['gold', 'platinum']"
""",
    source="club.toml",
)


def visit(at: int, message_id: str | None = None, name: str = "Visit") -> Event:
    return Event(
        kind="track",
        customer_id=CID,
        name=name,
        properties={},
        traits={},
        at=at,
        received=at,
        message_id=message_id or f"{name}-{at}",
    )


def identify(at: int, message_id: str | None = None, **traits: Any) -> Event:
    return Event(
        kind="identify",
        customer_id=CID,
        name=None,
        properties={},
        traits=traits,
        at=at,
        received=at,
        message_id=message_id or f"identify-{at}",
    )


def changes(ts: list[Transition]) -> list[tuple[str, str, int]]:
    """(segment, change, instant) of each transition."""
    return [(t.segment, t.change, to_instant(t.at)) for t in ts]


def check_invariants(c: Customer, history: list[Transition]) -> None:
    assert [t.version for t in history] == list(range(1, len(history) + 1))
    assert c.version == len(history)
    assert c.deadline is None or c.deadline > c.watermark
    members: dict[str, int] = {}
    for t in history:
        if t.change == "entered":
            assert t.segment not in members
            members[t.segment] = to_instant(t.at)
        else:
            assert t.segment in members
            del members[t.segment]
    assert c.members == members


# --- events ------------------------------------------------------------------------------


def test_first_visit_enters_new_customer_and_active() -> None:
    c = Customer(CID)
    out = c.apply(visit(T0, "m1"), DEFAULT)
    cause = EventCause(message_id="m1")
    assert out == [
        Transition(
            customer_id=CID,
            segment="new_customer",
            change="entered",
            at=from_instant(T0),
            cause=cause,
            version=1,
        ),
        Transition(
            customer_id=CID,
            segment="active",
            change="entered",
            at=from_instant(T0),
            cause=cause,
            version=2,
        ),
    ]
    assert c.members == {"new_customer": T0, "active": T0}
    assert (c.version, c.watermark, c.deadline) == (2, T0, T0 + 7 * DAY)


def test_new_customer_has_no_state() -> None:
    c = Customer(CID)
    assert (c.version, c.deadline, c.members) == (0, None, {})
    assert c.watermark < -(10**18)  # before any instant an event can have (1970 included)
    assert c.first_at() is None
    assert c.last_at("Visit") is None
    assert c.count("Visit") == 0
    assert c.trait("plan") is MISSING


def test_event_that_changes_nothing_returns_no_transitions() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    assert c.apply(visit(T0 + HOUR), DEFAULT) == []
    assert c.version == 2
    assert c.deadline == T0 + HOUR + 7 * DAY


def test_premium_enters_and_exits_on_identify() -> None:
    c = Customer(CID)
    first = c.apply(identify(T0, plan="gold"), DEFAULT)
    assert changes(first) == [("new_customer", "entered", T0), ("premium", "entered", T0)]
    out = c.apply(identify(T0 + DAY, plan="silver"), DEFAULT)
    assert changes(out) == [("premium", "exited", T0 + DAY)]
    assert out[0].cause == EventCause(message_id=f"identify-{T0 + DAY}")


def test_other_track_events_do_not_count_as_visits() -> None:
    c = Customer(CID)
    out = c.apply(visit(T0, name="Purchase"), DEFAULT)
    assert changes(out) == [("new_customer", "entered", T0)]
    assert c.count("Visit") == 0
    assert c.last_at("Visit") is None


def test_identify_counts_as_first_event() -> None:
    c = Customer(CID)
    c.apply(identify(T0, plan="basic"), DEFAULT)
    assert c.first_at() == T0


def test_event_before_1970_counts_from_its_own_instant() -> None:
    # Instants are signed; a first event stamped before the epoch is still its own instant.
    c = Customer(CID)
    out = c.apply(visit(-DAY, "old"), DEFAULT)
    assert changes(out) == [("new_customer", "entered", -DAY), ("active", "entered", -DAY)]
    assert c.deadline == 6 * DAY


# --- time --------------------------------------------------------------------------------


def test_active_exits_at_the_exact_instant() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    assert c.advance(T0 + 7 * DAY - 1, DEFAULT) == []
    out = c.advance(T0 + 7 * DAY, DEFAULT)
    assert out == [
        Transition(
            customer_id=CID,
            segment="active",
            change="exited",
            at=from_instant(T0 + 7 * DAY),
            cause=TimeCause(),
            version=3,
        )
    ]
    assert (c.watermark, c.deadline) == (T0 + 7 * DAY, T0 + 14 * DAY)


def test_advance_fires_each_deadline_at_its_own_instant() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    out = c.advance(T0 + 365 * DAY, DEFAULT)
    assert changes(out) == [
        ("active", "exited", T0 + 7 * DAY),
        ("lapsing", "entered", T0 + 14 * DAY),
        ("new_customer", "exited", T0 + 30 * DAY),
        ("lapsing", "exited", T0 + 30 * DAY),
        ("inactive", "entered", T0 + 30 * DAY),
    ]
    assert [t.version for t in out] == [3, 4, 5, 6, 7]
    assert all(t.cause == TimeCause() for t in out)
    assert c.deadline is None
    assert c.watermark == T0 + 30 * DAY


def test_a_next_instant_at_or_past_never_is_no_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # protocol.NEVER is further than any instant shoal handles: whichever segment comes
    # first in the file, a rule's next instant beyond it leaves the customer with none.
    # Rules may not reach that far (durations are at most 100 years): lifted for the test.
    monkeypatch.setattr("actors.rules._dates.MAX_DURATION", 10**9 * DAY)
    far = "since_last('Visit') < '100000000d'"  # flips 2.7e5 years on: past NEVER
    for order in ((far, "count('Visit') > 5"), ("count('Visit') > 5", far)):
        segments = parse_segments(
            f"""
[segments.first]
rule = "{order[0]}"
[segments.second]
rule = "{order[1]}"
"""
        )
        c = Customer(CID)
        assert [t.segment for t in c.apply(visit(T0), segments)] == [
            "first" if order[0] == far else "second"
        ]
        assert c.deadline is None


def test_advance_before_the_deadline_changes_nothing() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    assert c.advance(T0 + DAY, DEFAULT) == []
    assert (c.version, c.watermark, c.deadline) == (2, T0, T0 + 7 * DAY)


def test_never_visited_enters_a_week_after_the_first_event() -> None:
    c = Customer(CID)
    c.apply(identify(T0, plan="basic"), DEFAULT)
    assert c.deadline == T0 + 7 * DAY
    out = c.advance(T0 + 8 * DAY, DEFAULT)
    assert changes(out) == [("never_visited", "entered", T0 + 7 * DAY)]


def test_event_fires_due_deadlines_first() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    out = c.apply(visit(T0 + 20 * DAY, "back"), DEFAULT)
    assert changes(out) == [
        ("active", "exited", T0 + 7 * DAY),
        ("lapsing", "entered", T0 + 14 * DAY),
        ("active", "entered", T0 + 20 * DAY),
        ("lapsing", "exited", T0 + 20 * DAY),
    ]
    assert [t.cause for t in out] == [TimeCause(), TimeCause()] + [
        EventCause(message_id="back")
    ] * 2


def test_event_at_the_deadline_instant_is_evaluated_with_it_no_zero_length_flap() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    assert c.apply(visit(T0 + 7 * DAY, "again"), DEFAULT) == []
    assert "active" in c.members and c.deadline == T0 + 14 * DAY


def test_event_just_after_the_deadline_instant_fires_the_deadline_first() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    out = c.apply(visit(T0 + 7 * DAY + 1, "again"), DEFAULT)
    assert changes(out) == [
        ("active", "exited", T0 + 7 * DAY),
        ("active", "entered", T0 + 7 * DAY + 1),
    ]
    assert [t.cause for t in out] == [TimeCause(), EventCause(message_id="again")]


def test_equality_rule_is_member_for_one_microsecond() -> None:
    segs = parse_segments("[segments.day_one]\nrule = \"since_first() == '1d'\"\n")
    c = Customer(CID)
    assert c.apply(identify(T0), segs) == []
    out = c.advance(T0 + 2 * DAY, segs)
    assert changes(out) == [("day_one", "entered", T0 + DAY), ("day_one", "exited", T0 + DAY + 1)]


# --- late (out-of-order) events ----------------------------------------------------------


def test_late_event_is_evaluated_at_the_watermark() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    c.advance(T0 + 10 * DAY, DEFAULT)  # active exited at T0 + 7d
    assert c.watermark == T0 + 7 * DAY
    out = c.apply(visit(T0 + 5 * DAY, "late"), DEFAULT)
    assert changes(out) == [("active", "entered", T0 + 7 * DAY)]
    assert out[0].version == 4
    assert c.watermark == T0 + 7 * DAY
    assert c.deadline == T0 + 12 * DAY
    assert c.last_at("Visit") == T0 + 5 * DAY


def received_late(event: Event, received: int) -> Event:
    return msgspec.structs.replace(event, received=received)


def test_late_event_takes_effect_at_its_receive_instant() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    c.advance(T0 + 10 * DAY, DEFAULT)  # active exited at T0 + 7d: the latest instant
    # Visited at T0 + 5d, received at T0 + 9d: late, in effect from when shoal learned of it.
    out = c.apply(received_late(visit(T0 + 5 * DAY, "late"), T0 + 9 * DAY), DEFAULT)
    assert changes(out) == [("active", "entered", T0 + 9 * DAY)]
    assert c.watermark == T0 + 9 * DAY
    assert c.deadline == T0 + 12 * DAY  # the visit counts at its own instant
    assert c.last_at("Visit") == T0 + 5 * DAY


def test_an_event_fires_its_customers_deadlines_before_its_receive_instant_first() -> None:
    """The same result whether or not the engine fired the due deadlines before it took the
    event: the event itself fires those due before its receive instant (issue 17, item 4)."""
    late = received_late(visit(T0 + 5 * DAY, "late"), T0 + 9 * DAY)
    fired_first, not_fired = Customer(CID), Customer(CID)
    for c in (fired_first, not_fired):
        c.apply(visit(T0), DEFAULT)
    out_a = fired_first.advance(T0 + 9 * DAY - 1, DEFAULT) + fired_first.apply(late, DEFAULT)
    out_b = not_fired.apply(late, DEFAULT)
    assert out_a == out_b
    assert changes(out_b) == [
        ("active", "exited", T0 + 7 * DAY),
        ("active", "entered", T0 + 9 * DAY),
    ]


def test_an_event_received_late_but_not_late_takes_effect_at_its_own_instant() -> None:
    c = Customer(CID)
    c.apply(visit(T0), DEFAULT)
    # Received two days after it happened, with nothing changed in between: on time.
    out = c.apply(received_late(visit(T0 + 3 * DAY, "slow"), T0 + 5 * DAY), DEFAULT)
    assert changes(out) == []
    assert c.watermark == T0 + 3 * DAY
    assert c.deadline == T0 + 10 * DAY


def test_a_late_event_that_changes_nothing_leaves_the_latest_instant() -> None:
    """So a rebuild from the log (events folded, then transitions restored) gives the live
    actor's watermark, and a later event is late or not alike in both."""
    history = [visit(T0, "v1"), received_late(identify(T0 + DAY, "i1", plan="basic"), T0 + 9 * DAY)]
    live = Customer(CID)
    published = live.apply(history[0], DEFAULT) + live.advance(T0 + 8 * DAY, DEFAULT)
    assert changes(live.apply(history[1], DEFAULT)) == []
    assert live.watermark == T0 + 7 * DAY  # active exited then: the latest change
    rebuilt = Customer(CID)
    for e in history:
        rebuilt.fold(e, DEFAULT)
    rebuilt.restore(published)
    assert rebuilt.watermark == live.watermark


def test_late_event_does_not_move_last_visit_back() -> None:
    c = Customer(CID)
    c.apply(visit(T0 + DAY), DEFAULT)
    c.apply(visit(T0), DEFAULT)
    assert c.last_at("Visit") == T0 + DAY
    assert c.first_at() == T0
    assert c.count("Visit") == 2
    assert c.watermark == T0 + DAY


def test_late_first_event_moves_first_at_back() -> None:
    c = Customer(CID)
    c.apply(visit(T0 + 40 * DAY), DEFAULT)
    assert "new_customer" in c.members
    out = c.apply(identify(T0, plan="basic"), DEFAULT)
    # Entered at this very instant: one change per instant, so out at the next (SEGMENTS.md).
    assert changes(out) == []
    assert c.deadline == T0 + 40 * DAY + 1
    out = c.advance(T0 + 41 * DAY, DEFAULT)
    assert changes(out)[0] == ("new_customer", "exited", T0 + 40 * DAY + 1)
    assert out[0].cause == TimeCause()


# --- traits ------------------------------------------------------------------------------


def test_trait_latest_by_event_time_wins_over_log_order() -> None:
    c = Customer(CID)
    c.apply(identify(T0 + 2, plan="gold"), DEFAULT)
    out = c.apply(identify(T0 + 1, plan="silver"), DEFAULT)
    assert out == []
    assert c.trait("plan") == "gold"
    assert "premium" in c.members


def test_trait_tie_goes_to_the_later_in_the_log() -> None:
    c = Customer(CID)
    c.apply(identify(T0, "a", plan="gold"), DEFAULT)
    out = c.apply(identify(T0, "b", plan="silver"), DEFAULT)
    assert c.trait("plan") == "silver"
    # premium was entered at this very instant: one change per instant (SEGMENTS.md).
    assert changes(out) == []
    assert changes(c.advance(T0 + 1, DEFAULT)) == [("premium", "exited", T0 + 1)]


def test_trait_not_in_any_rule_is_not_kept() -> None:
    c = Customer(CID)
    c.apply(identify(T0, plan="gold", age=40), DEFAULT)
    assert c.trait("age") is MISSING


def test_identify_without_a_trait_keeps_the_old_value() -> None:
    c = Customer(CID)
    c.apply(identify(T0, plan="gold"), DEFAULT)
    c.apply(identify(T0 + 1, email="a@b.c"), DEFAULT)
    assert c.trait("plan") == "gold"


def test_a_trait_set_to_null_later_wins_over_an_earlier_value() -> None:
    c = Customer(CID)
    c.apply(identify(T0 + 2, plan=None), DEFAULT)
    c.apply(identify(T0 + 1, plan="gold"), DEFAULT)
    assert c.trait("plan") is MISSING
    restored = Customer.from_snapshot(CID, c.snapshot())
    restored.apply(identify(T0 + 1, "late", plan="gold"), DEFAULT)
    assert restored.trait("plan") is MISSING
    restored.apply(identify(T0 + 3, plan="gold"), DEFAULT)
    assert restored.trait("plan") == "gold"


# --- memory: empty collections shared, allocated at the first write -----------------------


def test_customers_without_events_or_members_share_their_empty_collections() -> None:
    quiet = Customer("quiet")
    bare = Customer.from_snapshot("bare", Customer("bare").snapshot())
    busy = Customer(CID)
    busy.apply(identify(T0, plan="gold"), DEFAULT)
    busy.apply(visit(T0 + 1), DEFAULT)
    busy.restore([])
    assert "premium" in busy.members and busy.count("Visit") == 1
    assert busy.trait("plan") == "gold" and len(busy.tracked()) == 0
    for c in (quiet, bare):
        assert (c.members, c.version, c.deadline) == ({}, 0, None)
        assert c.count("Visit") == 0 and c.last_at("Visit") is None
        assert c.trait("plan") is MISSING
        assert list(c.tracked()) == [] and list(c.instants(None)) == []
    assert quiet.members is bare.members and quiet._named is bare._named
    assert quiet._traits is bare._traits


def test_snapshot_of_a_customer_with_empty_collections_round_trips() -> None:
    c = Customer(CID)
    c.fold(identify(T0, email="a@b.c"), DEFAULT)  # a trait no rule reads: nothing kept
    assert c.members == {} and c.trait("plan") is MISSING
    restored = Customer.from_snapshot(CID, c.snapshot())
    assert restored.snapshot() == c.snapshot()
    assert (restored.first_at(), restored.watermark, restored.deadline) == (
        c.first_at(),
        c.watermark,
        c.deadline,
    )
    # Its first writes give it collections of its own.
    entered = changes(restored.apply(identify(T0 + 1, plan="gold"), DEFAULT))
    assert ("premium", "entered", T0 + 1) in entered
    restored.apply(visit(T0 + 2), DEFAULT)
    assert restored.count("Visit") == 1 and restored.trait("plan") == "gold"
    assert Customer("other").members == {} and Customer("other").count("Visit") == 0
    again = Customer.from_snapshot(CID, restored.snapshot())
    assert again.snapshot() == restored.snapshot()
    assert again.members == restored.members and again.members["premium"] == T0 + 1


def test_a_snapshot_with_outcomes_spares_the_first_evaluation_after_loading() -> None:
    segments = load_segments()
    c = Customer(CID)
    c.apply(visit(T0), segments)
    assert c.deadline == T0 + 14 * DAY  # inactive_14d: nothing else changes before it
    body = c.snapshot(outcomes=True)
    warm = Customer.from_snapshot(CID, body)
    cold = Customer.from_snapshot(CID, c.snapshot())
    assert warm.snapshot() == cold.snapshot() == c.snapshot()  # the state alone compares
    assert warm.snapshot(outcomes=True) == body  # kept as stored until first used
    fired = [x.advance(T0 + 14 * DAY, segments) for x in (c, warm, cold)]
    assert fired[0] == fired[1] == fired[2] and changes(fired[0]) == [
        ("inactive_14d", "entered", T0 + 14 * DAY)
    ]
    assert warm.deadline == cold.deadline == c.deadline
    # Only the segment due was evaluated: no window or score was read, so no index made.
    assert warm._index is None and cold._index is not None


def test_stored_outcomes_of_other_definitions_or_unreadable_are_not_used() -> None:
    segments = load_segments()
    c = Customer(CID)
    c.apply(visit(T0), segments)
    body = c.snapshot(outcomes=True)
    state = msgspec.msgpack.decode(body)
    assert len(state) == 10 and isinstance(state[-1], bytes)
    unreadable = msgspec.msgpack.encode([*state[:-1], b"\x93not outcomes"])
    assert segments.text is not None
    other = parse_segments(
        segments.text + "\n[segments.gold]\nrule = \"trait('plan') == 'gold'\"\n"
    )
    for defs, stored in ((other, body), (segments, unreadable)):
        x = Customer.from_snapshot(CID, stored)
        fresh = Customer.from_snapshot(CID, c.snapshot())
        assert x.advance(T0 + 14 * DAY, defs) == fresh.advance(T0 + 14 * DAY, defs)
        assert x._index is not None  # every segment evaluated afresh
        assert x.snapshot(outcomes=True) == fresh.snapshot(outcomes=True)


def test_a_bare_snapshot_shares_equal_instants_and_trait_values() -> None:
    a, b = Customer("a"), Customer("b")
    for c in (a, b):
        c.apply(identify(T0, plan="gold"), DEFAULT)
    ra = Customer.from_snapshot("a", a.snapshot())
    rb = Customer.from_snapshot("b", b.snapshot())
    assert ra.trait("plan") is rb.trait("plan")
    assert ra.first_at() is ra.members["premium"]


# --- restore and definition changes ------------------------------------------------------


def rebuilt(events: list[Event], history: list[Transition], segs: SegmentSet) -> Customer:
    c = Customer(CID)
    for e in events:
        c.fold(e, segs)
    c.restore(history)
    return c


def test_restore_takes_members_version_and_watermark() -> None:
    events = [visit(T0), identify(T0 + HOUR, plan="gold")]
    live = Customer(CID)
    history = [t for e in events for t in live.apply(e, DEFAULT)]
    history += live.advance(T0 + 8 * DAY, DEFAULT)
    c = rebuilt(events, history, DEFAULT)
    assert c.members == live.members
    assert c.version == live.version == 4
    assert c.watermark == T0 + 7 * DAY


def test_rebuild_with_same_definitions_changes_nothing() -> None:
    events = [visit(T0), identify(T0 + HOUR, plan="gold"), visit(T0 + 3 * DAY)]
    live = Customer(CID)
    history = [t for e in events for t in live.apply(e, DEFAULT)]
    c = rebuilt(events, history, DEFAULT)
    assert c.evaluate(DEFAULT, DefinitionCause()) == []
    assert c.deadline == live.deadline
    assert c.watermark == live.watermark


def test_changed_definition_exits_with_definition_cause() -> None:
    events = [visit(T0), visit(T0 + 5 * DAY)]
    live = Customer(CID)
    history = [t for e in events for t in live.apply(e, DEFAULT)]
    assert "active" in live.members
    new = parse_segments(
        "[segments.new_customer]\nrule = \"since_first() < '30d'\"\n"
        "[segments.active]\nrule = \"count('Visit') >= 3\"\n"
    )
    c = rebuilt(events, history, new)
    out = c.evaluate(new, DefinitionCause())
    assert out == [
        Transition(
            customer_id=CID,
            segment="active",
            change="exited",
            at=from_instant(T0 + 5 * DAY),
            cause=DefinitionCause(),
            version=3,
        )
    ]
    assert c.deadline == T0 + 30 * DAY


def test_removed_segment_is_exited_with_definition_cause() -> None:
    events = [identify(T0, plan="gold")]
    live = Customer(CID)
    history = [t for e in events for t in live.apply(e, DEFAULT)]
    assert set(live.members) == {"new_customer", "premium"}
    new = parse_segments("[segments.new_customer]\nrule = \"since_first() < '30d'\"\n")
    c = rebuilt(events, history, new)
    out = c.evaluate(new, DefinitionCause())
    assert changes(out) == [("premium", "exited", T0)]
    assert out[0].cause == DefinitionCause()
    assert out[0].version == 3
    assert c.members == {"new_customer": T0}


def test_added_segment_is_entered_with_definition_cause() -> None:
    events = [visit(T0), visit(T0 + DAY)]
    live = Customer(CID)
    history = [t for e in events for t in live.apply(e, DEFAULT)]
    text = "[segments.regular]\nrule = \"count('Visit') >= 2\"\n"
    new = parse_segments(text)
    c = rebuilt(events, history, new)
    out = c.evaluate(new, DefinitionCause())
    assert changes(out) == [
        ("regular", "entered", T0 + DAY),
        ("new_customer", "exited", T0 + DAY),
        ("active", "exited", T0 + DAY),
    ]
    assert [t.version for t in out] == [3, 4, 5]
    assert c.members == {"regular": T0 + DAY}


def test_restore_of_an_exit_removes_the_membership() -> None:
    live = Customer(CID)
    history = live.apply(visit(T0), DEFAULT) + live.advance(T0 + 7 * DAY, DEFAULT)
    c = rebuilt([visit(T0)], history, DEFAULT)
    assert c.members == {"new_customer": T0}


# --- properties --------------------------------------------------------------------------

_offsets = st.integers(min_value=0, max_value=40).map(lambda k: k * DAY // 2)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("visit"), _offsets),
        st.tuples(st.just("identify"), _offsets, st.sampled_from(["gold", "silver"])),
        st.tuples(st.just("advance"), _offsets),
    ),
    max_size=12,
)


def run(ops: list[tuple[Any, ...]]) -> tuple[Customer, list[Transition]]:
    c = Customer(CID)
    history: list[Transition] = []
    for i, op in enumerate(ops):
        at = T0 + op[1]
        if op[0] == "visit":
            history += c.apply(visit(at, f"m{i}"), DEFAULT)
        elif op[0] == "identify":
            history += c.apply(identify(at, f"m{i}", plan=op[2]), DEFAULT)
        else:
            history += c.advance(at, DEFAULT)
        check_invariants(c, history)
    return c, history


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_versions_watermark_and_deadline_invariants(ops: list[tuple[Any, ...]]) -> None:
    c, history = run(ops)
    instants = [to_instant(t.at) for t in history]
    assert instants == sorted(instants)
    assert all(i <= c.watermark for i in instants)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_members_match_the_rules_at_the_watermark(ops: list[tuple[Any, ...]]) -> None:
    c, _ = run(ops)
    # Let an exit pending from an entry at the watermark itself (one change per instant) happen.
    c.advance(c.watermark + 1, DEFAULT)
    values, deadline = rule_values(c, c.watermark)
    assert {s for s, v in zip(DEFAULT.names, values, strict=True) if v} == set(c.members)
    assert deadline == c.deadline


def rule_values(facts: Any, t: int) -> tuple[list[bool], int | None]:
    """Each default segment's rule at ``t``, and the earliest next change among them."""
    values: list[bool] = []
    nxt: int | None = None
    for s in DEFAULT.segments:
        v, n = s.rule.evaluate(facts, t)
        values.append(v)
        if n is not None and (nxt is None or n < nxt):
            nxt = n
    return values, nxt


@dataclass
class Snapshot:
    """The facts of the events at or before an instant, for the reference."""

    events: list[Event] = field(default_factory=list)

    def first_at(self) -> int | None:
        return min((e.at for e in self.events), default=None)

    def last_at(self, name: str | None) -> int | None:
        ats = [e.at for e in self.events if e.kind == "track" and name in (None, e.name)]
        return max(ats, default=None)

    def count(self, name: str | None) -> int:
        return sum(1 for e in self.events if e.kind == "track" and name in (None, e.name))

    def trait(self, key: str) -> Any:
        value = MISSING
        for e in sorted(self.events, key=lambda e: e.at):  # stable: log order at ties
            value = e.traits.get(key, value)
        return value


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(_offsets, st.sampled_from(["Visit", "gold", "silver"])), min_size=1, max_size=6
    )
)
def test_in_order_history_matches_rules_at_every_instant(raw: list[tuple[int, str]]) -> None:
    # Distinct instants: two events at one instant may hold an exit to the next microsecond.
    raw = sorted(dict(raw).items())
    events = [
        visit(T0 + off, f"m{i}") if kind == "Visit" else identify(T0 + off, f"m{i}", plan=kind)
        for i, (off, kind) in enumerate(raw)
    ]
    c = Customer(CID)
    history: list[Transition] = []
    for e in events:
        history += c.apply(e, DEFAULT)
    end = T0 + 80 * DAY
    history += c.advance(end, DEFAULT)

    # Every instant a rule can change at: event instants plus each duration, +-1 us.
    points = {T0 + off for off, _ in raw}
    for base in list(points):
        for d in (0, 7, 14, 30):
            for delta in (-1, 0, 1):
                points.add(base + d * DAY + delta)
    for t in sorted(p for p in points if T0 <= p <= end):
        expected_values, _ = rule_values(Snapshot([e for e in events if e.at <= t]), t)
        expected = {s for s, v in zip(DEFAULT.names, expected_values, strict=True) if v}
        members: set[str] = set()
        for tr in history:
            if to_instant(tr.at) <= t:
                (members.add if tr.change == "entered" else members.discard)(tr.segment)
        assert members == expected, (t - T0, history)
