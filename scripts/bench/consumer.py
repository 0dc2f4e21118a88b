"""Benchmark nats-py JetStream consumer APIs for shoal's ingest hot path.

The script starts a private ``nats-server -js`` on loopback (``_common.broker``), fills the
stream ``SHOAL_EVENTS`` with N small Segment-Spec style JSON events spread over ~10k
subjects (``shoal.events.c<i>``) using ``js.publish_async``, and then drains
all N stored messages once per consumer variant, each on a fresh durable
consumer. "Consuming" a message means what the ingest engine does per message:
read ``msg.data``, the stream sequence and timestamp from ``msg.metadata``,
decode the JSON with a reused ``msgspec.json.Decoder`` into a Struct, and ack
in micro-batches (AckPolicy.ALL: one ack on the last message of a batch).

Variants:
  pull-*        ``js.pull_subscribe`` + ``fetch(batch)``.
  push-cb-*     push consumer whose callback only queues the Msg and sets an
                ``asyncio.Event``; a consumer loop processes batches.
  push-next-*   push consumer without callback, drained via ``sub.next_msg()``.
  push-iter-*   push consumer without callback, drained via ``sub.messages``.

Every variant must see N distinct stream sequences; a variant that stalls is
cut off after ``--timeout`` seconds and reported as TIMEOUT. The machine is
assumed to be noisy: compare the ratios within one run, not absolute rates.

Usage::

    python -m scripts.bench.consumer                 # N=200000
    python -m scripts.bench.consumer --quick         # N=20000, short timeout
    python -m scripts.bench.consumer --json out.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from ._common import broker

STREAM = "SHOAL_EVENTS"
SUBJECT_FILTER = "shoal.events.>"
SUBJECT_COUNT = 10_000
PUSH_BATCH_CAP = 5_000
IDLE_HEARTBEAT = 5.0
FETCH_TIMEOUT = 5.0

Kind = Literal["pull", "push-cb", "push-next", "push-iter"]


class Event(msgspec.Struct):
    """Segment Spec event as published by shoal's producers."""

    type: str
    userId: str
    event: str
    properties: dict[str, str]
    messageId: str
    timestamp: str


@dataclass(frozen=True)
class Variant:
    """One consumer configuration to measure."""

    name: str
    kind: Kind
    ack_policy: AckPolicy
    batch: int
    max_ack_pending: int | None = None  # None: server default (1000)


VARIANTS: tuple[Variant, ...] = (
    Variant("pull-all-fetch1000", "pull", AckPolicy.ALL, 1_000),
    Variant("pull-all-fetch5000", "pull", AckPolicy.ALL, 5_000),
    Variant("pull-all-fetch5000-map10k", "pull", AckPolicy.ALL, 5_000, 10_000),
    Variant("pull-explicit-fetch1000", "pull", AckPolicy.EXPLICIT, 1_000),
    Variant("push-cb-all-map10k", "push-cb", AckPolicy.ALL, PUSH_BATCH_CAP, 10_000),
    Variant("push-cb-all-map50k", "push-cb", AckPolicy.ALL, PUSH_BATCH_CAP, 50_000),
    Variant("push-next-all-map10k", "push-next", AckPolicy.ALL, PUSH_BATCH_CAP, 10_000),
    Variant("push-iter-all-map10k", "push-iter", AckPolicy.ALL, PUSH_BATCH_CAP, 10_000),
    Variant("push-cb-none", "push-cb", AckPolicy.NONE, PUSH_BATCH_CAP),
)


@dataclass
class Result:
    """Outcome of one variant (or of the publish phase)."""

    variant: str
    status: str
    messages: int
    seconds: float
    rate: float
    distinct: int = 0
    deliveries: int = 0
    redelivered: int = 0
    out_of_order: int = 0
    batches: int = 0
    acks: int = 0
    consumer: dict[str, Any] = field(default_factory=dict)


