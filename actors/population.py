"""The population model: a synthetic, reproducible gym or club, as Segment Spec events.

Each customer joins on some day (a third in the first two weeks, the rest spread over the
period), says who it is with an ``identify`` (``plan``, ``renewal_date``, usually
``timezone`` and ``email``), and from then on:

- visits (``Visit``, property ``club``) on its preferred weekdays at its preferred local
  hour, with a weekly rhythm: a few customers only come at weekends, and now and then one
  drops in on another day;
- opens (``Email Opened``) and clicks (``Email Link Clicked``) the newsletter sent every
  Tuesday at 10:00 UTC and the promotion sent every other Friday at 15:00 UTC, hours after
  they are sent;
- buys (``Order Completed``, properties ``revenue`` and ``product``) now and then;
- renews its plan on its renewal date (an ``identify`` with the next ``renewal_date``), or
  lets it lapse and stops coming.

Engagement changes over time: most customers are steady, some slowly disengage (their visit,
open and purchase rates decay exponentially from some day on), some drop out at once (and a
few come back). Visits are sometimes received late (an offline check-in synced up to 6 hours
later): such an event's ``timestamp`` is before its ``receivedAt``.

Events come in receive order (ties in the order they were made), and the same arguments
always give the same events. Local hours ignore daylight saving time (each time zone is taken
at its standard offset); the engine, which reads weekdays in the customer's time zone, does
not.

:func:`generate` yields :class:`protocol.Event` s, :func:`to_segment_spec` turns one into a
Segment Spec dict (with ``timestamp`` and ``receivedAt``), :func:`from_segment_spec` reads one
back, and :func:`write_history` writes them as JSON lines. ``shoal generate`` is its command::

    shoal generate --customers 5000 --days 240 --seed 1 > history.jsonl
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import msgspec

from protocol import DAY, HOUR, MINUTE, SECOND, Event, format_instant, parse_timestamp, to_instant

__all__ = (
    "DEFAULT_START",
    "from_segment_spec",
    "generate",
    "history_end",
    "to_segment_spec",
    "write_history",
)

DEFAULT_START = to_instant(datetime(2025, 1, 6, tzinfo=UTC))
"""2025-01-06T00:00:00Z, a Monday: the first day of a generated history by default."""

WEEK = 7 * DAY
_EMPTY: dict[str, Any] = {}  # shared by every event without properties or traits: read only

# (IANA name, standard UTC offset in hours, weight); None: the customer gives no time zone.
_ZONES: tuple[tuple[str | None, int, int], ...] = (
    ("Europe/London", 0, 30),
    ("Europe/Paris", 1, 20),
    ("America/New_York", -5, 15),
    ("America/Los_Angeles", -8, 8),
    ("Australia/Sydney", 10, 7),
    (None, 0, 20),
)
# (plan, days between renewals, weight)
_PLANS: tuple[tuple[str, int, int], ...] = (
    ("monthly", 30, 55),
    ("annual", 365, 25),
    ("premium", 30, 20),
)
_CLUBS = ("north", "south", "central")
# Properties shared by many events (read only, like _EMPTY).
_ORDERS: tuple[dict[str, Any], ...] = tuple(
    {"revenue": revenue, "product": product}
    for product, revenue in (
        ("protein bar", 3.5),
        ("water bottle", 12.0),
        ("personal training", 45.0),
        ("towel", 9.75),
        ("class pack", 89.0),
    )
)
_CAMPAIGNS: dict[str, dict[str, Any]] = {c: {"campaign": c} for c in ("newsletter", "promotion")}
_VISITS_PER_WEEK = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5)
_VISIT_WEIGHTS = (8, 14, 14, 18, 14, 14, 10, 8)
_LATE_SHARE = 0.03
_LATE_MAX = 6 * HOUR


@dataclass(slots=True)
class _Profile:
    """How one customer behaves; drawn once, when it is created."""

    customer_id: str
    join: int
    zone: str | None
    offset: int  # standard UTC offset, microseconds
    plan: str
    period: int  # between renewals, microseconds
    props: dict[str, Any]  # of its visits (shared: read only)
    days: tuple[int, ...]  # preferred weekdays, 0 = Monday
    p_visit: float  # chance of a visit on each preferred day, at full engagement
    p_extra: float  # chance of one more visit on another day, per week
    hour: int  # preferred local hour
    p_open: float
    p_click: float  # given an open
    orders_per_week: float
    kind: str  # "steady", "fading" or "dropout"
    change_at: int  # when fading or dropping out starts
    tau: int  # fading: the e-folding time of engagement
    back_at: int | None  # dropout: when it comes back, if it does
    next_renewal: int
    lapsed_at: int | None = None
    unsubscribed: bool = False
    sent: int = 0  # events made so far, for message ids

    def engagement(self, t: int) -> float:
        if self.lapsed_at is not None and t >= self.lapsed_at:
            return 0.0
        if t < self.change_at:
            return 1.0
        if self.kind == "fading":
            return math.exp(-(t - self.change_at) / self.tau)
        if self.kind == "dropout":
            return 0.7 if self.back_at is not None and t >= self.back_at else 0.0
        return 1.0


def _weighted(rng: random.Random, options: tuple[Any, ...], weights: tuple[int, ...]) -> Any:
    return rng.choices(options, weights)[0]


def _profile(rng: random.Random, i: int, start: int, days: int, width: int) -> _Profile:
    if rng.random() < 1 / 3:
        join = start + rng.randrange(14 * DAY)
    else:
        join = start + rng.randrange(days * DAY)
    zone, offset_h, _ = _weighted(rng, _ZONES, tuple(z[2] for z in _ZONES))
    plan, period_days, _ = _weighted(rng, _PLANS, tuple(p[2] for p in _PLANS))
    per_week = float(_weighted(rng, _VISITS_PER_WEEK, _VISIT_WEIGHTS))
    preferred: tuple[int, ...]
    if rng.random() < 0.12:
        preferred = (5, 6) if per_week >= 1.5 else (rng.choice((5, 6)),)
        per_week = min(per_week, 2.0)
    else:
        k = max(1, min(7, math.ceil(per_week)))
        # Weekdays are busier than weekends.
        pool = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6]
        chosen: set[int] = set()
        while len(chosen) < k:
            chosen.add(rng.choice(pool))
        preferred = tuple(sorted(chosen))
    roll = rng.random()
    kind = "steady" if roll < 0.55 else ("fading" if roll < 0.85 else "dropout")
    change_at = join + rng.randrange(21 * DAY, 300 * DAY)
    back_at = None
    if kind == "dropout" and rng.random() < 0.2:
        back_at = change_at + rng.randrange(30 * DAY, 120 * DAY)
    return _Profile(
        customer_id=f"c{i:0{width}d}",
        join=join,
        zone=zone,
        offset=offset_h * HOUR,
        plan=plan,
        period=period_days * DAY,
        props={"club": rng.choice(_CLUBS)},
        days=preferred,
        p_visit=min(1.0, per_week / len(preferred)),
        p_extra=rng.choice((0.0, 0.05, 0.15, 0.3)),
        hour=rng.choice((6, 7, 7, 8, 12, 12, 13, 17, 18, 18, 19, 20)),
        p_open=rng.choice((0.1, 0.25, 0.4, 0.6)),
        p_click=rng.choice((0.0, 0.05, 0.15, 0.3)),
        orders_per_week=rng.choice((0.0, 0.0, 0.01, 0.05, 0.15)),
        kind=kind,
        change_at=change_at,
        tau=rng.randrange(14, 120) * DAY,
        back_at=back_at,
        next_renewal=join + period_days * DAY,
    )


def _date_text(instant: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=instant)).strftime("%Y-%m-%d")


class _Week:
    """The events made for one week, before they are put in receive order."""

    __slots__ = ("heap", "seq", "end")

    def __init__(self, heap: list[tuple[int, int, Event]], seq: int, end: int) -> None:
        self.heap, self.seq, self.end = heap, seq, end

    def add(
        self,
        p: _Profile,
        at: int,
        kind: str,
        name: str | None,
        properties: dict[str, Any],
        traits: dict[str, Any],
        received: int | None = None,
    ) -> None:
        rec = at if received is None else received
        if rec >= self.end:
            return
        p.sent += 1
        event = Event(
            kind=kind,  # type: ignore[arg-type]
            customer_id=p.customer_id,
            name=name,
            properties=properties,
            traits=traits,
            at=at,
            received=rec,
            message_id=f"{p.customer_id}-{p.sent}",
        )
        self.seq += 1
        heapq.heappush(self.heap, (rec, self.seq, event))


def _week_of(p: _Profile, rng: random.Random, week: int, w: _Week, end: int) -> None:
    """Add customer ``p``'s events of the week starting at ``week``."""
    week_end = week + WEEK
    if p.join >= week_end:
        return
    if week <= p.join:
        traits: dict[str, Any] = {
            "plan": p.plan,
            "renewal_date": _date_text(p.next_renewal),
        }
        if p.zone is not None:
            traits["timezone"] = p.zone
        if rng.random() < 0.9:
            traits["email"] = f"{p.customer_id}@example.com"
        w.add(p, p.join, "identify", None, _EMPTY, traits)
    eng = p.engagement(week + WEEK // 2)
    lo = max(p.join, week)
    # Visits on the preferred weekdays, at the preferred local hour.
    for day in p.days:
        if rng.random() < p.p_visit * eng:
            local = week + day * DAY + p.hour * HOUR + rng.randrange(-30, 60) * MINUTE
            _visit(p, rng, w, local - p.offset, lo, end)
    if p.p_extra and rng.random() < p.p_extra * eng:
        local = week + rng.randrange(7) * DAY + rng.randrange(6, 21) * HOUR
        _visit(p, rng, w, local - p.offset + rng.randrange(HOUR), lo, end)
    # The newsletter (Tuesday 10:00 UTC) and, every other week, a promotion (Friday 15:00).
    sends = [("newsletter", week + DAY + 10 * HOUR)]
    if (week // WEEK) % 2 == 0:
        sends.append(("promotion", week + 4 * DAY + 15 * HOUR))
    for campaign, sent in sends:
        if sent < p.join or p.unsubscribed or sent >= end:
            continue
        if rng.random() < 0.002:
            p.unsubscribed = True
            continue
        if rng.random() < p.p_open * (0.2 + 0.8 * eng):
            delay = min(int(rng.expovariate(1 / (4 * HOUR))), 3 * DAY) + SECOND
            opened = sent + delay
            tag = _CAMPAIGNS[campaign]
            w.add(p, opened, "track", "Email Opened", tag, _EMPTY)
            if rng.random() < p.p_click * (0.3 + 0.7 * eng):
                clicked = opened + rng.randrange(10 * SECOND, 10 * MINUTE)
                w.add(p, clicked, "track", "Email Link Clicked", tag, _EMPTY)
    # Purchases.
    if p.orders_per_week and rng.random() < p.orders_per_week * (0.2 + 0.8 * eng):
        at = week + rng.randrange(WEEK)
        if lo <= at < end:
            w.add(p, at, "track", "Order Completed", rng.choice(_ORDERS), _EMPTY)
    # Renewal: the plan goes on (an identify with the next date) or lapses.
    if p.lapsed_at is None and week <= p.next_renewal < week_end:
        due = p.next_renewal
        if rng.random() < 0.6 + 0.38 * p.engagement(due):
            p.next_renewal = due + p.period
            at = due + rng.randrange(HOUR, 8 * HOUR)
            if at < end:
                w.add(
                    p,
                    at,
                    "identify",
                    None,
                    _EMPTY,
                    {"plan": p.plan, "renewal_date": _date_text(p.next_renewal)},
                )
        else:
            p.lapsed_at = due


def _visit(
    p: _Profile,
    rng: random.Random,
    w: _Week,
    at: int,
    lo: int,
    end: int,
) -> None:
    if not lo <= at < end:
        return
    received = None
    if rng.random() < _LATE_SHARE:
        received = at + rng.randrange(MINUTE, _LATE_MAX)
    w.add(p, at, "track", "Visit", p.props, _EMPTY, received)


def generate(
    customers: int, days: int, seed: int = 0, *, start: int = DEFAULT_START
) -> Iterator[Event]:
    """The events of ``customers`` customers over ``days`` days from ``start``, in receive
    order. Customer ids are ``c`` and a zero-padded number; message ids ``<customer>-<n>``.

    The same arguments always give the same events. Every event is received before
    ``start + days`` days, and none is stamped after its receive instant.

    Raises:
        ValueError: ``customers`` or ``days`` is not positive.
    """
    if customers <= 0 or days <= 0:
        raise ValueError("customers and days must be positive")
    rng = random.Random(seed)
    width = len(str(customers - 1))
    profiles = [_profile(rng, i, start, days, width) for i in range(customers)]
    profiles.sort(key=lambda p: p.join)
    end = start + days * DAY
    heap: list[tuple[int, int, Event]] = []
    w = _Week(heap, 0, end)
    joined = 0
    week = start
    while week < end:
        while joined < len(profiles) and profiles[joined].join < week + WEEK:
            joined += 1
        for p in profiles[:joined]:
            _week_of(p, rng, week, w, end)
        week += WEEK
        # Whatever the following weeks add is stamped, so received, at or after their start.
        while heap and heap[0][0] < week:
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]


def history_end(days: int, *, start: int = DEFAULT_START) -> int:
    """The instant a history of ``days`` days from ``start`` ends at (exclusive)."""
    return start + days * DAY


def to_segment_spec(event: Event) -> dict[str, Any]:
    """The Segment Spec message of an event: ``timestamp`` is its instant and
    ``receivedAt`` its receive instant (RFC 3339, UTC)."""
    out: dict[str, Any] = {"type": event.kind, "userId": event.customer_id}
    if event.kind == "track":
        out["event"] = event.name
        out["properties"] = event.properties
    else:
        out["traits"] = event.traits
    out["timestamp"] = format_instant(event.at)
    out["receivedAt"] = format_instant(event.received)
    out["messageId"] = event.message_id
    return out


def from_segment_spec(message: Mapping[str, Any]) -> Event:
    """The event of a message :func:`to_segment_spec` wrote (``receivedAt`` required)."""
    track = message["type"] == "track"
    return Event(
        kind=message["type"],
        customer_id=message["userId"],
        name=message["event"] if track else None,
        properties=dict(message.get("properties") or {}) if track else {},
        traits={} if track else dict(message.get("traits") or {}),
        at=parse_timestamp(message["timestamp"]),
        received=parse_timestamp(message["receivedAt"]),
        message_id=message["messageId"],
    )


def write_history(events: Iterable[Event], out: IO[bytes]) -> int:
    """Write ``events`` to ``out`` as JSON lines (:func:`to_segment_spec`, one per line, each
    ended by a newline), as ``shoal generate`` does; returns how many.
    """
    encode = msgspec.json.Encoder().encode
    lines: list[bytes] = []
    n = 0
    for event in events:
        lines.append(encode(to_segment_spec(event)))
        if len(lines) >= 4096:
            out.write(b"\n".join(lines) + b"\n")
            n += len(lines)
            lines.clear()
    if lines:
        out.write(b"\n".join(lines) + b"\n")
        n += len(lines)
    out.flush()
    return n
