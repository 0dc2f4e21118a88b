"""explain(): each condition's value and which decide, and the exact instant the membership
next changes with no new event, held to what the engine (actors.Replay) then does and to the
brute-force reference of SEGMENTS.md."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from actors import Customer, Replay, SegmentSet, parse_segments
from actors._errors import ActorsError, UnknownSegmentError
from actors.rules import explain
from protocol import DAY, HOUR, Event, Transition, format_instant, to_instant
from protocol._explain import ConditionExplanation, SegmentExplanation

from .reference import Compiler, Cx, load, reference_changes
from .test_language_property import histories, segment_files, time_limit

T0 = to_instant(datetime(2026, 1, 1, tzinfo=UTC))
CID = "alice"


def track(at: int, name: str = "Visit", **properties: Any) -> Event:
    return Event(
        kind="track",
        customer_id=CID,
        name=name,
        properties=properties,
        traits={},
        at=at,
        received=at,
        message_id=f"{name}-{at}",
    )


def identify(at: int, **traits: Any) -> Event:
    return Event(
        kind="identify",
        customer_id=CID,
        name=None,
        properties={},
        traits=traits,
        at=at,
        received=at,
        message_id=f"identify-{at}",
    )


def run(segments: SegmentSet, events: list[Event]) -> Replay:
    r = Replay(segments)
    for e in events:
        r.apply(e)
    return r


def actor(r: Replay) -> Customer:
    c = r.customer(CID)
    assert c is not None
    return c


def one(r: Replay, segment: str, now: int | None = None) -> SegmentExplanation:
    """Explain at ``now`` (default: the last event), once the clock has reached it, as the
    engine's would have."""
    c = actor(r)
    if now is None:
        now = c.watermark
    r.advance(now)
    (x,) = explain(c, r.segments, now, segment)
    return x


def walk(c: ConditionExplanation) -> Iterator[ConditionExplanation]:
    yield c
    for child in c.children:
        yield from walk(child)


def find(x: SegmentExplanation, text: str) -> ConditionExplanation:
    roots = [x.rule] if x.exit is None else [x.rule, x.exit]
    found = [c for root in roots for c in walk(root) if c.text == text]
    assert found, f"no condition {text!r}"
    return found[0]


def at(t: int) -> str:
    return format_instant(t)


def changes(ts: list[Transition]) -> list[tuple[str, str, int]]:
    return [(t.segment, t.change, to_instant(t.at)) for t in ts]


# --- a window edge ---------------------------------------------------------------------------

REGULAR = parse_segments(
    """
[segments.regular]
rule = "count('Visit', within='30d') >= 3"
""",
    source="regular.toml",
)


def test_window_edge_names_the_condition_and_the_exact_instant() -> None:
    """Four visits on four days: the first leaving the window (day 30) keeps the count at 3;
    the second (day 31) drops it to 2, and that is when the customer leaves, exactly."""
    r = run(REGULAR, [track(T0 + d * DAY) for d in range(4)])
    c = actor(r)
    x = one(r, "regular")
    assert x.member and x.entered_at == at(T0 + 2 * DAY)
    assert x.evaluated_at == at(T0 + 3 * DAY)
    assert x.rule == ConditionExplanation(
        text="count('Visit', within='30d') >= 3",
        kind="condition",
        value=True,
        decides=True,
        op=">=",
        left="4",
        right="3",
        next_change=at(T0 + 31 * DAY),
    )
    # The engine may look earlier (a window edge at day 30), never later.
    assert c.deadline is not None and c.deadline <= T0 + 31 * DAY
    assert x.next_change == at(T0 + 31 * DAY)
    assert x.horizon is None
    assert x.reason == (
        "member since 2026-01-03T00:00:00Z: rule holds, as "
        "`count('Visit', within='30d') >= 3` is true (4 >= 3); leaves at "
        "2026-02-01T00:00:00Z when `count('Visit', within='30d') >= 3` turns false"
    )
    # The clock reaches it: nothing before, the exit at exactly that instant.
    assert r.advance(T0 + 31 * DAY - 1) == []
    assert x.member and actor(r).members == {"regular": T0 + 2 * DAY}
    later = one(r, "regular", T0 + 31 * DAY - 1)
    assert (later.rule.left, later.next_change) == ("3", at(T0 + 31 * DAY))
    out = r.advance(T0 + 31 * DAY)
    assert changes(out) == [("regular", "exited", T0 + 31 * DAY)]
    after = one(r, "regular", T0 + 31 * DAY)
    assert (after.member, after.rule.value, after.rule.left, after.next_change) == (
        False,
        False,
        "2",
        None,
    )
    assert after.reason.endswith("; no change without a new event")


