"""``Wire``: messages with headers written as nats-py writes them, without its cost."""

from __future__ import annotations

from typing import Any

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from protocol.nats._wire import Wire, command

HEADERS = [
    {"Nats-Msg-Id": "c%C3%A9%20x:vip:12", "Shoal-Partition": "7"},
    {
        "Nats-Msg-Id": "c1:inactive_14d:3",
        "Shoal-Partition": "0",
        "Nats-Batch-Id": "0123456789abcdef-12",
        "Nats-Batch-Sequence": "999",
        "Nats-Batch-Commit": "1",
    },
    {
        "Nats-Expected-Last-Subject-Sequence": "41",
        "Nats-Expected-Last-Subject-Sequence-Subject": "shoal.fence.3",
    },
]


async def _nats_pys(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    """What nats-py's own publish hands its outgoing buffer for this message."""
    nc: Any = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    nc._send_command = capture
    nc._flush_queue = None
    await nc._send_publish(subject, reply, payload, len(payload), dict(headers))
    (cmd,) = sent
    return cmd


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("reply", ["", "_INBOX.shoal.1a2b.7"])
async def test_the_command_is_nats_pys_byte_for_byte(headers: dict[str, str], reply: str) -> None:
    for subject, payload in [
        ("shoal.segments.vip.entered", b'{"customer_id":"c1","version":3}'),
        ("shoal.progress.3", b""),
        ("shoal.segments.a-b_c.exited", bytes(range(256)) * 4),
    ]:
        assert command(subject, reply, headers, payload) == await _nats_pys(
            subject, reply, headers, payload
        )


async def test_a_message_arrives_with_its_subject_headers_reply_and_payload(
    client: Client,
) -> None:
    wire = Wire(client)
    assert wire.raw
    sub = await client.subscribe("shoal.segments.>")
    payloads = [b"one", b"", b"x" * 70_000]
    for i, payload in enumerate(payloads):
        await wire.publish("shoal.segments.vip.entered", payload, HEADERS[i], reply=f"r.{i}")
    got = []
    with anyio.fail_after(5):
        async for msg in sub.messages:
            got.append((msg.subject, msg.reply, msg.data, msg.headers))
            if len(got) == len(payloads):
                break
    assert got == [
        ("shoal.segments.vip.entered", f"r.{i}", payload, HEADERS[i])
        for i, payload in enumerate(payloads)
    ]
    assert client.stats["out_msgs"] >= len(payloads)


async def test_it_refuses_as_nats_py_does(client: Client) -> None:
    wire = Wire(client)
    with pytest.raises(nats.errors.MaxPayloadError):
        await wire.publish("shoal.x", b"x" * (client.max_payload + 1), HEADERS[0])
    await client.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await wire.publish("shoal.x", b"x", HEADERS[0])


async def test_a_client_without_the_internals_it_needs_gets_its_own_publish() -> None:
    class Later:  # a nats-py whose internals moved: only the public publish
        def __init__(self) -> None:
            self.published: list[tuple[str, bytes, str, dict[str, str]]] = []

        async def publish(
            self, subject: str, payload: bytes, reply: str, headers: dict[str, str]
        ) -> None:
            self.published.append((subject, payload, reply, headers))

    nc = Later()
    wire = Wire(nc)  # type: ignore[arg-type]
    assert not wire.raw
    await wire.publish("shoal.x", b"p", HEADERS[0], reply="r")
    assert nc.published == [("shoal.x", b"p", "r", HEADERS[0])]
