"""Prometheus metrics and event logs: a real engine and nats-server, ``/metrics`` over HTTP."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from actors import Clock, Engine, EngineConfig, SystemClock, VirtualClock
from protocol import SECOND, format_instant
from protocol.metrics import EngineMetrics, MetricsError
from protocol.nats import connect, jetstream_ports
from store import Store
from tests.helpers import NatsServer, Proc, eventually, free_port, run, segments

ACTIVE_IDLE = segments(
    """
[segments.active]
rule = "since_last('Visit') < '1s'"

[segments.idle]
rule = "since_last('Visit') >= '1s'"
"""
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of the endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (an error status is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def readiness(base: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of ``base``/readyz."""
    status, body = get(f"{base}/readyz")
    doc: dict[str, Any] = json.loads(body)
    return status, doc


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def track(user: str, *, at: int | None = None, mid: str | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"type": "track", "userId": user, "event": "Visit", **extra}
    if at is not None:
        doc["timestamp"] = format_instant(at)
    if mid is not None:
        doc["messageId"] = mid
    return json.dumps(doc).encode()


@contextlib.asynccontextmanager
async def observed_engine(
    url: str, db: Path, *, clock: Clock | None = None
) -> AsyncIterator[tuple[Engine, EngineMetrics, Client]]:
    """An engine (not running) observed by its metrics, and its connection."""
    nc = await connect([url])
    log = await Store.open(db)
    metrics = EngineMetrics()
    try:
        source, sink = await jetstream_ports(nc)
        engine = Engine(
            source, sink, log, ACTIVE_IDLE, clock=clock, config=EngineConfig(), observer=metrics
        )
        yield engine, metrics, nc
    finally:
        await log.close()
        await nc.close()


@contextlib.asynccontextmanager
async def engine_with_metrics(
    url: str, db: Path, *, clock: Clock | None = None
) -> AsyncIterator[tuple[Engine, str]]:
    """An engine with its metrics endpoint on a free port, sampled every 50 ms."""
    async with (
        observed_engine(url, db, clock=clock) as (engine, metrics, _),
        anyio.create_task_group() as tg,
    ):
        endpoint = await tg.start(
            lambda task_status: metrics.serve(
                engine, port=free_port(), interval=0.05, task_status=task_status
            )
        )
        await tg.start(engine.run)
        try:
            yield engine, endpoint
        finally:
            tg.cancel_scope.cancel()


async def scraped(endpoint: str, check: Any, timeout: float = 10.0) -> Samples:
    """Scrape until ``check(samples)`` holds (the engine is sampled every 50 ms)."""
    last: Samples = {}

    def ok() -> bool:
        nonlocal last
        last = scrape(endpoint)
        return bool(check(last))

    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(ok):
            await anyio.sleep(0.05)
    return last