def test_explain_changes_nothing() -> None:
    r = run(REGULAR, [track(T0 + d * DAY) for d in range(4)])
    c = actor(r)
    before = (c.snapshot(), c.deadline, dict(c.members), c.version, c.watermark)
    explain(c, REGULAR, T0 + 10 * DAY)
    assert (c.snapshot(), c.deadline, dict(c.members), c.version, c.watermark) == before


def test_now_before_the_watermark_evaluates_at_the_watermark() -> None:
    r = run(REGULAR, [track(T0 + d * DAY) for d in range(4)])
    assert one(r, "regular", T0).evaluated_at == at(T0 + 3 * DAY)
    assert one(r, "regular", T0 + 5 * DAY).evaluated_at == at(T0 + 5 * DAY)


def test_a_change_the_engine_has_not_reached_yet() -> None:
    """Asked at an instant past a deadline the engine has not fired (its timers lag): the
    membership is still the engine's, and the change is reported as due."""
    r = run(REGULAR, [track(T0 + d * DAY) for d in range(3)])
    (x,) = explain(actor(r), REGULAR, T0 + 40 * DAY)
    assert x.member and not x.rule.value and x.next_change == at(T0 + 30 * DAY)
    assert x.reason.endswith(
        "; due to leave at 2026-01-31T00:00:00Z, which the engine has not reached yet"
    )
    assert changes(r.advance(T0 + 40 * DAY)) == [("regular", "exited", T0 + 30 * DAY)]


def test_search_bounded_reports_its_horizon() -> None:
    """A sum that stays at or above 10 through many window edges: with too few steps the
    search stops, says how far it looked, and claims no next change."""
    segs = parse_segments(
        """
[segments.spender]
rule = "sum('Order', 'amount', within='30d') >= 10"
""",
        source="spender.toml",
    )
    r = run(segs, [track(T0 + h * HOUR, "Order", amount=5) for h in range(10)])
    c = actor(r)
    (x,) = explain(c, segs, T0 + 9 * HOUR, max_steps=3)
    assert x.member and x.next_change is None and x.rule.next_change is None
    assert x.horizon is not None
    assert T0 + 30 * DAY <= to_instant(datetime.fromisoformat(x.horizon)) < T0 + 30 * DAY + 9 * HOUR
    assert x.reason.endswith(f"; no change found up to {x.horizon} without a new event")
    (full,) = explain(c, segs, T0 + 9 * HOUR)
    # 50 in the window until the orders leave it; under 10 once the ninth has left.
    assert full.next_change == at(T0 + 8 * HOUR + 30 * DAY) and full.horizon is None


# --- and / or / not --------------------------------------------------------------------------

COMBINED = parse_segments(
    """
[segments.mixed]
rule = "(since_last('Visit') < '7d' AND trait('plan') = 'gold') or NOT exists(trait('email'))"

[segments.window]
rule = "'7d' <= since_last('Visit') < '14d'"
""",
    source="combined.toml",
)


def test_and_or_not_deciding_parts() -> None:
    r = run(COMBINED, [identify(T0, plan="silver", email="a@example.com"), track(T0 + DAY)])
    x = one(r, "mixed")
    assert not x.member and x.next_change is None
    assert x.rule.kind == "or" and not x.rule.value and x.rule.decides
    conj, negation = x.rule.children
    # A false or: every part decides. In the false and, only its false part does.
    assert (conj.kind, conj.value, conj.decides) == ("and", False, True)
    recent, gold = conj.children
    assert (recent.text, recent.value, recent.decides) == (
        "since_last('Visit') < '7d'",
        True,
        False,
    )
    assert (recent.left, recent.op, recent.right) == ("0s", "<", "7d")
    assert recent.next_change == at(T0 + 8 * DAY)
    assert (gold.text, gold.value, gold.decides) == ("trait('plan') = 'gold'", False, True)
    assert (gold.left, gold.op, gold.right, gold.next_change) == ('"silver"', "==", '"gold"', None)
    assert (negation.kind, negation.text, negation.value, negation.decides) == (
        "not",
        "NOT exists(trait('email'))",
        False,
        True,
    )
    (inner,) = negation.children
    assert (inner.text, inner.value, inner.op, inner.left) == (
        "exists(trait('email'))",
        True,
        "exists",
        '"a@example.com"',
    )
    assert x.reason == (
        "not a member: rule is false, as `trait('plan') = 'gold'` is false "
        '("silver" == "gold"), `NOT exists(trait(\'email\'))` is false; '
        "no change without a new event"
    )

    # Gold now: the and holds and decides with both parts; the or is true because of it.
    r.apply(identify(T0 + 2 * DAY, plan="gold"))
    x = one(r, "mixed")
    assert x.member and x.rule.value
    conj, negation = x.rule.children
    assert (conj.value, conj.decides, negation.decides) == (True, True, False)
    assert [p.decides for p in conj.children] == [True, True]
    assert x.next_change == at(T0 + 8 * DAY) == conj.next_change
    assert x.reason.endswith(
        "; leaves at 2026-01-09T00:00:00Z when `since_last('Visit') < '7d'` turns false"
    )
    out = [ch for ch in changes(r.advance(T0 + 30 * DAY)) if ch[0] == "mixed"]
    assert out == [("mixed", "exited", T0 + 8 * DAY)]


