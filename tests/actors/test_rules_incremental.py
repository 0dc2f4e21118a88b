"""The fast paths of rule evaluation give exactly the answers of the plain ones.

- A rule is compiled to one function (``Rule.evaluator``); its node tree still evaluates it
  node by node (``_root.test``). On a customer (indexed facts: windows and scores read
  sorted instants, prefix sums and score estimates) and on the same facts without the
  indexes (windows and scores scan every event), all three agree on (value, next, until),
  at any instant: the event instants, the instants the rules name, one microsecond either
  side, and after.
- A customer keeps rules' answers and segments' outcomes between evaluations and looks
  again only where a fact they read changed or their time ran out. Step by step, its
  transitions, deadline and watermark equal those of a customer that evaluates everything
  afresh each time, on histories with late events and deadlines fired in between.
- Score comparisons right at the boundary of what estimates can settle (the constant equal
  to the exact score, or one float away) come out as the exact sums say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from actors import Customer, SegmentSet, parse_segments
from actors._customer import _DEFINITION
from actors.rules import Tracked
from protocol import DAY, HOUR, Event, Transition, to_instant

from .test_language_property import histories, segment_files

T0 = to_instant(datetime(2026, 3, 2, tzinfo=UTC))


class Plain:
    """A customer's facts through the Facts protocol alone: no indexes."""

    def __init__(self, c: Customer) -> None:
        self.c = c
        self.customer_id = c.customer_id

    def first_at(self) -> int | None:
        return self.c.first_at()

    def last_at(self, name: str | None) -> int | None:
        return self.c.last_at(name)

    def count(self, name: str | None) -> int:
        return self.c.count(name)

    def trait(self, key: str) -> Any:
        return self.c.trait(key)

    def tracked(self) -> Sequence[Tracked]:
        return self.c.tracked()

    def member(self, segment: str) -> bool:
        return self.c.member(segment)


def late(events: list[Event], delays: list[int]) -> list[Event]:
    """The events received ``delay`` hours after their instant, in receive order."""
    out = [
        Event(
            kind=e.kind,
            customer_id=e.customer_id,
            name=e.name,
            properties=e.properties,
            traits=e.traits,
            at=e.at,
            received=e.at + d * HOUR,
            message_id=e.message_id,
        )
        for e, d in zip(events, delays, strict=False)
    ]
    return sorted(out, key=lambda e: e.received)


def instants(segments: SegmentSet, c: Customer, events: list[Event]) -> set[int]:
    """Where answers change: event instants, the next instants rules give, +-1 us."""
    points = {e.at for e in events} | {c.watermark}
    for rule in segments.plan.rules:
        for t in list(points):
            _, nxt, until = rule.evaluator(c, t)
            points.update(x for x in (nxt, until) if x is not None)
    return {p + d for p in points for d in (-1, 0, 1)} | {max(points) + 90 * DAY}


def agree(segments: SegmentSet, c: Customer, t: int) -> None:
    for rule in segments.plan.rules:
        compiled = rule.evaluator(c, t)
        tree = rule._root.test(c, t)
        plain = rule._root.test(Plain(c), t)
        expected = (bool(plain[0]), plain[1], plain[2])
        assert compiled == expected, (rule.text, t - T0, compiled, expected)
        assert (bool(tree[0]), tree[1], tree[2]) == expected, (rule.text, t - T0, tree)


delays = st.lists(st.sampled_from([0, 0, 0, 1, 5, 30, 24 * 8]), max_size=16)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=segment_files(), history=histories(), lateness=delays)
def test_compiled_indexed_and_plain_agree(
    text: str, history: tuple[list[Event], int], lateness: list[int]
) -> None:
    segments = parse_segments(text)
    events = late(history[0], lateness + [0] * len(history[0]))
    note(text)
    customers: dict[str, Customer] = {}
    for e in events:
        c = customers.setdefault(e.customer_id, Customer(e.customer_id))
        c.apply(e, segments)
    for c in customers.values():
        mine = [e for e in events if e.customer_id == c.customer_id]
        for t in sorted(instants(segments, c, mine)):
            agree(segments, c, t)


def tracks(offsets: list[int], names: list[str]) -> list[Event]:
    """Track events of customer ``c`` at ``T0`` plus each offset (hours, in order), named in
    turn from ``names``."""
    return [
        Event(
            kind="track",
            customer_id="c",
            name=name,
            properties={},
            traits={},
            at=T0 + off * HOUR,
            received=T0 + off * HOUR,
            message_id=f"m{i}",
        )
        for i, (off, name) in enumerate(zip(sorted(offsets), names, strict=False))
    ]


def score_rules(a: str, b: str) -> SegmentSet:
    """Segments ``a`` and ``b`` of these rules, with a one-day half-life."""
    return parse_segments(
        '[score]\nhalf_life = "1d"\nweights = { "Visit" = 1.0, "Buy" = 0.3 }\n'
        f"[segments.a]\nrule = {a!r}\n[segments.b]\nrule = {b!r}\n"
    )


