"""Benchmark the deadline barrier (``fence``) of the engine's event source (issue 18): one
consumer of the whole stream against one per partition.

Before a deadline fires, the engine asks whether every event stored until then has reached
it (``EventSource.fence``). One consumer answers with one request; with a consumer per
partition, asking each costs a request each. ``PartitionedFeed`` first asks the stream's
last position instead, and asks every consumer only when a position may be on its way.

A private ``nats-server -js`` gets ``SHOAL_EVENTS`` as the engine makes it and N events of
N customers; each source takes and acknowledges them all, then answers ``--calls`` fences on
the idle stream (the case where deadlines fire between events). Variants:

- ``one``: one ``EventFeed`` filtered on ``shoal.events.>``;
- ``per-partition``: the engine's ``PartitionedFeed`` (33 consumers);
- ``per-partition, each asked``: the same, asking every consumer each time (its fallback).

Usage::

    python -m scripts.bench.fence                  # N=2000, 200 calls
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from protocol import EventSource, event_subject
from protocol.nats import EventFeed, PartitionedFeed, connect, jetstream_ports

from ._common import broker, say
from ._machine import loadavg, machine


async def _drain(source: EventSource, n: int) -> None:
    got = 0
    while got < n:
        with anyio.fail_after(30):
            await source.wait()
        batch = source.take(1_000)
        if batch:
            got += len(batch)
            await source.ack(batch[-1].stream_sequence)


async def _timed(source: EventSource, calls: int, each: bool) -> dict[str, float]:
    ok = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        if each and isinstance(source, PartitionedFeed):
            ok += await source._fence_each(2.0)
        else:
            ok += await source.fence()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if ok != calls:
        raise RuntimeError(f"{calls - ok} of {calls} fences said no on an idle stream")
    return {"cpu_ms": cpu / calls * 1e3, "wall_ms": wall / calls * 1e3}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-fence-") as name:
        async with broker(Path(name)) as url:
            nc = await connect([url])
            try:
                js = nc.jetstream()
                partitioned, _ = await jetstream_ports(nc)
                say(f"publishing {args.events:,} events")
                for i in range(args.events):
                    body = b'{"type":"track","userId":"c%d","event":"Visit"}' % i
                    await js.publish(event_subject(f"c{i}"), body)
                one = EventFeed(nc, js, durable="one", filter_subject="shoal.events.>")
                sources: list[EventSource] = [partitioned, one]
                for started in sources:
                    await started.start()
                    await _drain(started, args.events)
                variants: list[tuple[str, EventSource, bool]] = [
                    ("one", one, False),
                    ("per-partition", partitioned, False),
                    ("per-partition, each asked", partitioned, True),
                ]
                for label, source, each in variants:
                    say(f"{label}: {args.calls} fences")
                    out[label] = await _timed(source, args.calls, each)
                for started in sources:
                    await started.stop()
            finally:
                await nc.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=2_000)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    before = loadavg()
    doc = anyio.run(run, args)
    m = machine()
    lines = [
        "# The deadline barrier: one consumer against one per partition",
        "",
        f"Command: `python -m scripts.bench.fence "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {before} before, {loadavg()} after). "
        f"Working tree: {m['code']}.",
        f"- {args.events:,} events of as many customers taken and acknowledged, then "
        f"{args.calls} fences on the idle stream; per call, this process.",
        "",
        "| source | CPU ms per fence | wall ms per fence |",
        "|---|---:|---:|",
        *(f"| {k} | {v['cpu_ms']:.2f} | {v['wall_ms']:.2f} |" for k, v in doc.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