def test_chained_comparison_shows_each_link_as_written() -> None:
    r = run(COMBINED, [track(T0)])
    x = one(r, "window", T0 + 3 * DAY)
    assert x.rule.text == "'7d' <= since_last('Visit') < '14d'" and x.rule.kind == "and"
    low, high = x.rule.children
    # Written order kept, though the engine compares with the elapsed time on the left.
    assert (low.text, low.left, low.op, low.right, low.value, low.decides) == (
        "'7d' <= since_last('Visit')",
        "7d",
        "<=",
        "3d",
        False,
        True,
    )
    assert (high.text, high.left, high.op, high.right, high.value, high.decides) == (
        "since_last('Visit') < '14d'",
        "3d",
        "<",
        "14d",
        True,
        False,
    )
    assert (low.next_change, high.next_change) == (at(T0 + 7 * DAY), at(T0 + 14 * DAY))
    assert x.next_change == at(T0 + 7 * DAY)
    inside = one(r, "window", T0 + 7 * DAY + 1)
    assert inside.rule.value and inside.next_change == at(T0 + 14 * DAY)


# --- exit and min_dwell ----------------------------------------------------------------------

STICKY = parse_segments(
    """
[segments.sticky]
rule = "count('Order', within='7d') >= 1"
exit = "since_last('Order') >= '2d'"
min_dwell = "10d"

[segments.overlap]
rule = "count('Visit') >= 1"
exit = "since_last('Visit') < '1d'"
""",
    source="sticky.toml",
)


def test_exit_and_min_dwell() -> None:
    r = run(STICKY, [track(T0, "Order")])
    # Before the exit condition holds: not held yet, and already the exact instant.
    early = one(r, "sticky", T0 + DAY)
    assert not early.held_by_min_dwell and early.next_change == at(T0 + 10 * DAY)
    assert early.exit is not None and early.exit.next_change == at(T0 + 2 * DAY)
    x = one(r, "sticky", T0 + 5 * DAY)
    assert x.member and x.min_dwell == "10d"
    assert x.earliest_exit == at(T0 + 10 * DAY)
    # A member leaves by its exit: the rule no longer decides.
    assert (x.rule.value, x.rule.decides) == (True, False)
    assert (x.exit is not None and x.exit.value, x.exit is not None and x.exit.decides) == (
        True,
        True,
    )
    assert x.held_by_min_dwell
    assert x.next_change == at(T0 + 10 * DAY)
    assert x.reason == (
        "member since 2026-01-01T00:00:00Z: exit condition holds, as "
        "`since_last('Order') >= '2d'` is true (5d >= 2d); min_dwell 10d keeps it in until "
        "2026-01-11T00:00:00Z; leaves at 2026-01-11T00:00:00Z when min_dwell ends"
    )
    assert changes(r.advance(T0 + 30 * DAY)) == [("sticky", "exited", T0 + 10 * DAY)]
    after = one(r, "sticky", T0 + 10 * DAY)
    assert not after.member and after.earliest_exit is None and after.next_change is None


def test_rule_and_exit_overlapping_keep_a_customer_out() -> None:
    r = run(STICKY, [track(T0)])
    x = one(r, "overlap")
    assert not x.member and x.rule.value
    assert x.exit is not None and x.exit.value and x.exit.decides
    assert x.next_change == at(T0 + DAY)
    assert x.reason.startswith("not a member: the rule holds but so does the exit condition")
    assert x.reason.endswith(
        "; enters at 2026-01-02T00:00:00Z when `since_last('Visit') < '1d'` turns false"
    )
    assert changes(r.advance(T0 + 3 * DAY)) == [("overlap", "entered", T0 + DAY)]


