"""``shoal backup`` of a running engine under load, and ``shoal restore`` onto an empty broker
and data directory: everything in the backup comes back, the engine resumes, and versions go
on from the backup.

The engine runs as ``shoal serve`` with its embedded broker (its keys, so the backup and the
restore act with the engine's permissions). A producer publishes events with message ids all
along; the backup is taken while it does. The engine then takes every event, and what it
published is the reference: the run that never failed. The data directory (the broker's
store and the keys with it) is wiped, the backup restored, the engine started on it, and the
producer publishes again every event from the backup's start on (it cannot know which of
them the backup holds): the same message ids, so each is applied once. The restored
deployment then publishes exactly the reference's transitions: the same content under the
same (customer, version), none missing, none else.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from actors import replay
from protocol import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    Transition,
    decode_event,
    role_key_file,
)
from protocol.nats import Credentials, LeaseBucket, connect, read_stream
from scripts._backup_cmd import read_manifest
from store import Store
from tests.helpers import NatsServer, Proc, free_port, now, run, segments, serve_engine, track

RULES = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 3"

[segments.browsing]
rule = "count('Visit') >= 2 and count('Order Completed') == 0"
"""
TIME_RULES = """
[segments.recent]
rule = "count('Visit', within='2s') >= 1"

[segments.regular]
rule = "count('Visit') >= 3"
"""
"""Rules with deadlines: an event published again after the restore is a new receipt, so
where its customer's deadlines fall around it may differ from the first run's; what the
backup holds must not."""
P = 32
"""shoal serve's number of partitions."""
CUSTOMERS = 150
EVENTS = 3_000
BACKUP_AT = 1_000
"""Events published when the backup starts; the producer goes on meanwhile."""


def _events(*, stamped: bool = True) -> list[tuple[str, bytes]]:
    """The producer's events: (customer, payload), each with its message id and (when
    ``stamped``) a timestamp in the past, in order, so that publishing one again is the same
    event."""
    base = now() - 3_600_000_000
    out = []
    for i in range(EVENTS):
        c = f"c{(i * 7) % CUSTOMERS}"
        name = "Order Completed" if i % 11 == 10 else "Visit"
        at = base + i * 1_000 if stamped else None
        out.append((c, track(c, name, at=at, mid=f"m{i}")))
    return out


def serve(data: Path, port: int, rules: Path) -> Proc:
    return Proc(
        "serve",
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--segments",
        str(rules),
        "--snapshot-interval",
        "1",
    )


async def as_role(data: Path, port: int, role: str) -> Client:
    return await connect(
        [f"nats://127.0.0.1:{port}"],
        credentials=Credentials(nkey=role_key_file(data, role), role=role),
    )


async def produce(nc: Client, events: list[tuple[str, bytes]], sent: list[int]) -> None:
    js = nc.jetstream()
    for i, (c, payload) in enumerate(events):
        await js.publish(f"shoal.events.{c}", payload, timeout=5)
        sent[0] += 1
        if i % 25 == 24:
            await anyio.sleep(0.01)


def expected(events: list[tuple[str, bytes]]) -> dict[tuple[str, int], Transition]:
    """What one process replaying every event once makes (count rules: whatever their
    receive instants)."""
    received = now()
    decoded = [
        decode_event(payload, f"shoal.events.{c}", received=received, default_message_id="-")
        for c, payload in events
    ]
    return {(t.customer_id, t.version): t for t in replay(decoded, segments(RULES), until=now())}


async def stream_messages(nc: Client, stream: str, subjects: str) -> list[tuple[Any, ...]]:
    """Every message of ``stream``: (sequence, subject, payload, message id)."""
    out: list[tuple[Any, ...]] = []
    async for chunk in read_stream(nc, stream, subjects):
        out += [(d.stream_sequence, d.subject, bytes(d.data), d.msg_id) for d in chunk]
    return out


def by_version(
    messages: list[tuple[Any, ...]],
) -> tuple[dict[tuple[str, int], bytes], int]:
    """The transitions among ``messages`` by (customer, version), checking that one stored
    twice is the same transition; and how many were stored twice."""
    found: dict[tuple[str, int], bytes] = {}
    repeats = 0
    for _, subject, data, _ in messages:
        if not subject.startswith("shoal.segments."):
            continue
        t = msgspec.json.decode(data, type=Transition)
        key = (t.customer_id, t.version)
        if key in found:
            repeats += 1
            assert found[key] == data, f"version {key} reused with other content"
        found[key] = data
    return found, repeats


