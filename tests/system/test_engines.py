"""Several ``shoal serve`` sharing the partitions of one broker: each claims its share,
hands surplus over when another joins, takes over from one that dies, and the transitions
of every customer stay one gap-free version sequence."""

from __future__ import annotations

import json
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client

from actors import replay
from protocol import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    EventCause,
    InvalidEvent,
    Transition,
    to_instant,
)
from protocol.nats import LeaseBucket, read_stream
from tests.helpers import NatsServer, Proc, now, run, segments, serve_engine, track

P = 32
RULES = """
[segments.active]
rule = "since_last() < '2s'"

[segments.regular]
rule = "count('Visit', within='6s') >= 2"
"""


async def owners(nc: Client) -> dict[str, list[int]]:
    held = await LeaseBucket(nc).holders()
    out: dict[str, list[int]] = defaultdict(list)
    for p, h in sorted(held.items()):
        out[h.engine].append(p)
    return dict(out)


async def wait_owners(nc: Client, check: Any, timeout: float = 60.0) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    with anyio.fail_after(timeout):
        while True:
            seen = await owners(nc)
            if check(seen):
                return seen
            await anyio.sleep(0.2)


async def transitions(nc: Client) -> list[tuple[Transition, str | None]]:
    out: list[tuple[Transition, str | None]] = []
    async for chunk in read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD):
        out += [(msgspec.json.decode(d.data, type=Transition), d.msg_id) for d in chunk]
    return out


def check_versions(ts: list[tuple[Transition, str | None]]) -> dict[str, int]:
    """Each customer's transitions are versions 1..n, each stored once; the last versions."""
    ids = [m for _, m in ts]
    assert len(ids) == len(set(ids)), "a transition stored twice"
    by: dict[str, list[int]] = defaultdict(list)
    for t, _ in ts:
        by[t.customer_id].append(t.version)
    for customer, versions in by.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), (customer, sorted(versions))
    return {c: max(v) for c, v in by.items()}


async def publish(nc: Client, customers: list[str], round_: int) -> None:
    js = nc.jetstream()
    for c in customers:
        await js.publish(f"shoal.events.{c}", track(c, mid=f"{c}-{round_}"))


async def replayed(nc: Client, until: int) -> list[Transition]:
    """What a single process replaying the whole events stream makes: each customer's
    message id applied once, as the engine applies it (a clustered broker can store a
    producer's publish twice when it reached two nodes around a leader's pause)."""
    events = []
    seen: set[tuple[str, str]] = set()
    async for chunk in read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD):
        for d in chunk:
            try:
                event = d.event()
            except InvalidEvent:
                continue
            key = (event.customer_id, event.message_id)
            if key not in seen:
                seen.add(key)
                events.append(event)
    return list(replay(events, segments(RULES), until=until))


def per_customer(ts: list[Transition], cutoff: int) -> dict[str, list[Transition]]:
    out: dict[str, list[Transition]] = defaultdict(list)
    for t in sorted(ts, key=lambda t: (t.customer_id, t.version)):
        if to_instant(t.at) <= cutoff:
            out[t.customer_id].append(t)
    return dict(out)