async def test_counters_move(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with engine_with_metrics(nats_server.url, tmp_path / "shoal.db") as (engine, endpoint):
        # Sampled before the engine made its consumer, then with it.
        first = await scraped(endpoint, lambda s: value(s, "shoal_consumer_lag_messages") == 0)
        assert value(first, "shoal_events_applied_total") == 0
        assert value(first, "shoal_events_rejected_total", reason="type") == 0
        assert value(first, "shoal_segment_members", segment="active") == 0
        assert value(first, "shoal_consumer_lag_messages") == 0

        await client.publish("shoal.events.alice", track("alice", mid="a1"))
        await client.publish("shoal.events.bob", track("bob", mid="b1"))
        await client.publish("shoal.events.alice", track("alice", mid="a1"))  # a repeat
        await client.publish("shoal.events.carol", b'{"userId": "carol", "messageId": "c1"}')
        s = await scraped(
            endpoint,
            lambda s: (
                value(s, "shoal_events_applied_total") == 2
                and value(s, "shoal_events_rejected_total", reason="type") == 1
                and value(s, "shoal_segment_members", segment="active") == 2
            ),
        )
        assert value(s, "shoal_events_duplicate_total") == 1
        entered = dict(segment="active", change="entered", cause="event")
        assert value(s, "shoal_transitions_total", **entered) == 2
        assert value(s, "shoal_deadlines_pending") == 2
        assert value(s, "shoal_customers") == 2
        assert value(s, "shoal_warm") == 1
        # One or two batches, each committed once.
        assert value(s, "shoal_batch_commit_seconds_count") in (1, 2)

        # A second later both leave `active` for `idle`, by time.
        s = await scraped(
            endpoint, lambda s: value(s, "shoal_segment_members", segment="idle") == 2
        )
        assert value(s, "shoal_segment_members", segment="active") == 0
        exited = dict(segment="active", change="exited", cause="time")
        assert value(s, "shoal_transitions_total", **exited) == 2
        assert (
            value(s, "shoal_transitions_total", segment="idle", change="entered", cause="time") == 2
        )
        assert value(s, "shoal_deadlines_fired_total") == 2
        assert value(s, "shoal_deadline_lateness_seconds_count") == 2
        assert value(s, "shoal_deadlines_pending") == 0
        s = await scraped(endpoint, lambda s: value(s, "shoal_transitions_published_total") == 6)
        assert value(s, "shoal_outbox_unpublished") == 0
        assert value(s, "shoal_consumer_lag_messages") == 0
        assert value(s, "process_resident_memory_bytes") is not None
        assert engine.stats.events_applied == 2


async def test_deadline_lateness_is_fired_at_less_due_at(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    start = SystemClock().now()
    clock = VirtualClock(start)
    visit = start - SECOND // 10
    async with engine_with_metrics(nats_server.url, tmp_path / "shoal.db", clock=clock) as (
        engine,
        endpoint,
    ):
        await client.publish("shoal.events.alice", track("alice", at=visit, mid="a1"))
        await eventually(lambda: engine.stats.transitions == 1)
        # Due a second after the visit; the engine's clock reaches it 2.5 s late.
        clock.set(visit + SECOND + 5 * SECOND // 2)
        s = await scraped(
            endpoint,
            lambda s: (
                value(s, "shoal_deadline_lateness_seconds_count") == 1
                and value(s, "shoal_segment_members", segment="idle") == 1
            ),
        )
        assert value(s, "shoal_deadline_lateness_seconds_sum") == 2.5
        assert value(s, "shoal_deadline_lateness_seconds_bucket", le="1.0") == 0
        assert value(s, "shoal_deadline_lateness_seconds_bucket", le="2.5") == 1
        assert value(s, "shoal_segment_members", segment="active") == 0


async def test_port_in_use_is_a_metrics_error(nats_server: NatsServer, tmp_path: Path) -> None:
    async with (
        observed_engine(nats_server.url, tmp_path / "shoal.db") as (engine, metrics, _),
        anyio.create_task_group() as tg,
    ):
        endpoint = await tg.start(
            lambda task_status: metrics.serve(engine, port=0, task_status=task_status)
        )
        port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(MetricsError) as caught:
            await EngineMetrics().serve(engine, port=port)
        tg.cancel_scope.cancel()
    assert str(caught.value) == (
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use "
        "(choose another with --metrics-port)"
    )


async def test_readiness_gives_the_reasons_of_its_checks(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    paused = ["paused: disk full"]  # a check another part may add
    bug: list[str] = []
    bug_error = RuntimeError("a bug in a check")

    def faulty() -> list[str]:
        if bug:
            raise bug_error
        return []

    async def probe(expected: tuple[int, dict[str, Any]]) -> None:
        with anyio.fail_after(10):
            while await anyio.to_thread.run_sync(readiness, base) != expected:
                await anyio.sleep(0.05)

    async with (
        observed_engine(nats_server.url, tmp_path / "shoal.db") as (engine, metrics, nc),
        anyio.create_task_group() as tg,
    ):
        endpoint = await tg.start(
            lambda task_status: metrics.serve(
                engine,
                broker=nc,
                checks=[lambda: paused, faulty],
                port=0,
                interval=0.05,
                task_status=task_status,
            )
        )
        base = endpoint.removesuffix("/metrics")
        # Sampled before the engine runs.
        starting = ["engine not consuming (starting or stopping)", "paused: disk full"]
        assert await anyio.to_thread.run_sync(readiness, base) == (
            503,
            {"ready": False, "reasons": starting},
        )
        assert await anyio.to_thread.run_sync(get, f"{base}/healthz") == (
            200,
            b'{"alive": true}\n',
        )
        await tg.start(engine.run)
        await probe((503, {"ready": False, "reasons": ["paused: disk full"]}))
        paused.clear()
        bug.append("a bug in a check")  # said, not raised: the engine goes on
        await probe((503, {"ready": False, "reasons": [f"readiness check failed: {bug_error!r}"]}))
        bug.clear()
        await probe((200, {"ready": True, "reasons": []}))
        assert metrics.not_ready == ()
        s = await anyio.to_thread.run_sync(scrape, endpoint)
        assert value(s, "shoal_broker_connected") == 1
        # Any other path is the metrics, as prometheus-client serves them.
        other = await anyio.to_thread.run_sync(scrape, f"{base}/")
        assert value(other, "shoal_broker_connected") == 1
        tg.cancel_scope.cancel()


async def test_without_a_broker_to_watch_there_is_no_broker_gauge(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with engine_with_metrics(nats_server.url, tmp_path / "shoal.db") as (engine, endpoint):
        s = await scraped(endpoint, lambda s: value(s, "shoal_warm") == 1)
        assert value(s, "shoal_broker_connected") is None


def test_serve_metrics_port_and_json_logs(nats_server: NatsServer, tmp_path: Path) -> None:
    """`shoal serve --metrics-port` serves /metrics; in a pipe, logs are JSON lines, and an
    event-related one names the customer and the message."""
    path = tmp_path / "segments.toml"
    path.write_text("[segments.active]\nrule = \"since_last('Visit') < '1h'\"\n", encoding="utf-8")
    port = free_port()
    serve = Proc(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--nats",
        nats_server.url,
        "--segments",
        str(path),
        "--metrics-port",
        str(port),
    )
    try:
        ready = json.loads(serve.wait_err("metrics endpoint ready"))
        assert ready["url"] == f"http://127.0.0.1:{port}/metrics"
        serve.wait_err("shoal is serving")

        async def publish() -> None:
            nc = await connect([nats_server.url])
            try:
                await nc.publish("shoal.events.dora", track("dora", mid="d1"))
                await nc.publish("shoal.events.erin", b'{"type": "track", "userId": "erin"}')
                await nc.publish(
                    "shoal.events.fay",
                    b'{"type": "track", "userId": "fay", "event": "Visit", "messageId": "f1",'
                    b' "timestamp": "yesterday"}',
                )
                await nc.flush()
            finally:
                await nc.close()

        anyio.run(publish)
        first = json.loads(serve.wait_err('"event rejected"'))
        second = json.loads(serve.wait_err('"event rejected"'))
        by_customer = {line["customer_id"]: line for line in (first, second)}
        erin, fay = by_customer["erin"], by_customer["fay"]
        assert erin["level"] == fay["level"] == "warning"
        assert erin["kind"] == "event" and fay["kind"] == "timestamp"
        assert fay["message_id"] == "f1"
        # Without a messageId, the one the engine would have logged the event under.
        assert erin["message_id"].startswith("js:2@")
        assert fay["reason"].startswith("timestamp 'yesterday' is not an ISO-8601 date")

        deadline = time.monotonic() + 10
        while True:
            s = scrape(f"http://127.0.0.1:{port}/metrics")
            if value(s, "shoal_events_applied_total") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert value(s, "shoal_events_applied_total") == 1
        assert value(s, "shoal_events_rejected_total", reason="event") == 1
        assert value(s, "shoal_events_rejected_total", reason="timestamp") == 1
        assert value(s, "shoal_segment_members", segment="active") == 1
        assert serve.stop() == 0
    finally:
        serve.close()


def test_serve_metrics_port_is_checked(tmp_path: Path) -> None:
    done = run("serve", "--data-dir", str(tmp_path), "--metrics-port", "70000")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "shoal serve: error: argument --metrics-port: '70000' is not a TCP port (0 to 65535)"
    )
