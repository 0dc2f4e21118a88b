"""Broker faults: nats-server restarts and dropped connections lose no event and no transition.

The faults are real: a nats-server stopped or killed and started again (same port, same
JetStream store), and a TCP relay between engine and server that drops its connections with
deliveries on their way. Outcomes are checked exactly. How fast the engine resumes is only
bounded generously, because test machines are shared.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import nats.errors
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from structlog.testing import capture_logs

from actors import EngineConfig
from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_WILDCARD,
    BrokerError,
    Transition,
    partition,
    partition_consumer,
)
from protocol.nats import EventFeed, connect, ensure_streams
from store import Store
from tests.helpers import NatsServer, engine_consumers, eventually, running_engine, segments

# nats-py, when the server goes away under it, can drop a connection's asyncio StreamWriter
# without closing it; the ResourceWarning then surfaces in whichever test the collector
# happens to run in (seen once in CI, in the restart test). Only that one is ignored here:
# shoal opens no asyncio streams of its own (the proxy below uses anyio's).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function StreamWriter.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)

VISITS = segments(
    """
[segments.visited]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 5"

[segments.frequent]
rule = "count('Visit') >= 20"
"""
)


def visit(user: str) -> bytes:
    # No messageId: the engine takes the Nats-Msg-Id header as the event's id.
    return json.dumps({"type": "track", "userId": user, "event": "Visit"}).encode()


def expected_versions(visits: int) -> int:
    """How many transitions (all entries) a customer with ``visits`` visits makes."""
    return sum(visits >= n for n in (1, 5, 20))


async def publish(js: JetStreamContext, user: str, msg_id: str) -> int:
    """Publish a visit of ``user`` until the stream confirms it; return how many retries."""
    retries = 0
    while True:
        try:
            await js.publish(
                f"shoal.events.{user}", visit(user), headers={"Nats-Msg-Id": msg_id}, timeout=1.0
            )
            return retries
        except (TimeoutError, nats.errors.Error):
            # The server is away (or JetStream is still recovering): the same message again,
            # which the stream drops if it did store it.
            retries += 1
            await anyio.sleep(0.05)


class Producer:
    """Publishes ``count`` visits over ``customers`` customers through JetStream, each with
    its own ``Nats-Msg-Id``, retrying a publish until the stream confirms it."""

    def __init__(self, nc: Client, count: int, customers: int, *, pace: float = 0.0) -> None:
        self._js = nc.jetstream()
        self.count = count
        self.customers = customers
        self.pace = pace
        self.published = 0
        self.retries = 0

    def customer(self, i: int) -> str:
        return f"c{i % self.customers}"

    async def run(self) -> None:
        for i in range(self.count):
            user = self.customer(i)
            self.retries += await publish(self._js, user, f"e{i}")
            self.published = i + 1
            if self.pace and i % 20 == 19:
                await anyio.sleep(20 * self.pace)

    def visits(self) -> Counter[str]:
        return Counter(self.customer(i) for i in range(self.count))


class Audit:
    """A durable JetStream subscriber on ``shoal.segments.>``, as a campaign tool would run
    one: it acknowledges each transition and drops repeats by ``Nats-Msg-Id``."""

    def __init__(self) -> None:
        self.seen: dict[str, Transition] = {}
        self.repeats = 0

    async def on_msg(self, msg: Msg) -> None:
        msg_id = (msg.headers or {})["Nats-Msg-Id"]
        if msg_id in self.seen:
            self.repeats += 1
        else:
            self.seen[msg_id] = msgspec.json.decode(msg.data, type=Transition)
        try:
            await msg.ack()
        except nats.errors.Error:
            pass  # the connection is down: it comes again after ack_wait

    async def subscribe(self, nc: Client) -> None:
        await nc.jetstream().subscribe(
            "shoal.segments.>",
            durable="audit",
            stream="SHOAL_SEGMENTS",
            cb=self.on_msg,
            manual_ack=True,
            # A delivery lost with the connection comes again soon.
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=2.0),
        )

    def versions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        for t in self.seen.values():
            out[t.customer_id].append(t.version)
        return {c: sorted(v) for c, v in out.items()}


def resumed(logs: Sequence[Mapping[str, Any]]) -> int:
    """How many times the engine logged that it resumed its consumer."""
    return sum(e["event"] == "consumer resumed" for e in logs)


async def logged_message_ids(db: Path) -> list[tuple[str, str]]:
    log = await Store.open(db)
    try:
        return [(e.customer_id, e.message_id) async for part in log.events.read() for e in part]
    finally:
        await log.close()


async def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    """Like ``eventually``, but says whether it happened, so the test can show what is
    missing instead of a bare timeout."""
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.05)
        return True
    return False


class Proxy:
    """A TCP relay in front of the server that a test can cut, as a network fault would.

    While :meth:`hold` is in force, nothing goes from the server to its clients: what the
    server sends waits in socket buffers, and :meth:`cut` closes every connection with it,
    so those deliveries are lost, as they would be when a connection drops.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._holding = False
        self._connections: set[anyio.CancelScope] = set()
        self.url = ""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.url = f"nats://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
        async with listener:
            task_status.started()
            await listener.serve(self._relay)

    async def _relay(self, client: SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client:
                    server = await self._dial()
                    if server is None:
                        return
                    async with server, anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, client, server, False, tg.cancel_scope)
                        tg.start_soon(self._pump, server, client, True, tg.cancel_scope)
            finally:
                self._connections.discard(scope)

    async def _dial(self) -> SocketStream | None:
        """A connection to the server, waiting for it while it restarts, as a slow network
        path would. (Closing the client's connection at once instead makes nats-py leak
        the half-open connection it then drops: a ResourceWarning, not a fault of ours.)"""
        with anyio.move_on_after(10):
            while True:
                try:
                    return await anyio.connect_tcp("127.0.0.1", self._target)
                except OSError:
                    await anyio.sleep(0.05)
        return None

    async def _pump(
        self, src: SocketStream, dst: SocketStream, to_client: bool, link: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                while to_client and self._holding:
                    await anyio.sleep(0.01)
                await dst.send(chunk)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        link.cancel()  # one side is gone: close the other, as a broken link would

    def hold(self) -> None:
        self._holding = True

    def cut(self) -> None:
        """Close every connection now, dropping what is held."""
        for scope in list(self._connections):
            scope.cancel()
        self._holding = False


async def test_a_dropped_connection_loses_no_delivery(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    nc = await connect([nats_server.url])  # the producer's, not through the proxy
    js = nc.jetstream()
    proxy = Proxy(nats_server.port)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve)
            with capture_logs() as logs:
                async with running_engine(proxy.url, db, VISITS) as engine:
                    for i in range(10):
                        await publish(js, "ann", f"a{i}")
                    await eventually(lambda: engine.stats.events_applied == 10)

                    # The broker sends 20 more deliveries, which the connection loses.
                    proxy.hold()
                    for i in range(10, 30):
                        await publish(js, "ann", f"a{i}")

                    async def all_sent() -> bool:
                        info = await js.consumer_info(
                            "SHOAL_EVENTS",
                            partition_consumer(
                                "shoal-engine", partition("ann", DEFAULT_PARTITIONS)
                            ),
                        )
                        return bool(info.num_pending == 0 and info.num_ack_pending == 20)

                    with anyio.fail_after(10):
                        while not await all_sent():
                            await anyio.sleep(0.02)
                    proxy.cut()

                    # They come again at once, not after the consumer's 30 s ack_wait
                    # (this bound is generous; it takes about a second).
                    await eventually(lambda: engine.stats.events_applied == 30, timeout=25)
                    # And later events still flow.
                    for i in range(30, 35):
                        await publish(js, "bob", f"b{i}")
                    await eventually(lambda: engine.stats.events_applied == 35, timeout=25)
                    await eventually(lambda: engine.stats.transitions_published == 5, timeout=25)
                    assert engine.stats.events_duplicate == 0
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    assert resumed(logs) >= 1
    logged = await logged_message_ids(db)
    assert sorted(m for _, m in logged) == sorted(
        [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30, 35)]
    )