def scoring(threshold: float) -> SegmentSet:
    return score_rules(
        f"score() >= {threshold!r} or score_at('6h') > {threshold!r}",
        f"score() <= {threshold!r} and 0.5 * score_at('6h') < score()",
    )


@settings(max_examples=150, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 20 * 24), min_size=1, max_size=12),
    names=st.lists(st.sampled_from(["Visit", "Buy"]), min_size=12, max_size=12),
    probe=st.integers(0, 30 * 24),
    nudge=st.sampled_from([-1, 0, 1]),
)
def test_score_at_the_edge_of_the_estimates(
    offsets: list[int], names: list[str], probe: int, nudge: int
) -> None:
    events = tracks(offsets, names)
    # The threshold is the exact score at some instant, or the float next to it.
    t = T0 + probe * HOUR
    exact = 0.0
    for e in events:
        if e.at <= t:
            w = 1.0 if e.name == "Visit" else 0.3
            exact += w * 2.0 ** ((e.at - t) / DAY)
    threshold = exact if nudge == 0 else math.nextafter(exact, nudge * math.inf)
    segments = scoring(threshold)
    c = Customer("c")
    for e in events:
        c.apply(e, segments)
    for p in sorted(instants(segments, c, events) | {t - 1, t, t + 1}):
        agree(segments, c, p)


def replay_ops(
    c: Customer, segments: SegmentSet, ops: list[Event | int], fresh: bool, stored: bool = False
) -> list[tuple[list[Transition], int | None, int]]:
    out = []
    for op in ops:
        if fresh:  # forget every kept answer: evaluate everything afresh, as before caching
            c._untils = None
        if isinstance(op, int):
            got = c.advance(op, segments)
        else:
            got = c.advance(op.received - 1, segments)
            if fresh:
                c._untils = None
            got += c.apply(op, segments)
        out.append((got, c.deadline, c.watermark))
        if stored:  # stored as the engine stores it, and loaded: the kept answers go along
            c = Customer.from_snapshot(c.customer_id, c.snapshot(outcomes=True))
    return out


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, list[Event | int]]:
    text = draw(st.one_of(segment_files(), st.just(DEFAULT_TEXT)))
    events, end = draw(histories())
    events = late(events, draw(delays) + [0] * len(events))
    ops: list[Event | int] = []
    for e in events:
        ops.append(e)
        if draw(st.integers(0, 3)) == 0:
            ops.append(e.received + draw(st.integers(0, 20 * 24)) * HOUR)
    ops.append(max([end, *(e.received for e in events)]) + 100 * DAY)
    return text, ops


DEFAULT_TEXT = (resources.files("actors") / "default_segments.toml").read_text("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=operations())
def test_kept_answers_change_nothing(case: tuple[str, list[Event | int]]) -> None:
    text, ops = case
    segments = parse_segments(text)
    note(text)
    for customer_id in sorted({op.customer_id for op in ops if isinstance(op, Event)}):
        mine = [op for op in ops if isinstance(op, int) or op.customer_id == customer_id]
        kept = replay_ops(Customer(customer_id), segments, mine, fresh=False)
        afresh = replay_ops(Customer(customer_id), segments, mine, fresh=True)
        assert kept == afresh
        # Loaded after each step from a snapshot that holds the answers it kept.
        assert replay_ops(Customer(customer_id), segments, mine, False, stored=True) == afresh


def test_a_definition_cause_evaluates_everything_afresh() -> None:
    segments = parse_segments("[segments.a]\nrule = \"count('Visit', within='1d') >= 1\"\n")
    c = Customer("c")
    visit = Event(
        kind="track",
        customer_id="c",
        name="Visit",
        properties={},
        traits={},
        at=T0,
        received=T0,
        message_id="m",
    )
    assert [t.change for t in c.apply(visit, segments)] == ["entered"]
    # Memberships changed behind the customer's back (as a rebuild does): a definition
    # cause looks at every segment again.
    members = c.members
    assert isinstance(members, dict)
    members.clear()
    assert [t.change for t in c.evaluate(segments, _DEFINITION)] == ["entered"]


REPEATS = [
    "count('Visit') = 1 and not count('Visit') = 2",
    "count('Visit') >= 1 or count('Visit') > 3 or count() = 2",
    "count('Visit', within='2d') >= 2 and count('Visit', within='2d') < 4",
    "count('Visit', within='3d', days=['sat', 'sun']) = count('Visit', within='3d')"
    " and count('Visit', within='3d', days=['sat', 'sun']) >= 1",
    "sum('Visit', 'n', within='2d') > 1 and sum('Visit', 'n', within='2d') < 5",
]


@settings(max_examples=60, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 10 * 24), min_size=1, max_size=10),
    zone=st.sampled_from([None, "Europe/London", "Asia/Kolkata"]),
)
def test_a_window_used_twice_in_a_rule(offsets: list[int], zone: str | None) -> None:
    segments = parse_segments(
        "\n".join(f"[segments.s{i}]\nrule = {rule!r}" for i, rule in enumerate(REPEATS))
    )
    c = Customer("c")
    if zone is not None:
        c.apply(
            Event(
                kind="identify",
                customer_id="c",
                name=None,
                properties={},
                traits={"timezone": zone},
                at=T0,
                received=T0,
                message_id="tz",
            ),
            segments,
        )
    events = [
        Event(
            kind="track",
            customer_id="c",
            name="Visit",
            properties={"n": i},
            traits={},
            at=T0 + off * HOUR,
            received=T0 + off * HOUR,
            message_id=f"m{i}",
        )
        for i, off in enumerate(sorted(offsets))
    ]
    for e in events:
        c.apply(e, segments)
    for t in sorted(instants(segments, c, events)):
        agree(segments, c, t)


