"""Snapshots: a snapshot plus the log tail gives exactly the state a full replay gives.

Two levels, both over random histories (hypothesis):

- the actor: replaying all events from scratch, and replaying them up to a point, snapshotting
  (through bytes), restoring and replaying the rest, give equal actors and equal transitions,
  field by field, whatever the point;
- the store and the engine's recovery: a history written to a real SQLite store as the engine
  writes it (events and transitions per batch, rounds of snapshots, some cut short as by a
  crash) and recovered with snapshots, without them, and after a snapshot format change or
  with corrupt snapshots, gives every customer the facts, memberships and version it had,
  and from then on the same transitions at the same instants.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actors._stored
from actors import (
    Customer,
    Engine,
    EngineConfig,
    SystemClock,
    VirtualClock,
    logged_event,
    outbox_entries,
    parse_segments,
    snapshot_row,
)
from actors._customer import SNAPSHOT_FORMAT, SnapshotError
from protocol import DAY, HOUR, SECOND, Event, TimeCause, Transition, format_instant, to_instant
from protocol.nats import connect, jetstream_ports
from store import LoggedEvent, SnapshotMarks, Store
from tests.helpers import Collector, NatsServer, collect, eventually, running_engine

T0 = to_instant(datetime(2026, 1, 1, tzinfo=UTC))

# The shipped defaults cover windows, scores, exit rules with a dwell, weekdays in a time zone
# and trait dates; two more add a reference and a property sum.
SEGMENTS = parse_segments(
    (resources.files("actors") / "default_segments.toml").read_text(encoding="utf-8")
    + """
[segments.gold_at_risk]
rule = "in_segment('at_risk') and trait('plan') == 'gold'"