@pytest.mark.slow
async def test_a_stream_of_events_survives_server_restarts_and_a_dropped_connection(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    producer_nc = await connect([nats_server.url])
    audit_nc = await connect([nats_server.url])
    # Paced (2,000 a second at most), so that each fault falls inside the stream.
    producer = Producer(producer_nc, count=6_000, customers=100, pace=0.0005)
    audit = Audit()
    visits = producer.visits()
    want = {c: list(range(1, expected_versions(n) + 1)) for c, n in visits.items()}
    total = sum(len(v) for v in want.values())
    proxy = Proxy(nats_server.port)  # the engine's way to the server, which a test can cut
    try:
        with capture_logs() as logs:
            async with anyio.create_task_group() as proxy_tg:
                await proxy_tg.start(proxy.serve)
                async with (
                    running_engine(proxy.url, db, VISITS) as engine,
                    anyio.create_task_group() as tg,
                ):
                    await audit.subscribe(audit_nc)
                    tg.start_soon(producer.run)
                    t0 = anyio.current_time()
                    # A clean shutdown, a dropped connection (losing what was on its way),
                    # then a crash, in the middle of the stream. Each fault waits for the
                    # engine to have resumed after the one before.
                    await eventually(lambda: producer.published >= 1_500, timeout=30)
                    await anyio.to_thread.run_sync(lambda: nats_server.restart(down=0.5))
                    await eventually(lambda: resumed(logs) >= 1, timeout=30)
                    await eventually(lambda: producer.published >= 3_000, timeout=30)
                    proxy.hold()
                    await anyio.sleep(0.3)
                    proxy.cut()
                    await eventually(lambda: resumed(logs) >= 2, timeout=30)
                    await eventually(lambda: producer.published >= 4_500, timeout=30)
                    await anyio.to_thread.run_sync(lambda: nats_server.restart(kill=True, down=0.5))

                    done = await wait_for(
                        lambda: (
                            producer.published == producer.count
                            and engine.stats.events_applied == producer.count
                            and len(audit.seen) == total
                            and resumed(logs) >= 3
                        ),
                        timeout=60,
                    )
                    elapsed = anyio.current_time() - t0
                    stats = engine.stats
                    tg.cancel_scope.cancel()
                proxy_tg.cancel_scope.cancel()
    finally:
        await producer_nc.close()
        await audit_nc.close()

    assert done, (
        f"after {elapsed:.1f} s: published {producer.published}, applied "
        f"{stats.events_applied}, transitions seen {len(audit.seen)} of {total}, consumer "
        f"resumed {resumed(logs)} times"
    )
    # The engine went on through every fault (or the test would have failed with its error),
    # resuming its consumer each time.
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]

    # Every published event is in the log exactly once.
    logged = await logged_message_ids(db)
    assert len(logged) == producer.count
    assert sorted(logged) == sorted((producer.customer(i), f"e{i}") for i in range(producer.count))
    # The durable subscriber saw every transition: versions 1..n per customer, no gap.
    assert audit.versions() == want
    assert all(t.change == "entered" for t in audit.seen.values())


