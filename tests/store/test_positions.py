"""The events stream positions a store records: overall, per partition, and replaced whole by
a migration."""

from __future__ import annotations

from pathlib import Path

from store import CutMark, LoggedEvent, Store


async def test_partition_positions_only_move_forward_and_survive_a_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shoal.db"
    async with await Store.open(path) as store:
        assert store.partitions_through == {}
        await store.commit([], [], stream_through=9, partitions_through={0: 9, 3: 4})
        await store.commit([], [], partitions_through={0: 5, 3: 7, 1: 2})
        assert store.partitions_through == {0: 9, 3: 7, 1: 2}
        assert store.stream_through == 9
    async with await Store.open(path) as store:
        assert store.partitions_through == {0: 9, 3: 7, 1: 2}
        assert store.stream_through == 9


async def test_a_reset_replaces_positions_and_open_imports(tmp_path: Path) -> None:
    path = tmp_path / "shoal.db"
    async with await Store.open(path) as store:
        await store.commit(
            [], [], stream_through=90, partitions_through={0: 90, 5: 80}, imports={"old": 3}
        )
        await store.reset_stream_positions(40, {1: 40, 2: 40}, {"old@1": 3, "old@2": 3})
        assert (store.stream_through, dict(store.partitions_through)) == (40, {1: 40, 2: 40})
        assert store.open_imports == {"old@1": 3, "old@2": 3}
    async with await Store.open(path) as store:
        assert (store.stream_through, dict(store.partitions_through)) == (40, {1: 40, 2: 40})
        assert store.open_imports == {"old@1": 3, "old@2": 3}
        # Positions move forward from the reset ones.
        await store.commit([], [], stream_through=41, partitions_through={1: 41})
        assert store.partitions_through == {1: 41, 2: 40}


async def test_a_reset_forgets_the_old_streams_positions_of_events_and_of_the_cut(
    tmp_path: Path,
) -> None:
    """After a migration the events' positions, and the positions the log's cut recorded for
    cutting the stream, are the old stream's: kept, retention would purge the new stream
    by them."""
    async with await Store.open(tmp_path / "shoal.db") as store:
        events = [
            LoggedEvent(customer_id=c, message_id="m", at=1, body=b"x", stream_seq=seq)
            for c, seq in (("a", 7), ("b", 9))
        ]
        await store.commit(events, [], stream_through=9)
        await store.cut_log([], CutMark(through=1, at=1, needs="{}", partitions={3: 7}))
        assert [e.stream_seq for e in await store.events.part(after=0, limit=9)] == [9]
        await store.reset_stream_positions(2, {0: 2}, {})
        assert [e.stream_seq for e in await store.events.part(after=0, limit=9)] == [None]
        assert store.retention.cut is not None and store.retention.cut.partitions == {}
    async with await Store.open(tmp_path / "shoal.db") as store:
        assert store.retention.cut is not None and store.retention.cut.partitions == {}