[segments.big_spender]
rule = "sum('Order Completed', 'amount', within='30d') >= 100"
""",
    source="snapshots.toml",
)
SLOTS = [s for s in Customer.__slots__ if s != "customer_id"]


def state(c: Customer) -> dict[str, Any]:
    return {slot: getattr(c, slot) for slot in SLOTS}


def facts(c: Customer) -> dict[str, Any]:
    """Everything but the watermark and the deadline, which a rebuild from the log alone
    cannot know when deadlines fired without changing anything after the last event."""
    return {k: v for k, v in state(c).items() if k not in ("watermark", "deadline")}


# Histories ---------------------------------------------------------------------------------


@st.composite
def events(draw: st.DrawFn, customers: tuple[str, ...] = ("ann",)) -> list[Event]:
    """Events in receive order; their instants mostly follow, some are stamped in the past."""
    out: list[Event] = []
    received = T0
    for i in range(draw(st.integers(1, 25))):
        received += draw(st.integers(1, 40 * DAY // HOUR)) * HOUR
        late = draw(st.sampled_from([0, 0, 0, 0, 1, 3 * DAY // HOUR, 20 * DAY // HOUR]))
        at = received - late * HOUR
        customer = draw(st.sampled_from(customers))
        if draw(st.integers(0, 5)) == 0:
            traits = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "plan": st.sampled_from(["gold", "basic", None]),
                        "renewal_date": st.sampled_from(["2026-02-01", "2026-03-15", "x"]),
                        "timezone": st.sampled_from(["Europe/Paris", "America/New_York"]),
                    },
                )
            )
            kind, name, props = "identify", None, {}
        else:
            traits = {}
            kind = "track"
            name = draw(
                st.sampled_from(
                    ["Visit", "Visit", "Visit", "Order Completed", "Email Opened", "Other"]
                )
            )
            props = {"amount": draw(st.integers(0, 150))} if name == "Order Completed" else {}
        out.append(
            Event(
                kind=kind,  # type: ignore[arg-type]
                customer_id=customer,
                name=name,
                properties=props,
                traits=traits,
                at=at,
                received=received,
                message_id=f"m{i}",
            )
        )
    return out


# The actor ---------------------------------------------------------------------------------


Op = Event | int
"""An event to apply, or an instant to run the clock on to (deadlines up to it fire)."""


def run(c: Customer, ops: list[Op]) -> list[Transition]:
    """Apply events as the live engine does (deadlines before each event's receive instant
    first), and run the clock on where told."""
    out: list[Transition] = []
    for op in ops:
        if isinstance(op, int):
            out += c.advance(op, SEGMENTS)
        else:
            out += c.advance(op.received - 1, SEGMENTS)
            out += c.apply(op, SEGMENTS)
    return out


@st.composite
def operations(draw: st.DrawFn) -> list[Op]:
    """Events, with the clock run on between some of them (the engine fires deadlines when
    they fall due, not only when the next event comes), and at the end."""
    history = draw(events())
    ops: list[Op] = []
    for e, nxt in zip(history, [*history[1:], None], strict=True):
        ops.append(e)
        if draw(st.booleans()):
            pause = e.received + draw(st.integers(0, 30 * DAY // HOUR)) * HOUR
            if nxt is None or pause < nxt.received:
                ops.append(pause)
    ops.append(history[-1].received + draw(st.integers(0, 200)) * DAY)
    return ops


@settings(max_examples=300)
@given(ops=operations(), data=st.data())
def test_snapshot_and_the_rest_equal_a_full_replay(ops: list[Op], data: st.DataObject) -> None:
    full = Customer("ann")
    expected = run(full, ops)

    cut = data.draw(st.integers(0, len(ops)))
    first = Customer("ann")
    before = run(first, ops[:cut])
    restored = Customer.from_snapshot("ann", first.snapshot())
    assert state(restored) == state(first)
    after = run(restored, ops[cut:])

    assert before + after == expected
    assert state(restored) == state(full)


def test_unreadable_snapshots_are_refused_with_the_reason() -> None:
    c = Customer("ann")
    run(
        c,
        [
            Event(
                kind="track",
                customer_id="ann",
                name="Visit",
                properties={},
                traits={},
                at=T0,
                received=T0,
                message_id="m",
            )
        ],
    )
    body = c.snapshot()
    with pytest.raises(SnapshotError, match="snapshot of customer 'ann' is unreadable"):
        Customer.from_snapshot("ann", body[:-3])
    with pytest.raises(SnapshotError):
        Customer.from_snapshot("ann", b"\x93\x01\x02\x03")
    with pytest.raises(SnapshotError):
        Customer.from_snapshot("ann", b"")


# The store and the engine's recovery -------------------------------------------------------


@dataclass
class Live:
    """The engine's writes, made by hand: events and their transitions per batch, deadlines
    fired in between, and rounds of snapshots."""

    log: Store
    customers: dict[str, Customer]
    dirty: set[str]

    async def ingest(self, batch: list[Event]) -> None:
        logged: list[LoggedEvent] = []
        transitions: list[Transition] = []
        for e in batch:
            c = self.customers.setdefault(e.customer_id, Customer(e.customer_id))
            transitions += c.apply(e, SEGMENTS)
            self.dirty.add(e.customer_id)
            logged.append(logged_event(e))
        await self.log.commit(logged, outbox_entries(transitions))

    async def fire(self, until: int) -> None:
        transitions: list[Transition] = []
        for c in self.customers.values():
            if c.deadline is not None and c.deadline <= until:
                transitions += c.advance(until, SEGMENTS)
                self.dirty.add(c.customer_id)
        await self.log.commit([], outbox_entries(transitions))

    async def snapshot(self, ids: list[str], marks: SnapshotMarks | None) -> None:
        needs, log_seq = SEGMENTS.needs.fingerprint(), self.log.events.last_seq
        rows = [snapshot_row(self.customers[i], needs=needs, log_seq=log_seq) for i in ids]
        await self.log.commit([], [], snapshots=rows, marks=marks)


CUSTOMERS = ("ann", "bob")


@st.composite
def store_histories(draw: st.DrawFn) -> tuple[list[Event], list[tuple[int, str]]]:
    """Events, and after which of them (by index) the engine fired deadlines, completed a
    round of snapshots, or wrote part of a round before it was cut short."""
    history = draw(events(CUSTOMERS))
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(history) - 1),
                st.sampled_from(["fire", "round", "round", "part"]),
            ),
            min_size=1,
            max_size=8,
        )
    )
    return history, sorted(steps)


async def write_history(
    db: Path, history: list[Event], steps: list[tuple[int, str]], data: st.DataObject
) -> tuple[dict[str, Customer], int]:
    """Write the history as a live engine would; return its actors and its clock's end."""
    async with await Store.open(db) as log:
        live = Live(log, {}, set())
        for i, e in enumerate(history):
            # The engine fires deadlines before the event's receive instant at the latest.
            await live.fire(e.received - 1)
            await live.ingest([e])
            for _, what in [s for s in steps if s[0] == i]:
                if what == "fire":
                    await live.fire(e.received + data.draw(st.integers(0, 20)) * DAY)
                elif what == "round":
                    marks = SnapshotMarks(
                        events_through=log.events.last_seq,
                        outbox_through=log.outbox.last_seq,
                        definitions=SEGMENTS.fingerprint,
                        needs=SEGMENTS.needs.fingerprint(),
                    )
                    ids, live.dirty = sorted(live.dirty), set()
                    await live.snapshot(ids, marks)
                elif what == "part" and live.dirty:
                    # Part of a round that never finished: snapshots without a mark.
                    await live.snapshot(sorted(live.dirty)[:1], None)
        end = history[-1].received + data.draw(st.integers(0, 20)) * DAY
        await live.fire(end)
        return live.customers, end