def test_an_entry_is_not_left_the_same_instant() -> None:
    segs = parse_segments(
        """
[segments.moment]
rule = "since_last('Visit') < '1s'"
""",
        source="moment.toml",
    )
    r = run(segs, [track(T0)])
    x = one(r, "moment")
    assert x.member and x.earliest_exit == at(T0 + 1) and not x.held_by_min_dwell
    assert x.next_change == at(T0 + 1_000_000)


# --- referenced segments ---------------------------------------------------------------------

REFS = parse_segments(
    """
[segments.regular]
rule = "count('Visit', within='30d') >= 3"

[segments.lapsed_regular]
rule = "since_first() >= '10d' and not in_segment('regular')"
""",
    source="refs.toml",
)


def test_in_segment_follows_the_referenced_segments_next_change() -> None:
    r = run(REFS, [track(T0 + d * DAY) for d in range(3)])
    x = one(r, "lapsed_regular", T0 + 12 * DAY)
    assert not x.member
    tenure, negation = x.rule.children
    assert (tenure.value, tenure.decides) == (True, False)
    assert (negation.value, negation.decides) == (False, True)
    (ref,) = negation.children
    assert (ref.text, ref.value, ref.next_change) == (
        "in_segment('regular')",
        True,
        at(T0 + 30 * DAY),
    )
    # The rule's own next instants say nothing of when `regular` ends; the run does.
    assert x.next_change == at(T0 + 30 * DAY) == x.rule.next_change
    assert x.reason.endswith(
        "; enters at 2026-01-31T00:00:00Z when `not in_segment('regular')` turns true"
    )
    assert changes(r.advance(T0 + 60 * DAY)) == [
        ("regular", "exited", T0 + 30 * DAY),
        ("lapsed_regular", "entered", T0 + 30 * DAY),
    ]


# --- scores ----------------------------------------------------------------------------------

SCORES = parse_segments(
    """
[score]
half_life = "7d"
weights = { "Order" = 2.0 }
default_weight = 0.0

[segments.engaged]
rule = "score() >= 3"

[segments.cooling]
rule = "score_at('7d') >= 3 and score() < 0.75 * score_at('7d')"
""",
    source="scores.toml",
)


def test_score_comparison_values_and_crossing() -> None:
    r = run(SCORES, [track(T0, "Order"), track(T0, "Order", m=1)])
    x = one(r, "engaged", T0)
    assert x.member
    assert (x.rule.left, x.rule.right, x.rule.value) == ("4", "3", True)
    assert x.next_change is not None and x.next_change == x.rule.next_change
    crossing = to_instant(datetime.fromisoformat(x.next_change))
    # score = 4 * 2 ** (-t / 7d) falls to 3 after 7d * log2(4/3), about 2.9 days.
    assert T0 + 2 * DAY < crossing < T0 + 3 * DAY
    assert changes(r.advance(crossing - 1)) == []
    assert changes(r.advance(crossing)) == [("engaged", "exited", crossing)]
    x = one(r, "engaged", T0 + 7 * DAY)
    assert (x.member, x.rule.left, x.rule.op, x.rule.right) == (False, "2", ">=", "3")


def test_score_against_score_shows_both_sides() -> None:
    r = run(SCORES, [track(T0 - 8 * DAY, "Order"), track(T0 - 7 * DAY - HOUR, "Order")])
    x = one(r, "cooling", T0)
    assert x.member
    then, drop = x.rule.children
    assert (then.left, then.op, then.right, then.value) == ("3.8032", ">=", "3", True)
    assert drop.text == "score() < 0.75 * score_at('7d')" and drop.value
    assert drop.op == "<" and drop.right is not None and drop.left is not None
    assert float(drop.left) < float(drop.right)
    # Between events score() / score_at('7d') stays 1/2: score_at('7d') falling below 3
    # (after 7d * log2(3.80 / 3), about 2.4 days) ends it.
    assert x.next_change is not None and x.next_change == then.next_change
    crossing = to_instant(datetime.fromisoformat(x.next_change))
    assert T0 + 2 * DAY < crossing < T0 + 3 * DAY and drop.next_change is None
    assert changes(r.advance(crossing - 1)) == []
    assert changes(r.advance(crossing)) == [("cooling", "exited", crossing)]


# --- traits ----------------------------------------------------------------------------------

