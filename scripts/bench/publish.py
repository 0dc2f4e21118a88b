"""Benchmark publishing transitions (issue 21): CPU per transition, this process's and the
broker's, with the messages written by nats-py's ``publish`` against shoal's own ``HPUB``
commands (``protocol.nats._wire``), and by how many are published at once.

A private ``nats-server -js`` gets the streams as the engine makes them. The engine's
``Publisher`` publishes N transitions of N customers in pieces (the outbox's
``EngineConfig.publish_batch``, which a burst of deadlines fills), both ways it publishes:

- ``fenced``: every partition claimed, each partition's share of a piece in atomic batches
  of up to 999 (what ``shoal serve`` does);
- ``unfenced``: one message and one acknowledgement each (an engine with no claims: the
  engine benchmarks').

The variants alternate, ``--rounds`` times each, on the same broker; the table gives medians.
The broker's CPU is read from ``/proc`` (its process, beside this one).

Usage::

    python -m scripts.bench.publish                 # N=64,000, 4 rounds of each
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

from actors import EngineConfig
from protocol import SEGMENTS_STREAM, TimeCause, Transition, from_instant
from protocol._ownership import FenceClaim
from protocol.nats import Publisher, connect, jetstream_ports
from protocol.nats._fences import claim_fence

from ._common import CpuSnapshot, broker, say
from ._machine import loadavg, machine

_OLD_PIECE = 2_000
"""``publish_batch`` before it was raised: fenced, about 62 transitions per batch."""
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


async def _timed(
    pub: Publisher, transitions: list[Transition], piece: int
) -> tuple[float, float, float]:
    """Publish ``transitions`` in pieces; this process's CPU, the wall time and the broker's
    CPU, each in us per transition."""
    before, t0 = CpuSnapshot.take(), time.perf_counter()
    for i in range(0, len(transitions), piece):
        await pub.publish_transitions(transitions[i : i + piece])
    wall, after, n = time.perf_counter() - t0, CpuSnapshot.take(), len(transitions)
    return (
        (after.process - before.process) / n * 1e6,
        wall / n * 1e6,
        (after.broker - before.broker) / n * 1e6,
    )


def variants(piece: int) -> list[tuple[str, str, bool, int]]:
    """(publishing, written by, shoal's commands?, piece) of each variant measured."""
    return [
        ("unfenced", "nats-py", False, piece),
        ("unfenced", "shoal", True, piece),
        ("fenced", "nats-py", False, piece),
        ("fenced", "shoal", True, piece),
        ("fenced", "shoal", True, _OLD_PIECE),
    ]


async def run(args: argparse.Namespace) -> dict[tuple[str, str, int], dict[str, Any]]:
    out: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
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
                    todo = variants(args.piece)
                    for way, writer, raw, piece in todo if r % 2 == 0 else todo[::-1]:
                        say(f"round {r + 1}: {way}, {writer}, {piece:,} at once")
                        if way == "fenced":
                            for p, seq in claims.items():
                                pub.claim(p, seq)
                        else:
                            pub._claims = None  # (an engine that never claimed)
                        _raw(pub, raw)
                        version += 1  # (new message ids: none is a repeat)
                        timed = await _timed(pub, _transitions(args.transitions, version), piece)
                        out.setdefault((way, writer, piece), []).append(timed)
                await pub.close()
            finally:
                await nc.close()
    return {
        key: {
            "cpu_us": statistics.median(c for c, _, _ in runs),
            "wall_us": statistics.median(w for _, w, _ in runs),
            "broker_us": statistics.median(b for _, _, b in runs),
            "runs": runs,
        }
        for key, runs in out.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transitions", type=int, default=64_000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--piece",
        type=int,
        default=EngineConfig().publish_batch,
        help="transitions published at once (default: the engine's publish_batch)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    before = loadavg()
    doc = anyio.run(run, args)
    m = machine()
    piece = args.piece

    def of(figure: str, way: str, writer: str, at_once: int = piece) -> float:
        return float(doc[(way, writer, at_once)][figure])

    def ratio(figure: str, new: tuple[str, str, int], old: tuple[str, str, int]) -> str:
        return f"{of(figure, *new) / of(figure, *old):.2f}"

    fenced, fenced_old = ("fenced", "shoal", piece), ("fenced", "shoal", _OLD_PIECE)
    lines = [
        "# Publishing transitions: nats-py's publish against shoal's commands, and how many "
        "at once",
        "",
        f"Command: `python -m scripts.bench.publish "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {before} before, {loadavg()} after). "
        f"Working tree: {m['code']}.",
        f"- {args.transitions:,} transitions, {args.rounds} rounds of each variant, "
        "alternating; medians, per transition. The broker runs beside this process, on the "
        "same cores.",
        "",
        "| publishing | written by | at once | CPU us, this process | CPU us, broker | wall us |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {way} | {writer} | {at_once:,} | {v['cpu_us']:.2f} | {v['broker_us']:.2f} | "
            f"{v['wall_us']:.2f} |"
            for (way, writer, at_once), v in doc.items()
        ),
        "",
        "This process's CPU, shoal's commands against nats-py's: unfenced "
        + ratio("cpu_us", ("unfenced", "shoal", piece), ("unfenced", "nats-py", piece))
        + ", fenced "
        + ratio("cpu_us", fenced, ("fenced", "nats-py", piece))
        + f". Fenced, {piece:,} at once against {_OLD_PIECE:,}: this process "
        + ratio("cpu_us", fenced, fenced_old)
        + ", the broker "
        + ratio("broker_us", fenced, fenced_old)
        + ", wall "
        + ratio("wall_us", fenced, fenced_old)
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