class Tally:
    """Per-message work of the engine plus bookkeeping of what was delivered."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.decoder = msgspec.json.Decoder(Event)
        self.seen = bytearray(expected + 1)
        self.distinct = 0
        self.deliveries = 0
        self.redelivered = 0
        self.out_of_order = 0
        self.batches = 0
        self.acks = 0
        self._last_seq = 0

    @property
    def done(self) -> bool:
        return self.distinct >= self.expected

    def process(self, msgs: list[Msg]) -> list[tuple[int, float, Event]]:
        """Decode one micro-batch into rows, as the engine would before its commit."""
        rows: list[tuple[int, float, Event]] = []
        decode = self.decoder.decode
        seen = self.seen
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            rows.append((seq, meta.timestamp.timestamp(), decode(msg.data)))
            if meta.num_delivered > 1:
                self.redelivered += 1
            if seq < self._last_seq:
                self.out_of_order += 1
            self._last_seq = seq
            if not seen[seq]:
                seen[seq] = 1
                self.distinct += 1
        self.deliveries += len(msgs)
        self.batches += 1
        return rows

    async def ack_batch(self, msgs: list[Msg], policy: AckPolicy) -> None:
        """Ack a processed micro-batch according to the consumer's ack policy."""
        if policy == AckPolicy.ALL:
            await msgs[-1].ack()
            self.acks += 1
        elif policy == AckPolicy.EXPLICIT:
            for msg in msgs:
                await msg.ack()
            self.acks += len(msgs)


# --------------------------------------------------------------------------- server


async def _error_cb(err: Exception) -> None:
    print(f"  nats async error: {type(err).__name__}: {err}", file=sys.stderr)


async def connect(url: str) -> NATS:
    """Plain client connection; no reconnects, so a dead server fails fast."""
    return await nats.connect(
        url, error_cb=_error_cb, allow_reconnect=False, max_reconnect_attempts=0
    )


# --------------------------------------------------------------------------- publish


async def fill_stream(url: str, count: int) -> Result:
    """Create SHOAL_EVENTS and publish ``count`` events with publish_async."""
    nc = await connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[SUBJECT_FILTER], storage=StorageType.FILE)
        )
        encode = msgspec.json.Encoder().encode
        props = [{"club": "north"}, {"club": "south"}, {"club": "east"}, {"club": "west"}]
        start = time.perf_counter()
        for i in range(count):
            cid = i % SUBJECT_COUNT
            payload = encode(
                Event(
                    type="track",
                    userId=f"c{cid}",
                    event="Visit",
                    properties=props[i & 3],
                    messageId=f"m-{i:08d}",
                    timestamp="2026-11-22T10:00:00+00:00",
                )
            )
            await js.publish_async(f"shoal.events.c{cid}", payload)
        await js.publish_async_completed()
        elapsed = time.perf_counter() - start
        info = await js.stream_info(STREAM)
        stored = info.state.messages
        if stored != count:
            raise AssertionError(f"stream holds {stored} messages, expected {count}")
        return Result("publish_async", "ok", count, elapsed, count / elapsed, distinct=stored)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- variants


async def consume_pull(js: JetStreamContext, v: Variant, durable: str, tally: Tally) -> None:
    """Pull consumer: fetch(batch), process, ack (last message or every message)."""
    config = ConsumerConfig(
        durable_name=durable, ack_policy=v.ack_policy, max_ack_pending=v.max_ack_pending
    )
    sub = await js.pull_subscribe(SUBJECT_FILTER, durable=durable, stream=STREAM, config=config)
    while not tally.done:
        try:
            msgs = await sub.fetch(v.batch, timeout=FETCH_TIMEOUT)
        except TimeoutError:  # nats.errors.TimeoutError subclasses it
            continue
        tally.process(msgs)
        await tally.ack_batch(msgs, v.ack_policy)