TRAITS = parse_segments(
    """
[segments.renewal]
rule = "'0s' <= until(trait('renewal_date')) <= '14d'"

[segments.premium]
rule = "trait('plan') in ['gold', 'platinum'] and date(trait('since')) < date('2026-06-01')"
""",
    source="traits.toml",
)


def test_missing_traits_are_shown_missing_and_false() -> None:
    r = run(TRAITS, [track(T0)])
    x = one(r, "renewal")
    assert not x.member and x.next_change is None
    for link in x.rule.children:
        assert (link.value, link.next_change) == (False, None)
    assert x.rule.children[1].left == "missing"
    p = one(r, "premium")
    plan, since = p.rule.children
    assert (plan.left, plan.op, plan.right, plan.value) == (
        "missing",
        "in",
        '["gold","platinum"]',
        False,
    )
    assert (since.left, since.op, since.right) == ("missing", "<", "2026-06-01T00:00:00Z")


def test_trait_dates_count_down() -> None:
    r = run(TRAITS, [identify(T0, renewal_date="2026-01-20", plan="gold", since="2025-05-01")])
    x = one(r, "renewal")
    assert not x.member
    assert x.next_change == at(to_instant(datetime(2026, 1, 6, tzinfo=UTC)))
    assert [(c.left, c.right) for c in x.rule.children] == [("0s", "19d"), ("19d", "14d")]
    p = one(r, "premium")
    assert p.member and p.rule.children[1].left == "2025-05-01T00:00:00Z"
    assert changes(r.advance(T0 + 40 * DAY)) == [
        ("renewal", "entered", to_instant(datetime(2026, 1, 6, tzinfo=UTC))),
        ("renewal", "exited", to_instant(datetime(2026, 1, 20, tzinfo=UTC)) + 1),
    ]


# --- the whole set, errors, JSON -------------------------------------------------------------


def test_all_segments_in_file_order_and_json() -> None:
    r = run(STICKY, [track(T0, "Order")])
    xs = explain(actor(r), STICKY, T0)
    assert [x.segment for x in xs] == ["sticky", "overlap"]
    body = msgspec.json.encode(xs)
    assert msgspec.json.decode(body, type=list[SegmentExplanation]) == xs


def test_a_customer_without_events() -> None:
    (x, y) = explain(Customer("nobody"), STICKY, T0)
    assert not x.member and not x.rule.value and x.next_change is None
    assert x.rule.left == "0"


def test_unknown_segment() -> None:
    r = run(STICKY, [track(T0)])
    with pytest.raises(UnknownSegmentError) as e:
        explain(actor(r), STICKY, T0, "loyal")
    assert str(e.value) == "unknown segment 'loyal'; the segments defined are: sticky, overlap"
    assert isinstance(e.value, ActorsError) and isinstance(e.value, LookupError)
    assert (e.value.segment, e.value.known) == ("loyal", ("sticky", "overlap"))
    many = UnknownSegmentError("x", tuple(f"s{i}" for i in range(12)))
    assert str(many) == (
        "unknown segment 'x'; the segments defined are: s0, s1, s2, s3, s4, s5, s6, s7, s8, "
        "s9 and 2 more"
    )


# --- property: next_change is the engine's next transition -----------------------------------

PROPERTY_TOML = """
[score]
half_life = "2d"
weights = { "Visit" = 1.0, "Order" = 3.0 }
default_weight = 0.0

[segments.regular]
rule = "count('Visit', within='3d') >= 2"

[segments.lapsing]
rule = "'1d' <= since_last('Visit') < '4d'"

[segments.hot]
rule = "score() >= 2.5"

[segments.sticky]
rule = "count('Order', within='2d') >= 1"
exit = "since_last() >= '1d'"
min_dwell = "2d"

[segments.fading]
rule = "in_segment('regular') or (score_at('1d') >= 2 and not in_segment('hot'))"

[segments.renewal]
rule = "'0s' <= until(trait('renewal_date')) <= '2d' and since_first() < '6d'"
"""
PROPERTY = parse_segments(PROPERTY_TOML, source="property.toml")

