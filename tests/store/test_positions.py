"""The events stream positions a store records: overall, per partition, and replaced whole by
a migration."""

from __future__ import annotations

from pathlib import Path

from store import Store


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
