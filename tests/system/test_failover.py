"""Failover on a replicated broker: three nats-server nodes (streams and buckets with three
replicas), three engines, a producer publishing thousands of events over thousands of
customers while time rules fire; meanwhile one engine is SIGKILLed, another SIGSTOPped for
longer than its lease and then resumed, and the broker's meta leader is killed.

At the end: every event was applied once, by the owner of its partition; each customer's
transitions are one gap-free version sequence; the stream holds no transition of an owner
after its fence moved on; and what was published equals a single-process replay of the
whole events stream. Every takeover's duration is measured and printed (the goal: the lease
plus 5 s); the test asserts only a generous bound, to catch a hang.

A second test pauses the events stream's leader node (SIGSTOP) again and again while
events flow and time rules fire, with two engines sharing the partitions: the engines go on
taking events, and their output equals a replay (a clustered server stamps an event before
a quorum stores it, so the deadline barrier must not trust consumers' counts).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from actors import event_of
from protocol import (
    EVENTS_STREAM,
    SEGMENTS_STREAM,
    BrokerError,
    InvalidEvent,
    Transition,
    partition,
)
from protocol._ownership import FENCE_DECODER, PROGRESS_DECODER
from protocol.nats import read_stream
from store import Store
from tests.cluster import NatsCluster
from tests.helpers import Proc, claimed_consumer, now, serve_engine, track
from tests.system.test_engines import (
    RULES,
    check_versions,
    owners,
    per_customer,
    replayed,
    wait_owners,
)

P = 32
TTL = 2
CUSTOMERS = 2_000
ROUNDS = 4
TAKEOVER_BOUND = 60.0


async def produce(
    nc: Client,
    sent: list[int],
    *,
    customers: int = CUSTOMERS,
    rounds: int = ROUNDS,
    every: int = 200,
    pause: float = 0.05,
) -> None:
    """Every customer an event a round, a pause after each ``every`` events, retrying what
    the broker does not confirm (the same message id: the stream keeps one)."""
    js = nc.jetstream()
    for r in range(rounds):
        for i in range(customers):
            c = f"c{i}"
            while True:
                try:
                    await js.publish(f"shoal.events.{c}", track(c, mid=f"{c}-{r}"), timeout=2)
                    break
                except (nats.errors.Error, TimeoutError):
                    await anyio.sleep(0.05)
            sent[0] += 1
            if i % every == every - 1:
                await anyio.sleep(pause)


async def taken_over(nc: Client, gone: str, started: float) -> float:
    """Seconds until none of ``gone``'s partitions is its any more and every one is held."""
    with anyio.fail_after(TAKEOVER_BOUND):
        while True:
            held = await owners(nc)
            if gone not in held and sum(len(v) for v in held.values()) == P:
                return time.monotonic() - started
            await anyio.sleep(0.1)


@pytest.mark.timeout(400)
async def test_failover_loses_nothing_and_publishes_once(
    nats_cluster: NatsCluster, tmp_path: Path, procs: list[Proc]
) -> None:
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    urls = nats_cluster.urls
    nc = await nats.connect(urls)
    engines: dict[str, Proc] = {}
    try:
        for e in ("a", "b", "c"):
            engines[e] = serve_engine(urls, tmp_path / e, e, rules, lease_ttl=TTL)
            procs.append(engines[e])
        for proc in engines.values():
            proc.wait_err("shoal is serving", timeout=60)
        await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [10, 11, 11])

        sent = [0]
        durations: dict[str, float] = {}
        try:
            await _scenario(nc, nats_cluster, engines, sent, durations)
        except BaseException:
            print("owners:", await owners(nc))
            for name, proc in engines.items():
                print(f"--- {name}:", *proc.rest()[-80:], sep="\n")
            raise
        print("takeover durations (s):", {k: round(v, 2) for k, v in durations.items()})
        assert sent[0] == CUSTOMERS * ROUNDS

        # Everything applied and published: the engines' output catches up with what one
        # process replaying the whole stream makes (up to a moment ago: a deadline due
        # just now may not have fired yet). It must, within a generous bound.
        differ: list[str] = []
        try:
            with anyio.fail_after(120):
                while True:
                    try:
                        if await _all_applied(nc, engines):
                            differ = await _differ(nc, now() - 2_000_000)
                            if not differ:
                                break
                    except (BrokerError, nats.errors.Error):
                        pass  # the broker busy after losing a node: ask again
                    await anyio.sleep(1)
        except TimeoutError:
            with contextlib.suppress(BrokerError, nats.errors.Error, AssertionError):
                await _differ(nc, now() - 2_000_000, show=3)
            print("customers differing:", len(differ), "owners:", await owners(nc))
            for name, proc in engines.items():
                print(f"--- {name}:", *proc.rest()[-200:], sep="\n")
            raise
        await anyio.sleep(3)  # the deadlines after the last round fall due
        stopped = now()
        for survivor in ("a", "c"):
            engines[survivor].popen.send_signal(signal.SIGTERM)
        for survivor in ("a", "c"):
            status = engines[survivor].popen.wait(60)
            if status != 0:
                print(f"--- {survivor}:", *engines[survivor].rest()[-100:], sep="\n")
            assert status == 0

        await _checked(nc)
        await _fences_held(nc)
        differ = await _differ(nc, stopped - 1_000_000, show=5)
        assert not differ, f"{len(differ)} customers differ"
        await _applied_once(nc, tmp_path)
    except BaseException:
        logs = os.environ.get("SHOAL_FAILOVER_LOGS")
        if logs:
            for name, proc in engines.items():
                if proc.popen.poll() is None:
                    proc.popen.kill()
                    proc.popen.wait()
                time.sleep(0.5)
                lines = [*proc.err, *proc.rest()]
                (Path(logs) / f"engine-{name}.log").write_text("\n".join(lines))
        raise
    finally:
        await nc.close()


