"""``true_since`` and ``actors.reconcile``: catch-up transitions say when a membership truly
began, and a customer rebuilt from its log equals a replay of it (issue 17, items 1 and 2)."""

from __future__ import annotations

import msgspec

from actors import Customer, Replay, reconcile
from protocol import (
    DAY,
    HOUR,
    DefinitionCause,
    Event,
    EventCause,
    ImportCause,
    TimeCause,
    Transition,
    from_instant,
    parse_timestamp,
    to_instant,
)
from tests.helpers import segments

T0 = parse_timestamp("2026-03-01T09:00:00Z")

RULES = segments(
    """
[segments.regular]
rule = "count('Visit', within='10d') >= 2"
min_dwell = "7d"

[segments.quiet]
rule = "since_last('Visit') >= '3d'"
"""
)


def visit(at: int, message_id: str, received: int | None = None) -> Event:
    return Event(
        kind="track",
        customer_id="ann",
        name="Visit",
        properties={},
        traits={},
        at=at,
        received=at if received is None else received,
        message_id=message_id,
    )


def test_a_transition_published_before_true_since_reads_it_as_at() -> None:
    old = (
        b'{"customer_id":"ann","segment":"regular","change":"entered",'
        b'"at":"2026-03-01T09:00:00Z","cause":{"kind":"time"},"version":3}'
    )
    t = msgspec.json.decode(old, type=Transition)
    assert t.true_since == t.at == from_instant(T0)
    new = msgspec.json.decode(old[:-1] + b',"true_since":"2026-02-01T09:00:00Z"}', type=Transition)
    assert to_instant(new.true_since) < to_instant(new.at)
    catch_up = b'{"customer_id":"a","segment":"s","change":"exited","at":"2026-03-01T09:00:00Z",'
    catch_up += b'"cause":{"kind":"import"},"version":1}'
    assert msgspec.json.decode(catch_up, type=Transition).cause == ImportCause()


def test_a_membership_restored_counts_from_its_true_instant() -> None:
    # A catch-up entry published at T0 + 10d for a membership true since T0: min_dwell (7d)
    # counts from T0, so the customer may leave from T0 + 7d, not T0 + 17d.
    c = Customer("ann")
    c.restore(
        [
            Transition(
                customer_id="ann",
                segment="regular",
                change="entered",
                at=from_instant(T0 + 10 * DAY),
                cause=ImportCause(),
                version=1,
                true_since=from_instant(T0),
            )
        ]
    )
    assert c.members == {"regular": T0}
    assert c.version == 1


def test_reconcile_publishes_one_catch_up_per_changed_membership() -> None:
    events = [visit(T0, "m1"), visit(T0 + HOUR, "m2"), visit(T0 + 2 * DAY, "m3")]
    now = T0 + 20 * DAY
    # What the engine published: in `regular` since T0, version 4. The replay at now: out
    # of regular (no 2 visits in 10 days), quiet since 3 days after the last visit.
    current = Customer("ann")
    current.members = {"regular": T0}
    current.version = 4
    done = reconcile(current, "ann", events, RULES, now=now, cause=ImportCause())
    want = replayed(events, now)
    assert want.members == {"quiet": T0 + 5 * DAY}
    assert (done.customer.members, done.customer.deadline, done.customer.watermark) == (
        want.members,
        want.deadline,
        want.watermark,
    )
    assert [(t.segment, t.change, t.version) for t in done.transitions] == [
        ("regular", "exited", 5),
        ("quiet", "entered", 6),
    ]
    assert done.customer.version == 6
    for t in done.transitions:
        assert t.cause == ImportCause()
        assert to_instant(t.at) == now
    # Exited when the replay last left it; entered when the replay entered it.
    assert [to_instant(t.true_since) for t in done.transitions] == [
        T0 + HOUR + 10 * DAY,  # the second visit left the 10-day window
        T0 + 5 * DAY,
    ]


def test_an_unchanged_membership_takes_its_true_instant_without_a_transition() -> None:
    events = [visit(T0, "m1")]
    current = Customer("ann")
    current.members = {"quiet": T0 + 9 * DAY}  # wrongly stamped: the last event's instant
    current.version = 1
    done = reconcile(current, "ann", events, RULES, now=T0 + 10 * DAY, cause=ImportCause())
    assert done.transitions == []
    assert done.customer.members == {"quiet": T0 + 3 * DAY}
    assert done.customer.version == 1


def test_reconcile_stamps_at_now_and_true_since_from_the_replay() -> None:
    events = [visit(T0, "m1"), visit(T0 + HOUR, "m2")]
    now = T0 + 2 * DAY  # still regular (2 visits within 10 days), not quiet yet
    done = reconcile(None, "ann", events, RULES, now=now, cause=DefinitionCause())
    assert [(t.segment, t.change, t.version) for t in done.transitions] == [
        ("regular", "entered", 1)
    ]
    (t,) = done.transitions
    assert t.cause == DefinitionCause()
    assert to_instant(t.at) == now
    assert to_instant(t.true_since) == T0 + HOUR
    assert done.customer.members == {"regular": T0 + HOUR}
    # min_dwell counts from the true instant: the replay's deadline, not one 7d after now.
    assert done.customer.deadline == replayed(events, now).deadline


def test_reconcile_of_a_segment_no_longer_defined_exits_it_at_now() -> None:
    current = Customer("ann")
    current.members = {"gone": T0}
    current.version = 2
    done = reconcile(
        current, "ann", [visit(T0, "m1")], RULES, now=T0 + HOUR, cause=DefinitionCause()
    )
    assert [(t.segment, t.change, t.version, t.true_since) for t in done.transitions] == [
        ("gone", "exited", 3, from_instant(T0 + HOUR))
    ]
    assert done.customer.version == 3


def test_live_transitions_are_true_since_their_at() -> None:
    c = Customer("ann")
    out = c.apply(visit(T0, "m1"), RULES) + c.apply(visit(T0 + HOUR, "m2"), RULES)
    out += c.advance(T0 + 30 * DAY, RULES)
    assert out
    for t in out:
        assert t.true_since == t.at
        assert isinstance(t.cause, EventCause | TimeCause)


def replayed(events: list[Event], now: int) -> Customer:
    replay = Replay(RULES)
    for e in events:
        replay.apply(e)
    replay.advance(now)
    c = replay.customer("ann")
    assert c is not None
    return c
