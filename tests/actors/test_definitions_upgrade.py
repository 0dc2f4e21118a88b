"""Stored definitions carry their format: a record of shoal 484eaec (without one) is
written again in this shoal's, in both copies, and logged; one of a later format is refused
at a start, never read or written over, and never followed while running. Real
nats-server, SQLite in tmp_path."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import structlog

from actors import DefinitionsKeeper, VirtualClock, load_segments
from protocol import (
    DEFINITIONS_FORMAT,
    ApiOrigin,
    FormatTooNewError,
    StoredDefinitions,
    StoredDefinitionsError,
    decode_definitions,
    encode_definitions,
)
from protocol.nats import DefinitionsKV
from protocol.nats._definitions_kv import HEAD_KEY, _chunk_key
from store import Store, StoredRow
from tests.actors.test_definitions_persist import REGULAR, VISITOR, copies, load_segments_of
from tests.helpers import NatsServer

T0 = 1_000_000_000_000_000


def without_format(d: StoredDefinitions) -> bytes:
    """``d`` as shoal 484eaec stored it: no ``format``."""
    raw = msgspec.json.decode(encode_definitions(d))
    del raw["format"]
    return msgspec.json.encode(raw)


def of_format(d: StoredDefinitions, fmt: int | str) -> bytes:
    raw = msgspec.json.decode(encode_definitions(d))
    raw["format"] = fmt
    return msgspec.json.encode(raw)


def test_a_record_reads_with_its_format() -> None:
    d = StoredDefinitions(
        version=3,
        applied_at=datetime(2026, 12, 7, tzinfo=UTC),
        origin=ApiOrigin(source="a.toml"),
        last_file=None,
        fingerprint="f",
        source="a.toml",
        toml="",
        lists={},
    )
    assert decode_definitions(encode_definitions(d), "here") == d
    assert d.format == DEFINITIONS_FORMAT == 1
    assert decode_definitions(without_format(d), "here").format == 0
    assert decode_definitions(without_format(d), "here") == msgspec.structs.replace(d, format=0)
    for fmt in (2, 99, "2b"):
        with pytest.raises(FormatTooNewError) as e:
            decode_definitions(of_format(d, fmt), "KV bucket SHOAL_DEFINITIONS")
        shown = repr(fmt) if isinstance(fmt, str) else fmt
        assert str(e.value) == (
            f"the definitions record in KV bucket SHOAL_DEFINITIONS has format {shown}, and "
            f"this shoal knows formats up to {DEFINITIONS_FORMAT}: it was written by a newer "
            "shoal. Run that shoal (or a later one) on this data; this one stops rather than "
            "misread it"
        )
        assert not isinstance(e.value, StoredDefinitionsError)  # never "repaired" over
    with pytest.raises(StoredDefinitionsError):
        decode_definitions(b"[1, 2]", "here")


async def put_local(store: Store, body: bytes, d: StoredDefinitions) -> None:
    await store.definitions.put(StoredRow(version=d.version, applied_at=T0, body=body))


async def put_shared(kv: DefinitionsKV, body: bytes) -> None:
    """Store ``body`` in the bucket as it is (a record's bytes another shoal wrote), laid out
    as the bucket lays records out: one chunk, then the head naming it."""
    digest = hashlib.sha256(body).hexdigest()
    bucket = kv._kv  # noqa: SLF001 - the bytes written are the point here
    await bucket.put(_chunk_key(digest, 0), body)
    head = {"version": msgspec.json.decode(body)["version"], "sha256": digest}
    await bucket.put(HEAD_KEY, msgspec.json.encode(head | {"size": len(body), "chunks": 1}))


async def test_records_of_484eaec_are_upgraded_in_both_copies_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    db = tmp_path / "a.db"
    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        await keeper.resume(load_segments(file), str(file))
        d = await keeper.propose(load_segments_of(VISITOR + REGULAR), None, [0])
        await keeper.in_force(d)
        # As shoal 484eaec left them: both copies without a format.
        await put_local(store, without_format(d), d)
        await put_shared(kv, without_format(d))
        loaded = await kv.load()
        assert loaded is not None and loaded.format == 0

    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        with structlog.testing.capture_logs() as logs:
            resumed = await keeper.resume(load_segments(file), str(file))
        assert resumed.fingerprint == d.fingerprint  # the stored ones, still in force
        upgraded = [e for e in logs if e["event"] == "upgraded in place"]
        assert upgraded == [
            {
                "event": "upgraded in place",
                "log_level": "info",
                "what": "the stored definitions",
                "copies": [f"the store {db}", "KV bucket SHOAL_DEFINITIONS"],
                "version": 2,
                "from_format": 0,
                "to_format": DEFINITIONS_FORMAT,
            }
        ]
        row = await store.definitions.get()
        assert row is not None
        assert decode_definitions(row.body, "store") == d  # the same record, format 1
        assert await kv.load() == d

    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        with structlog.testing.capture_logs() as logs:
            await keeper.resume(load_segments(file), str(file))
        assert "upgraded in place" not in [e["event"] for e in logs]


@pytest.mark.parametrize("where", ["store", "bucket"])
async def test_a_newer_record_is_refused_and_left_as_it_is(
    nats_server: NatsServer, tmp_path: Path, where: str
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    db = tmp_path / "a.db"
    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        await keeper.resume(load_segments(file), str(file))
        d = keeper.current
        assert d is not None
        newer = of_format(d, 99)
        if where == "store":
            await put_local(store, newer, d)
        else:
            await put_shared(kv, newer)

    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        with pytest.raises(FormatTooNewError) as e:
            await keeper.resume(load_segments(file), str(file))
        copy = f"the store {db}" if where == "store" else "KV bucket SHOAL_DEFINITIONS"
        assert str(e.value).startswith(f"the definitions record in {copy} has format 99, ")
        row = await store.definitions.get()
        assert row is not None
        assert (row.body == newer) is (where == "store")
        if where == "bucket":
            head = await kv.head_version()
            assert head == d.version
            with pytest.raises(FormatTooNewError):
                await kv.load()


async def test_a_newer_record_in_the_bucket_is_not_followed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(T0)
    async with copies(nats_server.url, tmp_path / "a.db") as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        await keeper.resume(load_segments(file), str(file))
        d = keeper.current
        assert d is not None
        later = msgspec.structs.replace(d, version=d.version + 1)
        await put_shared(kv, of_format(later, 99))
        with structlog.testing.capture_logs() as logs:
            assert await keeper.newer() is None
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("shared definitions not followed", "error")
        ]
        assert keeper.current == d
