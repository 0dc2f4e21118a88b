"""The stream snapshot and restore client (``protocol.nats._backup``) against a real
nats-server: an exact copy out and back in (sequences, subjects, headers, timestamps, deleted
messages, the configuration), a KV bucket as well, and the refusals."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from protocol.nats import StreamExists, StreamNotFound, restore_stream, snapshot_stream, stream_info
from tests.helpers import NatsServer


async def test_a_stream_comes_back_exactly(tmp_path: Path) -> None:
    first = NatsServer(tmp_path / "first")
    first.start()
    try:
        nc = await nats.connect(first.url)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"], duplicate_window=600)
        for i in range(3_000):  # several chunks: about 1 MB before compression
            await js.publish(
                f"t.{i % 7}", b"x" * 300 + str(i).encode(), headers={"Nats-Msg-Id": f"m{i}"}
            )
        await js.delete_msg("T", 5)
        kv = await js.create_key_value(bucket="B", history=5)
        await kv.put("k", b"1")
        await kv.put("k", b"2")
        before = [await js.get_msg("T", seq) for seq in (1, 6, 3_000)]
        copy = await snapshot_stream(nc, "T", tmp_path / "T.tar.s2")
        kv_copy = await snapshot_stream(nc, "KV_B", tmp_path / "B.tar.s2")
        with pytest.raises(StreamNotFound, match="^stream NONE does not exist on the broker$"):
            await snapshot_stream(nc, "NONE", tmp_path / "none.tar.s2")
        await nc.close()
    finally:
        first.stop()
    assert (copy.state["messages"], copy.state["last_seq"], copy.state["num_deleted"]) == (
        2_999,
        3_000,
        1,
    )
    assert copy.bytes == (tmp_path / "T.tar.s2").stat().st_size > 0

    second = NatsServer(tmp_path / "second")
    second.start()
    try:
        nc = await nats.connect(second.url)
        js = nc.jetstream()
        assert await stream_info(nc, "T") is None
        state = await restore_stream(nc, "T", copy.config, copy.state, tmp_path / "T.tar.s2")
        assert {k: state[k] for k in ("messages", "first_seq", "last_seq", "num_deleted")} == {
            k: copy.state[k] for k in ("messages", "first_seq", "last_seq", "num_deleted")
        }
        after = [await js.get_msg("T", seq) for seq in (1, 6, 3_000)]
        assert [(m.seq, m.subject, m.data, m.headers, m.time) for m in after] == [
            (m.seq, m.subject, m.data, m.headers, m.time) for m in before
        ]
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_msg("T", 5)  # still deleted
        info = await stream_info(nc, "T")
        assert info is not None and info["config"]["duplicate_window"] == 600_000_000_000
        # A restored stream does not drop a message whose id it holds (seen on 2.15.1): the
        # broker rebuilds its duplicate window only when it starts.
        ack = await js.publish("t.1", b"again", headers={"Nats-Msg-Id": "m10"})
        assert (ack.seq, ack.duplicate) == (3_001, None)

        await restore_stream(nc, "KV_B", kv_copy.config, kv_copy.state, tmp_path / "B.tar.s2")
        kv = await js.key_value("B")
        assert (await kv.get("k")).value == b"2"
        assert [e.value for e in await kv.history("k")] == [b"1", b"2"]

        with pytest.raises(StreamExists) as e:
            await restore_stream(nc, "T", copy.config, copy.state, tmp_path / "T.tar.s2")
        assert str(e.value) == (
            "stream T exists already on the broker (3000 messages): a restore needs a broker "
            "without it"
        )
        await nc.close()
    finally:
        second.stop()
