"""The deadline barrier of a source with a consumer per partition: one question about the
stream's last position while every position up to it was taken; every consumer asked only
when something may still be on its way, or when a position no consumer reads is in the way."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from protocol import EventSource, event_subject
from protocol.nats import PartitionedFeed, jetstream_ports
from tests.helpers import NatsServer, eventually


class Counting:
    """Counts the questions a feed's consumer is asked (the feed's own fence, wrapped)."""

    def __init__(self, source: PartitionedFeed) -> None:
        self.asked = 0
        for f in source._feeds:
            f.fence = self._counted(f.fence)  # type: ignore[method-assign,assignment]

    def _counted(self, fence: Callable[..., Awaitable[bool]]) -> Callable[..., Awaitable[bool]]:
        async def counted(*, timeout: float = 2.0) -> bool:
            self.asked += 1
            return await fence(timeout=timeout)

        return counted


async def _drain(source: EventSource, n: int) -> None:
    got = 0
    while got < n:
        await source.wait()
        batch = source.take(1_000)
        if not batch:
            continue
        got += len(batch)
        await source.ack(batch[-1].stream_sequence)


async def test_the_barrier_asks_each_consumer_only_when_it_must(
    nats_server: NatsServer, client: Client
) -> None:
    source, _ = await jetstream_ports(client)
    assert isinstance(source, PartitionedFeed)
    counting = Counting(source)
    feeds = len(source._feeds)
    js = client.jetstream()
    for i in range(200):
        body = json.dumps({"type": "track", "userId": f"c{i}", "event": "Visit"}).encode()
        await js.publish(event_subject(f"c{i}"), body)
    await source.start()
    await _drain(source, 200)
    # Every position up to the stream's last was taken: no consumer is asked.
    assert await source.fence()
    assert counting.asked == 0

    # A message on the literal shoal.events.> is stored where no consumer reads: a gap.
    await js.publish("shoal.events.>", b"{}")
    assert await source.fence()
    assert counting.asked == feeds  # each asked once, and the gap passed
    assert await source.fence()
    assert counting.asked == feeds

    # An event stored and buffered, not yet taken: it has reached the source, but only
    # the consumers can say so.
    await js.publish(event_subject("late"), b"{}")
    await eventually(lambda: source.buffered == 1)
    assert await source.fence()
    assert counting.asked == 2 * feeds
    await source.wait()
    (late,) = source.take(1)
    await source.ack(late.stream_sequence)
    assert await source.fence()
    assert counting.asked == 2 * feeds
    await source.stop()
