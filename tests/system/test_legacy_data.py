"""A data directory written by an older shoal starts from its snapshots, with no rebuild.

``data/legacy-ddd092d/shoal.db`` was written by ``shoal serve`` at commit ddd092d (before
the engine was assembled from parts): 40 customers, 195 events through the default segments,
published transitions, and complete rounds of snapshots. Starting on it must load every
customer from its snapshot, read nothing from the log, and give each customer the
memberships and version its published transitions (the outbox) say it has.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import anyio
import msgspec
import nats

from actors import EngineConfig, VirtualClock, load_segments
from actors._stored import received_of
from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    Delivery,
    Transition,
    customer_of_event_subject,
    is_control_subject,
    partition_consumer,
    stored_event_subject,
)
from protocol.nats import read_stream, rejected_positions
from protocol.nats._migrate import plan, republish
from scripts._migrate_cmd import read_dump
from store import Store
from tests.helpers import SHOAL, NatsServer, eventually, free_port, run, running_engine, track
from tests.helpers import published as published_transitions

LEGACY = Path(__file__).parent / "data" / "legacy-ddd092d" / "shoal.db"
CUSTOMERS, EVENTS = 40, 195
# The latest instant the old engine evaluated a customer at; no deadline falls before
# 2026-12-06, so starting here fires nothing.
WRITTEN = 1_796_479_568_852_878


def published(db: Path) -> dict[str, tuple[set[str], int]]:
    """Each customer's memberships and version as its transitions in the outbox tell."""
    out: dict[str, tuple[set[str], int]] = {}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT body FROM transitions ORDER BY customer_id, version")
        for (body,) in rows:
            t = msgspec.json.decode(body, type=Transition)
            members, _ = out.get(t.customer_id, (set(), 0))
            if t.change == "entered":
                members.add(t.segment)
            else:
                members.discard(t.segment)
            out[t.customer_id] = (members, t.version)
    return out


