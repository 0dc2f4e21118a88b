"""Benchmark the partitions' snapshots in Object Store (issue 19): ``put`` and ``get`` of one
partition's snapshot through ``protocol.nats.SnapshotStore``, the body stored plain or
zlib-compressed, in chunks of 128 KiB (the Object Store's default) or 1 MiB.

The customers' bodies are real actors' snapshots: a generated history
(``actors.population``) of ``--templates`` customers over ``--days`` days, replayed, and
each customer's ``Customer.snapshot()`` (about 400 bytes at 50 days); ``--customers`` ids
take them in turn. A private ``nats-server -js`` on this machine holds the bucket (file
storage, one node).

Per variant, the best of ``--repeat`` runs: ``put`` (encode, compress, upload), ``get``
(download, check the digest, decompress, decode), the bytes stored; MB/s count the msgpack
bytes of the snapshot. Then the CPU parts alone in this process, and nats-py's own
``ObjectStore.get`` of the plain objects for comparison.

Usage::

    python -m scripts.bench.snapshots                     # 100k customers
    python -m scripts.bench.snapshots --customers 10000   # quick
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from actors import Replay, load_segments
from actors.population import generate
from protocol import DAY
from protocol._ownership import PartitionSnapshot
from protocol._subjects import SNAPSHOTS_BUCKET
from protocol.nats import SnapshotStore, connect

from ._common import broker, say
from ._machine import loadavg, machine

CUT = 1_767_225_600_000_000
"""The instant the history ends and the snapshot is taken (2026-01-01)."""
PARTITIONS = 32
CHUNKS = (128 << 10, 1 << 20)
T = TypeVar("T")


def bodies(templates: int, days: int) -> list[bytes]:
    """The snapshots of a generated history's customers, replayed to :data:`CUT`."""
    r = Replay(load_segments())
    ids: set[str] = set()
    for e in generate(templates, days, seed=5, start=CUT - days * DAY):
        r.apply(e)
        ids.add(e.customer_id)
    r.advance(CUT)
    out = []
    for cid in sorted(ids):
        c = r.customer(cid)
        assert c is not None
        out.append(c.snapshot())
    return out


def partition_snapshot(customers: int, templates: list[bytes]) -> PartitionSnapshot:
    """Partition 3's snapshot of ``customers`` customers, bodies taken in turn."""
    return PartitionSnapshot(
        partition=3,
        partitions=PARTITIONS,
        through=customers * 30,
        progress=customers * 2,
        needs="0123456789abcdef",
        definitions="0123456789abcdef" * 4,
        definitions_version=7,
        taken_at=CUT,
        engine="bench-engine",
        claim=42,
        customers=[(f"c{i:07d}", i, templates[i % len(templates)]) for i in range(customers)],
    )


def best(repeat: int, f: Callable[[], T]) -> tuple[float, T]:
    """The least seconds of ``repeat`` calls of ``f``, and its last result."""
    least = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        least = min(least, time.perf_counter() - t)
    return least, out


