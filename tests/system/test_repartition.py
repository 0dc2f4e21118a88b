"""``shoal migrate --partitions P`` on a stream already split into another number of
partitions: the engine's stream and data directory re-split, and the engine going on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import anyio
import msgspec
import nats

from actors import VirtualClock, load_segments
from actors.rules import parse_segments
from protocol import (
    EVENTS_STREAM,
    Delivery,
    StoredDefinitions,
    Transition,
    customer_of_event_subject,
    decode_marker,
    definitions_marker_subject,
    import_marker_subject,
    is_control_subject,
    is_definitions_marker,
    partition_consumer,
)
from protocol.nats import (
    DefinitionsKV,
    StreamSettings,
    connect,
    ensure_streams,
    stream_partitions,
)
from protocol.nats._migrate import Repartitioner, republish
from scripts._migrate_cmd import _State, read_dump
from store import Store
from tests.actors.test_definitions_persist import REGULAR, VISITOR, Served, served
from tests.helpers import (
    SHOAL,
    NatsServer,
    engine_consumers,
    eventually,
    now,
    run,
    running_engine,
    track,
)
from tests.helpers import published as published_transitions
from tests.system.test_legacy_data import (
    check_versions,
    logged,
    pre18_data,
    stream_deliveries,
)

OLD, NEW = 4, 7
CUSTOMERS = [f"c{i:02}" for i in range(40)]


async def _declare(url: str, partitions: int) -> None:
    nc = await connect([url])
    try:
        await ensure_streams(nc.jetstream(), StreamSettings(partitions=partitions))
    finally:
        await nc.close()


async def _publish(url: str, events: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for customer, body in events:
            await js.publish(f"shoal.events.{customer}", body)
    finally:
        await nc.close()


def _visit(customer: str, n: str, mid: bool) -> tuple[str, bytes]:
    return customer, track(customer, "Visit", mid=f"{customer}-{n}" if mid else None, n=n)


def _round(n: int) -> list[tuple[str, bytes]]:
    """A Visit of every customer, every other one with a messageId."""
    return [_visit(c, str(n), bool(i % 2)) for i, c in enumerate(CUSTOMERS)]


TAIL = [_visit("c01", "t", True), _visit("c02", "t", False), _visit("t00", "t", False)]
TAIL += [_visit("c03", "t", True)]


def old_engine(s: Served, tmp_path: Path) -> None:
    """An engine on a stream of OLD partitions: two rounds of visits, new definitions applied
    over the API between them (version 2, marked in every partition), stopped; then a tail
    of visits it never reads."""
    anyio.run(_declare, s.url, OLD)
    s.file.write_text(VISITOR)
    s.start()
    anyio.run(_publish, s.url, _round(1))
    anyio.run(eventually, lambda: s.status()["events_applied"] == len(CUSTOMERS), 20.0)
    api = tmp_path / "api.toml"
    api.write_text(VISITOR + REGULAR)
    s.shoal("segments", "apply", str(api))
    anyio.run(_publish, s.url, _round(2))
    anyio.run(eventually, lambda: s.status()["events_applied"] == 2 * len(CUSTOMERS), 20.0)
    s.stop()
    anyio.run(_publish, s.url, TAIL)


def _customers(stream: list[Delivery]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for d in stream:
        if not is_control_subject(d.subject):
            out.setdefault(customer_of_event_subject(d.subject), []).append(d.data)
    return out


async def _record(db: Path, url: str) -> StoredDefinitions:
    """The store's record of the definitions in force, checked equal to the broker's copy."""
    async with await Store.open_read_only(db) as store:
        row = await store.definitions.get()
    assert row is not None
    record = msgspec.json.decode(row.body, type=StoredDefinitions)
    nc = await connect([url])
    try:
        assert await (await DefinitionsKV.open(nc)).load() == record
    finally:
        await nc.close()
    return record


def test_repartition_then_the_engine_goes_on(nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.url
    with served(nats_server, tmp_path) as s:
        old_engine(s, tmp_path)
        db = s.data / "shoal.db"
        old_stream = anyio.run(stream_deliveries, url)
        before = check_versions(anyio.run(published_transitions, url))
        old_log = anyio.run(logged, db)
        assert len(old_log) == 2 * len(CUSTOMERS)

        # Without --partitions: the stream's own, nothing to do.
        same = run("migrate", "--data-dir", str(s.data), "--nats", url)
        assert same.stdout.strip() == f"{EVENTS_STREAM} is partitioned ({OLD} partitions): " + (
            "nothing to migrate"
        )
        done = run("migrate", "--data-dir", str(s.data), "--nats", url, "--partitions", str(NEW))
        assert done.returncode == 0, done.stderr
        migration = done.stdout.split(" as import ")[1].split(".")[0]
        # 7 begin markers, the first round, 7 definitions markers, the second round.
        through = NEW + len(CUSTOMERS) + NEW + len(CUSTOMERS)
        assert done.stdout == (
            f"SHOAL_EVENTS: {2 * len(CUSTOMERS) + len(TAIL)} events and the markers of 0 "
            "imports and 1 definitions switches of the old stream "
            f"({2 * len(CUSTOMERS) + OLD + len(TAIL)} messages in {OLD} partitions) "
            f"republished into {NEW} partitions as import {migration}. The engine goes on "
            f"after position {through} (consumers shoal-engine-0 to shoal-engine-{NEW - 1}): "
            f"{len(TAIL)} messages the engine had not read, then the import's end markers\n"
        )
        assert not (s.data / "migrate").exists()

        new_stream = anyio.run(stream_deliveries, url)
        # Every customer's events, in their order; the unread tail after what was committed.
        assert _customers(new_stream) == _customers(old_stream)
        after = [d for d in new_stream if d.stream_sequence > through]
        assert [d.data for d in after if not is_control_subject(d.subject)] == [
            body for _, body in TAIL
        ]

        async def consumers() -> dict[str, str | None]:
            nc = await nats.connect(url)
            try:
                js = nc.jetstream()
                assert await stream_partitions(js) == NEW
                infos = await engine_consumers(js)
                for info in infos.values():
                    assert info.ack_floor is not None
                    assert info.ack_floor.stream_seq == through
                return {name: i.config.filter_subject for name, i in infos.items()}
            finally:
                await nc.close()

        assert anyio.run(consumers) == {
            partition_consumer("shoal-engine", p): f"shoal.events.{p}.>" for p in range(NEW)
        }

        # Version 2's markers: one per new partition, each naming the partition's last
        # position applied under version 1 (the first round, and the markers before).
        markers = [d for d in new_stream if is_definitions_marker(d.subject)]
        assert sorted(d.subject for d in markers) == sorted(
            definitions_marker_subject(p, 2) for p in range(NEW)
        )
        first = {body for _, body in _round(1)}
        record = anyio.run(_record, db, url)
        assert record.version == 2 and record.applied_through is not None
        for m in markers:
            p = int(m.subject.split(".")[2])
            mine = [d for d in new_stream if int(d.subject.split(".")[2]) == p]
            earlier = [d for d in mine if d.stream_sequence < m.stream_sequence]
            body = decode_marker(m.data)
            assert body.applied_through == max((d.stream_sequence for d in earlier), default=0)
            assert record.applied_through[p] == body.applied_through
            assert {d.data for d in earlier if not is_control_subject(d.subject)} == {
                d.data for d in mine if d.data in first
            }

        # The engine again: the tail (the migration's import), then new visits.
        s.start()
        anyio.run(_publish, url, [_visit("c01", "3", True), _visit("c04", "3", False)])

        def settled() -> bool:
            status = s.status()
            return (
                migration in status["imports_applied"]
                and status["consumer_lag"] == 0
                and status["unpublished"] == 0
                and status["events_applied"] >= 2
            )

        anyio.run(eventually, settled, 20.0)
        status = s.status()
        assert (status["events_duplicate"], status["events_rejected"]) == (0, 0)
        assert status["imports_open"] == []
        s.stop()

    transitions: list[Transition] = anyio.run(published_transitions, url)
    last = check_versions(transitions)  # no restart, gap or repeat
    # Two visits made everyone a visitor and regular: the tail and later visits change
    # nothing but for t00, new (a visitor, version 1).
    assert last == {**before, "t00": 1}
    migrated_log = anyio.run(logged, db)
    assert old_log <= migrated_log
    assert len(migrated_log) == len(old_log) + len(TAIL) + 2

    async def consumers_now() -> set[str]:
        nc = await nats.connect(url)
        try:
            return set(await engine_consumers(nc.jetstream()))
        finally:
            await nc.close()

    now = anyio.run(consumers_now)
    assert len(now) == NEW + 1
    assert {_partition_of_consumer(name) for name in now} == {*range(NEW), "unpartitioned"}
    # The new stream alone rebuilds the same log.
    rebuilt = tmp_path / "rebuilt"
    out = run(
        "rebuild", "--from-stream", "--data-dir", str(rebuilt), "--nats", url,
        "--consumer", "rebuild",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert anyio.run(logged, rebuilt / "shoal.db") == migrated_log


def test_repartition_resumes_after_a_stop_at_any_step(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    with served(nats_server, tmp_path) as s:
        old_engine(s, tmp_path)
    data = s.data
    migrate = ("migrate", "--data-dir", str(data), "--nats", url, "--partitions", str(NEW))

    async def refused_while_another_engine_reads() -> None:
        # Another engine (a copy of the store) on the stream: its consumers are bound.
        other = tmp_path / "other" / "shoal.db"
        other.parent.mkdir()
        shutil.copy(data / "shoal.db", other)
        async with running_engine(url, other, parse_segments(VISITOR)):
            refused = await anyio.to_thread.run_sync(lambda: run(*migrate))
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "shoal: error: consumer 'shoal-engine-0' of SHOAL_EVENTS is in use: an engine is "
            "running on this stream; stop it, then migrate"
        )

    anyio.run(refused_while_another_engine_reads)
    assert not (data / "migrate").exists()

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
    state = msgspec.json.decode((data / "migrate" / "state.json").read_bytes(), type=_State)
    assert (state.stage, state.old_partitions, state.partitions) == ("dumped", OLD, NEW)
    assert state.switch is not None and state.switch.version == 2
    # Not the partitions asked for at first: refused.
    other = run("migrate", "--data-dir", str(data), "--nats", url, "--partitions", "5")
    assert other.returncode == 2
    assert f"run it with --partitions {NEW} to finish it" in other.stderr
    stopped_after("replaced")

    planner = Repartitioner(
        migration_id=state.migration_id,
        partitions=NEW,
        old_partitions=OLD,
        committed=state.committed_in,
        rejected=set(state.rejected),
        switch=state.switch,
    )
    made = list(
        planner.messages(lambda only: read_dump(data / "migrate" / "messages.msgpack", only))
    )

    async def partly() -> None:
        nc = await nats.connect(url)
        try:
            await republish(nc.jetstream(), made[:30])
        finally:
            await nc.close()

    anyio.run(partly)
    stopped_after("republished")
    done = run(*migrate)
    assert done.returncode == 0, done.stderr
    assert f"goes on after position {planner.through} " in done.stdout
    assert not (data / "migrate").exists()

    stored = anyio.run(stream_deliveries, url)
    assert [(d.subject, d.data, d.msg_id, d.import_id, d.received_at) for d in stored] == [
        (
            m.subject,
            m.data,
            m.headers.get("Nats-Msg-Id"),
            m.headers.get("Shoal-Import"),
            m.headers.get("Shoal-Received-At"),
        )
        for m in made
    ]

    async def check_store() -> None:
        async with await Store.open_read_only(data / "shoal.db") as store:
            assert store.stream_through == planner.through
            assert dict(store.partitions_through) == dict.fromkeys(range(NEW), planner.through)
            assert set(store.open_imports) == {f"{state.migration_id}@{p}" for p in range(NEW)}
            assert await store.definitions.marked() == 2

    anyio.run(check_store)
    again = run("migrate", "--data-dir", str(data), "--nats", url)
    assert again.stdout.strip().endswith("nothing to migrate")


async def test_a_stream_migrated_from_an_earlier_shoal_re_partitioned(tmp_path: Path) -> None:
    """The pre-18 fixture (an import, a rejected event, an unread tail) migrated into 32
    partitions and read by the engine (the two imports' markers, the first migration's
    included), then re-split into 5: the engine goes on with nothing
    read twice, and the new stream rebuilds the same log."""
    data = pre18_data(tmp_path)
    db = data / "shoal.db"
    server = NatsServer(data / "nats")
    server.start()
    try:
        written = max(d.received for d in await stream_deliveries(server.url))
        migrate = ("migrate", "--data-dir", str(data), "--nats", server.url)
        done = await anyio.to_thread.run_sync(lambda: run(*migrate))
        assert done.returncode == 0, done.stderr
        clock = VirtualClock(written)
        async with running_engine(server.url, db, load_segments(), clock=clock) as engine:
            await eventually(lambda: engine.stats.imports_applied == 1)
            await eventually(lambda: engine.unpublished == 0)
        log = await logged(db)
        before = check_versions(await published_transitions(server.url))

        done = await anyio.to_thread.run_sync(lambda: run(*migrate, "--partitions", "5"))
        assert done.returncode == 0, done.stderr
        # The rejected event was left out by the first migration already.
        assert "left out" not in done.stdout
        assert ": 0 messages the engine had not read" in done.stdout
        async with running_engine(server.url, db, load_segments(), clock=clock) as engine:
            await eventually(lambda: engine.stats.imports_applied == 1)
            await eventually(lambda: engine.unpublished == 0)
            assert (engine.stats.events_duplicate, engine.stats.transitions) == (0, 0)
        assert await logged(db) == log
        assert check_versions(await published_transitions(server.url)) == before
        rebuilt = tmp_path / "rebuilt"
        out = await anyio.to_thread.run_sync(
            lambda: run(
                "rebuild",
                "--from-stream",
                "--data-dir",
                str(rebuilt),
                "--nats",
                server.url,
                "--consumer",
                "rebuild",
            )  # fmt: skip
        )
        assert out.returncode == 0, out.stderr
        assert await logged(rebuilt / "shoal.db") == log
    finally:
        server.stop()


async def test_an_import_open_at_the_stop_ends_after_the_re_partitioning(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """An import begun in every old partition, its events read, and its end markers
    published only once the engine stopped: re-partitioned, it is open in every new
    partition, and the engine applies it at the new end markers."""
    url = nats_server.url
    await _declare(url, OLD)
    db = tmp_path / "data" / "shoal.db"
    db.parent.mkdir()
    imported = [f"i{n}" for n in range(8)]
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()

        async def markers(stage: str) -> None:
            for q in range(OLD):
                await js.publish(
                    import_marker_subject("imp", stage, q), b"", headers={"Shoal-Import": "imp"}
                )

        async with running_engine(url, db, parse_segments(VISITOR)) as engine:
            await markers("begin")
            for n, customer in enumerate(imported):
                headers = {"Shoal-Import": "imp", "Shoal-Received-At": str(now() - 1000 + n)}
                await js.publish(f"shoal.events.{customer}", track(customer), headers=headers)
            await js.publish("shoal.events.live", track("live", mid="live-1"))
            await eventually(lambda: engine.stats.imported_events == len(imported))
            # Logged; its customers are made at its end.
            await eventually(lambda: engine.customer_count == 1)
            await eventually(lambda: engine.unpublished == 0)
        await markers("end")  # never read by that engine
    finally:
        await nc.close()
    async with await Store.open_read_only(db) as store:
        assert set(store.open_imports) == {f"imp@{q}" for q in range(OLD)}
    log = await logged(db)

    migrate = ("migrate", "--data-dir", str(db.parent), "--nats", url, "--partitions", "3")
    done = await anyio.to_thread.run_sync(lambda: run(*migrate))
    assert done.returncode == 0, done.stderr
    assert "the markers of 1 imports" in done.stdout
    assert f": {OLD} messages the engine had not read" in done.stdout
    migration = done.stdout.split(" as import ")[1].split(".")[0]
    async with await Store.open_read_only(db) as store:
        assert set(store.open_imports) == {f"{i}@{p}" for i in ("imp", migration) for p in range(3)}

    async with running_engine(url, db, parse_segments(VISITOR)) as engine:
        await eventually(lambda: engine.stats.imports_applied == 2)
        assert engine.stats.events_duplicate == 0
        assert engine.customer_count == len(imported) + 1
        await eventually(lambda: engine.unpublished == 0)
    async with await Store.open_read_only(db) as store:
        assert store.open_imports == {}
    assert await logged(db) == log
    rebuilt = tmp_path / "rebuilt"
    out = await anyio.to_thread.run_sync(
        lambda: run(
            "rebuild",
            "--from-stream",
            "--data-dir",
            str(rebuilt),
            "--nats",
            url,
            "--consumer",
            "rebuild",
        )  # fmt: skip
    )
    assert out.returncode == 0, out.stderr
    assert await logged(rebuilt / "shoal.db") == log


def _partition_of_consumer(name: str) -> int | str:
    """The partition of an engine's consumer ``shoal-engine-<partition>-<claim>``."""
    match = re.fullmatch(r"shoal-engine-([0-9]+|unpartitioned)-[0-9]+", name)
    assert match is not None, name
    part = match.group(1)
    return part if part == "unpartitioned" else int(part)
