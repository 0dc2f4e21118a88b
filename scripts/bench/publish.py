"""Benchmark publishing transitions (issue 21): this process's CPU per transition, with the
messages written by nats-py's ``publish`` against shoal's own ``HPUB`` commands
(``protocol.nats._wire``).

A private ``nats-server -js`` gets the streams as the engine makes them. The engine's
``Publisher`` publishes N transitions of N customers in pieces of 5,000 (the outbox's
commits during a burst of deadlines), both ways it publishes:

- ``fenced``: every partition claimed, each partition's transitions in atomic batches
  (what ``shoal serve`` does);
- ``unfenced``: one message and one acknowledgement each (an engine with no claims: the
  engine benchmarks').

Each way alternates nats-py's ``publish`` and the wire's commands, ``--rounds`` times each,
on the same broker; the table gives medians. The broker's own CPU is not counted: it runs
in its own process.

Usage::

    python -m scripts.bench.publish                 # N=40,000, 4 rounds of each
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

from protocol import SEGMENTS_STREAM, TimeCause, Transition, from_instant
from protocol._ownership import FenceClaim
from protocol.nats import Publisher, connect, jetstream_ports
from protocol.nats._fences import claim_fence

from ._common import broker, say
from ._machine import loadavg, machine

_PIECE = 5_000
_T0 = 1_767_225_600_000_000


def _transitions(n: int, version: int) -> list[Transition]:
    return [
        Transition(
            customer_id=f"c{i}",
            segment="inactive_14d",
            change="entered",
            at=from_instant(_T0 + i),
            cause=TimeCause(),
            version=version,
        )
        for i in range(n)
    ]


def _raw(pub: Publisher, raw: bool) -> None:
    pub._wire._raw = pub._fenced._wire._raw = raw  # (the wire's one switch: see its module)


async def _timed(pub: Publisher, transitions: list[Transition]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(transitions), _PIECE):
        await pub.publish_transitions(transitions[i : i + _PIECE])
    n = len(transitions)
    return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-publish-") as name:
        async with broker(Path(name)) as url:
            nc = await connect([url])
            try:
                _, pub = await jetstream_ports(nc)
                await pub.start()
                claims: dict[int, int] = {}
                js = nc.jetstream()
                assert pub.partitions is not None  # (the streams say how many)
                for p in range(pub.partitions):
                    claim = FenceClaim(engine="bench", partition=p, at=_T0)
                    claims[p] = await claim_fence(js, SEGMENTS_STREAM, p, claim, 0)
                version = 0
                for r in range(args.rounds):
                    for way in ("unfenced", "fenced"):
                        for raw in (False, True) if r % 2 == 0 else (True, False):
                            label = f"{way}, {'shoal' if raw else 'nats-py'}"
                            say(f"round {r + 1}: {label}")
                            if way == "fenced":
                                for p, seq in claims.items():
                                    pub.claim(p, seq)
                            else:
                                pub._claims = None  # (an engine that never claimed)
                            _raw(pub, raw)
                            version += 1  # (new message ids: none is a repeat)
                            timed = await _timed(pub, _transitions(args.transitions, version))
                            out.setdefault(label, []).append(timed)
                await pub.close()
            finally:
                await nc.close()
    return {
        label: {
            "cpu_us": statistics.median(c for c, _ in runs),
            "wall_us": statistics.median(w for _, w in runs),
            "runs": runs,
        }
        for label, runs in out.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transitions", type=int, default=40_000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    before = loadavg()
    doc = anyio.run(run, args)
    m = machine()
    ratio = {
        way: doc[f"{way}, shoal"]["cpu_us"] / doc[f"{way}, nats-py"]["cpu_us"]
        for way in ("unfenced", "fenced")
    }
    lines = [
        "# Publishing transitions: nats-py's publish against shoal's commands",
        "",
        f"Command: `python -m scripts.bench.publish "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {before} before, {loadavg()} after). "
        f"Working tree: {m['code']}.",
        f"- {args.transitions:,} transitions in pieces of {_PIECE:,}, {args.rounds} rounds of "
        "each, alternating; medians, per transition, this process (not the broker).",
        "",
        "| publishing | written by | CPU us per transition | wall us per transition |",
        "|---|---|---:|---:|",
        *(
            f"| {label.split(', ')[0]} | {label.split(', ')[1]} | {v['cpu_us']:.2f} | "
            f"{v['wall_us']:.2f} |"
            for label, v in sorted(doc.items())
        ),
        "",
        "CPU, shoal's commands against nats-py's: "
        + ", ".join(f"{way} {r:.2f}" for way, r in ratio.items())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