async def wait_published(
    nc: Client, want: dict[tuple[str, int], Transition] | None, timeout: float = 90
) -> dict[tuple[str, int], bytes]:
    """The transitions published, once they cover ``want``; without it, once no more come
    for 3 s (every window closed)."""
    last: dict[tuple[str, int], bytes] = {}
    quiet = 0
    with anyio.fail_after(timeout):
        while True:
            got, _ = by_version(await stream_messages(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD))
            if want is not None and got.keys() >= want.keys():
                return got
            quiet = quiet + 1 if want is None and got == last else 0
            if quiet >= 6:
                return got
            last = got
            await anyio.sleep(0.5)


def gap_free(published: dict[tuple[str, int], bytes]) -> None:
    versions: dict[str, list[int]] = defaultdict(list)
    for c, v in published:
        versions[c].append(v)
    for c, vs in versions.items():
        assert sorted(vs) == list(range(1, len(vs) + 1)), (c, sorted(vs))


async def store_rows(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    async with await Store.open_read_only(db) as store:
        events = [
            (e.seq, e.customer_id, e.message_id, e.body)
            async for rows in store.events.read()
            for e in rows
        ]
        outbox = [
            (o.seq, o.customer_id, o.version, o.body)
            async for rows in store.outbox.read()
            for o in rows
        ]
    return events, outbox


@pytest.mark.timeout(300)
@pytest.mark.parametrize("timed", [False, True], ids=["counts", "deadlines"])
async def test_backup_under_load_then_restore_resumes_with_versions_going_on(
    tmp_path: Path, procs: list[Proc], timed: bool
) -> None:
    rules = tmp_path / "segments.toml"
    rules.write_text(TIME_RULES if timed else RULES)
    data, backup = tmp_path / "data", tmp_path / "backup"
    events = _events(stamped=not timed)
    want = None if timed else expected(events)
    port = free_port()
    engine = serve(data, port, rules)
    procs.append(engine)
    engine.wait_err("shoal is serving", timeout=30)
    producer = await as_role(data, port, "producer")
    sent = [0]
    backed_up: list[Any] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, producer, events, sent)
            while sent[0] < BACKUP_AT:
                await anyio.sleep(0.01)
            started = sent[0]
            # Under load: the producer goes on while the backup runs.
            done = await anyio.to_thread.run_sync(
                lambda: run(
                    "backup",
                    str(backup),
                    "--data-dir",
                    str(data),
                    "--nats",
                    f"nats://127.0.0.1:{port}",
                )  # fmt: skip
            )
            backed_up += [started, sent[0]]
        assert done.returncode == 0, done.stderr
        assert "backed up" in done.stdout
    finally:
        await producer.close()
    start, end = backed_up
    assert start < end < EVENTS, "the backup did not run while events were published"
    manifest = read_manifest(backup)
    print(
        f"backup from event {start} to {end}: store through position "
        f"{manifest.store.stream_through}, "
        + ", ".join(f"{s.stream} {s.messages}" for s in manifest.streams)
    )
    assert [s.stream for s in manifest.streams][-1] == EVENTS_STREAM
    assert (manifest.store.stream_through or 0) >= start

    # The run that never failed: every event taken, every transition published.
    engine_nc = await as_role(data, port, "engine")
    try:
        original = await wait_published(engine_nc, want)
        original_events = await stream_messages(engine_nc, EVENTS_STREAM, EVENTS_WILDCARD)
        original_segments = await stream_messages(engine_nc, SEGMENTS_STREAM, ">")
    finally:
        await engine_nc.close()
    assert engine.stop() == 0
    if want is not None:
        assert {k: msgspec.json.decode(v, type=Transition) for k, v in original.items()} == want
    gap_free(original)
    logged, outbox = await store_rows(data / "shoal.db")
    keys = {role: role_key_file(data, role).read_bytes() for role in ("engine", "producer")}

    # Lost: the broker's store, the store, the keys, everything.
    shutil.rmtree(data)
    port = free_port()
    done = run("restore", str(backup), "--data-dir", str(data), "--port", str(port))
    assert done.returncode == 0, done.stderr
    assert "restored" in done.stdout
    assert {role: role_key_file(data, role).read_bytes() for role in keys} == keys

    engine = serve(data, port, rules)
    procs.append(engine)
    engine.wait_err("shoal is serving", timeout=30)
    engine_nc = await as_role(data, port, "engine")
    try:
        # Everything in the backup is back, as it was: each stream's messages through its
        # last position in the backup (sequence, subject, payload, message id).
        restored_events = await stream_messages(engine_nc, EVENTS_STREAM, EVENTS_WILDCARD)
        restored_segments = await stream_messages(engine_nc, SEGMENTS_STREAM, ">")
        for stream, before, after in (
            (EVENTS_STREAM, original_events, restored_events),
            (SEGMENTS_STREAM, original_segments, restored_segments),
        ):
            last = manifest_last(manifest, stream)
            assert [m for m in after if m[0] <= last] == [m for m in before if m[0] <= last]
        # And the store's rows through the backup's positions.
        restored_logged, restored_outbox = await store_rows(data / "shoal.db")
        assert restored_logged[: manifest.store.events] == logged[: manifest.store.events]
        assert restored_outbox[: manifest.store.transitions] == outbox[: manifest.store.transitions]

        # The producer publishes again what it sent from the backup's start on.
        producer = await as_role(data, port, "producer")
        try:
            await produce(producer, events[start:], [0])
        finally:
            await producer.close()
        resumed = await wait_published(engine_nc, want)
        final_segments = await stream_messages(engine_nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD)
    finally:
        await engine_nc.close()
    # Versions go on from the backup, each customer's with no gap, and none is reused with
    # other content (by_version checks every repeat).
    gap_free(resumed)
    _, repeats = by_version(final_segments)
    backed_up_segments, _ = by_version(
        [m for m in original_segments if m[0] <= manifest_last(manifest, SEGMENTS_STREAM)]
    )
    assert {k: resumed[k] for k in backed_up_segments} == backed_up_segments
    if not timed:
        # Count rules: every (customer, version) names the transition it named in the run
        # that never failed, and there is no other.
        assert resumed == original
    print(f"transitions made again after the restore and stored twice: {repeats}")
    assert engine.stop() == 0
    # Each event logged once, though part of them reached the stream twice.
    logged_after, _ = await store_rows(data / "shoal.db")
    ids = [(c, m) for _, c, m, _ in logged_after]
    assert len(ids) == len(set(ids)) == EVENTS
    per: dict[str, int] = defaultdict(int)
    for c, _ in ids:
        per[c] += 1
    assert sum(per.values()) == EVENTS

    # Refused: a second restore onto the data directory that has a store now.
    again = run("restore", str(backup), "--data-dir", str(data), "--port", str(free_port()))
    assert again.returncode == 2
    assert "is not empty" in again.stderr


