"""shoal's benchmark suite (issue 7): one command, every figure, against the targets.

Each measurement is a function that runs alone (``--only``); together they run in one
process, each with its own embedded ``nats-server`` (``protocol.embedded_broker``, free
loopback port) and SQLite files in a temporary directory, under the default segments
(``actors.load_segments()``). The engine runs in a child process
(``scripts/_bench_engine.py``); this process is the producer and the subscriber.

- ``ingest``: sustained end-to-end ingest at each size: a store of C customers built
  directly (snapshots, as ``bench_restart.py`` builds them), an engine started on it and
  warm, then N live events (Visit, email opens and clicks, orders, identifies; stamped now)
  published with ``js.publish_async`` while it consumes. Events/s from the first publish
  until every event is applied and every transition it caused is published.
- ``latency``: paced publishing (core ``publish`` every 2 ms, to the offered rate) for a
  few seconds per rate, 30 % of events for new customers; a subscriber on
  ``shoal.segments.>`` takes, for every transition with an event cause, its arrival
  minus the publish time of the causing event (matched by message id).
- ``deadlines``: N customers, all with a pending deadline: 10 % due within one and the same
  second (clones of 50 actors whose one visit was 14 days before it), 10 % spread over the
  next seconds, the rest over the coming weeks. The store is built first, with the
  instants chosen so that they fall due after the engine has restarted on it and is warm;
  lateness is the engine's clock when it fired minus the instant due
  (``EngineObserver.deadlines_fired``).
- ``replay``: ``actors.replay`` over a ``scripts/generate.py`` history (small here;
  ``bench_replay.py`` has the big figure).
- ``rebuild``: ready and warm times of the engine restarts above (from snapshots); if none
  ran, one restart of the deadline store's size.
- ``memory``: RSS of the warm engine (after ``gc.collect()``) less its RSS before opening the
  store, per customer: ``typical`` customers (an identify and 1 to 6 track events: event
  windows) and ``bare`` ones (an identify only: no event windows).
- ``sql``: the baseline, ``scripts/_bench_sql.py``: the default segments as one SQL query
  each over an ``events`` table in SQLite holding a generated history (loaded from its
  Segment Spec JSON lines, cloned to size), time per full recompute, staleness if run
  every N minutes, and the count of members per segment against shoal's replay of the
  same events at the same instant.
- ``consumer``: the nats-py consumer ceiling alone (``bench_consumer.py``'s fill and its
  push consumer with ``AckPolicy.ALL``), for the limiting factor.

Results: a table on stdout, JSON and a markdown report (machine, load, versions, commit)
in ``--out`` (default ``scripts/results/bench/``) as ``bench-<mode>.json`` and ``.md``.

``--profile`` (needs py-spy, ``pip install -e '.[bench]'``; without it the run stops at
once) adds sampling profiles, each from ``py-spy record --format raw --rate 250 --function
--nonblocking`` wrapped around a child process (``_bench_engine.py`` says why wrapped and
why non-blocking), as it sees asyncio and nats-py time as it is where cProfile inflated
call-heavy code:

- ``ingest``: one more run at the smallest size with the engine child under py-spy (its
  start and warm-up included);
- ``deadlines``: one more run, same size, the engine child under py-spy: the whole child
  (loading the store included), then the stacks through ``Engine._fire_due`` alone;
- ``replay``: the same history replayed in a child under py-spy (repeated for 3 s at
  least), the stacks through ``actors.replay`` alone (not the history's generation).

Figures of the profiled runs are not the measurements. Each report: the samples (threads
are sampled while they run), main thread against the others, the share of samples by where
the running function is (``actors/``, ``store/``, ``protocol/``, ``scripts/``, nats-py,
msgspec, SQLite, asyncio/anyio, a wait, other), and the top 20 functions by self and by
inclusive samples (once per sample), in the markdown and the JSON. The collapsed stacks,
files shortened, go to ``--out``'s ``profiles/`` (``bench-<mode>-<name>.txt``, gzipped
above 1 MB).

Usage::

    python scripts/bench.py --quick             # about a minute
    python scripts/bench.py                     # full: 10k/100k/1M customers, ~35 min
    python scripts/bench.py --quick --only ingest,latency
    python scripts/bench.py --quick --profile --only ingest,deadlines,replay
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import random
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from actors import load_segments, replay
from protocol import (
    EVENTS_STREAM,
    SECOND,
    EventCause,
    Transition,
    embedded_broker,
    find_nats_server,
)
from scripts import _bench_engine as be
from scripts import _bench_sql as bsql
from scripts.bench_ingest import CpuSnapshot, free_port, now_us
from scripts.bench_restart import loadavg, machine
from actors.population import generate, history_end
from store import EventLog

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results" / "bench"
MEASUREMENTS = ("ingest", "latency", "deadlines", "replay", "rebuild", "memory", "sql", "consumer")
_transition = msgspec.json.Decoder(Transition)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement runs in one mode."""

    ingest_customers: tuple[int, ...]
    ingest_events: int
    latency_customers: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    deadline_customers: int
    deadline_spread_s: int
    replay_customers: int
    replay_days: int
    memory_bare: int
    sql_base: int
    sql_clones: tuple[int, ...]
    sql_days: int
    consumer_messages: int
    timeout: float


MODES = {
    "smoke": Sizes(
        ingest_customers=(1_000,),
        ingest_events=2_000,
        latency_customers=1_000,
        latency_rates=(500, 2_000),
        latency_seconds=1.0,
        deadline_customers=3_000,
        deadline_spread_s=1,
        replay_customers=100,
        replay_days=120,
        memory_bare=1_000,
        sql_base=100,
        sql_clones=(2, 5),
        sql_days=120,
        consumer_messages=5_000,
        timeout=120,
    ),
    "quick": Sizes(
        ingest_customers=(5_000, 20_000),
        ingest_events=15_000,
        latency_customers=5_000,
        latency_rates=(1_000, 5_000),
        latency_seconds=2.0,
        deadline_customers=20_000,
        deadline_spread_s=3,
        replay_customers=500,
        replay_days=120,
        memory_bare=20_000,
        sql_base=500,
        sql_clones=(10, 40),
        sql_days=120,
        consumer_messages=30_000,
        timeout=300,
    ),
    "full": Sizes(
        ingest_customers=(10_000, 100_000, 1_000_000),
        ingest_events=100_000,
        latency_customers=100_000,
        latency_rates=(2_000, 5_000, 20_000, 50_000),
        latency_seconds=8.0,
        deadline_customers=1_000_000,
        deadline_spread_s=20,
        replay_customers=10_000,
        replay_days=120,
        memory_bare=100_000,
        sql_base=10_000,
        sql_clones=(10, 100),
        sql_days=120,
        consumer_messages=200_000,
        timeout=1_800,
    ),
}

TARGETS = {
    "ingest": "≥ 100,000 events/s end to end",
    "latency": "p99 ≤ 50 ms at 20,000 events/s",
    "deadlines": "lateness p99 ≤ 100 ms with 1M pending",
    "replay": "≥ 500,000 events/s",
    "rebuild": "restart of 1M from snapshots ≤ 10 s",
    "memory": "≤ 1 KB per customer (excluding event windows)",
}


