"""Stores built directly, without an engine: template customers made by really applying
events (``Customer.apply`` under the default segments), cloned into snapshots as the engine
writes them.

A fresh engine started on such a store loads every customer from its snapshot in deadline
order, exactly as after a clean stop. ``build_store`` makes the stores of the suite
(snapshots only, an empty event log); ``restart``'s store also has each clone's events and
transitions (``_restart_store``).
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from actors import Customer, Replay, SegmentSet, load_segments, snapshot_row
from actors.population import generate
from protocol import DAY, Event, Transition, format_instant
from store import SnapshotMarks, Store

from ._common import now_us

PART = 50_000
"""Snapshots per transaction while building a store (the engine's part at a clean stop)."""

TIMEZONES = (
    "Europe/London",
    "Europe/Paris",
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Australia/Sydney",
    "Asia/Tokyo",
)
PLANS = ("basic", "premium", "family", "student")


@dataclass(slots=True)
class Template:
    """One customer built by really applying events; clones copy it."""

    events: list[Event]
    transitions: list[Transition]
    body: bytes
    """Its snapshot."""
    deadline: int | None


def template_events(rng: random.Random, cut: int) -> list[Event]:
    """A customer's timeline in [now-90d, cut), in instant order."""
    first = cut - rng.randrange(DAY, 90 * DAY)
    last = rng.randrange(first + 1, cut)
    renewal = dt.datetime.fromtimestamp(cut / 1e6, dt.UTC) + dt.timedelta(days=rng.uniform(-10, 60))
    out: list[tuple[int, str | None, dict[str, Any], dict[str, Any]]] = [
        (
            first,
            None,
            {},
            {
                "plan": rng.choice(PLANS),
                "renewal_date": renewal.date().isoformat(),
                "timezone": rng.choice(TIMEZONES),
            },
        ),
        (first, "Visit", {"location": f"site-{rng.randrange(12)}"}, {}),
    ]
    for _ in range(rng.randint(0, 2)):
        out.append(
            (rng.randrange(first, last), "Visit", {"location": f"site-{rng.randrange(12)}"}, {})
        )
    if last > first + 1:
        out.append((last, "Visit", {"location": f"site-{rng.randrange(12)}"}, {}))
    if rng.random() < 0.7:
        out.append(
            (
                rng.randrange(first, last + 1),
                "Email Opened",
                {"campaign": f"news-{rng.randrange(30)}"},
                {},
            )
        )
    if rng.random() < 0.4:
        revenue = round(rng.uniform(9, 250), 2)
        out.append(
            (
                rng.randrange(first, last + 1),
                "Order Completed",
                {"revenue": revenue, "currency": "EUR"},
                {},
            )
        )
    out.sort(key=lambda x: x[0])
    return [
        Event(
            kind="track" if name is not None else "identify",
            customer_id="t",
            name=name,
            properties=props,
            traits=traits,
            at=at,
            received=at,
            message_id=str(k),
        )
        for k, (at, name, props, traits) in enumerate(out)
    ]


def template_of(events: list[Event], segments: SegmentSet, cut: int) -> Template:
    """The template of a customer whose events (all of its id) are ``events``: applied, then
    advanced to ``cut`` as a running engine would have."""
    c = Customer(events[0].customer_id)
    transitions: list[Transition] = []
    for e in events:
        transitions += c.apply(e, segments)
    transitions += c.advance(cut, segments)
    return Template(events, transitions, c.snapshot(outcomes=True), c.deadline)


def make_templates(k: int, segments: SegmentSet, cut: int) -> tuple[list[Template], float, int]:
    """K templates (``random.Random(42)``) of ``template_events``, at ``cut``.

    Returns them, the seconds it took and how many events were applied.
    """
    rng = random.Random(42)
    out: list[Template] = []
    t0 = time.perf_counter()
    for j in range(k):
        events = [
            msgspec.structs.replace(e, customer_id=f"t{j}") for e in template_events(rng, cut)
        ]
        out.append(template_of(events, segments, cut))
    return out, time.perf_counter() - t0, sum(len(t.events) for t in out)


def bare_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """K customers whose only event is an ``identify`` (plan, renewal date, time zone) in
    the 90 days before ``cut``: actors with traits and memberships but no event windows."""
    rng = random.Random(43)
    out = []
    for j in range(k):
        at = cut - rng.randrange(DAY, 90 * DAY)
        renewal = (at + rng.randrange(DAY, 120 * DAY)) // DAY * DAY
        e = Event(
            kind="identify",
            customer_id=f"t{j}",
            name=None,
            properties={},
            traits={
                "plan": rng.choice(("monthly", "annual", "premium")),
                "renewal_date": format_instant(renewal)[:10],
                "timezone": rng.choice(("Europe/London", "Europe/Paris", "America/New_York")),
            },
            at=at,
            received=at,
            message_id="0",
        )
        out.append(template_of([e], segments, cut))
    return out


def due_template(due: int, segments: SegmentSet, cut: int) -> Template:
    """A customer whose one ``Visit`` was 14 days before ``due``: its next deadline is
    ``due`` (``inactive_14d`` enters then), and nothing else changes before it."""
    at = due - 14 * DAY
    e = Event(
        kind="track",
        customer_id="t",
        name="Visit",
        properties={"club": "north"},
        traits={},
        at=at,
        received=at,
        message_id="0",
    )
    t = template_of([e], segments, cut)
    if t.deadline != due:
        raise RuntimeError(f"template deadline {t.deadline}, expected {due}")
    return t


def history_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """K customers of a generated history (``actors.population``) of the 120 days up to
    ``cut`` (about 33 events each), replayed to ``cut``: actors with realistic event
    windows."""
    r = Replay(segments)
    ids: set[str] = set()
    for e in generate(k, 120, seed=5, start=cut - 120 * DAY):
        r.apply(e)
        ids.add(e.customer_id)
    r.advance(cut)
    out = []
    for cid in sorted(ids):
        c = r.customer(cid)
        assert c is not None
        out.append(Template([], [], c.snapshot(outcomes=True), c.deadline))
    return out


def typical_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """``make_templates``' templates (``restart``'s): an identify and 1 to 6 track events over
    the last 1 to 90 days, advanced to ``cut`` (deadlines spread over the coming weeks)."""
    return make_templates(k, segments, cut)[0]


async def write_clones(
    log: Store, segments: SegmentSet, templates: Sequence[Template], ids: range
) -> float:
    """Snapshot customers ``c<i>`` for i in ``ids``, customer i a clone of template
    ``i % len(templates)``; returns seconds."""
    t0 = time.perf_counter()
    needs = segments.needs.fingerprint()
    # Each template's row is made once, by the stored-forms codec; a clone differs only in id.
    bases = [
        snapshot_row(Customer.from_snapshot("c", t.body), needs=needs, log_seq=0) for t in templates
    ]
    k = len(templates)
    for start in range(ids.start, ids.stop, PART):
        rows = []
        for i in range(start, min(ids.stop, start + PART)):
            rows.append(msgspec.structs.replace(bases[i % k], customer_id=f"c{i}"))
        await log.commit([], [], snapshots=rows)
    return time.perf_counter() - t0


def round_marks(log: Store, segments: SegmentSet) -> SnapshotMarks:
    """The marks of a complete snapshot round, at the log's end, under ``segments``."""
    return SnapshotMarks(
        events_through=log.events.last_seq,
        outbox_through=log.outbox.last_seq,
        definitions=segments.fingerprint,
        needs=segments.needs.fingerprint(),
    )


async def finish_store(log: Store, segments: SegmentSet) -> None:
    """Record the round's marks: every customer has a snapshot under these definitions."""
    await log.commit([], [], marks=round_marks(log, segments))


async def build_store(db: Path, customers: int, population: str = "typical") -> dict[str, Any]:
    """A store of ``customers`` clones of 2,000 templates (``typical``, ``bare`` or
    ``history``)."""
    segments = load_segments()
    cut = now_us()
    t0 = time.perf_counter()
    k = min(2_000, customers)
    make = {"typical": typical_templates, "bare": bare_templates, "history": history_templates}
    templates = make[population](k, segments, cut)
    log = await Store.open(db)
    try:
        await write_clones(log, segments, templates, range(customers))
        await finish_store(log, segments)
    finally:
        await log.close()
    return {"population": population, "customers": customers, "build_s": time.perf_counter() - t0}