def manifest_last(manifest: Any, stream: str) -> int:
    last: int = next(s.last_seq for s in manifest.streams if s.stream == stream)
    return last


def _copy(backup: Path, to: Path) -> Path:
    shutil.copytree(backup, to)
    return to


@pytest.mark.timeout(120)
async def test_restore_refuses_a_damaged_or_newer_backup_and_a_broker_with_shoal_streams(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data, backup = tmp_path / "data", tmp_path / "backup"
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    port = free_port()
    engine = serve(data, port, rules)
    procs.append(engine)
    engine.wait_err("shoal is serving", timeout=30)
    url = f"nats://127.0.0.1:{port}"
    producer = await as_role(data, port, "producer")
    try:
        await produce(producer, _events()[:50], [0])
    finally:
        await producer.close()
    done = run("backup", str(backup), "--data-dir", str(data), "--nats", url)
    assert done.returncode == 0, done.stderr
    # Not into a directory that holds anything.
    again = run("backup", str(backup), "--data-dir", str(data), "--nats", url)
    assert again.returncode == 2
    assert f"{backup} is not empty" in again.stderr

    # Onto a broker that has shoal's streams (the running engine's).
    onto = run("restore", str(backup), "--data-dir", str(tmp_path / "other"), "--nats", url)
    assert onto.returncode == 2, onto.stderr
    assert "the broker holds shoal's streams already: " in onto.stderr
    assert not (tmp_path / "other").exists()  # what the refused restore made is gone
    assert engine.stop() == 0

    damaged = _copy(backup, tmp_path / "damaged")
    stream_file = damaged / "streams" / f"{SEGMENTS_STREAM}.tar.s2"
    raw = bytearray(stream_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stream_file.write_bytes(bytes(raw))
    refused = run("restore", str(damaged), "--data-dir", str(tmp_path / "d1"))
    assert refused.returncode == 3
    assert refused.stderr.strip() == (
        f"shoal: error: {damaged} is damaged: {stream_file} is not the file the backup wrote "
        "(its size or checksum differs)"
    )

    newer = _copy(backup, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    refused = run("restore", str(newer), "--data-dir", str(tmp_path / "d2"))
    assert refused.returncode == 3
    assert f"{newer} is a backup of format 99, made by a newer shoal" in refused.stderr

    unfinished = _copy(backup, tmp_path / "unfinished")
    (unfinished / "manifest.json").unlink()
    refused = run("restore", str(unfinished), "--data-dir", str(tmp_path / "d3"))
    assert refused.returncode == 4
    assert "is not a backup made by `shoal backup` (or one that did not finish)" in refused.stderr
    # Nothing was made by a refused restore.
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3"))


async def owned(nc: Client) -> dict[str, int]:
    held = await LeaseBucket(nc).holders()
    out: dict[str, int] = defaultdict(int)
    for h in held.values():
        out[h.engine] += 1
    return dict(out)


async def wait_owned(nc: Client, want: dict[str, int], timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while await owned(nc) != want:
            await anyio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_a_backup_of_one_engine_among_two_brings_every_partition_back(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Two engines share the partitions; one of them is backed up (its store, and the
    streams). Restored alone, it serves its own partitions from its store and takes the
    other's over from their snapshots in the backup and the events stream, as when an
    engine dies: versions go on for every customer."""
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    backup = tmp_path / "backup"
    events = _events()
    want = expected(events)
    server = NatsServer(tmp_path / "broker")
    server.start()
    try:
        a = serve_engine(server.url, tmp_path / "a", "a", rules)
        procs.append(a)
        b = serve_engine(server.url, tmp_path / "b", "b", rules)
        procs.append(b)
        a.wait_err("shoal is serving", timeout=30)
        b.wait_err("shoal is serving", timeout=30)
        nc = await connect([server.url])
        try:
            await wait_owned(nc, {"a": P // 2, "b": P // 2})
            sent = [0]
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, nc, events, sent)
                while sent[0] < BACKUP_AT:
                    await anyio.sleep(0.01)
                start = sent[0]
                done = await anyio.to_thread.run_sync(
                    lambda: run(
                        "backup",
                        str(backup),
                        "--data-dir",
                        str(tmp_path / "a"),
                        "--nats",
                        server.url,
                    )  # fmt: skip
                )
            assert done.returncode == 0, done.stderr
            original = await wait_published(nc, want)
        finally:
            await nc.close()
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        server.stop()
    for lost in ("broker", "a", "b"):
        shutil.rmtree(tmp_path / lost)

    server = NatsServer(tmp_path / "broker")
    server.start()
    try:
        done = run("restore", str(backup), "--data-dir", str(tmp_path / "a"), "--nats", server.url)
        assert done.returncode == 0, done.stderr
        a = serve_engine(server.url, tmp_path / "a", "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        nc = await connect([server.url])
        try:
            await wait_owned(nc, {"a": P})
            await produce(nc, events[start:], [0])
            resumed = await wait_published(nc, want)
        finally:
            await nc.close()
        assert a.stop() == 0
    finally:
        server.stop()
    # b's partitions, from their snapshots: taken over as from an engine that died.
    taken = [line for line in [*a.err, *a.rest()] if "partition taken over" in line]
    assert len(taken) == P // 2, taken
    assert all('"snapshot": null' not in line for line in taken), taken
    gap_free(resumed)
    assert resumed == original
