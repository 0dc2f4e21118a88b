"""Benchmark several ``shoal serve`` sharing the 32 partitions of one broker: what each
engine costs per event, how soon a new owner serves a big partition after its owner dies,
and how a burst of deadlines spreads over the engines.

Every engine is a ``shoal serve --nats URL`` subprocess (this worktree's code) with its own
data directory and engine id, on ONE private single-node ``nats-server -js``. The machine
has few cores, so the figures are each engine's cost, not what a cluster would sustain.

1. ``load``: for N in ``--engines`` (1, 2, 3), a fresh broker; N engines, balanced; then
   ``--events`` events of ``--customers`` customers published at ``--rate`` events/s
   (paced, acknowledged); each engine's CPU (user + sys, ``/proc/<pid>/stat``) from just
   before publishing until every engine applied them all (``ApiClient.status``, what
   ``shoal status --json`` shows).
2. ``takeover``: engine A alone applies one event of each of ``--customers-in-partition``
   customers of partition 0 and uploads its snapshot; engine B joins (they split the
   partitions, A keeps 0); A is killed (SIGKILL). From the kill: B's lease of partition 0,
   B's "partition taken over" and "term begins" log lines, and the ``new_customer``
   transition of an event of a new partition-0 customer published right after the kill.
3. ``burst``: for N in 1 and 2, ``--burst`` customers with one event each, all stamped
   with the same instant, under one rule ``since_last() >= 'Ds'``: every customer enters at
   the same due instant. Per engine: the time from the due instant to its last ``time``
   transition, and its CPU meanwhile.

Usage::

    python -m scripts.bench.engines                              # all three
    python -m scripts.bench.engines --only takeover --customers-in-partition 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from protocol import (
    EVENTS_STREAM,
    BrokerError,
    EngineUnavailable,
    TimeCause,
    Transition,
    event_subject,
    format_instant,
    partition,
)
from protocol.nats import ApiClient, LeaseBucket, SnapshotStore, connect, read_stream
from protocol.nats._partitioned import partition_filter

from ._common import ROOT, broker, process_cpu, publish, say
from ._machine import loadavg, machine

P = 32


# --------------------------------------------------------------------------- engines


class Engine:
    """A ``shoal serve`` subprocess; its stderr (JSON lines) goes to a file."""

    def __init__(self, url: str, root: Path, engine_id: str, *extra: str) -> None:
        self.id = engine_id
        self.log = root / f"{engine_id}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as err:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "scripts.cli",
                    "serve",
                    "--nats",
                    url,
                    "--data-dir",
                    str(root / engine_id),
                    "--engine-id",
                    engine_id,
                    *extra,
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def cpu(self) -> float:
        return process_cpu(self.popen.pid)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        out.append(doc)
        return out

    async def wait_log(
        self,
        event: str,
        check: Callable[[dict[str, Any]], bool] = lambda d: True,
        *,
        timeout: float,
    ) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                for d in self.lines():
                    if d.get("event") == event and check(d):
                        return d
                if self.popen.poll() is not None:
                    raise RuntimeError(f"engine {self.id} exited: {self.tail()}")
                await anyio.sleep(0.05)

    def tail(self, n: int = 5) -> str:
        return " | ".join(json.dumps(d) for d in self.lines()[-n:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextlib.asynccontextmanager
async def engines(
    url: str, root: Path, ids: list[str], *extra: str
) -> AsyncIterator[dict[str, Engine]]:
    started: dict[str, Engine] = {}
    try:
        for i in ids:
            started[i] = Engine(url, root, i, *extra)
        yield started
    finally:
        for e in started.values():
            with contextlib.suppress(ProcessLookupError):
                if e.popen.poll() is None:
                    e.popen.send_signal(signal.SIGTERM)
        for e in started.values():
            e.stop()


def log_time(d: dict[str, Any]) -> float:
    """A log line's ``timestamp`` (ISO, UTC) in seconds since the epoch."""
    return datetime.fromisoformat(str(d["timestamp"]).replace("Z", "+00:00")).timestamp()


async def owners(nc: Client) -> dict[str, list[int]]:
    held = await LeaseBucket(nc).holders()
    out: dict[str, list[int]] = {}
    for p, h in sorted(held.items()):
        out.setdefault(h.engine, []).append(p)
    return out