def say(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """What the measurements of one run share."""

    mode: str
    sizes: Sizes
    tmp: Path
    warm: list[dict[str, Any]] = field(default_factory=list)
    """Every engine start of the run: population, customers, ready/warm seconds, RSS."""
    results: dict[str, Any] = field(default_factory=dict)
    profile: bool = False
    out: Path = RESULTS
    """Where the results go; the profiles' collapsed stacks go to its ``profiles/``."""

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@contextlib.asynccontextmanager
async def broker(d: Path) -> AsyncIterator[str]:
    async with embedded_broker(d / "nats", host="127.0.0.1", port=free_port()) as url:
        yield url


async def start_warm(
    run: Run, ep: be.EngineProcess, population: str, customers: int
) -> dict[str, Any]:
    """Wait for the engine child to be ready, then warm; record the start."""
    ready = await ep.wait("ready", run.sizes.timeout)
    warm = await ep.wait("warm", run.sizes.timeout)
    rec = {
        "population": population,
        "customers": customers,
        "ready_s": ready["seconds"],
        "warm_s": warm["seconds"],
        "customers_at_ready": ready["customers"],
        "rss_base_mib": warm["rss_base_mib"],
        "rss_warm_mib": warm["rss_mib"],
        "bytes_per_customer": (warm["rss_mib"] - warm["rss_base_mib"]) * 2**20 / customers,
        "pending_deadlines": warm["pending_deadlines"],
        "cpu_main_s": warm["cpu_main"],
        "cpu_threads_s": warm["cpu_threads"],
    }
    run.warm.append(rec)
    say(
        f"  {population} {customers:,}: ready {rec['ready_s']:.2f} s, warm {rec['warm_s']:.2f} s, "
        f"RSS {rec['rss_base_mib']:.0f} -> {rec['rss_warm_mib']:.0f} MiB"
    )
    return rec


# --------------------------------------------------------------------------- measurements


async def ingest_once(run: Run, n: int, profile: Path | None = None) -> dict[str, Any]:
    """One engine on a store of ``n`` customers, warm, then ``ingest_events`` live events."""
    sz = run.sizes
    d = run.dir(f"ingest-{n}" + ("-profile" if profile else ""))
    db = d / "shoal.db"
    build = await be.build_store(db, n)
    say(
        f"ingest at {n:,} customers (store built in {build['build_s']:.1f} s)"
        + (", engine under py-spy" if profile else "")
    )
    async with (
        broker(d) as url,
        be.engine_process(db, url, d / "engine.log", profile=profile) as ep,
    ):
        warm = await start_warm(run, ep, "typical" if profile is None else "profiled", n)
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            base = await ep.ask("mark")
            cpu0 = CpuSnapshot.take()
            t0 = time.perf_counter()
            events = be.live_events(random.Random(n), n, "i")
            publish_s = await be.publish_all(js, events, sz.ingest_events)
            t1, st = await be.wait_drained(
                ep, base["events_applied"] + sz.ingest_events, sz.timeout
            )
            cpu1 = CpuSnapshot.take()
        finally:
            await nc.close()
        await ep.stop()
    seconds = t1 - t0
    row: dict[str, Any] = {
        "customers": n,
        "events": sz.ingest_events,
        "seconds": seconds,
        "events_per_s": sz.ingest_events / seconds,
        "publish_s": publish_s,
        "transitions": st["transitions"] - base["transitions"],
        "deadlines_fired": st["deadlines_fired"] - base["deadlines_fired"],
        "engine_cpu_main_s": st["cpu_main"] - base["cpu_main"],
        "engine_cpu_threads_s": st["cpu_threads"] - base["cpu_threads"],
        "broker_cpu_s": cpu1.broker - cpu0.broker,
        "producer_cpu_s": cpu1.process - cpu0.process,
        "rss_warm_mib": warm["rss_warm_mib"],
        "rss_end_mib": st["rss_mib"],
        "engine_gc_s": st["gc_s"] - base["gc_s"],
        "engine_gc_full": st["gc_full"] - base["gc_full"],
        "max_stall_s": st["max_stall_s"],
    }
    if profile is not None:
        row["py_spy"] = ep.spy
    say(f"  {sz.ingest_events:,} events in {seconds:.2f} s: {row['events_per_s']:,.0f}/s")
    return row


async def measure_ingest(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": [await ingest_once(run, n) for n in run.sizes.ingest_customers]}
    if run.profile:
        # Once more at the smallest size with the engine under py-spy (not a figure).
        raw = run.tmp / "ingest.txt"
        out["profiled"] = await ingest_once(run, run.sizes.ingest_customers[0], raw)
        out["profile"] = profile_report(
            run, "ingest", raw, [("the engine child", None)], out["profiled"]["py_spy"]
        )
    return out


# --------------------------------------------------------------------------- profiles

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
STDLIB = "stdlib/"
"""What ``shorten_line`` puts before a file of the standard library."""
AREAS = (
    "actors",
    "store",
    "protocol",
    "scripts",
    "nats",
    "msgspec",
    "sqlite",
    "asyncio/anyio",
    "waiting",
)
"""Where a sample's running function is, by the first part of its shortened file name
(anything else is ``other``). A C extension has no frame of its own (py-spy without
``--native``): msgspec's and sqlite3's work counts to the Python function that called it.
``waiting``: the running function is one that waits (``WAITS``)."""
WAITS = (
    "EpollSelector.select (stdlib/selectors.py",
    "Condition.wait (stdlib/threading.py",
    "Event.wait (stdlib/threading.py",
    "Thread.join (stdlib/threading.py",
    "Thread._wait_for_tstate_lock (stdlib/threading.py",
)
"""Functions that wait, yet are sampled: py-spy takes a thread as running when the system
says it is runnable, and a thread woken that waits for a free core (or for the GIL) is."""
_ANYIO_RUN = ("run", "AsyncIOBackend.run", "AsyncIOBackend.run.<locals>.wrapper")
_AREA = {
    "actors": "actors",
    "store": "store",
    "protocol": "protocol",
    "scripts": "scripts",
    "nats": "nats",
    "msgspec": "msgspec",
    "aiosqlite": "sqlite",
    f"{STDLIB}sqlite3": "sqlite",
    f"{STDLIB}asyncio": "asyncio/anyio",
    f"{STDLIB}selectors.py": "asyncio/anyio",
    "anyio": "asyncio/anyio",
}


def shorten_line(line: str, roots: Sequence[tuple[str, str]] | None = None) -> str:
    """A line of py-spy's collapsed stacks (``func (/full/path.py:line);... count``) with
    each file named relative to the first of ``roots`` (prefix, replacement) it is under
    (default: the repository, nothing; the standard library, ``stdlib/``), else to its
    ``site-packages``."""
    if roots is None:
        roots = ((f"{ROOT}/", ""), (sysconfig.get_paths()["stdlib"] + "/", STDLIB))
    stack, _, count = line.strip().rpartition(" ")
    frames = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame)
        if m is not None:
            path = m["file"]
            for prefix, replacement in roots:
                if path.startswith(prefix):
                    path = replacement + path[len(prefix) :]
                    break
            else:
                for marker in ("/site-packages/", "/dist-packages/"):
                    if marker in path:
                        path = path.rsplit(marker, 1)[1]
                        break
            line_no = f":{m['line']}" if m["line"] else ""
            frame = f"{m['func']} ({path}{line_no})"
        frames.append(frame)
    return f"{';'.join(frames)} {count}"


@dataclass
class Profile:
    """Collapsed stacks summed up by function."""

    samples: int = 0
    """Samples counted (those through ``within``, if given)."""
    all_samples: int = 0
    """Samples in the input."""
    other_threads: int = 0
    """Samples counted that are not of the main thread (their stack starts in a thread)."""
    self_samples: Counter[str] = field(default_factory=Counter)
    """Samples in which the function was the one running."""
    inclusive: Counter[str] = field(default_factory=Counter)
    """Samples in which the function was on the stack (once per sample, recursion or not)."""
    areas: Counter[str] = field(default_factory=Counter)
    """Samples by ``AREAS`` (of the running function) and ``other``."""


def area(frame: str) -> str:
    """The ``AREAS`` entry of a (shortened) frame, or ``other``."""
    m = _FRAME.match(frame)
    if m is None:
        return "other"
    if frame.startswith(WAITS):
        return "waiting"
    path = m["file"]
    top = path.split("/", 2 if path.startswith(STDLIB) else 1)
    return _AREA.get("/".join(top[:2]) if path.startswith(STDLIB) else top[0], "other")


def read_collapsed(lines: Iterable[str], within: str | None = None) -> Profile:
    """Sum up collapsed stacks (``frame;frame;... count`` lines, root first, shortened by
    ``shorten_line``). With ``within``, only the samples with a frame starting with it
    count, each from its first such frame down (what called it is left out)."""
    p = Profile()
    for line in lines:
        stack, _, count = line.strip().rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        p.all_samples += n
        thread = frames[0].startswith("Thread._bootstrap ")
        if within is not None:
            at = next((i for i, f in enumerate(frames) if f.startswith(within)), None)
            if at is None:
                continue
            frames = frames[at:]
        p.samples += n
        p.other_threads += n * thread
        p.self_samples[frames[-1]] += n
        for f in set(frames):
            p.inclusive[f] += n
        p.areas[area(frames[-1])] += n
    return p


def plumbing(frame: str) -> bool:
    """Whether the inclusive table leaves ``frame`` out: a module's top level, the standard
    library's or Python's own (the event loop, threads, runpy, imports) and anyio's running
    of the event loop, which are on most stacks and say nothing of where the time goes."""
    m = _FRAME.match(frame)
    return (
        m is None
        or m["func"] == "<module>"
        or m["file"].startswith((STDLIB, "<frozen "))
        or (m["file"].startswith("anyio/") and m["func"] in _ANYIO_RUN)
    )


def profile_summary(p: Profile, top: int = 20) -> dict[str, Any]:
    """The JSON form: totals, samples by area, the top functions by self and inclusive
    samples (as ``profile_lines``)."""
    return {
        "samples": p.samples,
        "all_samples": p.all_samples,
        "other_threads": p.other_threads,
        "areas": {a: p.areas[a] for a in (*AREAS, "other")},
        "self": p.self_samples.most_common(top),
        "inclusive": [(f, n) for f, n in p.inclusive.most_common() if not plumbing(f)][:top],
    }


def profile_lines(p: Profile, rate: int, top: int = 20) -> list[str]:
    """The text form: a line of totals, one of areas, then the top ``top`` functions by
    self samples and by inclusive samples (``plumbing`` left out), in % of the samples."""
    if not p.samples:
        return ["no samples"]

    def pct(n: int) -> str:
        return f"{100 * n / p.samples:5.1f}"

    main = p.samples - p.other_threads
    out = [
        f"{p.samples:,} samples at {rate} Hz ({p.samples / rate:.1f} s on a CPU): "
        f"main thread {pct(main).strip()} %, other threads {pct(p.other_threads).strip()} %",
        "running in " + ", ".join(f"{a} {pct(p.areas[a]).strip()} %" for a in (*AREAS, "other")),
        "",
        f"top {top} by self samples (the function running), % of samples",
        " self %  incl %  function",
    ]
    out += [f"{pct(n)}   {pct(p.inclusive[f])}   {f}" for f, n in p.self_samples.most_common(top)]
    out += [
        "",
        f"top {top} by inclusive samples (the function on the stack; the standard library "
        "and the loop's runner left out), % of samples",
        " incl %  self %  function",
    ]
    out += [
        f"{pct(n)}   {pct(p.self_samples[f])}   {f}"
        for f, n in profile_summary(p, top)["inclusive"]
    ]
    return out


def profile_report(
    run: Run,
    name: str,
    raw: Path,
    parts: Sequence[tuple[str, str | None]],
    spy: Sequence[str] = (),
) -> dict[str, Any]:
    """Read py-spy's collapsed stacks ``raw``; keep them (files shortened) in ``--out``'s
    ``profiles/`` (gzipped if over 1 MB); report each of ``parts`` (title, ``within`` of
    ``read_collapsed``). ``spy``: py-spy's own messages (with its count of errors)."""
    lines = raw.read_text(encoding="utf-8").splitlines()
    stacks = [shorten_line(ln) for ln in lines if ln.strip()]
    text = "\n".join(stacks) + "\n"
    keep = run.out / "profiles" / f"bench-{run.mode}-{name}.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    if len(text) > 1_000_000:
        keep = keep.with_name(keep.name + ".gz")
        keep.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        keep.write_text(text, encoding="utf-8")
    errors = [int(m[1]) for ln in spy if (m := re.search(r"Errors: (\d+)", ln))]
    out: dict[str, Any] = {
        "collapsed": keep.relative_to(run.out).as_posix(),
        "rate": be.PY_SPY_RATE,
        "py_spy_errors": errors[-1] if errors else None,
        "parts": {},
    }
    text_lines: list[str] = []
    for title, within in parts:
        p = read_collapsed(stacks, within)
        out["parts"][title] = profile_summary(p)
        if within is not None:
            share = 100 * p.samples / p.all_samples if p.all_samples else 0.0
            title += f" ({share:.1f} % of all samples)"
        text_lines += [""] if text_lines else []
        text_lines += [f"== {title}", *profile_lines(p, be.PY_SPY_RATE)]
    out["text"] = "\n".join(text_lines)
    return out


async def measure_latency(run: Run) -> dict[str, Any]:
    sz = run.sizes
    n = sz.latency_customers
    d = run.dir("latency")
    db = d / "shoal.db"
    await be.build_store(db, n)
    say(f"latency at {n:,} customers, offered {', '.join(f'{r:,}' for r in sz.latency_rates)}/s")
    sent: dict[str, float] = {}
    lat: list[float] = []
    rows = []
    async with broker(d) as url, be.engine_process(db, url, d / "engine.log") as ep:
        await start_warm(run, ep, "typical", n)
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()

            async def on_transition(msg: Any) -> None:
                t = time.perf_counter()
                tr = _transition.decode(msg.data)
                if isinstance(tr.cause, EventCause):
                    t0 = sent.get(tr.cause.message_id)
                    if t0 is not None:
                        lat.append(t - t0)

            await nc.subscribe("shoal.segments.>", cb=on_transition)
            published = 0
            for rate in sz.latency_rates:
                lat.clear()
                sent.clear()
                base = await ep.ask("mark")
                gen = be.live_events(random.Random(rate), n, f"l{rate}-", fresh=0.3)
                k = 0
                start = time.perf_counter()
                while (elapsed := time.perf_counter() - start) < sz.latency_seconds:
                    due = int(rate * elapsed) + 1
                    while k < due:
                        subject, body, mid = next(gen)
                        sent[mid] = time.perf_counter()
                        await nc.publish(subject, body)
                        k += 1
                    await anyio.sleep(0.002)
                await nc.flush()
                publish_s = time.perf_counter() - start
                done, st = await be.wait_drained(ep, base["events_applied"] + k, sz.timeout)
                await anyio.sleep(0.3)  # the last transitions on their way to the subscriber
                published += k
                stored = (await js.stream_info(EVENTS_STREAM)).state.messages
                ms = [x * 1000 for x in lat]
                row: dict[str, Any] = {
                    "offered_per_s": rate,
                    "published": k,
                    "stored_total": stored,
                    "published_total": published,
                    "achieved_publish_per_s": k / publish_s,
                    "seconds": sz.latency_seconds,
                    "drain_after_publish_s": done - start - publish_s,
                    "applied_per_s": k / (done - start),
                    "transitions_matched": len(ms),
                    "latency_ms": be.percentiles(ms),
                    "above_capacity": done - start - publish_s > 1.0,
                    "engine_gc_s": st["gc_s"] - base["gc_s"],
                    "engine_gc_full": st["gc_full"] - base["gc_full"],
                    "max_stall_s": st["max_stall_s"],
                }
                rows.append(row)
                p = row["latency_ms"]
                say(
                    f"  {rate:,}/s: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, "
                    f"max {p['max']:.1f} ms ({p['count']:,} transitions; "
                    f"drained {row['drain_after_publish_s']:.1f} s after publishing)"
                )
        finally:
            await nc.close()
        await ep.stop()
    return {"customers": n, "rates": rows}


async def measure_deadlines(run: Run) -> dict[str, Any]:
    out = await deadlines_once(run)
    if run.profile:
        # Once more with the engine under py-spy (not a figure): the whole child, loading
        # the store included, then the firing path alone.
        raw = run.tmp / "deadlines.txt"
        p = await deadlines_once(run, raw)
        out["profiled"] = {
            k: p[k] for k in ("customers", "lateness_ms", "deadlines_fired", "py_spy")
        }
        out["profile"] = profile_report(
            run,
            "deadlines",
            raw,
            [
                ("the engine child", None),
                ("firing: the stacks through Engine._fire_due", "Engine._fire_due (actors/"),
            ],
            p["py_spy"],
        )
    return out


async def deadlines_once(run: Run, profile: Path | None = None) -> dict[str, Any]:
    """One engine on a store of ``deadline_customers`` customers with pending deadlines,
    until they fell due (under py-spy, writing ``profile``, if given)."""
    sz = run.sizes
    n = sz.deadline_customers
    burst = n // 10
    spread = n // 10
    typical = n - burst - spread
    span = sz.deadline_spread_s * SECOND
    d = run.dir("deadlines" + ("-profile" if profile else ""))
    db = d / "shoal.db"
    segments = load_segments()
    say(
        f"deadlines: {n:,} customers pending, {burst:,} due in one second"
        + (", engine under py-spy" if profile else "")
    )
    t0 = time.perf_counter()
    log = await EventLog.open(db)
    try:
        cut = now_us()
        templates = be.typical_templates(min(2_000, typical), segments, cut)
        await be.write_clones(log, segments, templates, range(typical))
        # Due once the rest is written and the engine has restarted and is warm.
        margin = (burst + spread) * 40e-6 + n * 80e-6 + 8.0
        due = (now_us() + int(margin * SECOND)) // SECOND * SECOND + SECOND
        burst_t = [be.due_template(due + j * (SECOND // 50), segments, cut) for j in range(50)]
        spread_t = [
            be.due_template(due + SECOND + j * (span // 200), segments, cut) for j in range(200)
        ]
        await be.write_clones(log, segments, burst_t, range(typical, typical + burst))
        await be.write_clones(log, segments, spread_t, range(typical + burst, n))
        await be.finish_store(log, segments)
    finally:
        await log.close()
    build_s = time.perf_counter() - t0
    async with (
        broker(d) as url,
        be.engine_process(db, url, d / "engine.log", profile=profile) as ep,
    ):
        warm = await start_warm(run, ep, "deadlines" if profile is None else "profiled", n)
        warm_before_due = now_us() < due
        base = await ep.ask("mark")
        end = due + SECOND + span + 2 * SECOND
        await anyio.sleep(max(0.0, (end - now_us()) / SECOND))
        windows = {"burst": [due, due + SECOND], "spread": [due + SECOND, due + SECOND + span]}
        late = await ep.ask("lateness " + json.dumps(windows), sz.timeout)
        st = await ep.ask("stats")
        await ep.stop()
    del late["ev"]
    spy = {"py_spy": ep.spy} if profile is not None else {}
    say(
        f"  lateness p50 {late['all']['p50']:.1f} ms, p99 {late['all']['p99']:.1f} ms, "
        f"max {late['all']['max']:.1f} ms over {late['all']['count']:,} deadlines"
    )
    return {
        "customers": n,
        "pending_at_warm": warm["pending_deadlines"],
        "due_in_one_second": burst,
        "spread_over_s": sz.deadline_spread_s,
        "build_s": build_s,
        "warm_before_due": warm_before_due,
        "lateness_ms": late,
        "deadlines_fired": st["deadlines_fired"],
        "transitions": st["transitions"],
        "transitions_published": st["transitions_published"],
        "engine_gc_s": st["gc_s"] - base["gc_s"],
        "engine_gc_full": st["gc_full"] - base["gc_full"],
        "max_stall_s": st["max_stall_s"],
        **spy,
    }


def measure_replay(run: Run) -> dict[str, Any]:
    sz = run.sizes
    events = list(generate(sz.replay_customers, sz.replay_days, seed=7))
    end = history_end(sz.replay_days)
    segments = load_segments()
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    transitions = sum(1 for _ in replay(events, segments, until=end))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    say(f"replay: {len(events):,} events in {seconds:.2f} s: {len(events) / seconds:,.0f}/s")
    out: dict[str, Any] = {}
    if run.profile:
        out["profiled"], out["profile"] = profile_replay(run)
    return {
        **out,
        "customers": sz.replay_customers,
        "days": sz.replay_days,
        "events": len(events),
        "transitions": transitions,
        "seconds": seconds,
        "cpu_s": cpu,
        "events_per_s": len(events) / seconds,
    }


REPLAY_CHILD = "import sys; from scripts.bench import replay_child; replay_child(*sys.argv[1:])"


def profile_replay(run: Run, seconds: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same replay in a child process under py-spy (repeated for ``seconds`` at least,
    for enough samples); returns what the child ran and the report of the replay alone."""
    sz = run.sizes
    raw = run.tmp / "replay.txt"
    cmd = [
        *be.py_spy_command(raw),
        sys.executable,
        "-c",
        REPLAY_CHILD,
        str(sz.replay_customers),
        str(sz.replay_days),
        str(seconds),
    ]
    say("replay under py-spy")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=sz.timeout)
    docs = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not docs:
        raise RuntimeError(f"replay under py-spy failed ({proc.returncode}): {proc.stderr[-2000:]}")
    child: dict[str, Any] = json.loads(docs[-1])
    parts = [("replay: the stacks through actors.replay", "replay (actors/_replay.py")]
    spy = [ln for ln in proc.stdout.splitlines() if ln.startswith("py-spy>")]
    return child, profile_report(run, "replay", raw, parts, spy)


def replay_child(customers: str, days: str, seconds: str) -> None:
    """``profile_replay``'s child: ``measure_replay``'s history, replayed until ``seconds``
    have passed (at least once); prints what it did as JSON."""
    events = list(generate(int(customers), int(days), seed=7))
    end = history_end(int(days))
    segments = load_segments()
    t0 = time.perf_counter()
    repeats = 0
    while not repeats or time.perf_counter() - t0 < float(seconds):
        for _ in replay(events, segments, until=end):
            pass
        repeats += 1
    took = time.perf_counter() - t0
    print(json.dumps({"events": len(events), "repeats": repeats, "seconds": took}), flush=True)


async def measure_rebuild(run: Run) -> dict[str, Any]:
    if not run.warm:
        n = run.sizes.deadline_customers
        d = run.dir("rebuild")
        db = d / "shoal.db"
        await be.build_store(db, n)
        say(f"rebuild from snapshots at {n:,} customers")
        async with broker(d) as url, be.engine_process(db, url, d / "engine.log") as ep:
            await start_warm(run, ep, "typical", n)
            await ep.stop()
    starts = sorted(run.warm, key=lambda w: w["customers"])
    return {
        "starts": [
            {k: w[k] for k in ("population", "customers", "ready_s", "warm_s")} for w in starts
        ]
    }


async def measure_memory(run: Run) -> dict[str, Any]:
    sz = run.sizes
    have = {(w["population"], w["customers"]) for w in run.warm}
    wanted = [("typical", n) for n in sz.ingest_customers] + [
        ("bare", sz.memory_bare),
        ("history", sz.memory_bare),
    ]
    for population, n in wanted:
        if (population, n) in have:
            continue
        d = run.dir(f"memory-{population}-{n}")
        db = d / "shoal.db"
        await be.build_store(db, n, population)
        say(f"memory: {population} {n:,}")
        async with broker(d) as url, be.engine_process(db, url, d / "engine.log") as ep:
            await start_warm(run, ep, population, n)
            await ep.stop()
    rows = [
        {
            k: w[k]
            for k in (
                "population",
                "customers",
                "rss_base_mib",
                "rss_warm_mib",
                "bytes_per_customer",
            )
        }
        for w in sorted(run.warm, key=lambda w: (w["population"], w["customers"]))
        if w["population"] in ("typical", "bare", "history")
    ]
    return {"engines": rows}


def schedule(recompute_s: float, minutes: int, shoal_us: float) -> dict[str, Any]:
    """A full recompute every ``minutes``, each taking ``recompute_s``: how old the
    memberships read are (a run's results show the data as of its start, from its end
    until the next run's end), the CPU it takes per hour, and the event rate at which
    shoal (``shoal_us`` per event) would spend as much. A recompute longer than the
    interval cannot keep to it: the runs go back to back (``feasible`` false)."""
    period = max(minutes * 60.0, recompute_s)
    return {
        "feasible": recompute_s <= minutes * 60,
        "period_s": period,
        "mean_s": period / 2 + recompute_s,
        "max_s": period + recompute_s,
        "sql_cpu_s_per_hour": recompute_s * 3600 / period,
        "break_even_events_per_s": recompute_s / period / (shoal_us / 1e6),
    }


def measure_sql(run: Run) -> dict[str, Any]:
    sz = run.sizes
    d = run.dir("sql")
    events = list(generate(sz.sql_base, sz.sql_days, seed=11))
    at = history_end(sz.sql_days)
    jsonl = d / "history.jsonl"
    bsql.write_jsonl(events, jsonl)
    segments = load_segments()
    t0, c0 = time.perf_counter(), time.process_time()
    shoal = bsql.shoal_members(events, segments, at)
    shoal_s, shoal_cpu = time.perf_counter() - t0, time.process_time() - c0
    per_event_us = shoal_s / len(events) * 1e6
    # The engine's end-to-end cost per event, from this run's ingest, if it ran.
    ingest = run.results.get("ingest", {}).get("sizes", [])
    events_per_customer_day = len(events) / sz.sql_base / sz.sql_days
    say(
        f"sql baseline: base {sz.sql_base:,} customers, {len(events):,} events; "
        f"shoal replay {shoal_s:.2f} s"
    )
    scales = []
    for k in sz.sql_clones:
        customers = sz.sql_base * k
        db = d / f"events-{customers}.db"
        loaded = bsql.load(db, jsonl, k)
        seconds, counts = bsql.recompute(db, at)
        total = sum(seconds.values())
        agreement = {
            s: {
                "sql": counts[s],
                "shoal": shoal[s] * k,
                "equal": counts[s] == shoal[s] * k,
                "approximated": s in bsql.APPROXIMATED,
            }
            for s in bsql.QUERIES
        }
        # shoal's cost per event: end to end from this run's ingest at the nearest size,
        # else the actors alone (the replay above).
        if ingest:
            near = min(ingest, key=lambda r: abs(r["customers"] - customers))
            shoal_us, basis = 1e6 / near["events_per_s"], f"ingest at {near['customers']:,}"
        else:
            shoal_us, basis = per_event_us, "replay"
        # Keeping C customers current for an hour, at the history's own event rate.
        events_per_s = events_per_customer_day * customers / 86_400
        staleness = {str(m): schedule(total, m, shoal_us) for m in (5, 15, 60, 1440)}
        row = {
            "customers": customers,
            "rows": loaded["rows"],
            "load_s": loaded["load_s"],
            "index_s": loaded["index_s"],
            "recompute_s": total,
            "query_s": seconds,
            "sql_us_per_row": total / loaded["rows"] * 1e6,
            "shoal_us_per_event": shoal_us,
            "shoal_basis": basis,
            "recompute_over_shoal_event": total * 1e6 / shoal_us,
            "history_events_per_s": events_per_s,
            "shoal_cpu_s_per_hour": events_per_s * 3600 * shoal_us / 1e6,
            "staleness": staleness,
            "agreement": agreement,
        }
        scales.append(row)
        say(
            f"  {customers:,} customers, {loaded['rows']:,} rows: recompute {total:.2f} s "
            f"(load {loaded['load_s']:.1f} s, indexes {loaded['index_s']:.1f} s)"
        )
        db.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    return {
        "base_customers": sz.sql_base,
        "days": sz.sql_days,
        "base_events": len(events),
        "at": at,
        "shoal_replay_s": shoal_s,
        "shoal_replay_cpu_s": shoal_cpu,
        "shoal_us_per_event_replay": per_event_us,
        "events_per_customer_day": events_per_customer_day,
        "approximated": bsql.APPROXIMATED,
        "scales": scales,
    }


async def measure_consumer(run: Run) -> dict[str, Any]:
    from scripts.bench_consumer import VARIANTS, fill_stream, run_variant

    m = run.sizes.consumer_messages
    v = next(v for v in VARIANTS if v.name == "push-cb-all-map50k")
    d = run.dir("consumer")
    async with broker(d) as url:
        published = await fill_stream(url, m)
        consumed = await run_variant(url, v, m, run.sizes.timeout)
    say(f"consumer ceiling ({v.name}): {consumed.rate:,.0f} msgs/s")
    return {
        "variant": v.name,
        "messages": m,
        "publish_async_per_s": published.rate,
        "consume_per_s": consumed.rate,
        "status": consumed.status,
    }


async def _sync(fn: Callable[[Run], dict[str, Any]], run: Run) -> dict[str, Any]:
    return fn(run)


RUNNERS: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "ingest": measure_ingest,
    "latency": measure_latency,
    "deadlines": measure_deadlines,
    "replay": lambda run: _sync(measure_replay, run),
    "rebuild": measure_rebuild,
    "memory": measure_memory,
    "sql": lambda run: _sync(measure_sql, run),
    "consumer": measure_consumer,
}


# --------------------------------------------------------------------------- report


def nats_server_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            [str(find_nats_server()), "--version"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip().removeprefix("nats-server: ")
    return "?"


def summary(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per figure the issue asks for: what was measured, at what size, the target."""
    rows: list[dict[str, str]] = []

    def add(name: str, figure: str, at: str, target: str = "", met: bool | None = None) -> None:
        rows.append(
            {
                "measurement": name,
                "figure": figure,
                "at": at,
                "target": target,
                "met": "" if met is None else ("yes" if met else "no"),
            }
        )

    if "ingest" in results:
        for r in results["ingest"]["sizes"]:
            add(
                "ingest",
                f"{r['events_per_s']:,.0f} events/s",
                f"{r['customers']:,} customers, {r['events']:,} events",
                TARGETS["ingest"],
                r["events_per_s"] >= 100_000,
            )
    if "latency" in results:
        for r in results["latency"]["rates"]:
            p = r["latency_ms"]
            add(
                "latency",
                f"p50 {p['p50']:.1f} / p99 {p['p99']:.1f} / max {p['max']:.1f} ms",
                f"{r['offered_per_s']:,}/s offered ({r['achieved_publish_per_s']:,.0f} published,"
                f" {r['applied_per_s']:,.0f} applied)"
                + (", above capacity" if r["above_capacity"] else ""),
                TARGETS["latency"] if r["offered_per_s"] == 20_000 else "",
                p["p99"] <= 50 if r["offered_per_s"] == 20_000 else None,
            )
    if "deadlines" in results:
        r = results["deadlines"]
        for key in ("all", "burst"):
            p = r["lateness_ms"][key]
            add(
                "deadlines" if key == "all" else "deadlines (one-second burst)",
                f"p50 {p['p50']:.1f} / p99 {p['p99']:.1f} / max {p['max']:.1f} ms",
                f"{p['count']:,} fired, {r['pending_at_warm']:,} pending",
                TARGETS["deadlines"] if key == "all" else "",
                p["p99"] <= 100 if key == "all" and r["customers"] >= 1_000_000 else None,
            )
    if "replay" in results:
        r = results["replay"]
        add(
            "replay",
            f"{r['events_per_s']:,.0f} events/s",
            f"{r['events']:,} events, {r['customers']:,} customers",
            TARGETS["replay"],
            r["events_per_s"] >= 500_000,
        )
    if "rebuild" in results:
        # The largest start of each population (smaller ones are in the report's table).
        largest = {
            r["population"]: r
            for r in results["rebuild"]["starts"]
            if r["population"] != "profiled"
        }
        for r in largest.values():
            add(
                "rebuild from snapshots",
                f"ready {r['ready_s']:.2f} s, warm {r['warm_s']:.2f} s",
                f"{r['customers']:,} customers ({r['population']})",
                TARGETS["rebuild"] if r["customers"] >= 1_000_000 else "",
                r["warm_s"] <= 10 if r["customers"] >= 1_000_000 else None,
            )
    if "memory" in results:
        once = {(r["population"], r["customers"]): r for r in results["memory"]["engines"]}
        for r in once.values():
            bare = r["population"] == "bare"
            add(
                "memory",
                f"{r['bytes_per_customer']:,.0f} B/customer",
                f"{r['customers']:,} customers, "
                + {
                    "bare": "no event windows (identify only)",
                    "typical": "small event windows (1 to 6 events)",
                    "history": "generated histories (about 33 events each)",
                }[r["population"]],
                TARGETS["memory"] if bare else "",
                r["bytes_per_customer"] <= 1024 if bare else None,
            )
    if "sql" in results:
        for r in results["sql"]["scales"]:
            agree = sum(a["equal"] for a in r["agreement"].values())
            add(
                "sql recompute",
                f"{r['recompute_s']:.2f} s per full recompute",
                f"{r['customers']:,} customers, {r['rows']:,} rows; {agree}/{len(r['agreement'])}"
                " segments agree",
            )
            add(
                "sql vs shoal",
                f"1 recompute = {r['recompute_over_shoal_event']:,.0f} events through shoal",
                f"{r['customers']:,} customers: SQL recompute {r['recompute_s']:.2f} s / shoal "
                f"{r['shoal_us_per_event']:.0f} us per event ({r['shoal_basis']}); every 15 min "
                f"SQL costs what shoal spends on "
                f"{r['staleness']['15']['break_even_events_per_s']:,.1f} events/s "
                f"(this history: {r['history_events_per_s']:,.2f}/s)",
            )
    if "consumer" in results:
        r = results["consumer"]
        add("nats-py consumer alone", f"{r['consume_per_s']:,.0f} msgs/s", r["variant"])
    return rows


def table(rows: list[dict[str, str]]) -> Iterator[str]:
    yield "| measurement | figure | at | target | met |"
    yield "|---|---|---|---|---|"
    for r in rows:
        yield f"| {r['measurement']} | {r['figure']} | {r['at']} | {r['target']} | {r['met']} |"


def _gc(r: dict[str, Any]) -> str:
    """GC seconds (full collections) | the longest event-loop stall, or dashes when the
    results predate these figures."""
    if "engine_gc_s" not in r:
        return "- | -"
    return f"{r['engine_gc_s']:.2f} ({r['engine_gc_full']}) | {r['max_stall_s']:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    res = doc["results"]
    out = [
        f"# shoal benchmark, {doc['mode']} mode",
        "",
        f"Script: `scripts/bench.py` (its docstring says what each measurement does). "
        f"Run on {doc['started_at']}, {doc['duration_s']:.0f} s.",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "## Machine and code",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; load average "
        f"{doc['load_before']} before, {doc['load_after']} after (shared machine: compare "
        "ratios within a run).",
        f"- Python {m['python']}, msgspec {m['msgspec']}, nats-py {m['nats_py']}, nats-server "
        f"{doc['nats_server']}, SQLite {m['sqlite']}, aiosqlite {m['aiosqlite']}.",
        f"- Code: {m['code']}.",
        "",
        "## Summary",
        "",
        *table(doc["summary"]),
        "",
    ]
    if not doc["complete"]:
        out += ["**Partial: the run has not finished (or stopped early).**", ""]
    if doc["not_run"]:
        out += [f"Not run: {', '.join(doc['not_run'])}.", ""]
    for name, error in doc["failed"].items():
        out += [f"Failed: {name}: `{error}`.", ""]
    if "ingest" in res:
        out += [
            "## Ingest",
            "",
            "| customers | events | s | events/s | transitions | engine CPU main / other s "
            "| broker CPU s | producer CPU s | RSS warm / end MiB | engine GC s (full) "
            "| longest loop stall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["ingest"]["sizes"]:
            out.append(
                f"| {r['customers']:,} | {r['events']:,} | {r['seconds']:.2f} "
                f"| {r['events_per_s']:,.0f} | {r['transitions']:,} "
                f"| {r['engine_cpu_main_s']:.1f} / {r['engine_cpu_threads_s']:.1f} "
                f"| {r['broker_cpu_s']:.1f} | {r['producer_cpu_s']:.1f} "
                f"| {r['rss_warm_mib']:.0f} / {r['rss_end_mib']:.0f} | {_gc(r)} |"
            )
        out.append("")
    if "latency" in res:
        out += [
            f"## Event-to-transition latency ({res['latency']['customers']:,} customers)",
            "",
            "| offered/s | published/s | applied/s | transitions | p50 ms | p90 ms | p99 ms "
            "| max ms | drained s after publishing | engine GC s (full) | longest loop stall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["latency"]["rates"]:
            p = r["latency_ms"]
            out.append(
                f"| {r['offered_per_s']:,} | {r['achieved_publish_per_s']:,.0f} "
                f"| {r['applied_per_s']:,.0f} | {p['count']:,} | {p['p50']:.1f} | {p['p90']:.1f} "
                f"| {p['p99']:.1f} | {p['max']:.1f} | {r['drain_after_publish_s']:.1f} "
                f"| {_gc(r)} |"
            )
        out += [
            "",
            "Above the engine's capacity the stream holds a growing backlog: latency is then "
            "the time the backlog takes to drain, and grows with the length of the run.",
            "",
        ]
    if "deadlines" in res:
        r = res["deadlines"]
        out += [
            f"## Deadline lateness ({r['customers']:,} customers, {r['pending_at_warm']:,} "
            f"pending at warm; {r['due_in_one_second']:,} due in one second, then spread over "
            f"{r['spread_over_s']} s; engine warm before the first was due: "
            f"{r['warm_before_due']})",
            "",
            "| deadlines | fired | firing rounds | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, p in r["lateness_ms"].items():
            out.append(
                f"| {key} | {p['count']:,} | {p['rounds']:,} | {p['p50']:.1f} | {p['p90']:.1f} "
                f"| {p['p99']:.1f} | {p['max']:.1f} |"
            )
        out += ["", f"Engine GC s (full collections) | longest loop stall s: {_gc(r)}.", ""]
    if "replay" in res:
        r = res["replay"]
        out += [
            "## Replay",
            "",
            f"{r['events']:,} events ({r['customers']:,} customers, {r['days']} days, "
            f"`scripts/generate.py` seed 7): {r['seconds']:.2f} s, {r['events_per_s']:,.0f} "
            f"events/s, {r['transitions']:,} transitions.",
            "",
        ]
    if "rebuild" in res or "memory" in res:
        out += [
            "## Engine starts from snapshots (rebuild) and memory",
            "",
            "| population | customers | ready s | warm s | RSS before / warm MiB "
            "| bytes/customer |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for w in sorted(doc["warm"], key=lambda w: (w["population"], w["customers"])):
            out.append(
                f"| {w['population']} | {w['customers']:,} | {w['ready_s']:.2f} "
                f"| {w['warm_s']:.2f} | {w['rss_base_mib']:.0f} / {w['rss_warm_mib']:.0f} "
                f"| {w['bytes_per_customer']:,.0f} |"
            )
        out += [
            "",
            "*typical*: an identify and 1 to 6 track events (event windows); *bare*: an "
            "identify only (no event windows); *history*: customers of a `scripts/generate.py` "
            "history of the last 120 days (about 33 events each); *deadlines*: the lateness "
            "store; *profiled*: the engine under py-spy. RSS after `gc.collect()`; "
            "bytes/customer is (warm - before) / customers, so small stores carry the "
            "engine's fixed costs.",
            "",
        ]
    if "sql" in res:
        r = res["sql"]
        out += [
            "## SQL baseline",
            "",
            f"A `scripts/generate.py` history of {r['base_customers']:,} customers over "
            f"{r['days']} days ({r['base_events']:,} events, "
            f"{r['events_per_customer_day']:.2f} per customer and day), loaded from its "
            "JSON lines into SQLite and cloned to size. shoal's members come from a replay "
            f"of the base history ({r['shoal_us_per_event_replay']:.1f} us per event), "
            "times the clones. Queries: `scripts/_bench_sql.py`.",
            "",
            "*ratio*: one full SQL recompute against one event through shoal (its cost per "
            "event from this run's ingest at the nearest size, else from the replay). *CPU per "
            "hour*: keeping the segments current for an hour at this history's event rate "
            "(shoal: that many events; SQL: a recompute every 15 or 60 minutes). *Break-even*: "
            "the event rate at which shoal would spend what SQL every 15 minutes spends. "
            "*Staleness*: how old a membership is when read, on average and at worst, with a "
            "recompute every 15 minutes: a run's results show the data as of its start, from "
            "its end until the next run's end (time-based changes wait for the next run; "
            "shoal's are on time, see the deadline lateness). A recompute longer than the "
            "interval cannot keep to it: the runs then go back to back, using a whole core.",
            "",
            "| customers | rows | recompute s | SQL us per row | shoal us per event | ratio "
            "| events/s of this history | CPU s per hour: shoal / SQL every 15 min / every 60 min "
            "| break-even events/s, every 15 min | staleness mean / max s, every 15 min |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in r["scales"]:
            st = s["staleness"]
            out.append(
                f"| {s['customers']:,} | {s['rows']:,} | {s['recompute_s']:.2f} "
                f"| {s['sql_us_per_row']:.2f} | {s['shoal_us_per_event']:.0f} "
                f"| {s['recompute_over_shoal_event']:,.0f} "
                f"| {s['history_events_per_s']:,.1f} "
                f"| {s['shoal_cpu_s_per_hour']:.1f} / {st['15']['sql_cpu_s_per_hour']:.1f} / "
                f"{st['60']['sql_cpu_s_per_hour']:.1f} "
                f"| {st['15']['break_even_events_per_s']:,.0f} "
                f"| {st['15']['mean_s']:.0f} / {st['15']['max_s']:.0f}"
                + ("" if st["15"]["feasible"] else " (runs back to back: longer than 15 min)")
                + " |"
            )
        out += ["", "Members per segment at the history's end, SQL against shoal:", ""]
        out += [
            "| segment | "
            + " | ".join(f"{s['customers']:,} SQL / shoal" for s in r["scales"])
            + " | seconds |"
        ]
        out += ["|---|" + "---:|" * (len(r["scales"]) + 1)]
        for seg in bsql.QUERIES:
            cells = []
            for s in r["scales"]:
                a = s["agreement"][seg]
                mark = "" if a["equal"] else " (differs)"
                cells.append(f"{a['sql']:,} / {a['shoal']:,}{mark}")
            secs = " / ".join(f"{s['query_s'][seg]:.2f}" for s in r["scales"])
            out.append(f"| {seg} | " + " | ".join(cells) + f" | {secs} |")
        out += ["", "Approximated in SQL:", ""]
        out += [f"- `{k}`: {v}." for k, v in r["approximated"].items()]
        out.append("")
    if "consumer" in res:
        r = res["consumer"]
        out += [
            "## nats-py consumer ceiling",
            "",
            f"{r['messages']:,} events, `bench_consumer.py`'s `{r['variant']}` (push "
            f"consumer, `AckPolicy.ALL`, decode only): {r['consume_per_s']:,.0f} msgs/s "
            f"(publish_async {r['publish_async_per_s']:,.0f}/s).",
            "",
        ]
    profiled = [n for n in ("ingest", "deadlines", "replay") if "profile" in res.get(n, {})]
    if profiled:
        out += [
            "## Profiles (py-spy)",
            "",
            f"`py-spy record --rate {be.PY_SPY_RATE} --function --nonblocking` on a child "
            "process: it samples "
            "the threads while they run (a thread waiting is not sampled, so the percentages "
            "are of the CPU time), and costs the process little, unlike a deterministic "
            "profiler. Self: the function was running; inclusive: it was on the stack "
            "(counted once per sample). A C extension has no frame of its own: msgspec's and "
            "sqlite3's work, and garbage collection, count to the Python function running. "
            "A thread that is woken but waits for a free core or for the GIL counts as running "
            "(on a busy machine, a share of the event loop's waits: *waiting*). "
            "The collapsed stacks (for flamegraph.pl or speedscope) are in `--out`'s "
            "`profiles/`.",
            "",
        ]
    for name in profiled:
        r = res[name]
        prof = r["profile"]
        if name == "ingest":
            p = r["profiled"]
            out += [
                "### The engine during ingest",
                "",
                f"One more ingest run at {p['customers']:,} customers, the engine child under "
                f"py-spy ({p['events_per_s']:,.0f} events/s under the profiler; the samples "
                "include its start and warm-up).",
            ]
        elif name == "deadlines":
            p = r["profiled"]["lateness_ms"]["all"]
            out += [
                "### The engine firing deadlines",
                "",
                f"One more deadline run at {r['profiled']['customers']:,} customers, the "
                f"engine child under py-spy (lateness p99 {p['p99']:.1f} ms, max "
                f"{p['max']:.1f} ms under the profiler): the whole child, loading the store "
                "included, then the stacks through `Engine._fire_due` alone.",
            ]
        else:
            p = r["profiled"]
            out += [
                "### The replay",
                "",
                f"The same replay in a child under py-spy, {p['repeats']} time(s) over "
                f"{p['seconds']:.1f} s; the stacks through `actors.replay` alone (not the "
                "generation of the history).",
            ]
        errors = prof["py_spy_errors"]
        out += [
            "",
            f"Collapsed stacks: `{prof['collapsed']}`"
            + ("" if errors is None else f" (py-spy errors: {errors})")
            + ".",
            "",
            "```",
            prof["text"],
            "```",
            "",
        ]
    return "\n".join(out) + "\n"


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    sizes = MODES[args.mode]
    chosen = args.only or list(MEASUREMENTS)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "mode": args.mode,
        "command": "python scripts/bench.py " + shlex.join(args.argv),
        "started_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "nats_server": nats_server_version(),
        "load_before": loadavg(),
        "sizes": asdict(sizes),
    }
    doc["failed"] = {}
    done: list[str] = []

    def save(run: Run) -> None:
        """Write what is measured so far: a long run that stops early keeps it."""
        doc["warm"] = run.warm
        doc["results"] = run.results
        doc["not_run"] = [m for m in MEASUREMENTS if m not in done]
        doc["complete"] = len(done) == len(chosen)
        doc["load_after"] = loadavg()
        doc["duration_s"] = time.perf_counter() - t0
        doc["summary"] = summary(run.results)
        write(doc, args.out)

    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        run = Run(args.mode, sizes, Path(tmp), profile=args.profile, out=args.out)
        for name in MEASUREMENTS:
            if name in chosen:
                try:
                    run.results[name] = await RUNNERS[name](run)
                except Exception as e:  # report it, and measure the rest
                    doc["failed"][name] = f"{type(e).__name__}: {e}"
                    say(f"{name} failed: {doc['failed'][name]}")
                done.append(name)
                save(run)
        save(run)
    return doc


def write(doc: dict[str, Any], out: Path) -> Path:
    """``bench-<mode>.json`` and ``.md`` in ``out``; returns their stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{doc['mode']}"
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="mode",
        help="tiny sizes, for the test suite",
    )
    parser.set_defaults(mode="full")
    parser.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated, from: {','.join(MEASUREMENTS)}",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and markdown")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile (py-spy) the replay, one more ingest run at the smallest size and "
        "one more deadline run",
    )
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args.only:
        unknown = set(args.only) - set(MEASUREMENTS)
        if unknown:
            parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    args.argv = raw
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and be.find_py_spy() is None:
        print(
            "bench.py: --profile needs py-spy (a sampling profiler), which is not installed: "
            "pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    from scripts._logging import configure_logging

    configure_logging("warning")
    doc = anyio.run(run_all, args)
    print()
    for line in table(doc["summary"]):
        print(line)
    stem = args.out / f"bench-{args.mode}"
    print(f"\nwritten: {stem}.json, {stem}.md")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
