"""Definitions markers: each switch to new definitions is recorded in every partition's own
subjects of ``SHOAL_EVENTS``, with the stream position up to which that partition's events
were applied under the definitions before, so that a partition can be rebuilt from the
stream alone. The engine reads its own markers back without rejecting them."""

from __future__ import annotations

from pathlib import Path

import anyio

from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    Delivery,
    decode_marker,
    definitions_marker_subject,
    is_definitions_marker,
)
from protocol.nats import connect, read_stream
from store import Store
from tests.actors.test_definitions_persist import REGULAR, VISITOR, served
from tests.helpers import NatsServer

CUSTOMERS = ["alice", "bob", "carol", "dave", "erin"]


async def _stream(url: str) -> list[Delivery]:
    nc = await connect([url], name="test")
    try:
        return [d async for chunk in read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD) for d in chunk]
    finally:
        await nc.close()


def test_each_switch_is_marked_in_every_partition_where_it_happened(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with served(nats_server, tmp_path) as s:
        s.file.write_text(VISITOR)
        s.start()
        for c in CUSTOMERS:
            s.visit(c, f"{c}-1")
        api = tmp_path / "api.toml"
        api.write_text(VISITOR + REGULAR)
        s.shoal("segments", "apply", str(api))
        for c in CUSTOMERS:
            s.visit(c, f"{c}-2")
        assert s.status()["events_applied"] == 2 * len(CUSTOMERS)
        assert s.status()["events_rejected"] == 0
        s.stop()
        # Restarted: nothing to publish again, and the store is level with the stream (the
        # markers' positions committed like any message's).
        s.start()
        assert s.status()["events_rejected"] == 0
        s.stop()

    stream = anyio.run(_stream, nats_server.url)
    markers = [d for d in stream if is_definitions_marker(d.subject)]
    events = [d for d in stream if not is_definitions_marker(d.subject)]
    assert len(events) == 2 * len(CUSTOMERS)
    # Version 1 (the served file, at the first start) replaced none: no marker. Version 2
    # (applied over the API) is marked in every partition, after its first round of visits.
    assert sorted(d.subject for d in markers) == sorted(
        definitions_marker_subject(p, 2) for p in range(DEFAULT_PARTITIONS)
    )
    first_round = {e.stream_sequence for e in events[: len(CUSTOMERS)]}
    for d in markers:
        p = int(d.subject.split(".")[2])
        body = decode_marker(d.data)
        assert d.subject == definitions_marker_subject(p, body.version)
        mine = [e.stream_sequence for e in events if _in(e, p)]
        before = [seq for seq in mine if seq in first_round]
        # Exactly the partition's events applied before the switch, none after.
        assert body.applied_through == max(before, default=0)
        assert all(seq > d.stream_sequence for seq in mine if seq not in first_round)

    async def positions() -> dict[int, int]:
        async with await Store.open_read_only(s.data / "shoal.db") as store:
            return dict(store.partitions_through)

    recorded = anyio.run(positions)
    for p in range(DEFAULT_PARTITIONS):
        last = max(d.stream_sequence for d in stream if d.subject.split(".")[2] == str(p))
        assert recorded[p] == last


def _in(d: Delivery, p: int) -> bool:
    return d.subject.split(".")[2] == str(p)
