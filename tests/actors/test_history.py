"""actors.membership_intervals and memberships_at: a customer's stays in its segments."""

from __future__ import annotations

from datetime import datetime

import pytest

from actors import Interval, membership_intervals, memberships_at
from protocol import (
    Cause,
    DefinitionCause,
    EventCause,
    TimeCause,
    Transition,
    from_instant,
    parse_timestamp,
)


def at(text: str) -> datetime:
    return from_instant(parse_timestamp(text))


def tr(
    version: int, segment: str, change: str, when: str, cause: Cause, customer: str = "alice"
) -> Transition:
    return Transition(
        customer_id=customer,
        segment=segment,
        change=change,  # type: ignore[arg-type]
        at=at(when),
        cause=cause,
        version=version,
    )


# Alice: in `new` from her first visit until 30 days later; `lapsed` twice, the second time
# still; `vip` from a change of definitions. Bob enters `new`.
HISTORY = [
    tr(1, "new", "entered", "2026-01-01T10:00:00Z", EventCause(message_id="v1")),
    tr(2, "lapsed", "entered", "2026-01-15T10:00:00Z", TimeCause()),
    tr(1, "new", "entered", "2026-01-03T00:00:00Z", EventCause(message_id="b1"), "bob"),
    tr(3, "lapsed", "exited", "2026-01-20T08:30:00.5Z", EventCause(message_id="v2")),
    tr(4, "new", "exited", "2026-01-31T10:00:00Z", TimeCause()),
    tr(5, "vip", "entered", "2026-02-01T00:00:00Z", DefinitionCause()),
    tr(6, "lapsed", "entered", "2026-02-03T08:30:00.5Z", TimeCause()),
]


def stay(
    segment: str,
    entered: str,
    by: Cause,
    version: int,
    exited: str | None = None,
    exited_by: Cause | None = None,
    exited_version: int | None = None,
    customer: str = "alice",
) -> Interval:
    return Interval(
        customer_id=customer,
        segment=segment,
        entered_at=at(entered),
        entered_by=by,
        entered_version=version,
        exited_at=None if exited is None else at(exited),
        exited_by=exited_by,
        exited_version=exited_version,
    )


ALICE = [
    stay(
        "lapsed",
        "2026-01-15T10:00:00Z",
        TimeCause(),
        2,
        "2026-01-20T08:30:00.5Z",
        EventCause(message_id="v2"),
        3,
    ),
    stay("lapsed", "2026-02-03T08:30:00.5Z", TimeCause(), 6),
    stay(
        "new",
        "2026-01-01T10:00:00Z",
        EventCause(message_id="v1"),
        1,
        "2026-01-31T10:00:00Z",
        TimeCause(),
        4,
    ),
    stay("vip", "2026-02-01T00:00:00Z", DefinitionCause(), 5),
]


# --- the pure functions ------------------------------------------------------------------------


def test_intervals_per_customer_and_segment_in_any_input_order() -> None:
    intervals = membership_intervals(reversed(HISTORY))
    assert intervals == [
        *ALICE,
        stay("new", "2026-01-03T00:00:00Z", EventCause(message_id="b1"), 1, customer="bob"),
    ]
    assert membership_intervals([]) == []


@pytest.mark.parametrize(
    ("history", "problem"),
    [
        (
            [HISTORY[0], tr(2, "new", "entered", "2026-01-02T00:00:00Z", TimeCause())],
            "customer 'alice' enters 'new' at version 2 but is in it since version 1",
        ),
        (
            [HISTORY[0], tr(2, "lapsed", "exited", "2026-01-02T00:00:00Z", TimeCause())],
            "customer 'alice' leaves 'lapsed' at version 2 but is not in it",
        ),
    ],
)
def test_an_inconsistent_history_is_refused(history: list[Transition], problem: str) -> None:
    with pytest.raises(ValueError) as e:
        membership_intervals(history)
    assert str(e.value) == problem


def test_was_alice_in_the_segment_at_an_instant() -> None:
    intervals = membership_intervals(HISTORY)

    def members(when: str) -> dict[str, bool]:
        answers = memberships_at(intervals, at(when))
        return {m.segment: m.member for m in answers if m.customer_id == "alice"}

    # In from the instant of entry, out from the instant of exit.
    assert members("2026-01-01T09:59:59.999999Z") == {"new": False, "lapsed": False, "vip": False}
    assert members("2026-01-01T10:00:00Z") == {"new": True, "lapsed": False, "vip": False}
    assert members("2026-01-20T08:30:00.499999Z") == {"new": True, "lapsed": True, "vip": False}
    assert members("2026-01-20T08:30:00.5Z") == {"new": True, "lapsed": False, "vip": False}
    assert members("2026-01-31T10:00:00Z") == {"new": False, "lapsed": False, "vip": False}
    assert members("2030-01-01T00:00:00+09:00") == {"new": False, "lapsed": True, "vip": True}
    answers = memberships_at(intervals, at("2026-01-16T00:00:00Z"))
    assert [(m.customer_id, m.segment, m.member) for m in answers] == [
        ("alice", "lapsed", True),
        ("alice", "new", True),
        ("alice", "vip", False),
        ("bob", "new", True),
    ]
    assert [m.interval for m in answers[:3]] == [ALICE[0], ALICE[2], None]
