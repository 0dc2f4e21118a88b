"""``protocol.nats.read_stream`` loses nothing when its reader falls behind: the client drops
what overflows its queue, nats-py's ordered consumer counts it as seen, and without a check
those messages would be missing from a rebuild with no word said."""

from __future__ import annotations

import anyio
import nats
import nats.errors
from nats.js.api import StreamConfig

from protocol.nats import read_stream
from tests.helpers import NatsServer

MESSAGES = 1_500


async def test_a_slow_reader_gets_every_message_in_order(nats_server: NatsServer) -> None:
    slow: list[Exception] = []

    async def on_error(e: Exception) -> None:
        if isinstance(e, nats.errors.SlowConsumerError):
            slow.append(e)

    nc = await nats.connect(nats_server.url, error_cb=on_error)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="READ", subjects=["read.>"]))
        for i in range(0, MESSAGES, 500):
            futures = [
                await js.publish_async(f"read.{j % 7}", b"%d" % j) for j in range(i, i + 500)
            ]
            for f in futures:
                await f
        seqs: list[int] = []
        async for chunk in read_stream(nc, "READ", "read.>", chunk=100, pending_limit=300):
            seqs += [d.stream_sequence for d in chunk]
            assert [int(d.data) for d in chunk] == [
                s - 1 for s in (d.stream_sequence for d in chunk)
            ]
            await anyio.sleep(0.01)  # a busy reader: the broker sends faster
        assert seqs == list(range(1, MESSAGES + 1))
        # The case it is about did happen: the client dropped deliveries on the way.
        assert slow
    finally:
        await nc.close()