async def recover(
    url: str, db: Path, end: int, *, use_snapshots: bool
) -> tuple[dict[str, Customer], Engine]:
    nc = await connect([url])
    try:
        async with await Store.open(db) as log:
            source, sink = await jetstream_ports(nc)
            engine = Engine(
                source,
                sink,
                log,
                SEGMENTS,
                clock=VirtualClock(end),
                config=EngineConfig(use_snapshots=use_snapshots),
            )
            await engine.recover()
            got = {i: engine.customer(i) for i in CUSTOMERS}
            return {i: c for i, c in got.items() if c is not None}, engine
    finally:
        await nc.close()


def assert_same_from_now_on(live: Customer, got: Customer, until: int) -> None:
    """Equal facts and memberships now; equal transitions and state after running both on."""
    assert facts(got) == facts(live)
    assert got.advance(until, SEGMENTS) == live.advance(until, SEGMENTS)
    assert state(got) == state(live)


@pytest.mark.timeout(900)  # shrinking a failure takes a while
# One nats-server serves every example: recovery does not use it, but an engine needs a
# connection, and each example keeps its store in a directory of its own.
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=store_histories(), data=st.data(), damage=st.sampled_from(["none", "format", "corrupt"])
)
def test_recovery_from_snapshots_and_tail_equals_recovery_from_the_log(
    nats_server: NatsServer,
    case: tuple[list[Event], list[tuple[int, str]]],
    data: st.DataObject,
    damage: str,
) -> None:
    history, steps = case

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "shoal.db"
            live, end = await write_history(db, history, steps, data)
            if damage == "corrupt":
                async with await Store.open(db) as log:
                    rows = await log.snapshots.of(CUSTOMERS)
                    await log.commit(
                        [],
                        [],
                        snapshots=[
                            msgspec.structs.replace(r, body=r.body[: len(r.body) // 2])
                            for r in rows
                        ],
                    )
            # After "format", this is the next version of shoal: it reads another format.
            new_format = SNAPSHOT_FORMAT + (damage == "format")
            with mock.patch.object(actors._stored, "SNAPSHOT_FORMAT", new_format):
                from_snapshots, engine = await recover(nats_server.url, db, end, use_snapshots=True)
            from_log, plain = await recover(nats_server.url, db, end, use_snapshots=False)

            assert sorted(from_snapshots) == sorted(from_log) == sorted(live)
            # Same definitions: recovering changes no membership.
            assert engine.stats.transitions == plain.stats.transitions == 0
            if damage != "none":
                assert engine.stats.snapshots_loaded == 0
            until = end + 400 * DAY
            for customer_id, c in live.items():
                twin = Customer.from_snapshot(customer_id, c.snapshot())
                assert_same_from_now_on(c, from_snapshots[customer_id], until)
                assert_same_from_now_on(twin, from_log[customer_id], until)

    anyio.run(main)


# The engine, end to end ------------------------------------------------------------------

IDLE = parse_segments(
    """
[segments.idle]
rule = "since_last('Visit') >= '3s'"
""",
    source="idle.toml",
)


def _visit(user: str, at: int) -> bytes:
    return msgspec.json.encode(
        {"type": "track", "userId": user, "event": "Visit", "timestamp": format_instant(at)}
    )


def _assert_entered_idle_at(seen: Collector, expected: dict[str, int]) -> None:
    """Each customer of ``expected`` entered ``idle`` once, by its deadline, at that instant."""
    got = {t.customer_id: t for t in seen.transitions()}
    assert {u: to_instant(t.at) for u, t in got.items()} == expected
    assert {(t.segment, t.change, t.version, t.cause) for t in got.values()} == {
        ("idle", "entered", 1, TimeCause())
    }


async def test_restart_loads_snapshots_in_deadline_order_and_fires_each_on_time(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    nc = await connect([nats_server.url])
    seen = await collect(nc, "shoal.segments.>")
    # Visits a millisecond apart, later for lower ids, so that deadline order is not id
    # order. The engine's clock stands still before the first deadline.
    start = SystemClock().now()
    visits = {f"c{i:02d}": start - 1_000_000 - i * 1000 for i in range(40)}
    clock = VirtualClock(start)
    try:
        async with running_engine(nats_server.url, db, IDLE, clock=clock) as engine:
            for user, at in visits.items():
                await nc.publish(f"shoal.events.{user}", _visit(user, at))
            await eventually(lambda: engine.stats.events_applied == 40)
        # The clean stop snapshotted every customer.
        async with await Store.open(db) as log:
            assert await log.snapshots.count() == 40

        config = EngineConfig(page_batch=4)
        async with running_engine(nats_server.url, db, IDLE, clock=clock, config=config) as engine:
            # Started with one page of 4 (no deadline is overdue), the rest load as it runs.
            assert engine.stats.rebuilt_customers == 4
            assert engine.stats.rebuilt_events == 0
            # A late visit for a customer whose snapshot is among the last to load.
            await nc.publish("shoal.events.c00", _visit("c00", visits["c00"] + 1_000_000))
            await eventually(lambda: engine.stats.events_applied == 1)
            clock.set(start + 10 * SECOND)
            await eventually(lambda: len(seen.msgs) == 40)
            assert engine.warm
            assert gc.isenabled()  # off only while a page decodes
            assert engine.stats.snapshots_loaded == 40
            assert engine.stats.snapshots_ignored == 0
    finally:
        await nc.close()
    expected = {u: at + 3 * SECOND for u, at in visits.items()}
    expected["c00"] += SECOND
    _assert_entered_idle_at(seen, expected)


async def test_customers_due_soon_are_prepared_while_idle_and_fire_once_on_time(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    nc = await connect([nats_server.url])
    seen = await collect(nc, "shoal.segments.>")
    start = SystemClock().now()
    visits = {f"c{i}": start - 1_000_000 - i * 1000 for i in range(6)}
    try:
        async with running_engine(nats_server.url, db, IDLE, clock=VirtualClock(start)) as engine:
            for user, at in visits.items():
                await nc.publish(f"shoal.events.{user}", _visit(user, at))
            await eventually(lambda: engine.stats.events_applied == 6)

        clock = VirtualClock(start - 20 * SECOND)
        async with running_engine(nats_server.url, db, IDLE, clock=clock) as engine:
            await anyio.sleep(0.3)
            assert not engine._partition._held  # due in 22 s: not yet
            clock.set(start - 5 * SECOND)
            # Idle, with six deadlines within the next few seconds: prepared, and taken
            # out of the timer queue, but still counted and still the next one.
            await eventually(lambda: len(engine._partition._held) == 6)
            assert engine.pending_deadlines == 6
            assert engine.next_deadline == visits["c5"] + 3 * SECOND
            # A later visit moves c1's deadline: the one held for it no longer holds.
            await nc.publish("shoal.events.c1", _visit("c1", visits["c1"] + 1_000_000))
            await eventually(lambda: engine.stats.events_applied == 1)
            assert engine.next_deadline == visits["c5"] + 3 * SECOND
            clock.set(start + 70 * SECOND)
            await eventually(lambda: len(seen.msgs) == 6)
            await anyio.sleep(0.2)  # nothing more comes
            assert engine.stats.deadlines_fired == 6
            assert engine.pending_deadlines == 0
    finally:
        await nc.close()
    expected = {u: at + 3 * SECOND for u, at in visits.items()}
    expected["c1"] += SECOND
    assert len(seen.msgs) == 6
    _assert_entered_idle_at(seen, expected)


async def test_a_prepared_customer_keeps_the_deadline_it_was_loaded_with(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Preparing evaluates a customer afresh; if that gives another next instant than the
    # one it was loaded with, it still fires when it would have unprepared, once.
    db = tmp_path / "shoal.db"
    nc = await connect([nats_server.url])
    seen = await collect(nc, "shoal.segments.>")
    start = SystemClock().now()
    visit = start - 1_000_000
    try:
        async with running_engine(nats_server.url, db, IDLE, clock=VirtualClock(start)) as engine:
            await nc.publish("shoal.events.a", _visit("a", visit))
            await eventually(lambda: engine.stats.events_applied == 1)
        async with await Store.open(db) as log:
            (stored,) = await log.snapshots.of(["a"])
            c = Customer.from_snapshot("a", stored.body)
            assert c.deadline == visit + 3 * SECOND
            c.deadline = visit + 5 * SECOND  # later than its rule says
            await log.commit(
                [],
                snapshots=[msgspec.structs.replace(stored, deadline=c.deadline, body=c.snapshot())],
            )

        clock = VirtualClock(start - 5 * SECOND)
        async with running_engine(nats_server.url, db, IDLE, clock=clock) as engine:
            await eventually(lambda: len(engine._partition._held) == 1)
            loaded = engine.customer("a")
            assert loaded is not None and loaded.deadline == visit + 5 * SECOND
            clock.set(start + 10 * SECOND)
            await eventually(lambda: len(seen.msgs) == 1)
            await anyio.sleep(0.2)
            assert engine.stats.deadlines_fired == 1
    finally:
        await nc.close()
    (t,) = seen.transitions()
    assert (t.segment, t.change, t.version, to_instant(t.at)) == (
        "idle",
        "entered",
        1,
        visit + 5 * SECOND,
    )