async def push_subscribe(
    js: JetStreamContext,
    v: Variant,
    durable: str,
    cb: Callable[[Msg], Awaitable[None]] | None,
) -> JetStreamContext.PushSubscription:
    """Create a durable push consumer with flow control and idle heartbeats."""
    config = ConsumerConfig(
        ack_policy=v.ack_policy,
        max_ack_pending=v.max_ack_pending,
        flow_control=True,
        idle_heartbeat=IDLE_HEARTBEAT,
    )
    # js.subscribe() overwrites config.flow_control with its own flow_control
    # argument (default False), so it has to be passed explicitly as well.
    return await js.subscribe(
        SUBJECT_FILTER,
        stream=STREAM,
        durable=durable,
        cb=cb,
        manual_ack=True,
        flow_control=True,
        idle_heartbeat=IDLE_HEARTBEAT,
        config=config,
    )


async def consume_push_cb(js: JetStreamContext, v: Variant, durable: str, tally: Tally) -> None:
    """Push consumer whose callback only buffers; the loop drains the buffer in batches."""
    buffer: deque[Msg] = deque()
    ready = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        buffer.append(msg)
        ready.set()

    await push_subscribe(js, v, durable, on_msg)
    while not tally.done:
        await ready.wait()
        ready.clear()
        while buffer:
            batch = [buffer.popleft() for _ in range(min(len(buffer), v.batch))]
            tally.process(batch)
            await tally.ack_batch(batch, v.ack_policy)


async def _drain_push(
    messages: AsyncIterator[Msg], sub: JetStreamContext.PushSubscription, v: Variant, tally: Tally
) -> None:
    """Batch = everything already queued client-side, capped at ``v.batch``."""
    batch: list[Msg] = []
    async for msg in messages:
        batch.append(msg)
        if len(batch) >= v.batch or sub.pending_msgs == 0:
            tally.process(batch)
            await tally.ack_batch(batch, v.ack_policy)
            batch = []
            if tally.done:
                return


async def consume_push_next(js: JetStreamContext, v: Variant, durable: str, tally: Tally) -> None:
    """Push consumer without callback, drained with ``await sub.next_msg()``."""
    sub = await push_subscribe(js, v, durable, None)

    async def next_msgs() -> AsyncIterator[Msg]:
        while True:
            try:
                yield await sub.next_msg(timeout=FETCH_TIMEOUT)
            except TimeoutError:
                continue

    await _drain_push(next_msgs(), sub, v, tally)


async def consume_push_iter(js: JetStreamContext, v: Variant, durable: str, tally: Tally) -> None:
    """Push consumer without callback, drained with ``async for msg in sub.messages``.

    The iterator never answers flow-control requests itself; delivery resumes
    only when the server's idle heartbeat carries a Consumer-Stalled reply.
    """
    sub = await push_subscribe(js, v, durable, None)
    await _drain_push(sub.messages, sub, v, tally)


CONSUMERS: dict[Kind, Callable[[JetStreamContext, Variant, str, Tally], Awaitable[None]]] = {
    "pull": consume_pull,
    "push-cb": consume_push_cb,
    "push-next": consume_push_next,
    "push-iter": consume_push_iter,
}


