"""Segment definitions among several ``shoal serve`` sharing one broker: a change applied
through the API (which one engine answers) reaches every engine, whose customers all get
the catch-up transitions of the new rules; each engine marks the switch in the partitions
it owns, at its own positions; ``unpark`` reaches the owner of each id."""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import nats
from nats.aio.client import Client

from protocol import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    UnparkReply,
    decode_definitions,
    decode_marker,
    definitions_marker_subject,
    is_definitions_marker,
    partition,
)
from protocol.nats import ApiClient, read_stream
from store import Store
from tests.helpers import NatsServer, Proc, run, segments
from tests.helpers import serve_engine as serve
from tests.system.test_engines import check_versions, owners, publish, transitions

P = 32
V1 = """
[segments.visitor]
rule = "count('Visit') >= 1"
"""
V2 = (
    V1
    + """
[segments.anyone]
rule = "count('Visit') >= 1"
"""
)
ENGINES = ("a", "b", "c")
CUSTOMERS = [f"c{i}" for i in range(90)]


async def _eventually_async(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.3)


async def test_a_change_through_one_engine_reaches_every_engine(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    url = nats_server.url
    rules = tmp_path / "segments.toml"
    rules.write_text(V1)
    nc: Client = await nats.connect(url)
    try:
        engines = {e: serve(url, tmp_path / e, e, rules) for e in ENGINES}
        procs.extend(engines.values())
        for proc in engines.values():
            proc.wait_err("shoal is serving", timeout=60)

        async def shared() -> bool:
            o = await owners(nc)
            return sorted(o) == sorted(ENGINES) and sum(map(len, o.values())) == P

        await _eventually_async(shared, 60)
        await publish(nc, CUSTOMERS, 1)

        async def entered(segment: str) -> bool:
            got = {t.customer_id for t, _ in await transitions(nc) if t.segment == segment}
            return got == set(CUSTOMERS)

        await _eventually_async(lambda: entered("visitor"), 30)
        before = await owners(nc)

        api = ApiClient(nc, timeout=5)
        reply = await api.definitions(V2, source="v2.toml", apply=True, timeout=60)
        assert reply.applied and reply.added == ["anyone"]

        # Every engine follows: all hold version 2, and agree (no EnginesDisagree).
        async def everyone_at_2() -> bool:
            status = await api.status()
            versions = [
                None if e.definitions_applied is None else e.definitions_applied.version
                for e in status.engines
            ]
            return status.complete and len(versions) == 3 and set(versions) == {2}

        await _eventually_async(everyone_at_2, 30)
        listed = await api.segments()
        assert listed.fingerprint == segments(V2).fingerprint
        assert [s.name for s in listed.segments] == ["visitor", "anyone"]
        assert (listed.complete, listed.partitions) == (True, list(range(P)))

        # Customers of every partition get the catch-up transition of the new rule, once.
        await _eventually_async(lambda: entered("anyone"), 30)
        ts = await transitions(nc)
        check_versions(ts)
        anyone = [t for t, _ in ts if t.segment == "anyone"]
        assert len(anyone) == len(CUSTOMERS)
        assert {(t.change, str(t.cause.__struct_config__.tag)) for t in anyone} == {
            ("entered", "definition")
        }
        assert {partition(c, P) for c in CUSTOMERS} == set(range(P))

        # Unpark reaches the owner of each id: none is parked, each is answered for once.
        done = await anyio.to_thread.run_sync(
            lambda: run("unpark", *CUSTOMERS[:40], "nobody", "--nats", url, "--json")
        )
        assert done.returncode == 0, done.stderr
        unpark = msgspec.json.decode(done.stdout, type=UnparkReply)
        assert (unpark.unparked, unpark.parked) == ([], [])
        assert unpark.not_parked == [*CUSTOMERS[:40], "nobody"]
        assert (unpark.partitions, unpark.unanswered) == (list(range(P)), [])

        assert await owners(nc) == before  # no partition changed hands meanwhile
        # Stopped together: no partition is handed over as one after another goes.
        for proc in engines.values():
            proc.popen.send_signal(signal.SIGINT)
        for proc in engines.values():
            assert proc.popen.wait(30) == 0
    finally:
        await nc.close()

    # One marker per partition for version 2 (version 1 replaced none), each at the last
    # position of its partition's events (all applied under version 1).
    nc = await nats.connect(url)
    try:
        chunks = read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD)
        stream = [d async for chunk in chunks for d in chunk]
    finally:
        await nc.close()
    markers = [d for d in stream if is_definitions_marker(d.subject)]
    assert sorted(d.subject for d in markers) == sorted(
        definitions_marker_subject(p, 2) for p in range(P)
    )
    last: dict[int, int] = defaultdict(int)
    for d in stream:
        if not is_definitions_marker(d.subject):
            p = int(d.subject.split(".")[2])
            last[p] = max(last[p], d.stream_sequence)
    for d in markers:
        p = int(d.subject.split(".")[2])
        assert decode_marker(d.data).applied_through == last[p]
        assert d.stream_sequence > last[p]

    # Each partition was marked by its owner: each engine's store holds version 2 with
    # positions for exactly the partitions it owned.
    for e in ENGINES:
        async with await Store.open_read_only(tmp_path / e / "shoal.db") as store:
            row = await store.definitions.get()
            assert row is not None
            record = decode_definitions(row.body, e)
            assert record.version == 2
            assert record.applied_through is not None
            assert sorted(record.applied_through) == before[e], e
            assert await store.definitions.marked() == 2
