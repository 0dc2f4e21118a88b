"""Issue 20's done-when for upgrades: a data directory made by the shoal of the commit before
it (484eaec, ``data/legacy-484eaec/``, see its ``make_484eaec.py``) starts under today's
``shoal serve``, which upgrades every stored format in place and says so, and goes on from
it; and data claiming a format newer than this shoal knows is refused with a clear message,
never misread.

The fixture: 32 customers (30 live, 2 imported), 106 events logged, 64 transitions
published, definitions version 2 applied over the API (the shipped segments and
``visited_twice``), a complete round of customer snapshots, and each partition's snapshot
in the Object Store; schema version 3, no ``shoal_format`` on any stream or bucket, the
definitions records without ``format``.

``serve`` runs on the real clock: deadlines due since the fixture was made (inactive_14d,
say) fire at start. So each customer is checked against all its published transitions,
the fixture's and those since, and the versions must go on 1, 2, ... without a gap.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from actors._customer import SNAPSHOT_FORMAT as CUSTOMER_FORMAT
from protocol import (
    DEFAULT_PARTITIONS,
    DEFINITIONS_FORMAT,
    EVENTS_STREAM,
    REJECTED_STREAM,
    SEGMENTS_STREAM,
    STREAM_FORMAT,
    Transition,
    decode_definitions,
)
from protocol._ownership import SNAPSHOT_FORMAT
from protocol.nats import ApiClient, DefinitionsKV, SnapshotStore
from store import SCHEMA_VERSION
from tests.helpers import NatsServer, Proc, free_port, published, run, track

FIXTURE = Path(__file__).parent / "data" / "legacy-484eaec"
FACTS = json.loads((FIXTURE / "fixture.json").read_text())
STREAMS = (
    EVENTS_STREAM,
    SEGMENTS_STREAM,
    REJECTED_STREAM,
    "KV_SHOAL_LEASES",
    "KV_SHOAL_DEFINITIONS",
    "OBJ_SHOAL_SNAPSHOTS",
)


def fixture_copy(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", data)
    return data


def serve(data: Path, port: int) -> Proc:
    return Proc(
        "serve", "--data-dir", str(data), "--port", str(port), "--no-auth",
        "--snapshot-interval", "1",
    )  # fmt: skip


def logged(proc: Proc) -> list[dict[str, Any]]:
    """The JSON log lines ``proc`` wrote on stderr so far."""
    out = []
    for line in proc.err:
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def upgrades(events: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {
        e["what"]: (e["from_format"], e["to_format"])
        for e in events
        if e["event"] == "upgraded in place"
    }


def fold(transitions: list[Transition]) -> dict[str, tuple[set[str], int]]:
    """Each customer's memberships and last version, as its transitions say; and checks
    that its versions are 1, 2, ... with no gap and no repeat."""
    by: dict[str, list[Transition]] = {}
    for t in transitions:
        by.setdefault(t.customer_id, []).append(t)
    out: dict[str, tuple[set[str], int]] = {}
    for customer_id, ts in by.items():
        ts.sort(key=lambda t: t.version)
        assert [t.version for t in ts] == list(range(1, len(ts) + 1)), customer_id
        members: set[str] = set()
        for t in ts:
            if t.change == "entered":
                members.add(t.segment)
            else:
                members.discard(t.segment)
        out[customer_id] = (members, ts[-1].version)
    return out


def outbox(db: Path) -> list[Transition]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT body FROM transitions").fetchall()
    return [msgspec.json.decode(body, type=Transition) for (body,) in rows]


async def test_a_484eaec_data_dir_is_upgraded_in_place_and_goes_on(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = fixture_copy(tmp_path)
    db = data / "shoal.db"
    before = fold(outbox(db))
    assert sum(v for _, v in before.values()) == FACTS["transitions"]
    assert len(before) == FACTS["customers"]
    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    first = serve(data, port)
    procs.append(first)
    first.wait_err("shoal is serving", timeout=60)
    events = logged(first)
    # Every stored format upgraded in place, each said once.
    assert upgrades(events) == {
        f"the store {db}": (3, SCHEMA_VERSION),
        **{f"stream {s}": (0, STREAM_FORMAT) for s in STREAMS[:3]},
        "KV bucket SHOAL_LEASES": (0, STREAM_FORMAT),
        "KV bucket SHOAL_DEFINITIONS": (0, STREAM_FORMAT),
        "Object Store bucket SHOAL_SNAPSHOTS": (0, STREAM_FORMAT),
        "the stored definitions": (0, DEFINITIONS_FORMAT),
    }
    assert [e["what"] for e in events if e["event"] == "upgraded in place"].count(
        "the stored definitions"
    ) == 1
    # Started from its snapshots: not one event read from the log.
    started = next(e for e in events if e["event"] == "engine started")
    assert (started["snapshots_loaded"], started["snapshots_ignored"]) == (FACTS["snapshots"], 0)
    assert started["rebuilt_events"] == 0
    # The definitions applied over the API (version 2) stay in force.
    chose = next(e for e in events if e["event"] == "definitions chosen at start")
    assert (chose["chose"], chose["version"], chose["origin"]) == ("stored", 2, "api")
    assert "visited_twice" in started["segments"]

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # Not a message touched: the events stream holds what it held.
        events_stream = await js.stream_info(EVENTS_STREAM)
        assert events_stream.state.messages == FACTS[EVENTS_STREAM]
        for stream in STREAMS:
            config = (await js.stream_info(stream)).config
            assert (config.metadata or {}).get("shoal_format") == str(STREAM_FORMAT), stream
        kv = await DefinitionsKV.open(nc)
        shared = await kv.load()
        assert shared is not None
        assert (shared.version, shared.format) == (2, DEFINITIONS_FORMAT)

        # Every customer as its published transitions say (deadlines due since included).
        api = ApiClient(nc)
        with anyio.fail_after(30):
            while True:
                now = fold(await published(url))
                answers = {c: await api.customer(c) for c in now}
                found = {
                    c: ({m.segment for m in r.segments}, r.version) for c, r in answers.items()
                }
                if found == now:
                    break
                await anyio.sleep(0.2)
        assert set(now) == set(before)
        for customer_id, (_, version) in before.items():
            assert now[customer_id][1] >= version
        twice = {c for c, (members, _) in now.items() if "visited_twice" in members}
        assert twice == {f"c{i:02d}" for i in range(30) if i % 3 or i < 10}

        # A new event goes on from the last version.
        last = now["c05"][1]
        await js.publish("shoal.events.c05", track("c05", "Email Opened", mid="after-upgrade"))
        with anyio.fail_after(20):
            while True:
                after = [t for t in await published(url) if t.customer_id == "c05"]
                if any(t.segment == "opens_no_clicks" for t in after):
                    break
                await anyio.sleep(0.1)
        opened = next(t for t in after if t.segment == "opens_no_clicks")
        assert (opened.change, opened.version) == ("entered", last + 1)
        assert fold(await published(url))["c05"][1] == last + 1
    finally:
        await nc.close()
    assert first.stop(signal.SIGTERM, timeout=30) == 0

    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        (body,) = conn.execute("SELECT body FROM definitions").fetchone()
    assert version == (str(SCHEMA_VERSION),)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (FACTS["logged"] + 1,)
    local = decode_definitions(body, "store")
    assert (local.version, local.format) == (2, DEFINITIONS_FORMAT)

    # A second start upgrades nothing.
    second = serve(data, port)
    procs.append(second)
    second.wait_err("shoal is serving", timeout=60)
    assert upgrades(logged(second)) == {}
    nc = await nats.connect(url)
    try:
        reply = await ApiClient(nc).customer("c05")
        assert reply.version == last + 1
    finally:
        await nc.close()
    assert second.stop(signal.SIGTERM, timeout=30) == 0


# Newer than this shoal knows: refused, with what, the format found and the one known -----


REFUSED_END = (
    "and this shoal knows {kind} up to {known}: it was written by a newer shoal. Run that "
    "shoal (or a later one) on this {on}; this one stops rather than misread it"
)


def refused(data: Path) -> str:
    done = run("serve", "--data-dir", str(data), "--port", str(free_port()), "--no-auth")
    assert done.returncode == 1, done.stderr
    last: str = done.stderr.strip().splitlines()[-1]
    return last


def test_a_newer_store_schema_is_refused(tmp_path: Path) -> None:
    data = fixture_copy(tmp_path)
    db = data / "shoal.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    # Closed: the change is in the file itself, which the refusal must leave as it is.
    untouched = db.read_bytes()
    assert refused(data) == (
        f"shoal: error: {db} has schema version 99, "
        + REFUSED_END.format(kind="versions", known=SCHEMA_VERSION, on="data directory")
    )
    assert db.read_bytes() == untouched


def test_newer_definitions_are_refused(tmp_path: Path) -> None:
    data = fixture_copy(tmp_path)
    db = data / "shoal.db"
    with sqlite3.connect(db) as conn:
        (body,) = conn.execute("SELECT body FROM definitions").fetchone()
        raw = msgspec.json.decode(body)
        conn.execute(
            "UPDATE definitions SET body = ?", (msgspec.json.encode(raw | {"format": 99}),)
        )
    assert refused(data) == (
        f"shoal: error: the definitions record in the store {db} has format 99, "
        + REFUSED_END.format(kind="formats", known=DEFINITIONS_FORMAT, on="data")
    )


async def test_a_newer_stream_is_refused(tmp_path: Path) -> None:
    data = fixture_copy(tmp_path)
    server = NatsServer(data / "nats")
    server.start()
    try:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            config = (await js.stream_info(SEGMENTS_STREAM)).config
            config.metadata = {"shoal_format": "99"}
            await js.update_stream(config)
        finally:
            await nc.close()
    finally:
        server.stop()
    assert refused(data) == (
        f"shoal: error: stream {SEGMENTS_STREAM} has format 99, "
        + REFUSED_END.format(kind="formats", known=STREAM_FORMAT, on="data")
    )


async def test_a_newer_partition_snapshot_is_refused(tmp_path: Path) -> None:
    """Read when a partition is taken over: here by an engine of another id."""
    data = fixture_copy(tmp_path)
    server = NatsServer(data / "nats")
    server.start()
    try:
        nc = await nats.connect(server.url)
        try:
            snapshots = SnapshotStore(nc, partitions=DEFAULT_PARTITIONS)
            snapshot = await snapshots.get(7)
            assert snapshot is not None
            await snapshots.put(msgspec.structs.replace(snapshot, format=99))
        finally:
            await nc.close()
    finally:
        server.stop()
    (data / "engine-id").unlink()
    assert refused(data) == (
        "shoal: error: the snapshot of partition 7 in Object Store bucket SHOAL_SNAPSHOTS has "
        "format 99, " + REFUSED_END.format(kind="formats", known=SNAPSHOT_FORMAT, on="data")
    )


def test_a_newer_customer_snapshot_is_refused(tmp_path: Path) -> None:
    data = fixture_copy(tmp_path)
    db = data / "shoal.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE snapshots SET format = 99 WHERE customer_id = 'c03'")
    assert refused(data) == (
        f"shoal: error: a customer snapshot in {db} has format 99, "
        + REFUSED_END.format(kind="formats", known=CUSTOMER_FORMAT, on="data")
    )


async def test_customer_snapshots_of_an_older_format_are_rebuilt_and_said(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """No older customer snapshot format exists yet: format 0 stands for one. Those
    customers are rebuilt from the log (the others load from their snapshots), with the
    same memberships and versions, and the log says so."""
    data = fixture_copy(tmp_path)
    db = data / "shoal.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE snapshots SET format = 0 WHERE customer_id IN ('c01', 'c02')")
    port = free_port()
    proc = serve(data, port)
    procs.append(proc)
    proc.wait_err("shoal is serving", timeout=60)
    events = logged(proc)
    assert upgrades(events)[f"the customer snapshots in {db}"] == (0, CUSTOMER_FORMAT)
    said = next(e for e in events if e.get("what") == f"the customer snapshots in {db}")
    assert said["customers"] == 2
    started = next(e for e in events if e["event"] == "engine started")
    assert (started["snapshots_loaded"], started["snapshots_ignored"]) == (
        FACTS["snapshots"] - 2,
        2,
    )
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        now = fold(await published(f"nats://127.0.0.1:{port}"))
        api = ApiClient(nc)
        for customer_id in ("c01", "c02"):
            reply = await api.customer(customer_id)
            assert ({m.segment for m in reply.segments}, reply.version) == now[customer_id]
    finally:
        await nc.close()
    assert proc.stop(signal.SIGTERM, timeout=30) == 0