async def test_engines_share_the_partitions_and_take_over(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    nc = await nats.connect(nats_server.url)
    try:
        a = serve_engine(nats_server.url, tmp_path / "a", "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        await wait_owners(nc, lambda o: len(o.get("a", [])) == P)
        customers = [f"c{i}" for i in range(300)]
        await publish(nc, customers, 1)

        b = serve_engine(nats_server.url, tmp_path / "b", "b", rules)
        procs.append(b)
        c = serve_engine(nats_server.url, tmp_path / "c", "c", rules)
        procs.append(c)
        balanced = await wait_owners(
            nc, lambda o: sorted(len(v) for v in o.values()) == [10, 11, 11]
        )
        assert set(balanced) == {"a", "b", "c"}
        await publish(nc, customers, 2)

        # One dies: the others take its partitions over once its leases expire.
        victim = "b"
        dead = {"a": a, "b": b, "c": c}[victim]
        dead.popen.send_signal(signal.SIGKILL)
        dead.popen.wait()
        await wait_owners(
            nc,
            lambda o: victim not in o and sorted(len(v) for v in o.values()) == [16, 16],
        )
        await publish(nc, customers, 3)

        # shoal status says who owns what, and what changed hands.
        out = await anyio.to_thread.run_sync(
            lambda: run("status", "--nats", nats_server.url, "--json")
        )
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        owned = {e["ownership"]["engine_id"]: e["ownership"] for e in status["engines"]}
        assert set(owned) == {"a", "c"}
        assert sorted(lease["partition"] for o in owned.values() for lease in o["leases"]) == list(
            range(P)
        )
        assert sum(o["takeovers"] for o in owned.values()) >= 11  # b's partitions at least
        assert all(lease["lease_age"] < 2 for o in owned.values() for lease in o["leases"])
        text = await anyio.to_thread.run_sync(lambda: run("status", "--nats", nats_server.url))
        assert "engine a: 16 partitions" in text.stdout and "engine c: 16 partitions" in text.stdout

        await anyio.sleep(4)  # the deadlines after the last round fall due
        stopped = now()
        for p in (a, c):
            p.popen.send_signal(signal.SIGTERM)
        for p in (a, c):
            assert p.popen.wait(30) == 0, p.rest()

        published = await transitions(nc)
        last = check_versions(published)
        assert len(last) == len(customers)
        # Each customer's transitions are what one process replaying the whole stream makes
        # (up to a moment before the stop: a deadline after it may not have fired).
        cutoff = stopped - 1_000_000
        got = per_customer([t for t, _ in published], cutoff)
        assert got == per_customer(await replayed(nc, stopped), cutoff)
        assert all(len(ts) >= 6 for ts in got.values())
    finally:
        await nc.close()


async def test_a_retry_after_a_takeover_outside_the_duplicate_window_is_applied_once(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    """The producer's retry of an event reaches the partition's new owner after the broker's
    duplicate window: the new owner's log holds the event (it logged the partition's history
    from the stream when it took over), so it drops the retry."""
    rules = tmp_path / "segments.toml"
    rules.write_text(
        """
[segments.twice]
rule = "count('Visit') >= 2"
"""
    )
    nc = await nats.connect(nats_server.url)
    try:
        a = serve_engine(nats_server.url, tmp_path / "a", "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        await wait_owners(nc, lambda o: len(o.get("a", [])) == P)
        js = nc.jetstream()
        # A short duplicate window, so that the retry below is stored again.
        info = await js.stream_info(EVENTS_STREAM)
        info.config.duplicate_window = 1.0
        await js.update_stream(info.config)
        await js.publish("shoal.events.zed", track("zed", mid="m1"), headers={"Nats-Msg-Id": "m1"})
        await anyio.sleep(2.5)  # a's snapshots (every second) hold zed

        b = serve_engine(nats_server.url, tmp_path / "b", "b", rules)
        procs.append(b)
        b.wait_err("shoal is serving", timeout=30)
        a.popen.send_signal(signal.SIGKILL)
        a.popen.wait()
        await wait_owners(nc, lambda o: o.keys() == {"b"} and len(o["b"]) == P)
        await anyio.sleep(1.5)  # past the duplicate window
        ack = await js.publish(
            "shoal.events.zed", track("zed", mid="m1"), headers={"Nats-Msg-Id": "m1"}
        )
        assert not ack.duplicate  # the broker stored it again: only the engine can drop it
        await js.publish("shoal.events.zed", track("zed", mid="m2"))
        with anyio.fail_after(30):
            while True:
                zed = [t for t, _ in await transitions(nc) if t.customer_id == "zed"]
                if zed:
                    break
                await anyio.sleep(0.2)
        await anyio.sleep(1)
        zed = [t for t, _ in await transitions(nc) if t.customer_id == "zed"]
        # The second visit (m2) made zed a member: the retry of m1 did not count.
        assert [(t.segment, t.change, t.version) for t in zed] == [("twice", "entered", 1)]
        assert zed[0].cause == EventCause(message_id="m2")
        b.popen.send_signal(signal.SIGTERM)
        assert b.popen.wait(30) == 0
    finally:
        await nc.close()


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_a_kill_around_a_batch_commit_loses_and_repeats_nothing(
    nats_server: NatsServer,
    tmp_path: Path,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    """An engine dies just before it sends the commit of an atomic batch of transitions (the
    broker drops the open batch), or just after the broker stored it (the engine never
    learnt it): the partition's new owner publishes what was not stored, and nothing
    twice."""
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    nc = await nats.connect(nats_server.url)
    try:
        monkeypatch.setenv("SHOAL_KILL_AT_BATCH", f"{moment}:5")
        a = serve_engine(nats_server.url, tmp_path / "a", "a", rules)
        procs.append(a)
        monkeypatch.delenv("SHOAL_KILL_AT_BATCH")
        a.wait_err("shoal is serving", timeout=30)
        b = serve_engine(nats_server.url, tmp_path / "b", "b", rules)
        procs.append(b)
        await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [16, 16])
        customers = [f"c{i}" for i in range(300)]
        for r in range(3):
            await publish(nc, customers, r)
            await anyio.sleep(0.5)
        # a killed itself at its 5th batch; b took its partitions over.
        assert await anyio.to_thread.run_sync(a.popen.wait, 30) == -signal.SIGKILL
        await wait_owners(nc, lambda o: o.keys() == {"b"} and len(o["b"]) == P)
        await publish(nc, customers, 3)
        with anyio.fail_after(60):
            while True:
                published = await transitions(nc)
                want = per_customer(await replayed(nc, now() - 2_000_000), now() - 3_000_000)
                got = per_customer([t for t, _ in published], now() - 3_000_000)
                if got == want and len(got) == len(customers):
                    break
                await anyio.sleep(1)
        check_versions(published)
        b.popen.send_signal(signal.SIGTERM)
        assert b.popen.wait(30) == 0
    finally:
        await nc.close()
