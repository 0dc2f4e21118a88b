"""Definitions persist (issue 17, item 7): the definitions in force are stored with a version,
when and from where, in the KV bucket SHOAL_DEFINITIONS and the engine's SQLite store; a
restart resumes them, and the served file wins only when its content changed.

Real nats-server, SQLite in tmp_path: ``shoal serve`` as a subprocess where the command line
is what is tested, the keeper in the test's task where the copies are.
"""

from __future__ import annotations

import getpass
import json
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from nats.aio.client import Client

from actors import (
    DefinitionsKeeper,
    SegmentSet,
    SystemClock,
    VirtualClock,
    load_segments,
    parse_segments,
)
from actors.engine import content_hash, segments_of
from protocol import (
    DEFINITIONS_BUCKET,
    ApiOrigin,
    FileOrigin,
    StoredDefinitions,
    StoredDefinitionsError,
    Transition,
)
from protocol.nats import DefinitionsKV, connect
from store import SCHEMA_VERSION, Store
from tests.helpers import NatsServer, Proc, published, run

VISITOR = "[segments.visitor]\nrule = \"count('Visit') >= 1\"\n"
REGULAR = "[segments.regular]\nrule = \"count('Visit') >= 2\"\n"
LOYAL = "[segments.loyal]\nrule = \"count('Visit') >= 2\"\n"


# shoal serve, restarted -----------------------------------------------------------------


