"""The startup check on in-memory ports: a store behind its consumer's acknowledgement floor
refuses to start; a first start, a store level with the stream, and a store written before
the position was recorded start as before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from actors import Engine, StoreBehindError, VirtualClock, logged_event, rebuild_from_stream
from actors.engine._startup import _behind, _without_gaps
from protocol import EVENTS_WILDCARD, Delivery, Event, StreamState, decode_event, partition
from protocol.memory import MemoryBroker
from store import Store
from tests.helpers import eventually, segments

T0 = 1_767_225_600_000_000
SEEN = segments("[segments.seen]\nrule = \"count('Visit') >= 1\"\n")


def visit(customer: str) -> bytes:
    return msgspec.json.encode({"type": "track", "userId": customer, "event": "Visit"})


async def run_until_applied(broker: MemoryBroker, db: Path, clock: VirtualClock, n: int) -> None:
    async with await Store.open(db) as store:
        engine = Engine(broker.source(), broker.sink(), store, SEEN, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await eventually(lambda: engine.stats.events_applied == n)
            tg.cancel_scope.cancel()


async def test_an_empty_store_behind_an_acknowledged_stream_refuses_to_start(
    tmp_path: Path,
) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    for c in ("a", "b"):
        broker.publish(f"shoal.events.{c}", visit(c))
    broker.publish("shoal.events.c", b"{")  # rejected: acknowledged, not logged
    # A first start: the consumer does not exist yet, the stream is read from its start.
    await run_until_applied(broker, tmp_path / "shoal.db", clock, 2)
    async with await Store.open(tmp_path / "shoal.db") as store:
        assert store.stream_through == 3  # the rejection counts: it was committed too

    async with await Store.open(tmp_path / "lost.db") as store:
        engine = Engine(broker.source(), broker.sink(), store, SEEN, clock=clock)
        with pytest.raises(StoreBehindError) as refused:
            await engine.run()
    assert str(refused.value) == (
        f"{tmp_path / 'lost.db'} is behind stream SHOAL_EVENTS (3 messages): consumer "
        "'shoal-engine' acknowledged messages through position 3, the store recorded "
        "nothing. Starting would lose those events and restart transition versions. With "
        "the engine stopped, rebuild the store from the stream: shoal rebuild --from-stream "
        f"--data-dir {tmp_path}"
    )


async def test_a_store_level_with_the_stream_or_older_than_the_position_starts(
    tmp_path: Path,
) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    broker.publish("shoal.events.a", visit("a"))
    await run_until_applied(broker, tmp_path / "shoal.db", clock, 1)
    broker.publish("shoal.events.b", visit("b"))
    await run_until_applied(broker, tmp_path / "shoal.db", clock, 1)

    # Written by a shoal that did not record the position: trusted when it holds anything.
    async with await Store.open(tmp_path / "legacy.db") as store:
        await store.import_events([logged_event(_event("a"))])
        assert store.stream_through is None
    broker.publish("shoal.events.c", visit("c"))
    await run_until_applied(broker, tmp_path / "legacy.db", clock, 1)


def _event(customer: str) -> Event:
    return decode_event(
        visit(customer), f"shoal.events.{customer}", received=T0, default_message_id="m"
    )


async def test_a_rebuilt_store_is_level(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    for c in ("a", "b", "a"):
        broker.publish(f"shoal.events.{c}", visit(c))
    await run_until_applied(broker, tmp_path / "shoal.db", clock, 3)

    async def deliveries() -> list[list[Delivery]]:
        source = broker.source(consumer="reader")
        await source.start()
        try:
            return [source.take(100)]
        finally:
            await source.stop()

    async def one(chunks: list[list[Delivery]]) -> AsyncIterator[list[Delivery]]:
        for chunk in chunks:
            yield chunk

    async with await Store.open(tmp_path / "rebuilt.db") as store:
        report = await rebuild_from_stream(store, one(await deliveries()), one([]), through=2)
        assert (report.read, report.logged, report.transitions) == (2, 2, 0)
        assert store.stream_through == 2


async def test_a_partition_taken_over_past_the_stores_other_positions_is_level(
    tmp_path: Path,
) -> None:
    """A partition taken over starts after its snapshot's position, which can be past every
    message the store committed (here the stream's last one): its consumer's floor is that
    position until it acknowledges one. Each partition is compared with its own position
    (a CI run had an engine refuse its own store on the next term, taken for behind), the
    consumer of unpartitioned messages with the overall one."""
    async with await Store.open(tmp_path / "shoal.db") as store:
        await store.commit([], [], stream_through=7999, partitions_through={0: 7990})
        await store.commit([], [], partitions_through={6: 8000})  # a takeover's
        names = {0: "shoal-engine-0-5", 6: "shoal-engine-6-9"}

        def state(floors: dict[int, int], strays: int | None = None) -> StreamState:
            return StreamState(
                stream="SHOAL_EVENTS",
                messages=8000,
                ack_floor=max([*floors.values(), *([] if strays is None else [strays])]),
                partition_floors=floors,
                partition_consumers=names,
                strays_floor=strays,
                strays_consumer=None if strays is None else "shoal-engine-unpartitioned-5",
            )

        assert not _behind(store, state({0: 7990, 6: 8000}, 7999), EVENTS_WILDCARD)
        for behind, name, floor, mine in (
            (state({0: 7995, 6: 8000}), "shoal-engine-0-5", 7995, 7990),
            (state({0: 7990, 6: 8000}, 8000), "shoal-engine-unpartitioned-5", 8000, 7999),
        ):
            assert _behind(store, behind, EVENTS_WILDCARD)
            assert f"consumer {name!r} acknowledged messages through position {floor}, " in (
                str(StoreBehindError(store, behind, "shoal-engine"))
            )
            assert f"the store recorded messages through position {mine}." in (
                str(StoreBehindError(store, behind, "shoal-engine"))
            )


async def test_a_floor_past_positions_without_the_partitions_messages_is_level(
    tmp_path: Path,
) -> None:
    """A purge of a partition's oldest messages (retention) moves its consumer's floor past
    positions that hold none of them (up to the stream's last message when none is left):
    the store lacks nothing there, and starts. A message of the partition in between is
    one it lacks."""
    broker = MemoryBroker(VirtualClock(T0).now, partitions=4)
    a, b = "a", next(c for c in "bcdefgh" if partition(c, 4) != partition("a", 4))
    pa, pb = partition(a, 4), partition(b, 4)
    for c in (a, b, b):
        broker.publish(f"shoal.events.{c}", visit(c))
    source = broker.source()
    async with await Store.open(tmp_path / "shoal.db") as store:
        await store.commit([], [], stream_through=3, partitions_through={pa: 1, pb: 3})

        def state(floor: int) -> StreamState:
            return StreamState(
                stream="SHOAL_EVENTS",
                messages=floor,
                ack_floor=floor,
                partition_floors={pa: floor, pb: 3},
            )

        level = await _without_gaps(store, state(3), source)
        assert level.partition_floors == {pa: 1, pb: 3} and level.ack_floor == 3
        assert not _behind(store, level, EVENTS_WILDCARD)
        broker.publish(f"shoal.events.{a}", visit(a))
        behind = await _without_gaps(store, state(4), source)
        assert behind.partition_floors == {pa: 4, pb: 3}
        assert _behind(store, behind, EVENTS_WILDCARD)