async def _scenario(
    nc: Client,
    nats_cluster: NatsCluster,
    engines: dict[str, Proc],
    sent: list[int],
    durations: dict[str, float],
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce, nc, sent)
        while sent[0] < CUSTOMERS:
            await anyio.sleep(0.1)
        # One engine dies.
        engines["b"].popen.send_signal(signal.SIGKILL)
        engines["b"].popen.wait()
        durations["SIGKILL b"] = await taken_over(nc, "b", time.monotonic())
        # Another stops for longer than its lease, then wakes up fenced out.
        engines["c"].popen.send_signal(signal.SIGSTOP)
        durations["SIGSTOP c"] = await taken_over(nc, "c", time.monotonic())
        await anyio.sleep(1)
        engines["c"].popen.send_signal(signal.SIGCONT)
        # It notices, gives up what it lost, and claims its share again.
        await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [16, 16], timeout=90)
        # The broker's meta leader dies.
        leader = await nats_cluster.meta_leader()
        nats_cluster.nodes[leader].kill()
        await nats_cluster.wait_ready(timeout=30)
        # It comes back on its store, as a supervised server would.
        await anyio.sleep(2)
        await anyio.to_thread.run_sync(nats_cluster.nodes[leader].start)
        await nats_cluster.wait_ready(timeout=60)


async def _checked(nc: Client) -> list[tuple[Transition, str | None]]:
    """The transitions published, checked for one gap-free version sequence per customer;
    on failure, what the stream holds of the customers at fault is printed."""
    published = await _transitions(nc)
    try:
        check_versions(published)
    except AssertionError:
        await _explain(nc, published)
        raise
    return published


async def _explain(nc: Client, published: list[tuple[Transition, str | None]]) -> None:
    """Print, for each customer whose versions repeat or skip, its transitions and the
    progress records naming it, with their claims' engines."""
    by: dict[str, list[int]] = defaultdict(list)
    for t, _ in published:
        by[t.customer_id].append(t.version)
    bad = {c for c, vs in by.items() if sorted(vs) != list(range(1, len(vs) + 1))}
    claims: dict[int, str] = {}
    async for chunk in read_stream(nc, SEGMENTS_STREAM, ">"):
        for d in chunk:
            if d.subject.startswith("shoal.fence."):
                claim = FENCE_DECODER.decode(d.data)
                claims[d.stream_sequence] = claim.engine
                print("fence", d.stream_sequence, claim)
            elif d.subject.startswith("shoal.progress."):
                record = PROGRESS_DECODER.decode(d.data)
                for c, v in record.versions:
                    if c in bad:
                        print(
                            "progress",
                            d.stream_sequence,
                            d.subject,
                            "claim",
                            record.claim,
                            claims.get(record.claim),
                            c,
                            v,
                        )
            else:
                t = msgspec.json.decode(d.data, type=Transition)
                if t.customer_id in bad:
                    print(
                        "transition",
                        d.stream_sequence,
                        t.customer_id,
                        t.version,
                        t.segment,
                        t.change,
                        t.at.isoformat(),
                        t.cause,
                    )


async def _differ(nc: Client, cutoff: int, *, show: int = 0) -> list[str]:
    """The customers whose published transitions up to ``cutoff`` are not what one process
    replaying the whole events stream makes; the first ``show`` of them printed."""
    published = await _checked(nc)
    got = per_customer([t for t, _ in published], cutoff)
    want = per_customer(await replayed(nc, cutoff + 1_000_000), cutoff)
    differ = sorted(c for c in got.keys() | want.keys() if got.get(c) != want.get(c))
    for c in differ[:show]:
        print("customer", c)
        for name, ts in (("published", got.get(c, [])), ("replayed", want.get(c, []))):
            print(" ", name)
            for t in ts:
                print("   ", t.version, t.segment, t.change, t.at.isoformat(), t.cause)
    return differ