async def run_variant(url: str, v: Variant, count: int, timeout: float) -> Result:
    """Drain the whole stream once with a fresh durable consumer for ``v``."""
    durable = v.name.replace("-", "_")
    tally = Tally(count)
    nc = await connect(url)
    js = nc.jetstream()
    status = "ok"
    start = time.perf_counter()  # includes consumer creation (a few ms)
    try:
        await asyncio.wait_for(CONSUMERS[v.kind](js, v, durable, tally), timeout)
    except TimeoutError:
        status = "TIMEOUT"
    elapsed = time.perf_counter() - start
    consumer: dict[str, Any] = {}
    try:
        info = await js.consumer_info(STREAM, durable)
        consumer = {
            "max_ack_pending": info.config.max_ack_pending,
            "flow_control": info.config.flow_control,
            "idle_heartbeat": info.config.idle_heartbeat,
            "num_ack_pending": info.num_ack_pending,
            "num_redelivered": info.num_redelivered,
        }
        await js.delete_consumer(STREAM, durable)
    finally:
        await nc.close()
    if status == "ok" and tally.distinct != count:
        raise AssertionError(
            f"{v.name}: {tally.distinct} distinct stream sequences, expected {count}"
        )
    return Result(
        v.name,
        status,
        count,
        elapsed,
        tally.distinct / elapsed,
        distinct=tally.distinct,
        deliveries=tally.deliveries,
        redelivered=tally.redelivered,
        out_of_order=tally.out_of_order,
        batches=tally.batches,
        acks=tally.acks,
        consumer=consumer,
    )


# --------------------------------------------------------------------------- report


def table(results: list[Result]) -> Iterator[str]:
    """Markdown table; ratio is relative to the fastest variant that finished."""
    ok = [r.rate for r in results if r.status == "ok"]
    best = max(ok) if ok else 0.0
    yield "| variant | msgs/s | seconds | ratio | distinct/N | deliveries | batches | notes |"
    yield "|---|---:|---:|---:|---:|---:|---:|---|"
    for r in results:
        ratio = f"{r.rate / best:.2f}" if best and r.status == "ok" else "-"
        notes = [r.status] if r.status != "ok" else []
        if r.redelivered:
            notes.append(f"redelivered={r.redelivered}")
        if r.out_of_order:
            notes.append(f"out_of_order={r.out_of_order}")
        if r.consumer.get("max_ack_pending") is not None:
            notes.append(f"map={r.consumer['max_ack_pending']}")
        if r.consumer.get("flow_control"):
            notes.append("fc")
        yield (
            f"| {r.variant} | {r.rate:,.0f} | {r.seconds:.2f} | {ratio} | {r.distinct}/{r.messages}"
            f" | {r.deliveries} | {r.batches} | {' '.join(notes)} |"
        )


async def main_async(args: argparse.Namespace) -> int:
    names = set(args.only or [v.name for v in VARIANTS])
    unknown = names - {v.name for v in VARIANTS}
    if unknown:
        sys.exit(f"unknown variant(s): {', '.join(sorted(unknown))}")
    variants = [v for v in VARIANTS if v.name in names]
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        async with broker(Path(tmp)) as url:
            nc = await connect(url)
            sv = nc.connected_server_version
            await nc.close()
            meta = {
                "nproc": os.cpu_count(),
                "python": platform.python_version(),
                "nats_py": importlib.metadata.version("nats-py"),
                "nats_server": f"{sv.major}.{sv.minor}.{sv.patch}",
                "messages": args.messages,
                "timeout": args.timeout,
            }
            print("# " + " ".join(f"{k}={v}" for k, v in meta.items()))
            published = await fill_stream(url, args.messages)
            print(f"# publish_async: {published.rate:,.0f} msgs/s ({published.seconds:.2f} s)")
            results: list[Result] = []
            for v in variants:
                result = await run_variant(url, v, args.messages, args.timeout)
                print(
                    f"#   {v.name}: {result.status} {result.rate:,.0f} msgs/s "
                    f"{result.seconds:.2f} s",
                    flush=True,
                )
                results.append(result)
    print()
    for line in table(results):
        print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(json.dumps({"meta": meta}) + "\n")
            for r in [published, *results]:
                out.write(json.dumps(asdict(r)) + "\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--messages",
        type=int,
        default=200_000,
        help="events to publish and consume (default 200000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20000 messages, 30 s timeout"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="per-variant time limit in seconds"
    )
    parser.add_argument("--json", metavar="FILE", help="append JSON lines results to FILE")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 20_000)
        args.timeout = min(args.timeout, 30.0)
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
