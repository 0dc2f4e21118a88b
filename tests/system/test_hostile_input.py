"""One hostile message cannot stop shoal: each message that used to crash the engine at
every restart (a crash loop), or to stall ingest or the query service for good, is rejected
with its reason and acknowledged, and the engine, restarted after it, ingests the next valid
event. Against a real nats-server; the subjects that are not UTF-8 are published over a raw
socket, as nats-py cannot publish them."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from actors import Engine, EngineApi
from protocol import DEFAULT_PARTITIONS, REJECTED_SUBJECT, ApiError
from protocol.nats import ApiClient, connect, serve_api
from tests.helpers import NatsServer, collect, eventually, running_engine, segments, track

ZONED = segments("""
[segments.weekender]
rule = "count('Visit', within='60d', days=['sat', 'sun']) >= 1"

[segments.visitor]
rule = "count('Visit') >= 1"
""")


def raw_publish(url: str, subject: bytes, payload: bytes) -> None:
    """Publish with the NATS text protocol itself: any subject bytes, as a hostile client."""
    host, port = url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        s.sendall(b"PUB " + subject + b" " + str(len(payload)).encode() + b"\r\n")
        s.sendall(payload + b"\r\nPING\r\n")
        got = b""
        while b"PONG" not in got:
            chunk = s.recv(4096)
            assert chunk, f"the server closed the connection: {got!r}"
            got += chunk
        assert b"-ERR" not in got, got


async def applied(engine: Engine, n: int) -> None:
    await eventually(lambda: engine.stats.events_applied >= n, timeout=20)


async def poison_then_valid(
    nats_server: NatsServer, client: Client, db: Path, publish_poison: object, expected_kind: str
) -> None:
    """Publish the poison, then a valid event; the engine rejects the first with
    ``expected_kind``, applies the second; restarted, it applies the next one."""
    rejected = await collect(client, REJECTED_SUBJECT)
    js = client.jetstream()
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await publish_poison(js)  # type: ignore[operator]
        await js.publish("shoal.events.bob", track("bob", mid="after-1"))
        await applied(engine, 1)
        await eventually(lambda: engine.stats.events_rejected >= 1)
        assert engine.rejection_counts == {expected_kind: 1}
    await eventually(lambda: len(rejected.msgs) >= 1)
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await js.publish("shoal.events.bob", track("bob", mid="after-2"))
        await applied(engine, 1)
        assert engine.stats.events_rejected == 0  # the poison was acknowledged
    (r,) = rejected.rejections()
    assert r.reason


async def test_json_nested_a_thousand_deep(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async def poison(js: object) -> None:
        deep = b'{"type":"track","userId":"ann","event":"V","properties":{"a":'
        deep += b"[" * 1000 + b"]" * 1000 + b"}}"
        await js.publish("shoal.events.ann", deep)  # type: ignore[attr-defined]

    await poison_then_valid(nats_server, client, tmp_path / "shoal.db", poison, "depth")


async def test_an_integer_trait_over_64_bits(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async def poison(js: object) -> None:
        body = b'{"type":"identify","userId":"ann","traits":{"visits":'
        body += b"1000000000000000000000000000000}}"
        await js.publish("shoal.events.ann", body)  # type: ignore[attr-defined]

    await poison_then_valid(nats_server, client, tmp_path / "shoal.db", poison, "integer")


@pytest.mark.parametrize("zone", ["America", "x" * 300])
async def test_a_timezone_zoneinfo_does_not_know_then_a_track(
    nats_server: NatsServer, client: Client, tmp_path: Path, zone: str
) -> None:
    async def poison(js: object) -> None:
        identify = {"type": "identify", "userId": "ann", "traits": {"timezone": zone}}
        await js.publish("shoal.events.ann", json.dumps(identify).encode())  # type: ignore[attr-defined]
        await js.publish("shoal.events.ann", track("ann", mid="ann-1"))  # type: ignore[attr-defined]

    db = tmp_path / "shoal.db"
    rejected = await collect(client, REJECTED_SUBJECT)
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await poison(client.jetstream())
        await applied(engine, 1)  # ann's track, read in UTC
        await eventually(lambda: engine.stats.events_rejected == 1)
        assert engine.rejection_counts == {"timezone": 1}
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await client.jetstream().publish("shoal.events.ann", track("ann", mid="ann-2"))
        await applied(engine, 1)
    await eventually(lambda: len(rejected.msgs) == 1)


async def test_a_year_one_event_for_a_customer_with_a_timezone(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async def poison(js: object) -> None:
        identify = {"type": "identify", "userId": "ann", "traits": {"timezone": "Europe/Paris"}}
        await js.publish("shoal.events.ann", json.dumps(identify).encode())  # type: ignore[attr-defined]
        body = track("ann", mid="old", timestamp="0001-01-01T00:30:00+01:00")
        await js.publish("shoal.events.ann", body)  # type: ignore[attr-defined]

    db = tmp_path / "shoal.db"
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await poison(client.jetstream())
        await client.jetstream().publish("shoal.events.bob", track("bob", mid="b1"))
        await applied(engine, 2)  # ann's identify and bob's track
        await eventually(lambda: engine.stats.events_rejected == 1)
        assert engine.rejection_counts == {"timestamp": 1}
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await client.jetstream().publish("shoal.events.ann", track("ann", mid="ann-2"))
        await applied(engine, 1)


async def test_an_event_subject_that_is_not_utf8(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    rejected = await collect(client, REJECTED_SUBJECT)
    db = tmp_path / "shoal.db"
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await anyio.to_thread.run_sync(
            raw_publish, nats_server.url, b"shoal.events.p\xff", track("p", mid="bad")
        )
        await client.jetstream().publish("shoal.events.bob", track("bob", mid="b1"))
        await applied(engine, 1)
        assert engine.rejection_counts == {"subject": 1}
    async with running_engine(nats_server.url, db, ZONED) as engine:
        await client.jetstream().publish("shoal.events.bob", track("bob", mid="b2"))
        await applied(engine, 1)
    await eventually(lambda: len(rejected.msgs) == 1)
    (r,) = rejected.rejections()
    # Stored under the partition the broker hashed from the token's raw bytes (FNV-1a).
    p = fnv1a(b"p\xff") % DEFAULT_PARTITIONS
    assert r.subject == f"shoal.events.{p}.p\\xff"
    assert r.reason.startswith(f"subject 'shoal.events.{p}.p\\xff' is not valid UTF-8")


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


async def test_an_api_subject_that_is_not_utf8(nats_server: NatsServer, tmp_path: Path) -> None:
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ZONED) as engine:
        nc = await connect([nats_server.url])
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_api, nc, EngineApi(engine))
                await anyio.to_thread.run_sync(
                    raw_publish, nats_server.url, b"shoal.api.customer.\xff", b""
                )
                await anyio.sleep(0.2)
                # The service still answers.
                api = ApiClient(nc)
                with pytest.raises(ApiError, match="unknown customer 'nobody'") as e:
                    await api.customer("nobody")
                assert e.value.code == "404"
                tg.cancel_scope.cancel()
        finally:
            await nc.close()


async def test_a_rejection_over_the_brokers_max_payload_is_cut(tmp_path: Path) -> None:
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 4096\n")
    server = NatsServer(tmp_path / "nats", "-c", str(config))
    server.start()
    try:
        nc = await connect([server.url])
        try:
            assert nc.max_payload == 4096
            rejected = await collect(nc, REJECTED_SUBJECT)
            # Valid as a payload (3,000 bytes), but its rejection would not be: each byte
            # takes six in JSON (\u0001).
            poison = b"\x01" * 3000
            async with running_engine(server.url, tmp_path / "shoal.db", ZONED) as engine:
                await nc.jetstream().publish("shoal.events.ann", poison)
                await nc.jetstream().publish("shoal.events.bob", track("bob", mid="b1"))
                await applied(engine, 1)
            await eventually(lambda: len(rejected.msgs) == 1)
            (r,) = rejected.rejections()
            assert len(rejected.msgs[0].data) <= 4096
            assert r.truncated and r.payload_bytes == 3000
            assert r.payload_sha256 == hashlib.sha256(poison).hexdigest()
            assert r.payload is not None and poison.decode().startswith(r.payload)
            assert r.reason.startswith("invalid JSON")
        finally:
            await nc.close()
    finally:
        server.stop()
