"""The shipped segments file does what its descriptions say (through actors.replay)."""

from __future__ import annotations

from typing import Any

from actors import load_segments, replay
from protocol import DAY, HOUR, Event, to_instant

DEFAULT = load_segments()
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, a Thursday


def track(c: str, name: str, at: int, **props: Any) -> Event:
    return Event(
        kind="track", customer_id=c, name=name, properties=props, traits={}, at=at,
        received=at, message_id=f"{c}:{name}:{at}",
    )  # fmt: skip


def identify(c: str, at: int, **traits: Any) -> Event:
    return Event(
        kind="identify", customer_id=c, name=None, properties={}, traits=traits, at=at,
        received=at, message_id=f"{c}:identify:{at}",
    )  # fmt: skip


def timeline(events: list[Event], until: int, segment: str) -> list[tuple[str, float]]:
    """(change, day since T0) of one segment's transitions."""
    return [
        (t.change, (to_instant(t.at) - T0) / DAY)
        for t in replay(events, DEFAULT, until=until)
        if t.segment == segment
    ]


def test_new_customer_for_30_days() -> None:
    assert timeline([track("a", "Visit", T0)], T0 + 40 * DAY, "new_customer") == [
        ("entered", 0),
        ("exited", 30),
    ]


def test_inactive_14_30_60_and_churned() -> None:
    events = [track("a", "Email Opened", T0)]
    for segment, days in (
        ("inactive_14d", 14), ("inactive_30d", 30), ("inactive_60d", 60), ("churned", 90),
    ):  # fmt: skip
        assert timeline(events, T0 + 100 * DAY, segment) == [("entered", days)]


def test_engagement_dropped_after_a_busy_week_then_silence() -> None:
    events = [track("a", "Visit", T0 + i * HOUR) for i in range(6)]
    got = timeline(events, T0 + 30 * DAY, "engagement_dropped")
    # A silent week keeps 2 ** (-7/14) = 71% of the score, under the 75% threshold; it holds
    # once all six visits are inside score_at('7d'): 7 days after the last, at 7 d + 5 h.
    assert got[0] == ("entered", 7 + 5 / 24)


def test_renewal_due_for_the_14_days_before_the_date() -> None:
    events = [identify("a", T0, renewal_date="2026-01-31")]
    assert timeline(events, T0 + 40 * DAY, "renewal_due") == [
        ("entered", 16),
        ("exited", 30 + 1 / (DAY)),  # the microsecond after the renewal instant
    ]


def test_opens_no_clicks_until_a_click() -> None:
    events = [track("a", "Email Opened", T0), track("a", "Email Link Clicked", T0 + 5 * DAY)]
    assert timeline(events, T0 + 10 * DAY, "opens_no_clicks") == [
        ("entered", 0),
        ("exited", 5),
    ]


def test_at_risk_with_hysteresis_and_dwell() -> None:
    events = [track("a", "Visit", T0 + i * 3 * DAY) for i in range(31)]  # 0 .. 90 days
    events.append(track("a", "Visit", T0 + 130 * DAY))  # back once: not enough to leave
    events += [track("a", "Visit", T0 + 131 * DAY + i * HOUR) for i in range(3)]
    got = timeline(events, T0 + 140 * DAY, "at_risk")
    # Last regular visits at 87 and 90 days: fewer than 2 in 30 days from 117 days on; out
    # at the third visit within 14 days (130 d, 131 d, 131 d + 1 h).
    assert got == [("entered", 117), ("exited", 131 + 1 / 24)]


def test_weekend_only_in_the_customers_time_zone() -> None:
    sat = T0 + 2 * DAY  # 2026-01-03 is a Saturday
    events = [identify("a", T0, timezone="America/New_York")]
    events += [track("a", "Visit", sat + w * 7 * DAY + 15 * HOUR) for w in range(3)]
    assert timeline(events, sat + 20 * DAY, "weekend_only")[0] == ("entered", 16 + 15 / 24)
    # 01:00 UTC on a Saturday is still Friday evening in New York.
    events = [identify("b", T0, timezone="America/New_York")]
    events += [track("b", "Visit", sat + w * 7 * DAY + 1 * HOUR) for w in range(3)]
    assert timeline(events, sat + 20 * DAY, "weekend_only") == []


def test_one_time_buyer_until_a_second_order() -> None:
    events = [
        track("a", "Order Completed", T0, revenue=30),
        track("a", "Order Completed", T0 + 45 * DAY, revenue=20),
    ]
    assert timeline(events, T0 + 60 * DAY, "one_time_buyer") == [
        ("entered", 30),
        ("exited", 45),
    ]


def test_loyal_stays_until_visits_fall_below_4() -> None:
    events = [track("a", "Visit", T0 + i * DAY) for i in range(8)]
    # In at the 8th visit (day 7); out when fewer than 4 of them are within 30 days: the
    # 5th visit (day 4) leaves the window at day 34.
    assert timeline(events, T0 + 60 * DAY, "loyal") == [("entered", 7), ("exited", 34)]
