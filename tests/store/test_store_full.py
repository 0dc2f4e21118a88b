"""A full disk: a write fails with :class:`StoreFullError` naming the file, nothing of it is
written, and the same write succeeds once there is room; an engine pauses ingestion meanwhile
and resumes by itself, every event applied once.

The disk is made full without a disk: SQLite fails a write that would grow the file past
``PRAGMA max_page_count`` with SQLITE_FULL, exactly as when the disk is full
(tests/system/test_disk_full.py does it with a real full file system).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from actors import Engine, VirtualClock
from protocol.memory import MemoryBroker
from store import LoggedEvent, Store, StoreFullError
from tests.helpers import eventually, segments

T0 = 1_767_225_600_000_000


async def fill(store: Store, full: bool) -> None:
    """Make the disk full at the file's present size, or give it room again."""
    row = await store._db.one("PRAGMA page_count", doing="test")
    pages = int(row[0]) if full and row else 1 << 30
    await store._db.execute(f"PRAGMA max_page_count={pages}", doing="test")


def events(first: int, n: int) -> list[LoggedEvent]:
    return [
        LoggedEvent(customer_id=f"c{i}", message_id="m", at=T0, body=b"x" * 2000)
        for i in range(first, first + n)
    ]


async def test_a_full_disk_fails_the_write_whole_and_the_same_write_succeeds_later(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shoal.db"
    async with await Store.open(db) as store:
        await store.commit(events(0, 10), stream_through=10)
        await fill(store, True)
        with pytest.raises(StoreFullError) as full:
            await store.commit(events(10, 100), stream_through=110)
        assert str(full.value) == f"cannot write to {db}: its disk is full; free space on it"
        assert full.value.path == db
        assert (store.events.last_seq, store.stream_through) == (10, 10)
        assert await store.events.count() == 10

        await fill(store, False)
        await store.commit(events(10, 100), stream_through=110)
        assert (store.events.last_seq, store.stream_through) == (110, 110)
    async with await Store.open_read_only(db) as store:
        assert await store.events.count() == 110
        assert store.stream_through == 110


SEEN = segments("[segments.seen]\nrule = \"count('Visit') >= 1\"\n")


async def test_an_engine_pauses_on_a_full_disk_and_resumes_by_itself(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)

    def visit(i: int) -> None:
        body = {
            "type": "track",
            "userId": f"c{i}",
            "event": "Visit",
            "properties": {"pad": "x" * 3000},
        }
        broker.publish(f"shoal.events.c{i}", msgspec.json.encode(body))

    async with await Store.open(tmp_path / "shoal.db") as store:
        engine = Engine(broker.source(), broker.sink(), store, SEEN, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            visit(0)
            await eventually(lambda: engine.stats.events_applied == 1)
            await fill(store, True)
            for i in range(1, 200):
                visit(i)
            await eventually(lambda: engine.paused is not None)
            assert engine.paused == f"disk full at {tmp_path / 'shoal.db'}"
            applied = engine.stats.events_applied
            await anyio.sleep(0.5)
            assert engine.stats.events_applied == applied  # paused: nothing goes on
            assert broker.ack_floor("shoal-engine") <= store.stream_through  # type: ignore[operator]

            await fill(store, False)
            await eventually(lambda: engine.stats.events_applied == 200)
            assert engine.paused is None
            await eventually(lambda: len(broker.transitions) == 200)
            tg.cancel_scope.cancel()
        assert sorted(t.customer_id for t in broker.transitions) == sorted(
            f"c{i}" for i in range(200)
        )
        assert await store.events.count() == 200
