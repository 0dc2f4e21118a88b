"""Benchmark the cost of consuming a partitioned ``SHOAL_EVENTS`` (issue 18): one consumer
over every partition against one consumer per partition, with shoal's own ``EventFeed``.

A private ``nats-server -js`` gets ``SHOAL_EVENTS`` with the subject transform
``shoal.events.*`` -> ``shoal.events.{{partition(P,1)}}.{{wildcard(1)}}`` and N events over
10,000 customers (published on ``shoal.events.c<i>``, stored partitioned). Each variant then
drains all N on fresh durable consumers, as the engine's loop does: take a micro-batch of up
to ``--batch`` deliveries, acknowledge it (one acknowledgement per consumer the batch
touched), again until every event was taken:

- ``one``: one ``EventFeed`` filtered on ``shoal.events.>`` (today's engine);
- ``per-partition``: P ``EventFeed`` s, each filtered on ``shoal.events.<p>.>``, a batch
  taken across them (round robin, each feed's own order kept).

Variants alternate over ``--rounds`` rounds; the figures are CPU microseconds of this
process per event and events per wall second, with the ratio per-partition/one of each
round. The machine is shared and noisy: read the ratios.

Usage::

    python -m scripts.bench.partitions                    # N=100000, P=32, 3 rounds
    python -m scripts.bench.partitions --events 20000 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.js.api import StorageType, StreamConfig, SubjectTransform

from protocol import EVENTS_STREAM
from protocol.nats import EventFeed, connect

from ._common import broker, publish, say
from ._machine import loadavg, machine

CUSTOMERS = 10_000


async def fill(url: str, events: int, partitions: int) -> None:
    """SHOAL_EVENTS, partitioned by the broker, holding ``events`` events."""
    nc = await connect([url])
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=EVENTS_STREAM,
                subjects=["shoal.events.*", "shoal.events.*.ctl.>"],
                storage=StorageType.FILE,
                subject_transform=SubjectTransform(
                    src="shoal.events.*",
                    dest=f"shoal.events.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
                ),
            )
        )
        encode = msgspec.json.Encoder().encode

        def messages() -> Any:
            for i in range(events):
                cid = i % CUSTOMERS
                body = {
                    "type": "track",
                    "userId": f"c{cid}",
                    "event": "Visit",
                    "properties": {"club": "north"},
                    "messageId": f"m-{i:08d}",
                    "timestamp": "2026-11-22T10:00:00Z",
                }
                yield f"shoal.events.c{cid}", encode(body)

        await publish(js, messages())
        info = await js.stream_info(EVENTS_STREAM)
        if info.state.messages != events:
            raise RuntimeError(f"the stream holds {info.state.messages} events, not {events}")
        subjects = await js.stream_info(EVENTS_STREAM, subjects_filter="shoal.events.>")
        used = {s.split(".")[2] for s in (subjects.state.subjects or {})}
        if len(used) != partitions:
            raise RuntimeError(f"{len(used)} partitions used, not {partitions}")
    finally:
        await nc.close()


async def drain(url: str, feeds_of: list[str], prefix: str, events: int, batch: int) -> float:
    """Start feeds filtered on ``feeds_of``, and take and acknowledge every event through
    them; the CPU seconds it took."""
    nc = await connect([url])
    try:
        js = nc.jetstream()
        feeds = [
            EventFeed(nc, js, durable=f"{prefix}-{i}", filter_subject=f)
            for i, f in enumerate(feeds_of)
        ]
        # From before the starts: deliveries reach the buffers (through the client's
        # callbacks, the bulk of the cost) while the feeds start.
        t0 = time.process_time()
        for feed in feeds:
            await feed.start()
        seen = 0
        while seen < events:
            taken = 0
            touched = []
            # Round robin: a share of the batch from each feed, then what is left.
            share = max(1, batch // len(feeds))
            for feed in feeds:
                got = feed.take(min(share, batch - taken))
                if got:
                    touched.append((feed, got[-1].stream_sequence))
                    taken += len(got)
                if taken >= batch:
                    break
            for feed, last in touched:
                await feed.ack(last)
            seen += taken
            if not taken:
                with anyio.move_on_after(0.05):
                    async with anyio.create_task_group() as tg:
                        for feed in feeds:

                            async def woken(f: EventFeed = feed) -> None:
                                await f.wait()
                                tg.cancel_scope.cancel()

                            tg.start_soon(woken)
        cpu = time.process_time() - t0
        for feed in feeds:
            await feed.stop()
        return cpu
    finally:
        await nc.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-partitions-") as name:
        async with broker(Path(name)) as url:
            say(f"filling SHOAL_EVENTS with {args.events:,} events in {args.partitions} partitions")
            await fill(url, args.events, args.partitions)
            variants = {
                "one": ["shoal.events.>"],
                "per-partition": [f"shoal.events.{p}.>" for p in range(args.partitions)],
            }
            rounds: list[dict[str, dict[str, float]]] = []
            for r in range(args.rounds):
                row = {}
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for v in order:
                    say(f"round {r + 1}: {v}")
                    t0 = time.perf_counter()
                    cpu = await drain(url, variants[v], f"{v}-{r}", args.events, args.batch)
                    wall = time.perf_counter() - t0
                    row[v] = {"cpu_us": cpu / args.events * 1e6, "per_s": args.events / wall}
                rounds.append(row)
    return {"rounds": rounds}


def report(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    m = machine()
    out = [
        "# Consuming a partitioned SHOAL_EVENTS: one consumer against one per partition",
        "",
        f"Command: `python -m scripts.bench.partitions {shlex.join(args.argv)}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {doc['load_before']} before, "
        f"{doc['load_after']} after). Python {m['python']}, nats-py {m['nats_py']}. "
        f"Working tree: {m['code']}.",
        f"- {args.events:,} events of {CUSTOMERS:,} customers in {args.partitions} partitions "
        f"(the broker's subject transform); batches of up to {args.batch}, one "
        "acknowledgement per consumer a batch touched; shoal's `EventFeed`.",
        "",
        "| round | one: CPU us/event | per-partition: CPU us/event | ratio | one: events/s "
        "| per-partition: events/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for i, row in enumerate(doc["rounds"], 1):
        one, per = row["one"], row["per-partition"]
        ratio = per["cpu_us"] / one["cpu_us"]
        ratios.append(ratio)
        out.append(
            f"| {i} | {one['cpu_us']:.1f} | {per['cpu_us']:.1f} | {ratio:.2f} | "
            f"{one['per_s']:,.0f} | {per['per_s']:,.0f} |"
        )
    out += ["", f"Median ratio per-partition/one (CPU per event): {statistics.median(ratios):.2f}."]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=32)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    before = loadavg()
    doc = anyio.run(run, args)
    doc["load_before"], doc["load_after"] = before, loadavg()
    text = "\n".join(report(args, doc)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
