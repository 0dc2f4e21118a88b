"""Startup checks end to end, on a real nats-server: an engine whose ``shoal.db`` is lost
beside a stream full of events refuses to start, with one line that names the stream, its
size and the rebuild command; ``shoal rebuild --from-stream`` brings the store level; the
engine then goes on from the transition versions published before, and its memberships are
those a replay of the rebuilt log gives."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from actors import replay
from protocol import EVENTS_STREAM, Event, Transition, event_subject
from protocol.nats import connect, jetstream_ports
from store import Store
from tests.helpers import (
    NatsServer,
    engine_consumers,
    eventually,
    published,
    run,
    running_engine,
    segments,
    track,
)

SEGMENTS = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 2"

[segments.buyer]
rule = "count('Buy') >= 1"
"""


def _memberships(transitions: list[Transition]) -> dict[str, set[str]]:
    members: dict[str, set[str]] = defaultdict(set)
    for t in transitions:
        if t.change == "entered":
            members[t.customer_id].add(t.segment)
        else:
            members[t.customer_id].discard(t.segment)
    return {c: s for c, s in members.items() if s}


async def _run_then_lose_store(
    url: str, db: Path, js: JetStreamContext, sent: list[tuple[str, bytes]], transitions: int
) -> None:
    """Run an engine until ``sent`` made ``transitions``, stop it, and delete its store."""
    async with running_engine(url, db, segments(SEGMENTS)) as engine:
        for user, body in sent:
            await js.publish(event_subject(user), body)
        await eventually(lambda: engine.stats.transitions_published == transitions)
    for p in db.parent.glob(db.name + "*"):
        p.unlink()


async def test_a_lost_store_refuses_to_start_and_is_rebuilt_from_the_stream(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    url, data, js = nats_server.url, tmp_path / "data", client.jetstream()
    db, segs = data / "shoal.db", segments(SEGMENTS)
    visits = [("a", "Visit"), ("b", "Visit"), ("a", "Visit"), ("a", "Buy")]
    sent = [(user, track(user, name)) for user, name in visits]
    sent.append(("c", b"{not json"))  # rejected, acknowledged
    await _run_then_lose_store(url, db, js, sent, 4)
    before = await published(url)
    assert [(t.customer_id, t.version) for t in before] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]

    refused = run("serve", "--nats", url, "--data-dir", str(data), timeout=30)
    assert refused.returncode == 1, refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("shoal: error: ")
    assert "Traceback" not in refused.stderr
    assert f"is behind stream {EVENTS_STREAM} (5 messages)" in error
    assert f"shoal rebuild --from-stream --data-dir {data}" in error

    rebuilt = run("rebuild", "--from-stream", "--nats", url, "--data-dir", str(data))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "4 events logged and 4 published transitions restored" in rebuilt.stdout
    assert "(1 rejected" in rebuilt.stdout

    async with running_engine(url, db, segs) as engine:
        await js.publish(event_subject("b"), track("b", "Visit"))
        await js.publish(event_subject("d"), track("d", "Buy"))
        await eventually(lambda: engine.stats.transitions_published == 2)
        assert engine.stats.events_applied == 2  # nothing ingested twice
        live = {c: set(engine.customer(c).members) for c in "abd"}  # type: ignore[union-attr]
    after = await published(url)

    # The new transitions go on from the versions published before; none is published again.
    assert [(t.customer_id, t.segment, t.version) for t in after[len(before) :]] == [
        ("b", "regular", 2),
        ("d", "buyer", 1),
    ]
    async with await Store.open_read_only(db) as store:
        decoder = msgspec.msgpack.Decoder(Event)
        events = [decoder.decode(e.body) async for chunk in store.events.read() for e in chunk]
    replayed = list(replay(events, segs))
    assert _memberships(replayed) == {c: s for c, s in live.items() if s} == _memberships(after)
    assert sorted((t.customer_id, t.version) for t in replayed) == sorted(
        (t.customer_id, t.version) for t in after
    )


async def test_a_lost_store_and_consumer_refuse_to_start_while_transitions_were_published(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    url, data, js = nats_server.url, tmp_path / "data", client.jetstream()
    db = data / "shoal.db"
    sent = [(user, track(user, name)) for user, name in [("a", "Visit"), ("a", "Visit")]]
    sent.append(("b", track("b", "Buy")))
    await _run_then_lose_store(url, db, js, sent, 3)
    for name in await engine_consumers(js):
        await js.delete_consumer(EVENTS_STREAM, name)

    refused = run("serve", "--nats", url, "--data-dir", str(data), timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"shoal: error: {db} is behind stream SHOAL_EVENTS (3 messages): the store is "
        "empty, while SHOAL_SEGMENTS holds 3 transitions an engine published. Starting "
        "would lose those events and restart transition versions. With the engine "
        f"stopped, rebuild the store from the stream: shoal rebuild --from-stream "
        f"--data-dir {data}"
    )
    rebuilt = run("rebuild", "--from-stream", "--nats", url, "--data-dir", str(data))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "3 events logged and 3 published transitions restored" in rebuilt.stdout

    async with running_engine(url, db, segments(SEGMENTS)) as engine:
        await js.publish(event_subject("b"), track("b", "Visit"))
        await eventually(lambda: engine.stats.transitions_published == 1)
        # The stream is read again from its start: what the log holds is not applied twice.
        await eventually(lambda: engine.stats.events_duplicate == 3)
        assert engine.stats.events_applied == 1
    after = await published(url)
    assert [(t.customer_id, t.segment, t.version) for t in after[3:]] == [("b", "visitor", 2)]


async def test_a_first_start_against_a_stream_with_events_reads_it_all(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Producers published before the engine ever ran: no consumer yet, nothing to refuse.
    nc = await connect([nats_server.url])
    try:
        await jetstream_ports(nc)  # declares the streams
        js = nc.jetstream()
        for user in ("a", "b"):
            await js.publish(event_subject(user), track(user))
    finally:
        await nc.close()
    async with running_engine(nats_server.url, tmp_path / "shoal.db", segments(SEGMENTS)) as e:
        await eventually(lambda: e.stats.events_applied == 2)


def test_rebuild_without_a_consumer_has_nothing_to_do(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    done = run("rebuild", "--from-stream", "--nats", nats_server.url, "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "exists and no transition was published: nothing to rebuild" in done.stdout


def test_rebuild_needs_the_from_stream_flag(tmp_path: Path) -> None:
    done = run("rebuild", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--from-stream" in done.stderr
