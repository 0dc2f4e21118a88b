"""Forgetting a customer in the engine, on memory ports: its ``forgotten`` exits, the store's
erasure, suppression, and versions continued when an id comes back (the broker's part is
tested against a real nats-server in tests/system/test_forget.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import msgspec

from actors import Engine, EngineConfig, VirtualClock
from protocol import (
    SECOND,
    ForgetOrder,
    ForgottenCause,
    forget_hash,
    forget_order_subject,
    partition,
)
from protocol.memory import MemoryBroker
from store import Store
from tests.helpers import eventually, segments

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
SEGS = segments(
    """
[segments.active]
rule = "since_last('Visit') < '1h'"

[segments.seen]
rule = "count('Visit') >= 1"
"""
)


def visit(customer: str) -> bytes:
    return msgspec.json.encode({"type": "track", "userId": customer, "event": "Visit"})


def order(broker: MemoryBroker, customer: str, *, suppress: int | None = None) -> None:
    body = msgspec.json.encode(
        ForgetOrder(customer_id=customer, request="r1", by="test", suppress_seconds=suppress)
    )
    broker.publish(forget_order_subject(partition(customer, broker.partitions)), body)


def rows(db: Path, customer: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {
            table: conn.execute(
                f"SELECT count(*) FROM {table} WHERE customer_id = ?", (customer,)
            ).fetchone()[0]
            for table in ("events", "transitions", "snapshots", "forgotten")
        }


async def test_forget_exits_erases_and_continues_versions(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    db = tmp_path / "shoal.db"
    async with await Store.open(db) as store:
        engine = Engine(
            broker.source(), broker.sink(), store, SEGS, clock=clock, config=EngineConfig()
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            for n, who in enumerate(["ann", "bob", "ann"]):
                broker.publish(f"shoal.events.{who}", visit(who), msg_id=f"m{n}")
            await eventually(lambda: len(broker.transitions) == 4)
            clock.set(T0 + 5 * SECOND)

            order(broker, "ann")
            await eventually(lambda: len(broker.transitions) == 6)
            exits = broker.transitions[4:]
            assert {(t.customer_id, t.segment, t.change, t.version) for t in exits} == {
                ("ann", "active", "exited", 3),
                ("ann", "seen", "exited", 4),
            }
            assert all(t.cause == ForgottenCause() for t in exits)
            await eventually(lambda: engine.erasures_pending == 0)
            assert engine.customer("ann") is None
            assert rows(db, "ann") == {
                "events": 0,
                "transitions": 0,
                "snapshots": 0,
                "forgotten": 0,
            }
            record = store.forgotten.get(forget_hash("ann"))
            assert record is not None and not record.pending
            assert (record.floor, record.exits, record.by) == (4, 2, "test")
            # bob is untouched.
            assert engine.customer("bob") is not None
            assert rows(db, "bob")["events"] == 1

            # ann comes back: versions go on from 4.
            broker.publish("shoal.events.ann", visit("ann"), msg_id="m9")
            await eventually(lambda: len(broker.transitions) == 8)
            assert sorted(t.version for t in broker.transitions[6:]) == [5, 6]

            # bob is forgotten with suppression: his later events are refused, by hash.
            order(broker, "bob", suppress=3600)
            await eventually(lambda: len(broker.transitions) == 10)
            await eventually(lambda: engine.erasures_pending == 0)
            broker.publish("shoal.events.bob", visit("bob"), msg_id="m10")
            await eventually(lambda: len(broker.rejections) == 1)
            refused = broker.rejections[0]
            assert "bob" not in refused.subject and "bob" not in (refused.payload or "")
            assert forget_hash("bob") in refused.reason
            assert engine.customer("bob") is None
            tg.cancel_scope.cancel()

    # A restart: ann rebuilt from the log continues her versions; bob is still refused.
    async with await Store.open(db) as store:
        engine = Engine(
            broker.source(),
            broker.sink(),
            store,
            SEGS,
            clock=clock,
            config=EngineConfig(use_snapshots=False),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            ann = engine.customer("ann")
            assert ann is not None and ann.version == 6
            assert engine.customer("bob") is None
            broker.publish("shoal.events.bob", visit("bob"), msg_id="m11")
            await eventually(lambda: len(broker.rejections) == 2)
            tg.cancel_scope.cancel()
