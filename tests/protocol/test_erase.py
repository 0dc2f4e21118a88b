"""Erasing messages from a stream by sequence, on a real broker."""

from __future__ import annotations

import nats
import nats.js.errors
import pytest

from protocol import BrokerError
from protocol.nats._erase import erase_messages
from tests.helpers import NatsServer


async def test_erasing_again_what_is_gone_is_done(nats_server: NatsServer) -> None:
    """An erasure retried after a failure part-way finds some messages erased already (the
    broker says so with a 500 'no message found', not a 404), and one past the end of the
    stream: both are done, not an error that would stop the erasure for ever."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        seqs = [(await js.publish(f"t.{i}", b"personal")).seq for i in range(3)]
        await erase_messages(js, "T", seqs[:2])
        await erase_messages(js, "T", [*seqs, seqs[-1] + 10])
        info = await js.stream_info("T")
        assert info.state.messages == 0
        with pytest.raises(BrokerError, match=r"^cannot erase message 1 of NOPE: "):
            await erase_messages(js, "NOPE", [1])
    finally:
        await nc.close()