async def _transitions(nc: Client) -> list[tuple[Transition, str | None]]:
    out: list[tuple[Transition, str | None]] = []
    async for chunk in read_stream(nc, SEGMENTS_STREAM, "shoal.segments.>"):
        out += [(msgspec.json.decode(d.data, type=Transition), d.msg_id) for d in chunk]
    return out


async def _all_applied(nc: Client, engines: dict[str, Proc]) -> bool:
    """Whether the consumers of the partitions' last claims hold nothing more."""
    js = nc.jetstream()
    for p in range(P):
        try:
            info = await js.consumer_info(EVENTS_STREAM, await claimed_consumer(js, p))
        except nats.js.errors.NotFoundError:
            return False  # not made yet: its owner's term is starting
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def _fences_held(nc: Client) -> None:
    """Every batch stored was published under its partition's last claim at the time."""
    last: dict[int, int] = {}
    batches = 0
    async for chunk in read_stream(nc, SEGMENTS_STREAM, ">"):
        for d in chunk:
            if d.subject.startswith("shoal.fence."):
                claim = FENCE_DECODER.decode(d.data)
                last[claim.partition] = d.stream_sequence
            elif d.subject.startswith("shoal.progress."):
                p = int(d.subject.rsplit(".", 1)[1])
                record = PROGRESS_DECODER.decode(d.data)
                assert record.claim == last.get(p), (p, record.claim, last.get(p))
                for customer_id, _ in record.versions:
                    assert partition(customer_id, P) == p
                batches += 1
    assert batches


async def _applied_once(nc: Client, tmp_path: Path) -> None:
    """Each partition's events are in its last owner's log, each once; no other store holds
    any of them."""
    stream: dict[int, set[tuple[str, str]]] = defaultdict(set)
    async for chunk in read_stream(nc, EVENTS_STREAM, "shoal.events.>"):
        for d in chunk:
            try:
                event = d.event()
            except InvalidEvent:
                continue
            stream[partition(event.customer_id, P)].add((event.customer_id, event.message_id))
    logs: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for e in ("a", "b", "c"):
        db = tmp_path / e / "shoal.db"
        if e == "b" or not db.exists():
            continue  # b died: its store is not an owner's any more
        async with await Store.open_read_only(db) as store:
            async for rows in store.events.read():
                for row in rows:
                    ev = event_of(row)
                    logs[partition(ev.customer_id, P)].append((ev.customer_id, ev.message_id))
    for p in range(P):
        assert sorted(logs[p]) == sorted(stream[p]), p


PAUSE_CUSTOMERS = 600
PAUSE_ROUNDS = 12


async def _events_leader(nc: Client, names: list[str]) -> int:
    info = await nc.jetstream().stream_info(EVENTS_STREAM)
    assert info.cluster is not None and info.cluster.leader
    return names.index(info.cluster.leader)


@pytest.mark.timeout(400)
async def test_live_equals_replay_across_stream_leader_pauses(
    nats_cluster: NatsCluster, tmp_path: Path, procs: list[Proc]
) -> None:
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    urls = nats_cluster.urls
    names = [n.name for n in nats_cluster.nodes]
    nc = await nats.connect(urls)
    engines: dict[str, Proc] = {}
    try:
        for e in ("a", "b"):
            engines[e] = serve_engine(urls, tmp_path / e, e, rules, lease_ttl=TTL)
            procs.append(engines[e])
        for proc in engines.values():
            proc.wait_err("shoal is serving", timeout=60)
        await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [16, 16])
        sent = [0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    produce,
                    customers=PAUSE_CUSTOMERS,
                    rounds=PAUSE_ROUNDS,
                    every=100,
                    pause=0.1,
                ),
                nc,
                sent,
            )
            for _ in range(4):
                await anyio.sleep(3)
                node = nats_cluster.nodes[await _events_leader(nc, names)]
                node.pause()
                await anyio.sleep(2.5)
                node.resume()
        assert sent[0] == PAUSE_CUSTOMERS * PAUSE_ROUNDS
        try:
            with anyio.fail_after(90):
                while True:
                    with contextlib.suppress(BrokerError, nats.errors.Error):
                        if await _all_applied(nc, engines):
                            break
                    await anyio.sleep(1)
        except TimeoutError:
            for name, proc in engines.items():
                print(f"--- {name}:", *proc.rest()[-100:], sep="\n")
            raise
        await anyio.sleep(3)  # the deadlines after the last events fall due
        await _checked(nc)
        # Up to a fixed instant: what the engines publish only grows, so a deadline they fire
        # late (a loaded machine: seen 2 s late with other tests running beside) is waited
        # for, while a transition that differs stays different.
        cutoff = now() - 2_000_000
        with anyio.move_on_after(30):
            while await _differ(nc, cutoff):
                await anyio.sleep(1)
        differ = await _differ(nc, cutoff, show=5)
        assert not differ, f"{len(differ)} customers differ"
    finally:
        await nc.close()