class Served:
    """``shoal serve --segments FILE`` on a test's nats-server and data directory."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.data = tmp_path / "data"
        self.file = tmp_path / "segments.toml"
        self.proc: Proc | None = None

    def start(self) -> Proc:
        self.proc = Proc(
            "serve", "--data-dir", str(self.data), "--nats", self.url, "--segments", str(self.file)
        )
        self.proc.wait_err("shoal is serving")
        return self.proc

    def stop(self) -> None:
        assert self.proc is not None
        assert self.proc.stop(signal.SIGINT) == 0
        self.proc.wait_err("shoal stopped")
        self.proc.close()
        self.proc = None

    def shoal(self, *args: str) -> str:
        done = run(*args, "--nats", self.url)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.shoal("status", "--json"))
        return doc

    def visit(self, customer: str, mid: str) -> None:
        self.shoal("publish", "--customer", customer, "--event", "Visit", "--message-id", mid)


@contextmanager
def served(nats_server: NatsServer, tmp_path: Path) -> Iterator[Served]:
    s = Served(nats_server.url, tmp_path)
    try:
        yield s
    finally:
        if s.proc is not None:
            s.proc.close()


def chosen(proc: Proc) -> dict[str, Any]:
    """The log line that says which definitions a start chose, without its timestamp (logged
    before the engine serves)."""
    (line,) = [line for line in proc.err if '"event": "definitions chosen at start"' in line]
    doc: dict[str, Any] = json.loads(line)
    doc.pop("timestamp")
    return doc


def transitions(url: str) -> list[tuple[str, str, str, str, int]]:
    """What SHOAL_SEGMENTS holds: (customer, segment, change, cause, version)."""
    ts: list[Transition] = anyio.run(published, url)
    return [
        (t.customer_id, t.segment, t.change, str(t.cause.__struct_config__.tag), t.version)
        for t in ts
    ]


def settled(s: Served, customer: str, count: int) -> list[tuple[str, str, str, str, int]]:
    """The transitions once ``customer``'s first Visit (published now) entered ``visitor``:
    the outbox publishes in commit order, so whatever the start committed came before."""
    s.visit(customer, f"{customer}-1")
    proc = Proc("tail", "--from-start", "--nats", s.url)
    try:
        lines = [json.loads(line) for line in proc.out_lines(count)]
    finally:
        proc.close()
    assert (lines[-1]["customer_id"], lines[-1]["segment"]) == (customer, "visitor")
    return transitions(s.url)


def api_applied(s: Served, tmp_path: Path) -> None:
    """Serve VISITOR, let alice visit twice, apply VISITOR + REGULAR over the API, stop."""
    s.file.write_text(VISITOR)
    s.start()
    s.visit("alice", "a1")
    s.visit("alice", "a2")
    api = tmp_path / "api.toml"
    api.write_text(VISITOR + REGULAR)
    assert s.shoal("segments", "apply", str(api)).endswith("1 transition(s)\n")
    applied = s.status()["definitions_applied"]
    assert {k: applied[k] for k in ("version", "origin", "source", "client")} == {
        "version": 2,
        "origin": "api",
        "source": str(api),
        "client": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    s.stop()


def test_api_applied_definitions_survive_a_restart_with_no_transitions(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with served(nats_server, tmp_path) as s:
        api_applied(s, tmp_path)
        before = transitions(s.url)
        assert before == [
            ("alice", "visitor", "entered", "event", 1),
            ("alice", "regular", "entered", "definition", 2),
        ]
        proc = s.start()  # the served file is untouched
        line = chosen(proc)
        assert (line["chose"], line["version"], line["origin"], line["source"]) == (
            "stored",
            2,
            "api",
            str(tmp_path / "api.toml"),
        )
        assert line["why"] == (
            "the served file is unchanged since it was last applied from it, so the "
            "definitions applied over the API after it stay in force"
        )
        status = s.status()
        assert [seg["name"] for seg in status["segments"]] == ["visitor", "regular"]
        shown = " ".join(s.shoal("status").split())  # the table, its wrapping undone
        assert "applied version 2, applied " in shown
        assert " over the API (" in shown
        assert status["definitions_applied"]["version"] == 2
        # No transition at restart: bob's is the next one published.
        assert settled(s, "bob", 3) == [*before, ("bob", "visitor", "entered", "event", 1)]


def test_an_unchanged_file_rewritten_does_not_override_api_definitions(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with served(nats_server, tmp_path) as s:
        api_applied(s, tmp_path)
        s.file.unlink()
        s.file.write_text(VISITOR)  # the same content, a new file (inode, mtime)
        proc = s.start()
        assert chosen(proc)["chose"] == "stored"
        assert [seg["name"] for seg in s.status()["segments"]] == ["visitor", "regular"]
        assert settled(s, "bob", 3)[-1] == ("bob", "visitor", "entered", "event", 1)
        assert len(transitions(s.url)) == 3


def test_a_changed_served_file_wins_with_a_log_line_and_definition_transitions(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with served(nats_server, tmp_path) as s:
        api_applied(s, tmp_path)
        s.file.write_text(VISITOR + LOYAL)
        proc = s.start()
        line = chosen(proc)
        assert (line["chose"], line["version"], line["origin"], line["source"]) == (
            "served file",
            3,
            "file",
            str(s.file),
        )
        assert line["previous_version"] == 2
        assert line["why"] == (
            f"the served file changed since it was last applied from a file ({s.file}, "
            "version 2 in force): it takes effect, by a switch once the engine runs"
        )
        assert (
            line["served_hash"] == line["content_hash"] == content_hash(load_segments(s.file))[:12]
        )
        applied = s.status()["definitions_applied"]
        assert (applied["version"], applied["origin"], applied["source"]) == (
            3,
            "file",
            str(s.file),
        )
        # The documented transitions: the definitions change, cause `definition`.
        got = settled(s, "bob", 5)
        assert got[2:4] == [
            ("alice", "regular", "exited", "definition", 3),
            ("alice", "loyal", "entered", "definition", 4),
        ] or got[2:4] == [
            ("alice", "loyal", "entered", "definition", 3),
            ("alice", "regular", "exited", "definition", 4),
        ]


# The copies, in the test's task ------------------------------------------------------------


@asynccontextmanager
async def copies(url: str, db: Path) -> AsyncIterator[tuple[Store, DefinitionsKV]]:
    nc = await connect([url])
    store = await Store.open(db)
    try:
        yield store, await DefinitionsKV.open(nc)
    finally:
        await store.close()
        await nc.close()


def load_segments_of(text: str) -> SegmentSet:
    """Definitions as the API parses them."""
    return parse_segments(text, source="api.toml")


def big_list(tmp_path: Path, n: int = 120_000) -> Path:
    """A segments file whose list file holds more than 1 MiB of ids."""
    (tmp_path / "vip.txt").write_text("".join(f"customer-{i:012d}\n" for i in range(n)))
    path = tmp_path / "big.toml"
    path.write_text(
        '[lists.vip]\nfile = "vip.txt"\n[segments.vip]\nrule = "in_list(\'vip\')"\n' + VISITOR
    )
    assert (tmp_path / "vip.txt").stat().st_size > 2 << 20
    return path


async def test_a_list_larger_than_a_kv_value_round_trips(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    path = big_list(tmp_path)
    served_set = load_segments(path)
    async with copies(nats_server.url, tmp_path / "shoal.db") as (store, kv):
        keeper = DefinitionsKeeper(store, kv, SystemClock())
        assert await keeper.resume(served_set, str(path)) is served_set
        stored = await kv.load()
    assert stored is not None and stored.version == 1
    assert len(stored.lists["vip"]) == 120_000
    assert len(msgspec.json.encode(stored)) > client.max_payload  # so it is chunked
    head = await (await client.jetstream().key_value(DEFINITIONS_BUCKET)).get("current")
    assert json.loads(head.value or b"")["chunks"] >= 3
    again = segments_of(stored)
    assert again.fingerprint == served_set.fingerprint
    assert again.lists == served_set.lists

    # A new store (its copy lost): the bucket's copy is resumed, and the store's written.
    async with copies(nats_server.url, tmp_path / "other.db") as (store, kv):
        keeper = DefinitionsKeeper(store, kv, SystemClock())
        with structlog.testing.capture_logs() as logs:
            resumed = await keeper.resume(load_segments(path), str(path))
        assert resumed.lists == served_set.lists
        row = await store.definitions.get()
    assert row is not None and row.version == 1
    (repaired,) = [e for e in logs if e["event"] == "definitions copy repaired"]
    assert repaired["repaired"] == f"the store {tmp_path / 'other.db'}"
    assert repaired["why"] == "it holds none (wiped, or never written)"


async def test_kv_wiped_is_restored_from_the_sqlite_copy(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    clock = VirtualClock(1_000_000_000_000_000)
    db = tmp_path / "shoal.db"
    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, clock)
        await keeper.resume(load_segments(file), str(file))
        api = load_segments_of(VISITOR + REGULAR)
        clock.advance(60_000_000)
        await keeper.applied(api, ApiOrigin(source="api.toml", client="ops@host"))
    await client.jetstream().delete_key_value(DEFINITIONS_BUCKET)  # the broker's store wiped

    async with copies(nats_server.url, db) as (store, kv):
        assert await kv.load() is None
        keeper = DefinitionsKeeper(store, kv, clock)
        with structlog.testing.capture_logs() as logs:
            resumed = await keeper.resume(load_segments(file), str(file))
        restored = await kv.load()
    assert resumed.names == ("visitor", "regular")
    assert restored is not None and restored == keeper.current
    assert (restored.version, restored.origin) == (
        2,
        ApiOrigin(source="api.toml", client="ops@host"),
    )
    assert restored.last_file == FileOrigin(
        path=str(file), content_hash=content_hash(load_segments(file))
    )
    events = [e["event"] for e in logs]
    assert events == ["definitions copy repaired", "definitions chosen at start"]
    assert logs[0]["repaired"] == f"KV bucket {DEFINITIONS_BUCKET}"
    assert logs[0]["from_copy"] == f"the store {db}"
    assert logs[0]["version"] == 2


async def test_the_higher_version_wins_and_the_copy_behind_is_repaired(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    db = tmp_path / "shoal.db"
    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, SystemClock())
        await keeper.resume(load_segments(file), str(file))
        old_row = await store.definitions.get()
        await keeper.applied(load_segments_of(VISITOR + REGULAR), None)
        assert old_row is not None
        await store.definitions.put(old_row)  # the store's copy restored from a backup
    async with copies(nats_server.url, db) as (store, kv):
        keeper = DefinitionsKeeper(store, kv, SystemClock())
        with structlog.testing.capture_logs() as logs:
            resumed = await keeper.resume(load_segments(file), str(file))
        row = await store.definitions.get()
    assert resumed.names == ("visitor", "regular")
    assert row is not None and row.version == 2
    assert logs[0]["event"] == "definitions copy repaired"
    assert logs[0]["why"] == "it holds version 1, behind"


async def test_a_corrupt_kv_copy_is_repaired(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    file = tmp_path / "segments.toml"
    file.write_text(VISITOR)
    async with copies(nats_server.url, tmp_path / "shoal.db") as (store, kv):
        await DefinitionsKeeper(store, kv, SystemClock()).resume(load_segments(file), str(file))
        bucket = await client.jetstream().key_value(DEFINITIONS_BUCKET)
        head = json.loads((await bucket.get("current")).value or b"")
        await bucket.put(f"chunk.{head['sha256'][:32]}.0", b"garbage")
        with pytest.raises(StoredDefinitionsError, match="do not match their digest"):
            await kv.load()
        with structlog.testing.capture_logs() as logs:
            await DefinitionsKeeper(store, kv, SystemClock()).resume(load_segments(file), str(file))
        assert isinstance(await kv.load(), StoredDefinitions)
    assert logs[0]["event"] == "definitions copy repaired"
    assert logs[0]["why"].startswith("it cannot be read (the chunks of version 1 do not match")


def test_an_old_store_opens_and_gains_the_definitions_table(tmp_path: Path) -> None:
    db = tmp_path / "shoal.db"

    async def make() -> None:
        store = await Store.open(db)
        await store.close()

    anyio.run(make)
    with sqlite3.connect(db) as conn:  # as a shoal of schema version 2 left it
        conn.execute("DROP TABLE definitions")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")

    async def read_only() -> None:
        store = await Store.open_read_only(db)
        try:
            assert await store.definitions.get() is None
        finally:
            await store.close()

    anyio.run(read_only)

    async def reopen() -> None:
        store = await Store.open(db)
        try:
            assert await store.definitions.get() is None
        finally:
            await store.close()

    anyio.run(reopen)
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert version == (str(SCHEMA_VERSION),)
    assert "definitions" in tables