async def test_deliveries_buffered_when_the_server_dies_are_not_lost(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    count = 3_000
    nc = await connect([nats_server.url])
    js = nc.jetstream()
    # Ingestion pauses once 5 transitions wait to be published, and none can be while
    # SHOAL_SEGMENTS is missing: the deliveries pile up in the engine's buffer, unacknowledged.
    config = EngineConfig(batch_size=10, max_outbox=5)
    try:
        with capture_logs() as logs:
            async with running_engine(nats_server.url, db, VISITS, config=config) as engine:
                await js.delete_stream("SHOAL_SEGMENTS")
                await Producer(nc, count=count, customers=30).run()

                async def all_delivered() -> bool:
                    infos = (await engine_consumers(js)).values()
                    return all(i.num_pending == 0 for i in infos) and any(
                        (i.num_ack_pending or 0) > 0 for i in infos
                    )

                with anyio.fail_after(30):
                    while not await all_delivered():
                        await anyio.sleep(0.02)
                await eventually(lambda: engine.stats.transitions >= 5)
                assert engine.stats.events_applied < count

                await anyio.to_thread.run_sync(lambda: nats_server.restart(kill=True, down=1.0))
                with anyio.fail_after(30):
                    while True:
                        try:
                            await ensure_streams(js)
                            break
                        except BrokerError:
                            await anyio.sleep(0.1)  # JetStream is still recovering
                await eventually(lambda: engine.stats.events_applied == count, timeout=60)
                await eventually(lambda: engine.stats.transitions_published == 3 * 30, timeout=30)
                await eventually(lambda: resumed(logs) >= 1)
    finally:
        await nc.close()
    logged = await logged_message_ids(db)
    assert len(logged) == count
    assert {m for _, m in logged} == {f"e{i}" for i in range(count)}


async def test_the_engine_waits_out_a_broker_outage(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    nc = await connect([nats_server.url])
    try:
        async with running_engine(nats_server.url, db, VISITS) as engine:
            await publish(nc.jetstream(), "ann", "a1")
            await eventually(lambda: engine.stats.transitions_published == 1)
            # Down for several seconds: the engine keeps running, and resumes once it is back.
            await anyio.to_thread.run_sync(lambda: nats_server.restart(down=4.0))
            await Producer(nc, count=5, customers=1).run()  # c0, ids e0..e4
            await eventually(lambda: engine.stats.events_applied == 6, timeout=30)
            await eventually(lambda: engine.stats.transitions_published == 3, timeout=30)
    finally:
        await nc.close()


async def test_needs_restart_after_a_reconnect_and_restart_resumes_past_the_acks(
    nats_server: NatsServer,
) -> None:
    nc = await connect([nats_server.url])
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        feed = EventFeed(nc, js, durable="unit")
        await feed.start()
        assert not feed.needs_restart and feed.pending_at_start == 0
        for i in range(5):
            await publish(js, "ann", f"a{i}")
        await eventually(lambda: feed.buffered == 5)
        taken = feed.take(2)
        assert [d.msg_id for d in taken] == ["a0", "a1"]
        await feed.ack(taken[-1].stream_sequence)

        await anyio.to_thread.run_sync(nats_server.restart)
        await eventually(lambda: feed.needs_restart, timeout=30)
        await publish(js, "ann", "a5")

        # What was buffered before the reconnect can still be taken (it came in order);
        # a5, delivered after it, is not buffered until the restart.
        taken = feed.take(100)
        assert [d.msg_id for d in taken] == ["a2", "a3", "a4"]
        await feed.ack(taken[-1].stream_sequence)
        await feed.restart()
        assert not feed.needs_restart and feed.pending_at_start == 1
        await eventually(lambda: feed.buffered == 1)
        taken = feed.take(100)
        assert [d.msg_id for d in taken] == ["a5"]
        await feed.ack(taken[-1].stream_sequence)
        await feed.stop()
    finally:
        await nc.close()


async def test_take_stops_at_a_delivery_gap_and_restart_delivers_it_again(
    nats_server: NatsServer,
) -> None:
    nc = await connect([nats_server.url])
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        feed = EventFeed(nc, js, durable="unit")
        await feed.start()
        for i in range(10):
            await publish(js, "ann", f"a{i}")
        await eventually(lambda: feed.buffered == 10)
        # The client dropped the fifth delivery (as a slow consumer would).
        del feed._buffer[4]

        taken = feed.take(100)
        assert [d.msg_id for d in taken] == ["a0", "a1", "a2", "a3"]
        assert feed.needs_restart and feed.buffered == 0
        assert feed.take(100) == []
        await feed.ack(taken[-1].stream_sequence)

        await feed.restart()
        assert not feed.needs_restart and feed.pending_at_start == 6
        await eventually(lambda: feed.buffered == 6)
        taken = feed.take(100)
        assert [d.msg_id for d in taken] == [f"a{i}" for i in range(4, 10)]
        await feed.ack(taken[-1].stream_sequence)
        await feed.stop()
    finally:
        await nc.close()


async def test_a_delivery_resent_after_ack_wait_is_not_handed_out_twice(
    nats_server: NatsServer,
) -> None:
    """A batch slower than ack_wait: the broker resends what the engine holds. Handing it
    out again would reject (and count) a bad event twice (seen in the fuzz test on a loaded
    machine)."""
    nc = await connect([nats_server.url])
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        feed = EventFeed(nc, js, durable="unit", ack_wait=1.0)
        await feed.start()
        for i in range(3):
            await publish(js, "ann", f"a{i}")
        await eventually(lambda: feed.buffered == 3)
        taken = feed.take(100)
        assert [d.msg_id for d in taken] == ["a0", "a1", "a2"]
        # Not acknowledged within ack_wait: the broker sends all three again.
        await eventually(lambda: feed.buffered == 3, timeout=10)
        await publish(js, "ann", "a3")
        await eventually(lambda: feed.buffered == 4)
        again = feed.take(100)
        assert [d.msg_id for d in again] == ["a3"]
        assert feed.redelivered == 3 and not feed.needs_restart
        # The acknowledgement of a3 covers the resent three too: once the broker has
        # processed it (it does so after the publish is flushed; a CI run on a loaded machine
        # asked first and saw all four pending). Not acknowledged, they would stay pending.
        await feed.ack(again[-1].stream_sequence)
        await nc.flush()
        with anyio.fail_after(5):
            while await feed.lag() != 0:
                await anyio.sleep(0.05)
        await feed.stop()
    finally:
        await nc.close()


async def test_the_engines_consumer_has_one_filter(nats_server: NatsServer) -> None:
    """nats-server serves a consumer with several filters (``filter_subjects``) some 50
    times slower once the stream holds thousands of subjects: the engine reads its events
    through one filter, the import markers (in each partition's subjects) included."""
    nc = await connect([nats_server.url])
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        feed = EventFeed(nc, js, durable="unit")
        await feed.start()
        info = await js.consumer_info("SHOAL_EVENTS", "unit")
        assert (info.config.filter_subject, info.config.filter_subjects) == (EVENTS_WILDCARD, None)
        await publish(js, "ann", "a0")
        await eventually(lambda: feed.buffered == 1)
        await feed.stop()
    finally:
        await nc.close()


async def test_restart_keeps_trying_while_the_broker_is_away(
    nats_server: NatsServer,
) -> None:
    nc = await connect([nats_server.url])
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        feed = EventFeed(nc, js, durable="unit")
        await feed.start()
        await publish(js, "ann", "a0")
        await eventually(lambda: feed.buffered == 1)
        await anyio.to_thread.run_sync(nats_server.stop)

        def start_later() -> None:
            time.sleep(3.0)
            nats_server.start()

        async with anyio.create_task_group() as tg:
            # Back in 3 s: meanwhile restart() waits for the client to reconnect.
            tg.start_soon(anyio.to_thread.run_sync, start_later)
            await feed.restart()
        assert not feed.needs_restart and feed.pending_at_start == 1
        await eventually(lambda: feed.buffered == 1)
        taken = feed.take(10)
        assert [d.msg_id for d in taken] == ["a0"]
        await feed.ack(taken[-1].stream_sequence)
        await feed.stop()
    finally:
        await nc.close()
