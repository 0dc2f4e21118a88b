"""Definitions shared by several engines (each with its own store) through one bucket
``SHOAL_DEFINITIONS``: versions are one sequence (a compare-and-set on the head), the loser
of a race is told and follows the winner, and a follower stores the winner's version with
its own positions. Real nats-server, SQLite in tmp_path."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
import structlog
from nats.aio.client import Client

from actors import DefinitionsConflict, DefinitionsKeeper, VirtualClock, load_segments
from protocol import ApiOrigin, decode_definitions
from tests.actors.test_definitions_persist import (
    LOYAL,
    REGULAR,
    VISITOR,
    copies,
    load_segments_of,
)
from tests.helpers import NatsServer

T0 = 1_000_000_000_000_000


async def test_two_proposals_of_one_version_one_wins(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    async with (
        copies(nats_server.url, tmp_path / "a.db") as (store_a, kv_a),
        copies(nats_server.url, tmp_path / "b.db") as (store_b, kv_b),
    ):
        a = DefinitionsKeeper(store_a, kv_a, clock)
        b = DefinitionsKeeper(store_b, kv_b, clock)
        await a.resume(load_segments(file), str(file))
        await b.resume(load_segments(file), str(file))  # the bucket's version 1
        assert (a.current, b.current) != (None, None)

        # The bucket's own compare-and-set: of two writes of version 2 at once, one wins.
        a_d = await a.propose(load_segments_of(VISITOR + REGULAR), None, [0, 1])
        assert a_d.version == 2
        assert await kv_a.head_version() == 2
        loser = msgspec.structs.replace(a_d, version=3, source="x")
        results: list[bool] = []

        async def put(d: object) -> None:
            assert isinstance(d, type(a_d))
            results.append(await kv_b.propose(d))

        async with anyio.create_task_group() as tg:
            tg.start_soon(put, loser)
            tg.start_soon(put, msgspec.structs.replace(loser, source="y"))
        assert sorted(results) == [False, True]
        won = await kv_a.load()
        assert won is not None and won.version == 3 and won.source in ("x", "y")
        # A version not after the head's is refused outright.
        assert not await kv_b.propose(a_d)

        # B, still at version 1, proposes: the bucket holds 3 already, so it is refused
        # with the winner named, and nothing of B's is stored.
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(DefinitionsConflict) as caught:
                await b.propose(load_segments_of(VISITOR + LOYAL), None, [2, 3])
        assert str(caught.value) == (
            "the definitions were not applied as version 2: version 3 (api.toml) was "
            "stored first by another engine; every engine follows it: check it (shoal "
            "status) and apply again if still wanted"
        )
        assert (caught.value.version, caught.value.winner) == (2, 3)
        assert [e["event"] for e in logs] == ["definitions not applied"]
        assert (await kv_a.load()) == won
        row = await store_b.definitions.get()
        assert row is not None and row.version == 1


async def test_a_follower_stores_the_same_version_with_its_own_positions(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    async with (
        copies(nats_server.url, tmp_path / "a.db") as (store_a, kv_a),
        copies(nats_server.url, tmp_path / "b.db") as (store_b, kv_b),
    ):
        a = DefinitionsKeeper(store_a, kv_a, clock)
        b = DefinitionsKeeper(store_b, kv_b, clock)
        await a.resume(load_segments(file), str(file))
        await b.resume(load_segments(file), str(file))
        assert await b.newer() is None  # nothing newer than what is in force

        new = load_segments_of(VISITOR + REGULAR)
        d = await a.propose(new, ApiOrigin(source="api.toml", client="ops@h"), [0, 1])
        assert await b.newer() is not None  # proposed: the others see it at once
        await a.in_force(d)
        assert d.applied_through == {0: 0, 1: 0}
        assert await a.newer() is None  # its own

        found = await b.newer()
        assert found is not None
        record, segments = found
        assert (record, segments.fingerprint) == (d, new.fingerprint)
        await b.adopted(record, [2, 3])
        assert b.current is not None
        assert b.current.version == 2 and b.current.applied_through == {2: 0, 3: 0}
        assert msgspec.structs.replace(b.current, applied_through=None) == (
            msgspec.structs.replace(d, applied_through=None)
        )
        assert await b.newer() is None
        row = await store_b.definitions.get()
        assert row is not None and row.version == 2
        assert decode_definitions(row.body, "b") == b.current

    # Restarted, the follower keeps its copy: the same version as the bucket's, differing
    # only by its positions, is no reason to repair either copy.
    async with copies(nats_server.url, tmp_path / "b.db") as (store_b, kv_b):
        b = DefinitionsKeeper(store_b, kv_b, clock)
        with structlog.testing.capture_logs() as logs:
            resumed = await b.resume(load_segments(file), str(file))
        assert resumed.fingerprint == new.fingerprint
        assert [e["event"] for e in logs] == ["definitions chosen at start"]
        assert b.current is not None and b.current.applied_through == {2: 0, 3: 0}
        assert await kv_b.load() == d


async def test_a_shared_record_that_does_not_parse_is_logged_once_and_not_followed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    async with (
        copies(nats_server.url, tmp_path / "a.db") as (store_a, kv_a),
        copies(nats_server.url, tmp_path / "b.db") as (store_b, kv_b),
    ):
        a = DefinitionsKeeper(store_a, kv_a, clock)
        b = DefinitionsKeeper(store_b, kv_b, clock)
        await a.resume(load_segments(file), str(file))
        await b.resume(load_segments(file), str(file))
        d = await a.propose(load_segments_of(VISITOR + REGULAR), None, [0])
        # A later shoal's syntax, say: this one cannot parse it.
        assert await kv_a.propose(
            msgspec.structs.replace(d, version=3, toml='[segments.x]\nrule = "nope("\n')
        )
        with structlog.testing.capture_logs() as logs:
            assert await b.newer() is None
            assert await b.newer() is None
        (line,) = logs
        assert (line["event"], line["log_level"], line["version"]) == (
            "shared definitions not followed",
            "error",
            3,
        )
        assert line["in_force"] == 1
        assert b.current is not None and b.current.version == 1