async def test_old_data_dir_starts_from_its_snapshots(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    shutil.copy(LEGACY, db)
    expected = published(db)
    assert len(expected) == CUSTOMERS

    clock = VirtualClock(WRITTEN)
    async with running_engine(
        nats_server.url, db, load_segments(), clock=clock, config=EngineConfig()
    ) as engine:
        await eventually(lambda: engine.warm and engine.customer_count == CUSTOMERS)
        stats = engine.stats
        assert (stats.snapshots_loaded, stats.snapshots_ignored) == (CUSTOMERS, 0)
        assert stats.rebuilt_events == 0  # not one event read from the log
        found = {}
        for customer_id in expected:
            c = engine.customer(customer_id)
            assert c is not None
            found[customer_id] = (set(c.members), c.version)
        assert found == expected
        assert stats.transitions == 0  # nothing changed by starting

    # The same store rebuilt from the log alone holds the same customers.
    log_db = tmp_path / "log" / "shoal.db"
    log_db.parent.mkdir()
    shutil.copy(LEGACY, log_db)
    async with running_engine(
        nats_server.url,
        log_db,
        load_segments(),
        clock=VirtualClock(WRITTEN),
        config=EngineConfig(use_snapshots=False),
        consumer="rebuild",
    ) as engine:
        assert engine.stats.rebuilt_events == EVENTS
        assert engine.customer_count == CUSTOMERS


# Issue 18: a data directory and streams made before partitions, migrated -----------------

PRE18 = Path(__file__).parent / "data" / "legacy-b1675b5"
PRE18_FACTS = json.loads((PRE18 / "fixture.json").read_text())
PARTITIONS = DEFAULT_PARTITIONS
# The old stream: 111 live events (one the old engine rejected), an import (5 events
# between its 2 markers), all committed; then a tail of 6 events no engine read. The
# rejected one is left out: SHOAL_REJECTED keeps it.
COMMITTED_EVENTS = PRE18_FACTS["live"] - PRE18_FACTS["rejected"] + PRE18_FACTS["imported"]
TAIL = PRE18_FACTS["tail"]
# The new stream: the migration's begin markers, the committed events, the old import's
# markers (one per partition each), the tail, the migration's end markers.
THROUGH = PARTITIONS + COMMITTED_EVENTS + 2 * PARTITIONS
MIGRATED = THROUGH + TAIL + PARTITIONS


def pre18_data(tmp_path: Path) -> Path:
    """A copy of the pre-18 data directory (``shoal.db`` and the broker store ``nats/``)."""
    data = tmp_path / "data"
    shutil.copytree(PRE18 / "data", data)
    return data


async def stream_deliveries(url: str) -> list[Delivery]:
    nc = await nats.connect(url)
    try:
        return [d async for chunk in read_stream(nc, EVENTS_STREAM, "shoal.>") for d in chunk]
    finally:
        await nc.close()


async def logged(db: Path) -> set[tuple[str, str, int, int, bytes]]:
    """Each event of a store's log: customer, message id, event instant, receive instant and
    the body logged."""
    async with await Store.open_read_only(db) as store:
        return {
            (e.customer_id, e.message_id, e.at, received_of(e), e.body)
            async for chunk in store.events.read()
            for e in chunk
        }


async def floors(url: str, prefix: str = "shoal-engine") -> tuple[set[int], int]:
    """The acknowledgement floors of the partitions' consumers, and their pending total."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        infos = [
            await js.consumer_info(EVENTS_STREAM, partition_consumer(prefix, p))
            for p in range(PARTITIONS)
        ]
        return {i.ack_floor.stream_seq for i in infos}, sum(i.num_pending for i in infos)
    finally:
        await nc.close()


async def published_past(url: str, versions: dict[str, int], timeout: float = 10.0) -> None:
    """Wait until ``SHOAL_SEGMENTS`` holds a transition past the version given for each
    customer."""
    with anyio.fail_after(timeout):
        while True:
            last: dict[str, int] = {}
            for t in await published_transitions(url):
                last[t.customer_id] = max(last.get(t.customer_id, 0), t.version)
            if all(last.get(c, 0) > v for c, v in versions.items()):
                return
            await anyio.sleep(0.1)


def check_versions(transitions: list[Transition]) -> dict[str, int]:
    """Every customer's transitions are numbered 1, 2, ... with no gap and no repeat; returns
    each customer's last version."""
    versions: dict[str, list[int]] = {}
    for t in transitions:
        versions.setdefault(t.customer_id, []).append(t.version)
    for customer_id, vs in versions.items():
        assert sorted(vs) == list(range(1, len(vs) + 1)), (customer_id, vs)
    return {c: len(vs) for c, vs in versions.items()}


async def test_migrate_pre18_data_then_the_engine_goes_on(tmp_path: Path) -> None:
    """Done-when of issue 18: a data directory and streams made by shoal before partitions
    (b1675b5) are migrated by ``shoal migrate``, and the engine then goes on with continuous
    versions, the old engine's unread tail applied and the old states kept."""
    data = pre18_data(tmp_path)
    db = data / "shoal.db"
    before = published(db)
    old_log = await logged(db)
    assert len(old_log) == COMMITTED_EVENTS
    server = NatsServer(data / "nats")
    server.start()
    try:
        old = await stream_deliveries(server.url)
        assert len(old) == PRE18_FACTS["stream_messages"]
        written = max(d.received for d in old)
        nc = await nats.connect(server.url)
        try:
            rejected = await rejected_positions(nc)
        finally:
            await nc.close()
        assert len(rejected) == PRE18_FACTS["rejected"]
        old_events = [
            d
            for d in old
            if d.subject.startswith("shoal.events.") and d.stream_sequence not in rejected
        ]

        refused = run("serve", "--data-dir", str(data), "--nats", server.url)
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1] == (
            "shoal: error: stream SHOAL_EVENTS was made by an earlier shoal, without "
            "partitions: this shoal reads events only from a partitioned stream. Migrate the "
            f"stream and the data directory with `shoal migrate --data-dir {data} --nats "
            f"{server.url}`, then start again"
        )

        done = run("migrate", "--data-dir", str(data), "--nats", server.url)
        assert done.returncode == 0, done.stderr
        assert f"goes on after position {THROUGH} " in done.stdout
        assert f"{TAIL} messages the old engine had not read" in done.stdout
        assert "; 1 the old engine rejected left out (kept in SHOAL_REJECTED)." in done.stdout
        assert not (data / "migrate").exists()

        new = await stream_deliveries(server.url)
        assert len(new) == MIGRATED
        # The same events in the same order, each under its partition, with its log id.
        moved = [d for d in new if not is_control_subject(d.subject)]
        assert [customer_of_event_subject(d.subject) for d in moved] == [
            customer_of_event_subject(d.subject) for d in old_events
        ]
        assert [d.data for d in moved] == [d.data for d in old_events]
        assert {d.subject for d in moved} == {
            stored_event_subject(customer_of_event_subject(d.subject), PARTITIONS) for d in moved
        }
        assert [d.default_message_id for d in moved] == [d.default_message_id for d in old_events]
        # Each partition's consumer starts after what the old engine had committed.
        assert await floors(server.url) == ({THROUGH}, TAIL + PARTITIONS)
        async with await Store.open_read_only(db) as store:
            assert store.stream_through == THROUGH
            assert dict(store.partitions_through) == dict.fromkeys(range(PARTITIONS), THROUGH)
            assert len(store.open_imports) == PARTITIONS  # the migration's, in each
        assert (
            "nothing to migrate"
            in run("migrate", "--data-dir", str(data), "--nats", server.url).stdout
        )

        # The engine: it reads the tail, applies the import's end, then new live events.
        async with running_engine(
            server.url, db, load_segments(), clock=VirtualClock(written)
        ) as engine:
            await eventually(lambda: engine.stats.imports_applied >= 1)
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                for customer_id in ("c10", "c11", "c05"):
                    await js.publish(
                        f"shoal.events.{customer_id}",
                        track(customer_id, "Email Opened", mid=f"after-{customer_id}"),
                    )
            finally:
                await nc.close()
            await published_past(server.url, {i: before[i][1] for i in ("c10", "c11")})
            await eventually(lambda: engine.unpublished == 0)
            stats = engine.stats
            assert stats.imported_events == TAIL
            # Each partition's consumer went on after THROUGH: nothing read twice, and only
            # the migration's import applied (the old import was, by the old engine).
            assert (stats.events_duplicate, stats.imports_applied) == (0, 1)
            # The tail, read as the migration's import: c05's and c06's opens, t00 new.
            for customer_id in ("c05", "c06"):
                c = engine.customer(customer_id)
                assert c is not None and "opens_no_clicks" in c.members
            t00 = engine.customer("t00")
            assert t00 is not None and "new_customer" in t00.members
            # Everyone else as the old outbox left them.
            for customer_id, (members, version) in before.items():
                if customer_id in ("c05", "c06", "c07", "c10", "c11"):
                    continue
                c = engine.customer(customer_id)
                assert c is not None
                assert (set(c.members), c.version) == (members, version), customer_id

        transitions = await published_transitions(server.url)
        last = check_versions(transitions)
        for customer_id in ("c10", "c11"):
            mine = [t for t in transitions if t.customer_id == customer_id]
            after = [t for t in mine if t.version > before[customer_id][1]]
            assert after and after[0].version == before[customer_id][1] + 1
            assert ("opens_no_clicks", "entered") in {(t.segment, t.change) for t in after}
        assert last["t00"] >= 1

        # The log: the old one kept, the tail and the new events added; and a rebuild from
        # the migrated stream alone logs the same.
        migrated_log = await logged(db)
        assert old_log <= migrated_log
        assert len(migrated_log) == COMMITTED_EVENTS + TAIL + 3
        rebuilt = tmp_path / "rebuilt"
        out = run(
            "rebuild", "--from-stream", "--data-dir", str(rebuilt), "--nats", server.url,
            "--consumer", "rebuild",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert await logged(rebuilt / "shoal.db") == migrated_log
    finally:
        server.stop()


async def test_migrate_refuses_a_running_engine_and_resumes_after_a_stop_at_any_step(
    tmp_path: Path,
) -> None:
    """Run by the embedded broker of the data directory (so as the engine role, with its
    key): stopped after each step, and once in the middle of the republishing, a run again
    finishes the migration, with every message once, in order."""
    data = pre18_data(tmp_path)
    port = str(free_port())
    migrate = ("migrate", "--data-dir", str(data), "--port", port)

    async with await Store.open(data / "shoal.db"):
        refused = run(*migrate)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"shoal: error: {data / 'shoal.db'} is in use by a running engine: stop it "
        "(`shoal serve`), then migrate"
    )

    def stopped_after(step: str) -> None:
        done = subprocess.run(
            [*SHOAL, *migrate],
            env={**os.environ, "SHOAL_MIGRATE_STOP_AFTER": step},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().endswith(
            f"stopped after step {step!r} (SHOAL_MIGRATE_STOP_AFTER)"
        )

    stopped_after("dumped")
    state = json.loads((data / "migrate" / "state.json").read_text())
    assert (state["stage"], state["committed"]) == ("dumped", PRE18_FACTS["stream_messages"] - TAIL)
    stopped_after("replaced")

    # A stop in the middle of the republishing: the first 100 messages stored.
    messages = [m for piece in read_dump(data / "migrate" / "messages.msgpack") for m in piece]
    made = plan(
        messages,
        migration_id=state["migration_id"],
        partitions=PARTITIONS,
        committed=state["committed"],
        rejected=set(state["rejected"]),
    )
    assert len(made.rejected) == PRE18_FACTS["rejected"]
    server = NatsServer(data / "nats")
    server.start()
    try:
        nc = await nats.connect(server.url)
        try:
            await republish(nc.jetstream(), made.messages[:100])
        finally:
            await nc.close()
    finally:
        server.stop()
    stopped_after("republished")
    done = run(*migrate)
    assert done.returncode == 0, done.stderr
    assert f"goes on after position {THROUGH} " in done.stdout
    assert not (data / "migrate").exists()

    server = NatsServer(data / "nats")
    server.start()
    try:
        stored = await stream_deliveries(server.url)
        assert [(d.subject, d.data, d.msg_id, d.import_id, d.received_at) for d in stored] == [
            (
                m.subject,
                m.data,
                m.headers.get("Nats-Msg-Id"),
                m.headers.get("Shoal-Import"),
                m.headers.get("Shoal-Received-At"),
            )
            for m in made.messages
        ]
        assert len(stored) == MIGRATED
        assert await floors(server.url) == ({THROUGH}, TAIL + PARTITIONS)
    finally:
        server.stop()
    async with await Store.open_read_only(data / "shoal.db") as store:
        assert store.stream_through == THROUGH
        assert set(store.open_imports) == {
            f"{state['migration_id']}@{p}" for p in range(PARTITIONS)
        }