_event = st.tuples(
    st.integers(0, 3 * 24),  # hours after the previous event
    st.integers(0, 2),  # sometimes a stray microsecond offset
    st.sampled_from(["Visit", "Visit", "Order", "identify"]),
    st.integers(0, 6),  # renewal date: days after T0
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_event, min_size=1, max_size=7), st.integers(0, 48))
def test_next_change_is_the_next_transition(
    steps: list[tuple[int, int, str, int]], later: int
) -> None:
    events: list[Event] = []
    t = T0
    for hours, us, kind, renewal in steps:
        t += hours * HOUR + us
        if kind == "identify":
            day = datetime.fromtimestamp((T0 + renewal * DAY) / 1e6, UTC).date().isoformat()
            events.append(identify(t, renewal_date=day))
        else:
            events.append(track(t, kind))
    r = run(PROPERTY, events)
    c = actor(r)
    now = c.watermark + later * HOUR
    # Deadlines up to `now` fire first, so the membership explained is the one at `now`.
    r.advance(now)
    xs = explain(c, PROPERTY, now)
    members = dict(c.members)
    assert {x.segment for x in xs if x.member} == set(members)
    end = now + 30 * DAY
    rest = changes(r.advance(end))
    reference = reference_changes(PROPERTY_TOML, events, end)[CID]
    for x in xs:
        assert x.horizon is None
        ours = [a for s, _, a in rest if s == x.segment and a > now]
        theirs = [ch.at for ch in reference if ch.segment == x.segment and ch.at > now]
        expected = at(ours[0]) if ours else None
        assert x.next_change == expected, (x.segment, x.reason)
        assert expected == (at(theirs[0]) if theirs else None)
        assert x.member == (x.segment in members)
        # Each condition of a rule that reads no membership flips exactly at its next_change.
        seg = next(s for s in PROPERTY.segments if s.name == x.segment)
        if not seg.rule.refs:
            value, _ = seg.rule.evaluate(c, now)
            assert value == x.rule.value
            if x.rule.next_change is not None:
                flip = to_instant(datetime.fromisoformat(x.rule.next_change))
                assert seg.rule.evaluate(c, flip - 1)[0] == value
                assert seg.rule.evaluate(c, flip)[0] != value


@settings(max_examples=150, deadline=None)
@given(text=segment_files(), history=histories(), cut=st.integers(0, 16))
def test_next_change_on_any_file(text: str, history: tuple[list[Event], int], cut: int) -> None:
    """Random files of the whole language (the language property's generator), random
    customers cut at a random event: every segment of every customer explains, as JSON, and
    its next_change is the replay's next transition with no new event."""
    events, end = history
    note(text)
    segs = parse_segments(text, source="generated.toml")
    r = Replay(segs)
    with time_limit(20):
        for e in events[:cut]:
            r.apply(e)
        if r.now is None:
            return
        now = r.now
        explained = {}
        for cid in sorted({e.customer_id for e in events[:cut]}):
            c = r.customer(cid)
            assert c is not None
            xs = explain(c, segs, now)
            assert msgspec.json.decode(msgspec.json.encode(xs), type=list[SegmentExplanation]) == xs
            explained[cid] = (dict(c.members), xs)
        latest = max(
            (
                to_instant(datetime.fromisoformat(x.next_change))
                for _, xs in explained.values()
                for x in xs
                if x.next_change is not None
            ),
            default=now,
        )
        rest = r.advance(max(end, latest) + DAY)
    spec = load(text)
    for cid, (members, xs) in explained.items():
        assert {x.segment for x in xs if x.member} == set(members)
        mine_events = [e for e in events[:cut] if e.customer_id == cid]
        for x in xs:
            assert x.horizon is None
            # Each condition that reads no membership, as its text alone means to the
            # reference: the same value, kept until just before its next_change, where it flips.
            start = to_instant(datetime.fromisoformat(x.evaluated_at))
            for root in (x.rule, x.exit):
                for cond in walk(root) if root is not None else ():
                    if "in_segment" in cond.text:
                        continue
                    ref = Compiler(set(spec_names(spec)), set(spec.lists)).rule(cond.text)
                    cx = Cx(spec, cid, mine_events, {}, start)
                    assert ref.test(cx) == cond.value, (cid, cond.text)
                    if cond.next_change is not None:
                        flip = to_instant(datetime.fromisoformat(cond.next_change))
                        for t in (flip - 1, (start + flip) // 2):
                            assert ref.test(cx.at(t)) == cond.value, (cid, cond.text, t)
                        assert ref.test(cx.at(flip)) != cond.value, (cid, cond.text, flip)
            mine = [
                to_instant(t.at) for t in rest if (t.customer_id, t.segment) == (cid, x.segment)
            ]
            assert x.next_change == (at(mine[0]) if mine else None), (cid, x.segment, x.reason)


def spec_names(spec: Any) -> list[str]:
    return [seg.name for seg in spec.segments]
