"""Events for many customers, spread over every partition of ``SHOAL_EVENTS``, each partition
read by its own durable consumer: what the engine publishes for each customer is exactly what
a replay of the same events gives."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import anyio
from nats.aio.client import Client

from actors import event_of, replay
from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    Event,
    Transition,
    event_subject,
    partition,
    partition_consumer,
)
from protocol.nats import ensure_streams, read_stream
from store import Store
from tests.helpers import NatsServer, collect, engine_consumers, eventually, now, running_engine
from tests.helpers import segments as parse

RULES = """
[segments.active]
rule = "since_last('Visit') < '1s'"

[segments.regular]
rule = "count('Visit', within='2s') >= 2"

[segments.idle]
rule = "since_last('Visit') >= '1s'"

[segments.buyer]
rule = "count('Buy') >= 1"
"""
CUSTOMERS = 400
BACKLOG = 5_000
EVENTS = BACKLOG + 1_200


async def logged(db: Path) -> list[Event]:
    async with await Store.open_read_only(db) as store:
        return [event_of(e) async for chunk in store.events.read() for e in chunk]


async def test_each_partition_has_its_consumer_and_transitions_equal_a_replay(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    rng = random.Random(18)
    customers = [f"cust-{i}" for i in range(CUSTOMERS)]
    # Every partition gets customers: the ids are spread by the broker's hash.
    assert {partition(c, DEFAULT_PARTITIONS) for c in customers} == set(range(DEFAULT_PARTITIONS))
    sent: Counter[int] = Counter()
    seen = await collect(client, "shoal.segments.>")
    db = tmp_path / "shoal.db"
    js = client.jetstream()

    async def send(i: int) -> None:
        c = rng.choice(customers)
        name = "Buy" if rng.random() < 0.1 else "Visit"
        body = json.dumps({"type": "track", "userId": c, "event": name, "messageId": f"m{i}"})
        await js.publish(event_subject(c), body.encode())
        sent[partition(c, DEFAULT_PARTITIONS)] += 1

    await ensure_streams(js)
    # A backlog first, larger than a batch: every partition's consumer has a share of it
    # buffered at once, and the batches must still come out in stream order.
    for i in range(BACKLOG):
        await send(i)
    async with running_engine(nats_server.url, db, parse(RULES)) as engine:
        for i in range(BACKLOG, EVENTS):
            await send(i)
            if i % 200 == 199:
                await anyio.sleep(0.3)  # some deadlines fire between the bursts

        def settled() -> bool:
            s = engine.stats
            return (
                s.events_applied == EVENTS
                and engine.pending_deadlines == 0
                and s.transitions_published == s.transitions
                and len(seen.msgs) == s.transitions
            )

        await eventually(settled, timeout=30)
        stopped = now()
        consumers = await engine_consumers(js)

    # One consumer per partition, on that partition's subjects only, which took exactly the
    # events of its customers; and the one of unpartitioned subjects, which had none.
    assert set(consumers) == {
        *(partition_consumer("shoal-engine", p) for p in range(DEFAULT_PARTITIONS)),
        "shoal-engine-unpartitioned",
    }
    for p in range(DEFAULT_PARTITIONS):
        info = consumers[partition_consumer("shoal-engine", p)]
        assert info.stream_name == EVENTS_STREAM
        assert info.config.filter_subject == f"shoal.events.{p}.>"
        assert info.ack_floor is not None and info.ack_floor.consumer_seq == sent[p]
        assert not info.num_pending and not info.num_ack_pending
    assert consumers["shoal-engine-unpartitioned"].config.filter_subject == "shoal.events.*"

    # The store recorded each partition's position.
    async with await Store.open_read_only(db) as store:
        assert set(store.partitions_through) == set(range(DEFAULT_PARTITIONS))
        for p, through in store.partitions_through.items():
            info = consumers[partition_consumer("shoal-engine", p)]
            assert info.ack_floor is not None and through == info.ack_floor.stream_seq

    # The log holds the events in stream order, whichever partition's consumer brought
    # each: a replay meets each at its receive instant, as the engine did.
    log = await logged(db)
    position = {
        json.loads(d.data)["messageId"]: d.stream_sequence
        async for chunk in read_stream(client, EVENTS_STREAM, EVENTS_WILDCARD)
        for d in chunk
    }
    assert [position[e.message_id] for e in log] == sorted(position.values())
    assert [e.received for e in log] == sorted(e.received for e in log)

    published = seen.transitions()
    assert len({t.customer_id for t in published}) > CUSTOMERS // 2
    replayed = list(replay(log, parse(RULES), until=stopped))

    def per_customer(ts: list[Transition]) -> dict[str, list[Transition]]:
        out: dict[str, list[Transition]] = defaultdict(list)
        for t in sorted(ts, key=lambda t: (t.customer_id, t.version)):
            out[t.customer_id].append(t)
        return dict(out)

    assert per_customer(published) == per_customer(replayed)


async def test_a_restart_with_one_partition_far_behind_the_others_catches_up(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    """After a restart, the partitions resume from their own positions: one far behind (more
    than its share of the deliveries in flight) is read to its end in stream order, past the
    positions the others acknowledged before, which never come again."""
    js = client.jetstream()
    db = tmp_path / "shoal.db"

    def body(c: str, mid: str) -> bytes:
        return json.dumps(
            {"type": "track", "userId": c, "event": "Visit", "messageId": mid}
        ).encode()

    others = [f"o{i}" for i in range(100)]
    async with running_engine(nats_server.url, db, parse(RULES)) as engine:
        for i, c in enumerate(others):
            await js.publish(event_subject(c), body(c, f"a{i}"))
        await eventually(lambda: engine.stats.events_applied == len(others))
    # Stopped: one customer's partition gets far more than its share of max_in_flight, the
    # others a little, interleaved.
    behind = 3_000
    for i in range(behind):
        await js.publish(event_subject("hot"), body("hot", f"h{i}"))
        if i % 100 == 0:
            c = others[i // 100]
            await js.publish(event_subject(c), body(c, f"b{i}"))
    async with running_engine(nats_server.url, db, parse(RULES)) as engine:
        await eventually(lambda: engine.stats.events_applied == behind + 30, timeout=30)
    log = await logged(db)
    assert len(log) == len(others) + behind + 30
    assert [e.received for e in log] == sorted(e.received for e in log)
