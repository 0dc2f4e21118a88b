"""The engine with in-memory ports and no nats-server: ingest, deadlines, a snapshot round, a
restart, a definitions change and a query, all on a virtual clock.

The same engine runs against NATS in tests/actors/test_engine.py; here the broker is
``protocol.memory``, held to the same contract (tests/protocol/test_ports_contract.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import msgspec

from actors import Engine, EngineApi, EngineConfig, VirtualClock
from protocol import SECOND, DefinitionCause, EventCause, TimeCause, Transition, to_instant
from protocol.memory import MemoryBroker
from store import Store
from tests.helpers import eventually, segments

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
ACTIVE_IDLE = segments(
    """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"
"""
)
WITH_SEEN = segments(
    """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"

[segments.seen]
rule = "count('Visit') >= 1"
"""
)


def visit(customer: str) -> bytes:
    return msgspec.json.encode({"type": "track", "userId": customer, "event": "Visit"})


def summary(ts: list[Transition]) -> list[tuple[str, str, str, str, int]]:
    return [
        (t.customer_id, t.segment, t.change, str(t.cause.__struct_config__.tag), t.version)
        for t in ts
    ]


async def test_an_engine_on_memory_ports(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    config = EngineConfig(snapshot_interval=5.0)
    db = tmp_path / "shoal.db"

    async with await Store.open(db) as store:
        engine = Engine(
            broker.source(), broker.sink(), store, ACTIVE_IDLE, clock=clock, config=config
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            # Ingest: an event enters alice in `active`, with its message id as the cause.
            broker.publish("shoal.events.alice", visit("alice"), msg_id="a1")
            broker.publish("shoal.events.alice", visit("alice"), msg_id="a1")  # a repeat
            await eventually(lambda: len(broker.transitions) == 1)
            assert broker.transitions[0].cause == EventCause(message_id="a1")

            # Deadlines: time alone moves her from `active` to `idle`, at the exact instant.
            clock.set(T0 + 3 * SECOND)
            await eventually(lambda: len(broker.transitions) == 3)
            assert [to_instant(t.at) for t in broker.transitions[1:]] == [T0 + 2 * SECOND] * 2
            assert all(t.cause == TimeCause() for t in broker.transitions[1:])

            # Queries: the engine's view, and the query service's handler on it.
            assert await engine.members("idle", limit=10) == ["alice"]
            assert engine.segment_sizes == {"active": 0, "idle": 1}
            reply = await EngineApi(engine).customer("alice")
            assert [m.segment for m in reply.segments] == ["idle"]
            status = await EngineApi(engine).status()
            assert (status.consumer, status.events_applied, status.consumer_lag) == (
                "shoal-engine",
                1,
                0,
            )

            # A snapshot round, once the interval has passed on the engine's clock.
            clock.set(T0 + 10 * SECOND)
            await eventually(lambda: engine.stats.snapshot_rounds == 1)

            # A definitions change: every customer evaluated under the new rules.
            assert await engine.apply_segments(WITH_SEEN) == 1
            await eventually(lambda: len(broker.transitions) == 4)
            assert broker.transitions[3].cause == DefinitionCause()
            tg.cancel_scope.cancel()

    # A restart on the same store: from snapshots, nothing read from the log, and on from
    # the versions it had.
    async with await Store.open(db) as store:
        engine = Engine(
            broker.source(), broker.sink(), store, WITH_SEEN, clock=clock, config=config
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await eventually(lambda: engine.warm)
            assert (engine.stats.snapshots_loaded, engine.stats.rebuilt_events) == (1, 0)
            broker.publish("shoal.events.alice", visit("alice"), msg_id="a2")
            await eventually(lambda: len(broker.transitions) == 6)
            tg.cancel_scope.cancel()

    assert summary(broker.transitions) == [
        ("alice", "active", "entered", "event", 1),
        ("alice", "active", "exited", "time", 2),
        ("alice", "idle", "entered", "time", 3),
        ("alice", "seen", "entered", "definition", 4),
        ("alice", "active", "entered", "event", 5),
        ("alice", "idle", "exited", "event", 6),
    ]


async def test_a_sink_that_fails_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    sink = broker.sink()
    sink.fail_next(2)
    async with await Store.open(tmp_path / "shoal.db") as store:
        engine = Engine(broker.source(), sink, store, ACTIVE_IDLE, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            broker.publish("shoal.events.bob", visit("bob"), msg_id="b1")
            await eventually(lambda: len(broker.transitions) == 1)
            assert engine.unpublished == 0
            tg.cancel_scope.cancel()
    assert summary(broker.transitions) == [("bob", "active", "entered", "event", 1)]


def test_importing_actors_loads_no_nats() -> None:
    code = (
        "import sys, actors, actors.engine, store, protocol, protocol.memory\n"
        "loaded = sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


async def test_a_static_lists_customers_are_added_by_their_partitions_owner(
    tmp_path: Path,
) -> None:
    """Engines sharing the partitions each add (and evaluate) only the listed customers of
    the partitions they own: another engine's would otherwise get transitions from two."""
    from protocol import partition

    listed = [f"v{i}" for i in range(40)]
    vip = segments(
        f"[lists.vip]\ncustomers = {listed!r}\n\n[segments.vip]\nrule = \"in_list('vip')\"\n"
    )
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    source = broker.source()
    owned = [p for p in range(source.partitions) if p % 2 == 0]
    async with await Store.open(tmp_path / "shoal.db") as store:
        engine = Engine(source, broker.sink(), store, vip, clock=clock, owned=owned)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            mine = sorted(c for c in listed if partition(c, source.partitions) in owned)
            assert 0 < len(mine) < len(listed)
            await eventually(lambda: len(broker.transitions) == len(mine))
            assert sorted(t.customer_id for t in broker.transitions) == mine
            assert sorted(await engine.members("vip", limit=100)) == mine
            tg.cancel_scope.cancel()