async def best_async(repeat: int, f: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    """:func:`best` of a coroutine function."""
    least = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = await f()
        least = min(least, time.perf_counter() - t)
    return least, out


def cpu_parts(snap: PartitionSnapshot, repeat: int) -> dict[str, float]:
    """Seconds of each CPU step alone: msgspec encode and decode, zlib level 1 both ways."""
    decoder = msgspec.msgpack.Decoder(PartitionSnapshot)
    encode_s, raw = best(repeat, lambda: msgspec.msgpack.encode(snap))
    decode_s, _ = best(repeat, lambda: decoder.decode(raw))
    compress_s, packed = best(repeat, lambda: zlib.compress(raw, 1))
    decompress_s, _ = best(repeat, lambda: zlib.decompress(packed))
    return {
        "encode": encode_s,
        "decode": decode_s,
        "compress": compress_s,
        "decompress": decompress_s,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    say(f"replaying {args.templates:,} customers over {args.days} days")
    templates = bodies(args.templates, args.days)
    snap = partition_snapshot(args.customers, templates)
    raw = len(msgspec.msgpack.encode(snap))
    say(f"{args.customers:,} customers, {raw / 1e6:.1f} MB of msgpack")
    out: dict[str, Any] = {"raw": raw, "parts": cpu_parts(snap, args.repeat), "variants": []}
    with tempfile.TemporaryDirectory(prefix="shoal-snapshots-") as name:
        async with broker(Path(name)) as url:
            nc = await connect([url])
            try:
                obs: Any = None
                for compress in (False, True):
                    for chunk in CHUNKS:
                        label = f"{'zlib 1' if compress else 'plain'}, {chunk >> 10} KiB chunks"
                        say(label)
                        store = SnapshotStore(
                            nc, partitions=PARTITIONS, chunk_size=chunk, compress=compress
                        )
                        await store.ensure()
                        put_s, info = await best_async(args.repeat, partial(store.put, snap))
                        get_s, got = await best_async(args.repeat, partial(store.get, 3))
                        if got != snap:
                            raise RuntimeError(f"{label}: the snapshot read is not the one put")
                        row = {
                            "label": label,
                            "stored": info.size,
                            "chunks": info.chunks,
                            "put": put_s,
                            "get": get_s,
                        }
                        if not compress:
                            obs = obs or await nc.jetstream().object_store(SNAPSHOTS_BUCKET)
                            t = time.perf_counter()
                            await obs.get("partition-3")
                            row["nats_py_get"] = time.perf_counter() - t
                        out["variants"].append(row)
            finally:
                await nc.close()
    return out


def report(doc: dict[str, Any], args: argparse.Namespace, argv: list[str], load: str) -> str:
    """The results as Markdown."""
    m = machine()
    raw = doc["raw"]

    def rate(seconds: float) -> str:
        return f"{raw / seconds / 1e6:.0f}"

    parts = doc["parts"]
    lines = [
        "# Partition snapshots in Object Store: plain or zlib, 128 KiB or 1 MiB chunks",
        "",
        f"Command: `python -m scripts.bench.snapshots {shlex.join(argv)}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {load} before, {loadavg()} after). "
        f"Working tree: {m['code']}. nats-py {m['nats_py']}, msgspec {m['msgspec']}.",
        f"- One partition's snapshot: {args.customers:,} customers, bodies of "
        f"{args.templates:,} replayed customers ({args.days} days of history), "
        f"{raw / 1e6:.1f} MB of msgpack ({raw / args.customers:.0f} bytes a customer). "
        f"Single-node nats-server, file storage; best of {args.repeat}; MB/s of msgpack.",
        "",
        "| variant | stored MB | chunks | put ms | put MB/s | get ms | get MB/s | nats-py get ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in doc["variants"]:
        theirs = f"{v['nats_py_get'] * 1e3:.0f}" if "nats_py_get" in v else ""
        lines.append(
            f"| {v['label']} | {v['stored'] / 1e6:.1f} | {v['chunks']} | {v['put'] * 1e3:.0f} "
            f"| {rate(v['put'])} | {v['get'] * 1e3:.0f} | {rate(v['get'])} | {theirs} |"
        )
    lines += [
        "",
        "The CPU steps alone (this process, best of the runs): msgpack encode "
        f"{parts['encode'] * 1e3:.0f} ms, decode {parts['decode'] * 1e3:.0f} ms; zlib level 1 "
        f"compress {parts['compress'] * 1e3:.0f} ms ({rate(parts['compress'])} MB/s), "
        f"decompress {parts['decompress'] * 1e3:.0f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--templates", type=int, default=5_000)
    p.add_argument("--days", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    load = loadavg()
    doc = anyio.run(run, args)
    text = report(doc, args, sys.argv[1:] if argv is None else argv, load)
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