def _busy_week(visits: list[int]) -> tuple[SegmentSet, Customer, int]:
    """A customer with a visit at each of the given hours after T0, under the default
    segments' score comparisons, evaluated one hour after the last visit."""
    segments = parse_segments(
        '[score]\nhalf_life = "14d"\nweights = { "Visit" = 1.0 }\n'
        "[segments.dropped]\n"
        "rule = \"score() < 0.75 * score_at('7d')\"\n"
        "[segments.was_busy]\n"
        "rule = \"score_at('7d') >= 3\"\n"
    )
    c = Customer("c1")
    for i, h in enumerate(visits):
        c.apply(
            Event(
                kind="track",
                customer_id="c1",
                name="Visit",
                properties={},
                traits={},
                at=T0 + h * HOUR,
                received=T0 + h * HOUR,
                message_id=f"m{i}",
            ),
            segments,
        )
    return segments, c, T0 + (max(visits) + 1) * HOUR


@pytest.mark.parametrize(
    "visits",
    [
        [0, 24, 48, 72, 96, 120, 144],  # a visit a day for a week, then none
        [0, 30, 31, 100, 101, 102, 150, 200],
        [0, 168, 336],  # one a week: the score never drops by a quarter
    ],
)
def test_score_comparisons_next_is_the_flip_not_the_next_step(visits: list[int]) -> None:
    # A score_at('7d') moves by a step where each event enters it, a week after the
    # event. The next instant a score comparison gives is the one where its value flips
    # (or None if it never does without an event), however many steps come first: a
    # comparison at each step and one microsecond before each step agree with it.
    segments, c, now = _busy_week(visits)
    steps = sorted({T0 + h * HOUR + 7 * DAY for h in visits})
    for rule in segments.plan.rules:
        value, nxt, _ = rule.evaluator(c, now)
        plain = rule._root.test(Plain(c), now)
        assert (value, nxt) == (bool(plain[0]), plain[1]), rule.text
        for t in [s + d for s in steps for d in (-1, 0) if s + d > now]:
            if nxt is None or t < nxt:
                assert rule.evaluator(c, t)[0] == value, (rule.text, t - now)
        if nxt is not None:
            assert rule.evaluator(c, nxt - 1)[0] == value
            assert rule.evaluator(c, nxt)[0] != value, rule.text
    # The busy week's drop is found in one evaluation, past the steps in between.
    if visits[1] == 24:
        dropped = segments.plan.rules[0]
        _, nxt, _ = dropped.evaluator(c, now)
        assert nxt is not None and nxt > steps[1]


def dropping(k: float) -> SegmentSet:
    return score_rules(
        f"score() < {k!r} * score_at('1d')",
        f"score_at('1d') >= 0.5 and score() <= {k!r} * score_at('1d')",
    )


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 6 * 24), min_size=1, max_size=16),
    names=st.lists(st.sampled_from(["Visit", "Buy"]), min_size=16, max_size=16),
    probe=st.integers(0, 8 * 24),
    nudge=st.sampled_from([-1, 0, 1]),
)
def test_score_against_score_at_over_many_steps(
    offsets: list[int], names: list[str], probe: int, nudge: int
) -> None:
    """``score() < k * score_at(D)``: only the right side grows, step by step, after the
    last event; the first step that flips it is found by bisection (ScoreCompare's
    ``_first_step_up``). Many events within D, several at one instant (they enter together),
    and ``k`` the exact ratio at some instant, or a float either side of it."""
    events = tracks(offsets, names)
    t = T0 + probe * HOUR
    now_sum = past = 0.0
    for e in events:
        w = 1.0 if e.name == "Visit" else 0.3
        if e.at <= t:
            now_sum += w * 2.0 ** ((e.at - t) / DAY)
        if e.at <= t - DAY:
            past += w * 2.0 ** ((e.at - t + DAY) / DAY)
    k = now_sum / past if past else 0.75
    if nudge:
        k = math.nextafter(k, nudge * math.inf)
    segments = dropping(k)
    c = Customer("c")
    for e in events:
        c.apply(e, segments)
    for p in sorted(instants(segments, c, events) | {t - 1, t, t + 1}):
        agree(segments, c, p)