def split(n: int) -> list[int]:
    return sorted(P // n + (i < P % n) for i in range(n))


async def wait_balanced(nc: Client, ids: list[str], timeout: float = 120.0) -> dict[str, list[int]]:
    """Until the engines ``ids`` hold P split evenly, and every one answers status for
    what it holds (its term began)."""
    api = ApiClient(nc, timeout=2.0)
    with anyio.fail_after(timeout):
        while True:
            try:
                o = await owners(nc)
            except BrokerError:  # no engine made the bucket yet
                o = {}
            if set(o) == set(ids) and sorted(len(v) for v in o.values()) == split(len(ids)):
                with contextlib.suppress(Exception):
                    st = await api.status()
                    mine = {
                        e.ownership.engine_id: sorted(x.partition for x in e.ownership.leases)
                        for e in st.engines
                        if e.ownership is not None
                    }
                    if st.complete and mine == o and all(e.warm for e in st.engines):
                        return o
            await anyio.sleep(0.25)


async def applied(nc: Client) -> dict[str, int]:
    """Events applied by each engine since it started, by engine id (none from an engine
    too busy to answer within 2 s: the machine is small and shared)."""
    try:
        st = await ApiClient(nc, timeout=2.0).status()
    except EngineUnavailable:
        return {}
    return {e.ownership.engine_id: e.events_applied for e in st.engines if e.ownership}


def track(customer: str, mid: str, at: int | None = None) -> bytes:
    doc: dict[str, Any] = {"type": "track", "userId": customer, "event": "Visit", "messageId": mid}
    if at is not None:
        doc["timestamp"] = format_instant(at)
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------- 1. load


async def paced(js: Any, events: int, customers: int, rate: float) -> float:
    """Publish ``events`` at ``rate`` per second (ticks of 50 ms), every ack awaited;
    the wall seconds it took."""
    tick = 0.05
    per = max(1, int(rate * tick))
    t0 = time.perf_counter()
    sent = 0
    while sent < events:
        n = min(per, events - sent)
        await publish(
            js,
            (
                (event_subject(f"c{i % customers}"), track(f"c{i % customers}", f"m{i}"))
                for i in range(sent, sent + n)
            ),
        )
        sent += n
        ahead = t0 + sent / rate - time.perf_counter()
        if ahead > 0:
            await anyio.sleep(ahead)
    return time.perf_counter() - t0


async def load(args: argparse.Namespace, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-engines-") as name:
        root = Path(name)
        async with broker(root) as url:
            nc = await connect([url])
            try:
                ids = [f"e{i + 1}" for i in range(n)]
                async with engines(url, root, ids, "--snapshot-interval", "5") as es:
                    say(f"load, {n} engine(s): waiting for the partitions to balance")
                    held = await wait_balanced(nc, ids)
                    await anyio.sleep(1)
                    idle0 = {i: e.cpu() for i, e in es.items()}
                    await anyio.sleep(args.idle)
                    idle = {i: (e.cpu() - idle0[i]) / args.idle for i, e in es.items()}
                    before = await applied(nc)
                    cpu0 = {i: e.cpu() for i, e in es.items()}
                    t0 = time.perf_counter()
                    say(f"publishing {args.events:,} events at {args.rate:,.0f}/s")
                    publish_wall = await paced(
                        nc.jetstream(), args.events, args.customers, args.rate
                    )
                    with anyio.fail_after(600):
                        while True:
                            got = await applied(nc)
                            if sum(got.values()) - sum(before.values()) >= args.events:
                                break
                            await anyio.sleep(0.2)
                    wall = time.perf_counter() - t0
                    cpu = {i: e.cpu() - cpu0[i] for i, e in es.items()}
                    per = {
                        i: {
                            "partitions": len(held[i]),
                            "events": got[i] - before.get(i, 0),
                            "cpu_s": cpu[i],
                            "idle_cpu_pct": idle[i] * 100,
                        }
                        for i in ids
                    }
                    total_cpu = sum(cpu.values())
                    say(f"{n} engine(s): {total_cpu:.1f} CPU s, {wall:.1f} s wall")
                    return {
                        "engines": n,
                        "wall_s": wall,
                        "publish_s": publish_wall,
                        "cpu_s": total_cpu,
                        "cpu_us_per_event": total_cpu / args.events * 1e6,
                        "per_engine": per,
                    }
            finally:
                await nc.close()


# --------------------------------------------------------------------------- 2. takeover


def partition0_ids(count: int, prefix: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        c = f"{prefix}{i}"
        if partition(c, P) == 0:
            out.append(c)
        i += 1
    return out


async def takeover(args: argparse.Namespace) -> dict[str, Any]:
    k = args.customers_in_partition
    flags = ("--snapshot-interval", "5", "--lease-ttl", "2")
    with tempfile.TemporaryDirectory(prefix="shoal-engines-") as name:
        root = Path(name)
        async with broker(root) as url:
            nc = await connect([url])
            try:
                ids = partition0_ids(k + 1, "t")
                probe, ids = ids[-1], ids[:-1]
                async with engines(url, root, ["a"], *flags) as es:
                    a = es["a"]
                    await wait_balanced(nc, ["a"])
                    say(f"takeover: publishing {k:,} events of partition-0 customers")
                    t = time.perf_counter()
                    await publish(
                        nc.jetstream(),
                        ((event_subject(c), track(c, f"m-{c}")) for c in ids),
                    )
                    say(f"published in {time.perf_counter() - t:.1f} s; waiting for A")
                    t = time.perf_counter()
                    with anyio.fail_after(1800):
                        while (await applied(nc)).get("a", 0) < k:
                            await anyio.sleep(1)
                    apply_s = time.perf_counter() - t
                    say(f"A applied them in {apply_s:.1f} s; waiting for its snapshot")
                    snaps = SnapshotStore(nc, partitions=P)
                    with anyio.fail_after(600):
                        while True:
                            info = (await snaps.list()).get(0)
                            if info is not None and info.customers == k:
                                break
                            await anyio.sleep(0.5)
                    snapshot_bytes = info.size
                    async with engines(url, root, ["b"], *flags) as eb:
                        b = eb["b"]
                        held = await wait_balanced(nc, ["a", "b"], timeout=600)
                        if 0 not in held["a"]:
                            raise RuntimeError(f"A handed partition 0 over: {held}")
                        say("B is up, A keeps partition 0; killing A")
                        seen: dict[str, float] = {}

                        async def on_transition(msg: Msg) -> None:
                            tr = msgspec.json.decode(msg.data, type=Transition)
                            if tr.customer_id == probe and "probe" not in seen:
                                seen["probe"] = time.time()

                        sub = await nc.subscribe("shoal.segments.>", cb=on_transition)
                        before = len(b.lines())
                        killed = time.time()
                        a.popen.send_signal(signal.SIGKILL)
                        a.popen.wait()
                        await nc.jetstream().publish(event_subject(probe), track(probe, "probe"))
                        lease = 0.0
                        with anyio.fail_after(600):
                            while not lease:
                                h = (await LeaseBucket(nc).holders()).get(0)
                                if h is not None and h.engine == "b":
                                    lease = time.time()
                                await anyio.sleep(0.02)
                        taken = await b.wait_log(
                            "partition taken over", lambda d: d.get("partition") == 0, timeout=600
                        )
                        term = await b.wait_log(
                            "term begins",
                            lambda d: 0 in d.get("partitions", []) and log_time(d) >= killed,
                            timeout=600,
                        )
                        with anyio.fail_after(600):
                            while "probe" not in seen:
                                await anyio.sleep(0.02)
                        await anyio.sleep(1)
                        await sub.unsubscribe()
                        after = [
                            {
                                "at_s": log_time(d) - killed,
                                "event": d.get("event"),
                                **{
                                    key: v
                                    for key, v in d.items()
                                    if key not in ("event", "timestamp", "level")
                                },
                            }
                            for d in b.lines()[before:]
                        ]
                        cpu_b = b.cpu()
                # The parts of a takeover the log does not separate, done again here.
                t = time.perf_counter()
                snap = await SnapshotStore(nc, partitions=P).get(0)
                get_s = time.perf_counter() - t
                t = time.perf_counter()
                read = 0
                if snap is not None:
                    async for chunk in read_stream(
                        nc, EVENTS_STREAM, partition_filter(0), through=snap.through
                    ):
                        read += len(chunk)
                read_s = time.perf_counter() - t
            finally:
                await nc.close()
    return {
        "customers": k,
        "apply_s": apply_s,
        "snapshot_bytes": snapshot_bytes,
        "lease_s": lease - killed,
        "taken_over_s": log_time(taken) - killed,
        "taken_over": {kk: taken.get(kk) for kk in ("customers", "events_logged", "snapshot")},
        "term_s": log_time(term) - killed,
        "term_partitions": len(term.get("partitions", [])),
        "probe_s": seen["probe"] - killed,
        "b_log": after,
        "again": {"snapshot_get_s": get_s, "events_read": read, "events_read_s": read_s},
        "b_cpu_s": cpu_b,
    }


# --------------------------------------------------------------------------- 3. burst


async def burst(args: argparse.Namespace, n: int) -> dict[str, Any]:
    k = args.burst
    delay = args.burst_delay
    with tempfile.TemporaryDirectory(prefix="shoal-engines-") as name:
        root = Path(name)
        rules = root / "segments.toml"
        rules.write_text(f"[segments.quiet]\nrule = \"since_last() >= '{delay}s'\"\n")
        async with broker(root) as url:
            nc = await connect([url])
            try:
                ids = [f"e{i + 1}" for i in range(n)]
                flags = ("--snapshot-interval", "5", "--segments", str(rules))
                async with engines(url, root, ids, *flags) as es:
                    say(f"burst, {n} engine(s): waiting for the partitions to balance")
                    held = await wait_balanced(nc, ids)
                    owner = {p: e for e, ps in held.items() for p in ps}
                    last: dict[str, float] = {}
                    count: Counter[str] = Counter()

                    async def on_transition(msg: Msg) -> None:
                        tr = msgspec.json.decode(msg.data, type=Transition)
                        if isinstance(tr.cause, TimeCause):
                            e = owner[partition(tr.customer_id, P)]
                            last[e] = time.time()
                            count[e] += 1

                    sub = await nc.subscribe("shoal.segments.>", cb=on_transition)
                    cpu0 = {i: e.cpu() for i, e in es.items()}
                    stamp = int(time.time() * 1e6)
                    due = stamp / 1e6 + delay
                    say(f"publishing {k:,} events stamped {format_instant(stamp)}")
                    t = time.perf_counter()
                    await publish(
                        nc.jetstream(),
                        (
                            (event_subject(f"b{i}"), track(f"b{i}", f"m{i}", at=stamp))
                            for i in range(k)
                        ),
                    )
                    publish_s = time.perf_counter() - t
                    with anyio.fail_after(delay + 600):
                        while sum((await applied(nc)).values()) < k:
                            await anyio.sleep(0.2)
                    applied_s = time.time() - stamp / 1e6
                    if time.time() > due - 0.5:
                        raise RuntimeError(f"applying took {applied_s:.1f} s: raise --burst-delay")
                    await anyio.sleep(due - 0.5 - time.time())
                    cpu1 = {i: e.cpu() for i, e in es.items()}
                    with anyio.fail_after(600):
                        while sum(count.values()) < k:
                            await anyio.sleep(0.1)
                    await anyio.sleep(1)
                    cpu = {i: e.cpu() - cpu1[i] for i, e in es.items()}
                    await sub.unsubscribe()
                    fired = {e.id: e for e in es.values()}
                    return {
                        "engines": n,
                        "publish_s": publish_s,
                        "applied_s": applied_s,
                        "per_engine": {
                            i: {
                                "customers": count[i],
                                "last_after_due_s": last.get(i, due) - due,
                                "cpu_s": cpu[i],
                                "apply_cpu_s": cpu1[i] - cpu0[i],
                            }
                            for i in fired
                        },
                    }
            finally:
                await nc.close()


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, argv: list[str], doc: dict[str, Any], before: str) -> str:
    m = machine()
    lines = [
        "# Several engines on one broker",
        "",
        f"Command: `{shlex.join(['python', '-m', 'scripts.bench.engines', *argv])}`, run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, shared (load {before} before, {loadavg()} after). "
        f"Working tree: {m['code']}.",
        "- ONE private single-node `nats-server -js` per run, on the same machine as every "
        "engine (each a `shoal serve --nats URL` subprocess, P=32 partitions). With "
        f"{m['cores']} cores for the broker, the engines and this producer, the figures are "
        "each engine's cost, not a cluster's throughput.",
    ]
    if "load" in doc:
        lines += [
            "",
            "## 1. CPU per event at a fixed offered load",
            "",
            f"{args.events:,} events of {args.customers:,} customers published at "
            f"{args.rate:,.0f} events/s (paced, each acknowledged) after the partitions were "
            "balanced; engine CPU (user+sys, `/proc/<pid>/stat`) from just before the first "
            "publish until the engines' status (`ApiClient.status`, as `shoal status --json`) "
            f"says every event was applied. `--snapshot-interval 5`, default lease TTL. Idle: "
            f"the engine's CPU over {args.idle:g} s before publishing (lease renewals, "
            "heartbeats, timers).",
            "",
            "| engines | wall s | CPU s, all | CPU µs/event, all | engine | partitions | "
            "events applied | CPU s | CPU µs/event applied | idle CPU % |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in doc["load"]:
            first = True
            for e, v in r["per_engine"].items():
                head = (
                    f"| {r['engines']} | {r['wall_s']:.1f} | {r['cpu_s']:.2f} | "
                    f"{r['cpu_us_per_event']:.0f} |"
                    if first
                    else "| | | | |"
                )
                first = False
                per = v["cpu_s"] / v["events"] * 1e6 if v["events"] else float("nan")
                lines.append(
                    f"{head} {e} | {v['partitions']} | {v['events']:,} | {v['cpu_s']:.2f} | "
                    f"{per:.0f} | {v['idle_cpu_pct']:.1f} |"
                )
    if "takeover" in doc:
        t = doc["takeover"]
        lines += [
            "",
            "## 2. A new owner for one partition holding many customers",
            "",
            f"Engine A alone applied one event of each of {t['customers']:,} customers of "
            f"partition 0 ({t['apply_s']:.1f} s) and uploaded the partition's snapshot "
            f"({t['snapshot_bytes']:,} bytes); engine B joined (16 partitions each, A kept 0); "
            "A was killed (SIGKILL) and an event of a customer new to partition 0 was "
            "published right after. `--lease-ttl 2 --snapshot-interval 5`. Seconds from the "
            "kill:",
            "",
            "| step | s after the kill |",
            "|---|---:|",
            f"| B holds partition 0's lease (KV `SHOAL_LEASES`) | {t['lease_s']:.2f} |",
            f'| B logs "partition taken over" for 0 ({t["taken_over"]}) | '
            f"{t['taken_over_s']:.2f} |",
            f'| B logs "term begins" with 0 ({t["term_partitions"]} partitions) | '
            f"{t['term_s']:.2f} |",
            f"| the new customer's `new_customer` transition arrives | {t['probe_s']:.2f} |",
            "",
            "Done again by this process on the same broker afterwards (the parts B's log does "
            f"not separate): downloading partition 0's snapshot "
            f"{t['again']['snapshot_get_s']:.2f} s (`SnapshotStore.get`); reading its "
            f"{t['again']['events_read']:,} events through the snapshot's position "
            f"{t['again']['events_read_s']:.2f} s (`read_stream`, as the takeover backfills "
            "the new owner's event log).",
            "",
            *(
                [
                    f"**B lost its leases during the takeover** ({len(lost)} time(s), first at "
                    f"{lost[0]['at_s']:.2f} s: {lost[0].get('why')}); it claimed them again.",
                    "",
                ]
                if (lost := [d for d in t["b_log"] if d["event"] == "partitions lost"])
                else []
            ),
            "B's log lines after the kill:",
            "",
            "| s after the kill | event | fields |",
            "|---:|---|---|",
            *(
                f"| {d['at_s']:.2f} | {d['event']} | "
                f"{json.dumps({k: v for k, v in d.items() if k not in ('at_s', 'event')})} |"
                for d in t["b_log"]
            ),
        ]
    if "burst" in doc:
        lines += [
            "",
            "## 3. A burst of deadlines spread over the engines",
            "",
            f"{args.burst:,} customers, one event each, all stamped with the same instant, "
            f"under one rule `since_last() >= '{args.burst_delay}s'`: every one enters at the "
            "same due instant. Per engine: from the due instant to its last `time` "
            "transition received (core subscription on `shoal.segments.>`); its CPU applying "
            "the events (first publish until all applied), and firing (0.5 s before the due "
            "instant until 1 s after the last transition).",
            "",
            "| engines | publish s | all applied after s | engine | customers | "
            "last transition after due, s | CPU s applying | CPU s firing |",
            "|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in doc["burst"]:
            first = True
            for e, v in r["per_engine"].items():
                head = (
                    f"| {r['engines']} | {r['publish_s']:.1f} | {r['applied_s']:.1f} |"
                    if first
                    else "| | | |"
                )
                first = False
                lines.append(
                    f"{head} {e} | {v['customers']:,} | {v['last_after_due_s']:.2f} | "
                    f"{v['apply_cpu_s']:.2f} | {v['cpu_s']:.2f} |"
                )
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if "load" in args.only:
        doc["load"] = [await load(args, n) for n in args.engines]
    if "takeover" in args.only:
        doc["takeover"] = await takeover(args)
    if "burst" in args.only:
        doc["burst"] = [await burst(args, n) for n in (1, 2)]
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=["load", "takeover", "burst"])
    p.add_argument("--engines", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--customers", type=int, default=2_000)
    p.add_argument("--rate", type=float, default=2_000.0, help="offered events per second")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    p.add_argument("--customers-in-partition", type=int, default=100_000)
    p.add_argument("--burst", type=int, default=100_000)
    p.add_argument("--burst-delay", type=int, default=60, help="seconds to the due instant")
    p.add_argument("--out", type=Path, default=ROOT / "scripts/bench/results/engines.md")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    before = loadavg()
    doc = anyio.run(run, args)
    text = report(args, given, doc, before)
    print(text)
    args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
