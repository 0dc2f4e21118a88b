"""Benchmark shoal's restart: snapshot cost, and restart to ready and to warm at N customers.

The script builds a store of N customers ``c<i>`` in a temporary directory, starts its own
``nats-server -js`` (``protocol.embedded_broker``, free loopback port, empty streams) and:

1. build: makes K template customers (default 2,000) by really applying events with
   ``Customer.apply`` under the default segments, with ``random.Random(42)``: an identify
   (``plan``, ``renewal_date`` from 10 days ago to 60 days ahead, ``timezone``) at the first
   event, 1 to 4 ``Visit``s (the first and the last), an ``Email Opened`` (70 %) and an
   ``Order Completed`` with ``revenue`` (40 %), over the last 1 to 90 days, all before
   ``now - downtime``; each template is then advanced to ``now - downtime``, as a running
   engine would have, so deadlines are spread over the coming days and weeks and those
   falling in the downtime are overdue at the restart. Customer i is template ``i % K``
   cloned: its events (the template's ``protocol.Event``, msgpack, with customer ``c<i>``
   and message ids ``c<i>-<k>``) and its transitions (``protocol.Transition`` JSON with the
   customer replaced, same versions) are appended with ``Store.commit`` in one
   transaction per block of 20,000 customers, sorted by instant within the block, with the
   outbox marked published.
2. snapshots: the actor of customer i is ``Customer.from_snapshot("c<i>", template
   snapshot)``; all N are encoded (``Customer.snapshot()``) and written as
   ``Engine._write_snapshots`` writes them (format ``SNAPSHOT_FORMAT``, ``needs``
   fingerprint, ``log_seq`` = the log's last position, deadline or ``protocol.NEVER``) with
   ``Store.commit([], [], snapshots=rows, marks=...)`` in parts of 50,000 (the engine's
   part at a clean stop), the last part recording the ``SnapshotMarks``. Then a random
   sample of up to 100,000 customers is written again (an upsert, as a running engine
   does) in parts of 5,000 (the engine's part per loop turn) and of 50,000.
3. restarts: each runs in a fresh Python process (this script with a hidden ``--child``
   argument), so that its RSS and CPU are the restart's own: it opens the store, connects,
   and times from just before ``await tg.start(engine.run)`` of a new ``Engine(nc, log,
   load_segments(), config=EngineConfig(use_snapshots=...))`` (``SystemClock``) until it
   returns (*ready*: consuming events and firing deadlines), then until ``engine.warm``
   (polled every 10 ms), then until *caught up* (no deadline left that was due when the
   restart began), waits for the publisher to publish what was committed, and cancels
   it, timing the clean stop (which snapshots every customer that changed).

   a. snapshots: the store as built, no tail after the marks;
   b. tail: after ``--tail`` events (Visit 70 %, Email Opened 20 %, Order Completed 10 %)
      for random customers, stamped now, are appended with the transitions they cause
      (each customer loaded from its stored snapshot and the events applied with
      ``Customer.apply``, outbox marked published) and no snapshot is written;
   c. log only: ``EngineConfig(use_snapshots=False)``, every customer rebuilt from the
      whole log (its clean stop then snapshots all N customers).

   With ``--profile FILE``, one more restart runs with cProfile on (main thread: the event
   loop; the SQLite thread is not profiled) between b and c: from snapshots after another
   tail of the same size; with ``--profile-log`` also one from the whole log, last. They
   are slower for it: the figures to quote are a, b and c's.

For each restart it reports wall seconds and, read from ``/proc``, CPU seconds of the
child's main thread (event loop, decoding, actors) and of its other threads (aiosqlite's
SQLite thread), and RSS. The engine's ``_rebuild``, ``_page``, ``_load``,
``_load_from_log`` and ``_flush_snapshots`` are wrapped with a wall-clock timer (two
``perf_counter`` calls per call).

The machine is assumed to be small and shared: compare ratios within one run.

Usage::

    python scripts/bench_restart.py                      # N=1000000, tail 100000
    python scripts/bench_restart.py --quick              # N=20000, tail 2000, no file written
    python scripts/bench_restart.py --profile /tmp/restart-prof.txt
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import gc
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import pstats
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from actors import Customer, Engine, EngineConfig, SegmentSet, load_segments
from actors._customer import SNAPSHOT_FORMAT
from protocol import DAY, HOUR, NEVER, Event, Transition, embedded_broker, to_instant
from protocol.nats import connect, jetstream_ports
from scripts.bench_ingest import CpuSnapshot, free_port, now_us, rss_mb
from store import LoggedEvent, OutboxEntry, Snapshot, SnapshotMarks, Store

POLL = 0.01
STALL_TICK = 0.05
"""Seconds the event-loop watcher sleeps; a wake-up later than twice that is a stall."""
TEMPLATES = 2_000
BLOCK = 20_000
"""Customers per transaction while building the store."""
STOP_PART = 50_000
"""Snapshots per transaction at a clean stop (``Engine._flush_snapshots``)."""
SAMPLE = 100_000
"""Customers rewritten to compare the two part sizes."""
TAIL_BATCH = 10_000
RESULTS = Path(__file__).resolve().parent / "results" / "restart.md"

_event_encoder = msgspec.msgpack.Encoder()
_transition_encoder = msgspec.json.Encoder()
_transition_decoder = msgspec.json.Decoder(Transition)

TIMEZONES = (
    "Europe/London",
    "Europe/Paris",
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Australia/Sydney",
    "Asia/Tokyo",
)
PLANS = ("basic", "premium", "family", "student")


# --------------------------------------------------------------------------- measuring


class Timers:
    """Wall seconds and calls of coroutine methods, wrapped on the instance."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj: object, name: str) -> None:
        fn: Callable[..., Awaitable[Any]] = getattr(obj, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(obj, name, timed)

    def take(self) -> dict[str, list[float]]:
        return {k: [round(v, 4), self.calls[k]] for k, v in self.seconds.items()}


def db_size(db: Path) -> dict[str, float]:
    """MiB of the SQLite file, its WAL, the pages in use, and the snapshots table."""
    out = {
        "file": db.stat().st_size / 2**20 if db.exists() else 0.0,
        "wal": 0.0,
        "pages": 0.0,
        "snapshots_table": 0.0,
    }
    wal = Path(str(db) + "-wal")
    if wal.exists():
        out["wal"] = wal.stat().st_size / 2**20
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        (count,) = con.execute("PRAGMA page_count").fetchone()
        (size,) = con.execute("PRAGMA page_size").fetchone()
        out["pages"] = count * size / 2**20
        with contextlib.suppress(sqlite3.Error):  # dbstat is an optional SQLite feature
            (used,) = con.execute(
                "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN "
                "('snapshots', 'snapshots_by_deadline', 'sqlite_autoindex_snapshots_1')"
            ).fetchone()
            out["snapshots_table"] = used / 2**20
    return {k: round(v, 1) for k, v in out.items()}


def deadline_spread(db: Path, at: int) -> dict[str, int]:
    """How many stored snapshots have their deadline in each span after ``at``."""
    edges = [
        ("overdue", at),
        ("<1h", at + HOUR),
        ("<1d", at + DAY),
        ("<7d", at + 7 * DAY),
        ("<30d", at + 30 * DAY),
        ("later", NEVER - 1),
        ("none", NEVER),
    ]
    out: dict[str, int] = {}
    low = -NEVER
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        for name, high in edges:
            (count,) = con.execute(
                "SELECT count(*) FROM snapshots WHERE deadline > ? AND deadline <= ?",
                (low, high),
            ).fetchone()
            out[name] = int(count)
            low = high
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    root = Path(__file__).resolve().parent.parent
    git = "?"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "actors", "store", "protocol"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
        git = head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "msgspec": importlib.metadata.version("msgspec"),
        "aiosqlite": importlib.metadata.version("aiosqlite"),
        "nats_py": importlib.metadata.version("nats-py"),
        "code": git,
    }


def loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])
    return "?"


def code_digest() -> dict[str, str]:
    """Short md5 of the files a restart runs, as imported by this process."""
    import actors._customer
    import actors.engine._engine
    import actors.rules._rule
    import protocol.nats._feed
    import store._store

    out = {}
    for mod in (
        actors.engine._engine,
        actors._customer,
        actors.rules._rule,
        store._store,
        protocol.nats._feed,
    ):
        path = Path(mod.__file__ or "")
        name = f"{path.parent.name}/{path.name}"
        out[name] = hashlib.md5(path.read_bytes()).hexdigest()[:8]
    return out


def say(text: str) -> None:
    print(f"# {text}", flush=True)


# --------------------------------------------------------------------------- the store


@dataclass(slots=True)
class Template:
    """One customer built by really applying events; clones copy it."""

    events: list[Event]
    transitions: list[Transition]
    body: bytes
    """Its snapshot."""
    deadline: int | None


def template_events(rng: random.Random, cut: int) -> list[Event]:
    """A customer's timeline in [now-90d, cut), in instant order."""
    first = cut - rng.randrange(DAY, 90 * DAY)
    last = rng.randrange(first + 1, cut)
    renewal = dt.datetime.fromtimestamp(cut / 1e6, dt.UTC) + dt.timedelta(days=rng.uniform(-10, 60))
    out: list[tuple[int, str | None, dict[str, Any], dict[str, Any]]] = [
        (
            first,
            None,
            {},
            {
                "plan": rng.choice(PLANS),
                "renewal_date": renewal.date().isoformat(),
                "timezone": rng.choice(TIMEZONES),
            },
        ),
        (first, "Visit", {"location": f"site-{rng.randrange(12)}"}, {}),
    ]
    for _ in range(rng.randint(0, 2)):
        out.append(
            (rng.randrange(first, last), "Visit", {"location": f"site-{rng.randrange(12)}"}, {})
        )
    if last > first + 1:
        out.append((last, "Visit", {"location": f"site-{rng.randrange(12)}"}, {}))
    if rng.random() < 0.7:
        out.append(
            (
                rng.randrange(first, last + 1),
                "Email Opened",
                {"campaign": f"news-{rng.randrange(30)}"},
                {},
            )
        )
    if rng.random() < 0.4:
        revenue = round(rng.uniform(9, 250), 2)
        out.append(
            (
                rng.randrange(first, last + 1),
                "Order Completed",
                {"revenue": revenue, "currency": "EUR"},
                {},
            )
        )
    out.sort(key=lambda x: x[0])
    return [
        Event(
            kind="track" if name is not None else "identify",
            customer_id="t",
            name=name,
            properties=props,
            traits=traits,
            at=at,
            received=at,
            message_id=str(k),
        )
        for k, (at, name, props, traits) in enumerate(out)
    ]


def make_templates(k: int, segments: SegmentSet, cut: int) -> tuple[list[Template], float, int]:
    """K templates (``random.Random(42)``), each applied and then advanced to ``cut``.

    Returns them, the seconds it took and how many events were applied.
    """
    rng = random.Random(42)
    out: list[Template] = []
    applied = 0
    t0 = time.perf_counter()
    for j in range(k):
        events = [
            msgspec.structs.replace(e, customer_id=f"t{j}") for e in template_events(rng, cut)
        ]
        c = Customer(f"t{j}")
        transitions: list[Transition] = []
        for e in events:
            transitions += c.apply(e, segments)
        applied += len(events)
        transitions += c.advance(cut, segments)
        out.append(Template(events, transitions, c.snapshot(), c.deadline))
    return out, time.perf_counter() - t0, applied


async def build_store(log: Store, templates: list[Template], n: int) -> dict[str, Any]:
    """Append the events and transitions of N clones, a block of customers per transaction."""
    k = len(templates)
    t0 = time.perf_counter()
    cpu0 = CpuSnapshot.take()
    commit_s = 0.0
    for start in range(0, n, BLOCK):
        events: list[tuple[int, LoggedEvent]] = []
        entries: list[tuple[int, OutboxEntry]] = []
        for i in range(start, min(n, start + BLOCK)):
            t = templates[i % k]
            cid = f"c{i}"
            for j, e in enumerate(t.events):
                mid = f"{cid}-{j}"
                body = _event_encoder.encode(
                    msgspec.structs.replace(e, customer_id=cid, message_id=mid)
                )
                events.append(
                    (e.at, LoggedEvent(customer_id=cid, message_id=mid, at=e.at, body=body))
                )
            for tr in t.transitions:
                at = to_instant(tr.at)
                body = _transition_encoder.encode(msgspec.structs.replace(tr, customer_id=cid))
                entries.append(
                    (
                        at,
                        OutboxEntry(
                            customer_id=cid,
                            version=tr.version,
                            segment=tr.segment,
                            at=at,
                            body=body,
                        ),
                    )
                )
        # Interleaved by instant within the block, as a live log would be (sort is stable:
        # each customer's transitions stay in version order).
        events.sort(key=lambda x: x[0])
        entries.sort(key=lambda x: x[0])
        tc = time.perf_counter()
        await log.commit(
            [e for _, e in events],
            [o for _, o in entries],
            published_through=log.outbox.last_seq + len(entries),
        )
        commit_s += time.perf_counter() - tc
        if start // BLOCK % 10 == 9:
            say(f"  built {start + BLOCK:,} customers, {time.perf_counter() - t0:.0f} s")
    cpu1 = CpuSnapshot.take()
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "commit_seconds": round(commit_s, 2),
        "events": log.events.last_seq,
        "transitions": log.outbox.last_seq,
        "cpu_main": round(cpu1.main - cpu0.main, 2),
        "cpu_threads": round((cpu1.process - cpu1.main) - (cpu0.process - cpu0.main), 2),
    }


def snapshot_rows(customers: list[Customer], needs: str, log_seq: int) -> list[Snapshot]:
    """As ``Engine._write_snapshots`` makes them."""
    return [
        Snapshot(
            customer_id=c.customer_id,
            format=SNAPSHOT_FORMAT,
            needs=needs,
            log_seq=log_seq,
            deadline=NEVER if c.deadline is None else c.deadline,
            body=c.snapshot(),
        )
        for c in customers
    ]


async def write_snapshots(
    log: Store,
    segments: SegmentSet,
    templates: list[Template],
    ids: list[int],
    part: int,
    marks: SnapshotMarks | None,
    gc_clock: GcClock,
) -> dict[str, Any]:
    """Snapshot customers ``ids`` in parts of ``part``, one transaction each; time each step.

    ``marks`` is recorded with the last part. Actors are made part by part (from the
    template's snapshot) so the builder does not hold N of them at once.
    """
    k = len(templates)
    needs = segments.needs.fingerprint()
    decode_s = encode_s = rows_s = commit_s = 0.0
    size = 0
    smallest, largest = 1 << 30, 0
    cpu0 = CpuSnapshot.take()
    gc0 = gc_clock.take()
    for start in range(0, len(ids), part):
        chunk = ids[start : start + part]
        t0 = time.perf_counter()
        customers = [Customer.from_snapshot(f"c{i}", templates[i % k].body) for i in chunk]
        t1 = time.perf_counter()
        bodies = [c.snapshot() for c in customers]
        t2 = time.perf_counter()
        rows = snapshot_rows(customers, needs, log.events.last_seq)
        t3 = time.perf_counter()
        last = start + part >= len(ids)
        await log.commit([], [], snapshots=rows, marks=marks if last else None)
        t4 = time.perf_counter()
        decode_s += t1 - t0
        encode_s += t2 - t1
        rows_s += t3 - t2
        commit_s += t4 - t3
        for b in bodies:
            size += len(b)
            smallest = min(smallest, len(b))
            largest = max(largest, len(b))
        del customers, bodies, rows
    cpu1 = CpuSnapshot.take()
    gc1 = gc_clock.take()
    n = len(ids)
    return {
        "customers": n,
        "part": part,
        "transactions": -(-n // part),
        "from_snapshot_us": round(decode_s / n * 1e6, 2),
        "encode_us": round(encode_s / n * 1e6, 2),
        "rows_us": round(rows_s / n * 1e6, 2),
        "commit_us": round(commit_s / n * 1e6, 2),
        "commit_seconds": round(commit_s, 2),
        "bytes_mean": round(size / n, 1),
        "bytes_min": smallest,
        "bytes_max": largest,
        "cpu_main": round(cpu1.main - cpu0.main, 2),
        "cpu_threads": round((cpu1.process - cpu1.main) - (cpu0.process - cpu0.main), 2),
        "gc_seconds": round(gc1[0] - gc0[0], 2),
    }


async def append_tail(
    log: Store, segments: SegmentSet, n: int, count: int, rng: random.Random
) -> dict[str, Any]:
    """Append ``count`` events stamped now for random customers, with the transitions they
    cause (as the engine's ``_ingest`` would), and no snapshot."""
    now = now_us()
    t0 = time.perf_counter()
    state: dict[str, Customer] = {}
    transitions = 0
    for start in range(0, count, TAIL_BATCH):
        size = min(TAIL_BATCH, count - start)
        picks = [f"c{rng.randrange(n)}" for _ in range(size)]
        missing = sorted({p for p in picks if p not in state})
        for snap in await log.snapshots.of(missing):
            state[snap.customer_id] = Customer.from_snapshot(snap.customer_id, snap.body)
        logged: list[LoggedEvent] = []
        changed: list[Transition] = []
        for j, cid in enumerate(picks):
            r = rng.random()
            name, props = (
                ("Visit", {"location": f"site-{rng.randrange(12)}"})
                if r < 0.7
                else ("Email Opened", {"campaign": f"news-{rng.randrange(30)}"})
                if r < 0.9
                else (
                    "Order Completed",
                    {"revenue": round(rng.uniform(9, 250), 2), "currency": "EUR"},
                )
            )
            at = now - count + start + j  # one microsecond apart, in log order
            mid = f"tail-{log.events.last_seq + j}"
            event = Event(
                kind="track",
                customer_id=cid,
                name=name,
                properties=props,
                traits={},
                at=at,
                received=at,
                message_id=mid,
            )
            changed += state[cid].apply(event, segments)
            logged.append(
                LoggedEvent(
                    customer_id=cid, message_id=mid, at=at, body=_event_encoder.encode(event)
                )
            )
        entries = [
            OutboxEntry(
                customer_id=t.customer_id,
                version=t.version,
                segment=t.segment,
                at=to_instant(t.at),
                body=_transition_encoder.encode(t),
            )
            for t in changed
        ]
        await log.commit(logged, entries, published_through=log.outbox.last_seq + len(entries))
        transitions += len(entries)
    return {
        "events": count,
        "customers": len(state),
        "transitions": transitions,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- a restart


class GcClock:
    """Seconds the garbage collector ran, and full (generation 2) collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.full += info["generation"] == 2

    def take(self) -> tuple[float, int]:
        return self.seconds, self.full


class _ReadyMark:
    """A task status that calls ``on_started`` at the very instant the engine says it is
    started, before passing it on (``tg.start`` returns later: after the engine's next
    suspension, which may be a whole turn of its loop)."""

    def __init__(self, inner: anyio.abc.TaskStatus[None], on_started: Callable[[], None]) -> None:
        self._inner = inner
        self._on_started = on_started

    def started(self, value: None = None) -> None:
        self._on_started()
        self._inner.started()


@dataclass
class _Mark:
    """What the engine and the process look like at one instant."""

    t: float
    cpu: CpuSnapshot
    gc: tuple[float, int]
    rss: float
    customers: int
    warm: bool
    stats: dict[str, int]
    timers: dict[str, list[float]]

    @classmethod
    def take(cls, engine: Engine, timers: Timers, gc_clock: GcClock) -> _Mark:
        return cls(
            t=time.perf_counter(),
            cpu=CpuSnapshot.take(),
            gc=gc_clock.take(),
            rss=rss_mb()[0],
            customers=engine.customer_count,
            warm=engine.warm,
            stats=msgspec.structs.asdict(_Stats.of(engine)),
            timers=timers.take(),
        )

    def since(self, before: _Mark) -> dict[str, float]:
        return {
            "seconds": round(self.t - before.t, 3),
            "cpu_main": round(self.cpu.main - before.cpu.main, 2),
            "cpu_threads": round(
                (self.cpu.process - self.cpu.main) - (before.cpu.process - before.cpu.main), 2
            ),
            "gc_seconds": round(self.gc[0] - before.gc[0], 2),
            "gc_full": self.gc[1] - before.gc[1],
        }


async def restart_child(p: dict[str, Any]) -> dict[str, Any]:
    """One restart, in this (fresh) process; returns its figures (with ``failed`` set, and
    what is known so far, if the engine failed)."""
    db = Path(p["db"])
    segments = load_segments()
    out: dict[str, Any] = {"label": p["label"], "use_snapshots": p["use_snapshots"]}
    out["code"] = code_digest()
    if p["use_snapshots"]:
        out["deadlines"] = deadline_spread(db, now_us())
    gc.collect()
    gc_clock = GcClock()
    out["rss_start"] = round(rss_mb()[0])
    t = time.perf_counter()
    log = await Store.open(db)
    out["open_s"] = round(time.perf_counter() - t, 3)
    nc = await connect([p["url"]])
    timers = Timers()
    profiles: dict[str, cProfile.Profile] = {}
    marks: dict[str, _Mark] = {}
    stalls: list[tuple[float, float]] = []
    start_clock = 0
    try:
        source, sink = await jetstream_ports(nc)
        config = EngineConfig(use_snapshots=p["use_snapshots"])
        engine = Engine(source, sink, log, segments, config=config)
        for name in ("_rebuild", "_page", "_load", "_load_from_log", "_flush_snapshots"):
            timers.wrap(engine, name)

        def on_started() -> None:
            if p["profile"]:
                profiles["start to ready"].disable()
            marks["ready"] = _Mark.take(engine, timers, gc_clock)
            # Not timed: customers in memory whose deadline was due when the restart began.
            due = engine._partition._timers._due.values()
            out["overdue_at_ready"] = sum(1 for at in due if at <= start_clock)
            if p["profile"]:
                profiles["ready to caught up"] = cProfile.Profile()
                profiles["ready to caught up"].enable()

        async def run_engine(
            *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            await engine.run(task_status=_ReadyMark(task_status, on_started))

        def caught_up() -> bool:
            nxt = engine._partition._timers.next()
            return nxt is None or nxt > start_clock

        async def watch_loop() -> None:
            # How late a short sleep wakes up: the longest the event loop ran one thing
            # without a break (nats-py answers the server's pings only in the breaks).
            while True:
                t = time.perf_counter()
                await anyio.sleep(STALL_TICK)
                late = time.perf_counter() - t - STALL_TICK
                if late > STALL_TICK:
                    stalls.append((time.perf_counter(), late))

        out["rss_before"] = round(rss_mb()[0])
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_loop)
                await anyio.sleep(0)
                start_clock = now_us()
                marks["start"] = _Mark.take(engine, timers, gc_clock)
                if p["profile"]:
                    profiles["start to ready"] = cProfile.Profile()
                    profiles["start to ready"].enable()
                await tg.start(run_engine)
                out["tg_start_returned_s"] = round(time.perf_counter() - marks["start"].t, 3)
                with anyio.fail_after(p["timeout"]):
                    while not engine.warm:
                        await anyio.sleep(POLL)
                    marks["warm"] = _Mark.take(engine, timers, gc_clock)
                    # Every deadline that was due when the restart began has fired.
                    while not caught_up():
                        await anyio.sleep(POLL)
                if p["profile"]:
                    profiles["ready to caught up"].disable()
                marks["caught_up"] = _Mark.take(engine, timers, gc_clock)
                out["pending_deadlines"] = engine.pending_deadlines
                # Let the publisher catch up, so the next restart does not republish.
                with anyio.fail_after(p["timeout"]):
                    while engine.stats.transitions_published < engine.stats.transitions:
                        await anyio.sleep(POLL)
                out["dirty_at_stop"] = len(engine._partition.changed or ())
                marks["stop"] = _Mark.take(engine, timers, gc_clock)
                tg.cancel_scope.cancel()
            marks["stopped"] = _Mark.take(engine, timers, gc_clock)
        except Exception as e:
            for prof in profiles.values():
                prof.disable()
            out["failed"] = _leaf(e)
            if "start" not in marks:
                raise
            out["failed_after_s"] = round(time.perf_counter() - marks["start"].t, 3)
            out["timers_failed"] = timers.take()
        out["reconnects"] = nc.stats["reconnects"]
        out["loadavg"] = loadavg()
        out["rss_peak"] = round(rss_mb()[1])
    finally:
        await log.close()
        await nc.close()
    t0 = marks["start"].t
    out["long_stalls"] = [
        [round(at - late - t0, 2), round(late, 2)] for at, late in stalls if late >= 1.0
    ]
    if profiles:
        out["profile"] = {k: _profile_text(v) for k, v in profiles.items()}
    if "failed" in out:
        out["stalls"] = {"start to failure": round(max((x for _, x in stalls), default=0.0), 2)}
        return out

    start, ready, warm, caught = marks["start"], marks["ready"], marks["warm"], marks["caught_up"]
    stop, stopped = marks["stop"], marks["stopped"]
    if ready.warm:  # log only: the poll saw it only once tg.start had returned
        warm = ready

    def longest(a: _Mark, b: _Mark) -> float:
        return round(max((x for at, x in stalls if a.t < at <= b.t), default=0.0), 2)

    out.update(
        ready_s=round(ready.t - start.t, 3),
        warm_s=round(warm.t - start.t, 3),
        caught_up_s=round(max(caught.t, warm.t) - start.t, 3),
        stop_s=round(stopped.t - stop.t, 3),
        loaded_at_ready=ready.customers,
        loaded_at_warm=warm.customers,
        warm_at_ready=ready.warm,
        to_ready=ready.since(start),
        to_warm=warm.since(ready),
        to_caught_up=caught.since(warm),
        stopping=stopped.since(stop),
        stalls={
            "start to ready": longest(start, ready),
            "ready to warm": longest(ready, warm),
            "warm to caught up": longest(warm, caught),
            "clean stop": longest(stop, stopped),
        },
        rss_ready=round(ready.rss),
        rss_warm=round(max(warm.rss, caught.rss)),
        stats_ready=ready.stats,
        stats_warm=warm.stats,
        stats_caught_up=caught.stats,
        stats_stop=stop.stats,
        stats_end=stopped.stats,
        timers_ready=ready.timers,
        timers_warm=warm.timers,
        timers_caught_up=caught.timers,
        timers_end=stopped.timers,
    )
    return out


def _leaf(e: BaseException) -> str:
    """The innermost error of a (nested) exception group, as one line."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__module__}.{type(e).__name__}: {e}"


class _Stats(msgspec.Struct):
    """The engine's counters that matter here."""

    events_applied: int
    transitions: int
    transitions_published: int
    deadlines_fired: int
    rebuilt_events: int
    rebuilt_customers: int
    snapshots_loaded: int
    snapshots_ignored: int
    snapshots_written: int
    snapshot_rounds: int

    @classmethod
    def of(cls, engine: Engine) -> _Stats:
        s = engine.stats
        return cls(**{f: getattr(s, f) for f in cls.__struct_fields__})


def _profile_text(profiler: cProfile.Profile) -> str:
    """Top 15 by internal time, then the top 15 of shoal's own code by cumulative time."""
    out = io.StringIO()
    out.write("top 15 by internal time (tottime)\n")
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(15)
    out.write("top 15 by cumulative time, shoal code only (actors/, protocol/, store/)\n")
    own = io.StringIO()
    pstats.Stats(profiler, stream=own).sort_stats("cumulative").print_stats(
        r"/(actors|protocol|store)/_\w+\.py", 15
    )
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    out.write(own.getvalue().replace(root, ""))
    # Drop pstats' preamble lines (file names, blank lines) that carry nothing.
    return "\n".join(
        line.rstrip()
        for line in out.getvalue().splitlines()
        if line.strip()
        and "function calls" not in line
        and "Ordered by" not in line
        and "restriction" not in line
        and not line.lstrip().startswith("List reduced")
    )


async def restart(
    label: str,
    db: Path,
    url: str,
    *,
    use_snapshots: bool,
    args: argparse.Namespace,
    profile: bool = False,
) -> dict[str, Any]:
    """Run one restart in a fresh process; returns its figures."""
    params = {
        "label": label,
        "db": str(db),
        "url": url,
        "use_snapshots": use_snapshots,
        "profile": profile,
        "timeout": args.timeout,
    }
    cpu0 = CpuSnapshot.take()
    done = await anyio.run_process(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(params)],
        check=False,
    )
    cpu1 = CpuSnapshot.take()
    sys.stderr.write(done.stderr.decode(errors="replace"))
    lines = done.stdout.decode().strip().splitlines()
    result: dict[str, Any]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        errors = done.stderr.decode(errors="replace").strip().splitlines() or ["?"]
        result = {"label": label, "failed": f"exit status {done.returncode}: {errors[-1]}"}
    result["cpu_broker"] = round(cpu1.broker - cpu0.broker, 2)
    if "failed" in result:
        say(f"  {label}: FAILED after {result.get('failed_after_s', '?')} s: {result['failed']}")
    else:
        say(
            f"  {label}: ready {result['ready_s']:.2f} s ({result['loaded_at_ready']:,} "
            f"customers), warm {result['warm_s']:.2f} s, caught up {result['caught_up_s']:.2f} "
            f"s, stop {result['stop_s']:.2f} s, RSS {result['rss_warm']:,} MiB, longest "
            f"event-loop stall {max(result['stalls'].values()):.2f} s"
        )
    return result


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    args: dict[str, Any]
    machine: dict[str, Any]
    date: str
    load_start: str
    load_end: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    snapshots: dict[str, Any] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    tails: list[dict[str, Any]] = field(default_factory=list)


async def run(args: argparse.Namespace) -> Report:
    segments = load_segments()
    report = Report(
        args={k: v for k, v in vars(args).items() if k != "child"},
        machine=machine(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=loadavg(),
    )
    say(" ".join(f"{k}={v}" for k, v in report.machine.items()))
    say(
        f"customers={args.customers:,} tail={args.tail:,} templates={args.templates:,} "
        f"downtime={args.downtime} h load={report.load_start}"
    )
    n = args.customers
    with tempfile.TemporaryDirectory(prefix="shoal-bench-restart-", dir=args.tmpdir) as tmp:
        db = Path(tmp) / "shoal.db"
        port = free_port()
        async with embedded_broker(Path(tmp) / "nats", host="127.0.0.1", port=port) as url:
            # 1. the store -------------------------------------------------------------------
            cut = now_us() - int(args.downtime * HOUR)
            templates, t_templates, applied = make_templates(min(args.templates, n), segments, cut)
            say(
                f"templates: {len(templates):,} customers, {applied:,} events applied in "
                f"{t_templates:.2f} s ({t_templates / applied * 1e6:.0f} us/event)"
            )
            log = await Store.open(db)
            try:
                build = await build_store(log, templates, n)
                build.update(
                    templates=len(templates),
                    template_events=applied,
                    template_seconds=round(t_templates, 2),
                    apply_us=round(t_templates / applied * 1e6, 1),
                )
                say(
                    f"store: {build['events']:,} events, {build['transitions']:,} transitions "
                    f"in {build['seconds']:.0f} s"
                )
                build["db_before_snapshots"] = db_size(db)
                report.build = build

                # 2. snapshot cost ---------------------------------------------------------
                marks = SnapshotMarks(
                    events_through=log.events.last_seq,
                    outbox_through=log.outbox.last_seq,
                    definitions=segments.fingerprint,
                    needs=segments.needs.fingerprint(),
                )
                rss0 = rss_mb()[0]
                gc_clock = GcClock()
                full = await write_snapshots(
                    log, segments, templates, list(range(n)), STOP_PART, marks, gc_clock
                )
                full["rss_delta"] = round(rss_mb()[0] - rss0)
                say(
                    f"snapshots: all {n:,} in parts of {STOP_PART:,}: encode "
                    f"{full['encode_us']} us, commit {full['commit_us']} us per customer, "
                    f"{full['bytes_mean']:.0f} bytes each"
                )
                rng = random.Random(42)
                sample = rng.sample(range(n), min(SAMPLE, n))
                parts = {}
                for part in (5_000, STOP_PART):
                    parts[part] = await write_snapshots(
                        log, segments, templates, sample, part, None, gc_clock
                    )
                    say(
                        f"  rewrite {len(sample):,} in parts of {part:,}: commit "
                        f"{parts[part]['commit_us']} us per customer"
                    )
                report.snapshots = {
                    "full": full,
                    "rewrite": [parts[5_000], parts[STOP_PART]],
                    "db_after": db_size(db),
                    "needs_fingerprint_us": _time_fingerprint(segments),
                }
            finally:
                await log.close()
            del templates
            gc.collect()

            # 3. restarts -----------------------------------------------------------------
            say("restart a: from snapshots, no tail")
            report.restarts.append(
                await restart("a. snapshots", db, url, use_snapshots=True, args=args)
            )
            report.tails.append(await _tail(db, segments, n, args.tail, rng))
            say("restart b: from snapshots plus the tail")
            report.restarts.append(
                await restart(
                    f"b. snapshots + {args.tail:,}-event tail",
                    db,
                    url,
                    use_snapshots=True,
                    args=args,
                )
            )
            if args.profile:
                report.tails.append(await _tail(db, segments, n, args.tail, rng))
                say("restart p1: snapshots + tail, cProfile on")
                report.restarts.append(
                    await restart(
                        f"p1. snapshots + {args.tail:,}-event tail, cProfile on",
                        db,
                        url,
                        use_snapshots=True,
                        args=args,
                        profile=True,
                    )
                )
            say("restart c: from the whole log (use_snapshots=False)")
            report.restarts.append(
                await restart("c. log only", db, url, use_snapshots=False, args=args)
            )
            if args.profile and args.profile_log:
                say("restart p2: log only, cProfile on")
                report.restarts.append(
                    await restart(
                        "p2. log only, cProfile on",
                        db,
                        url,
                        use_snapshots=False,
                        args=args,
                        profile=True,
                    )
                )
            report.snapshots["db_end"] = db_size(db)
    report.load_end = loadavg()
    return report


async def _tail(
    db: Path, segments: SegmentSet, n: int, count: int, rng: random.Random
) -> dict[str, Any]:
    log = await Store.open(db)
    try:
        tail = await append_tail(log, segments, n, count, rng)
    finally:
        await log.close()
    say(
        f"tail: {tail['events']:,} events for {tail['customers']:,} customers, "
        f"{tail['transitions']:,} transitions, {tail['seconds']:.1f} s"
    )
    return tail


def _time_fingerprint(segments: SegmentSet) -> float:
    """Microseconds per ``segments.needs.fingerprint()`` (the engine calls it per snapshot
    loaded)."""
    t0 = time.perf_counter()
    for _ in range(20_000):
        segments.needs.fingerprint()
    return round((time.perf_counter() - t0) / 20_000 * 1e6, 2)


# --------------------------------------------------------------------------- report


def restart_table(restarts: list[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| restart | ready s | customers at ready | of them overdue | events replayed "
        "| warm s | caught up s | clean stop s (snapshots written) "
        "| RSS MiB: before / ready / warm |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for r in restarts:
        yield (
            f"| {r['label']} | {r['ready_s']:.2f} | {r['loaded_at_ready']:,} "
            f"| {r['overdue_at_ready']:,} | {r['stats_ready']['rebuilt_events']:,} "
            f"| {r['warm_s']:.2f} | {r['caught_up_s']:.2f} "
            f"| {r['stop_s']:.2f} ({_written_at_stop(r):,}) "
            f"| {r['rss_before']:,} / {r['rss_ready']:,} / {r['rss_warm']:,} |"
        )


def _written_at_stop(r: dict[str, Any]) -> int:
    return int(r["stats_end"]["snapshots_written"] - r["stats_stop"]["snapshots_written"])


def cpu_table(restarts: list[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| restart | span | wall s | CPU main thread s | CPU SQLite thread s "
        "| of which GC s (full collections) | deadlines fired | longest event-loop stall s |"
    )
    yield "|---|---|---:|---:|---:|---:|---:|---:|"
    for r in restarts:
        for span, key, before, after in (
            ("start to ready", "to_ready", None, "stats_ready"),
            ("ready to warm", "to_warm", "stats_ready", "stats_warm"),
            ("warm to caught up", "to_caught_up", "stats_warm", "stats_caught_up"),
            ("clean stop", "stopping", "stats_caught_up", "stats_end"),
        ):
            stall = {
                "to_ready": "start to ready",
                "to_warm": "ready to warm",
                "to_caught_up": "warm to caught up",
                "stopping": "clean stop",
            }[key]
            c = r[key]
            if key == "to_warm" and r["warm_at_ready"] or c["seconds"] < 0.005:
                continue
            fired = r[after]["deadlines_fired"] - (r[before]["deadlines_fired"] if before else 0)
            yield (
                f"| {r['label']} | {span} | {c['seconds']:.2f} | {c['cpu_main']:.2f} "
                f"| {c['cpu_threads']:.2f} | {c['gc_seconds']:.2f} ({c['gc_full']}) "
                f"| {fired:,} | {r['stalls'][stall]:.2f} |"
            )


def snapshot_table(s: dict[str, Any]) -> Iterator[str]:
    yield (
        "| write | customers | part | transactions | from_snapshot us | encode us "
        "| rows us | commit us | total us | CPU main / SQLite thread | GC s |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name, w in (
        ("all N, insert", s["full"]),
        ("sample, upsert", s["rewrite"][0]),
        ("sample, upsert", s["rewrite"][1]),
    ):
        total = w["rows_us"] + w["commit_us"]
        yield (
            f"| {name} | {w['customers']:,} | {w['part']:,} | {w['transactions']:,} "
            f"| {w['from_snapshot_us']} | {w['encode_us']} | {w['rows_us']} | {w['commit_us']} "
            f"| {total:.1f} | {w['cpu_main']:.2f} / {w['cpu_threads']:.2f} s "
            f"| {w['gc_seconds']:.2f} |"
        )


def breakdown_lines(r: dict[str, Any]) -> Iterator[str]:
    names = {
        "_rebuild": "`_rebuild` (tail, overdue pages; or the whole log)",
        "_page": "`_page` (a page of snapshots)",
        "_load": "`_load` (tail customers, and customers of events while warming)",
        "_load_from_log": "`_load_from_log`",
        "_flush_snapshots": "`_flush_snapshots` (clean stop)",
    }
    ready, warm, end = r["timers_ready"], r["timers_caught_up"], r["timers_end"]
    for key, label in names.items():
        a = ready.get(key, [0.0, 0])
        b = warm.get(key, [0.0, 0])
        c = end.get(key, [0.0, 0])
        if c[1] == 0:
            continue
        yield (
            f"| {r['label']} | {label} | {a[0]:.2f} s / {a[1]} | {b[0] - a[0]:.2f} s / "
            f"{b[1] - a[1]} | {c[0] - b[0]:.2f} s / {c[1] - b[1]} |"
        )


def markdown(report: Report, command: str) -> str:
    a = report.args
    m = report.machine
    b = report.build
    s = report.snapshots
    first = report.restarts[0]
    ok = [r for r in report.restarts if "failed" not in r]
    failed = [r for r in report.restarts if "failed" in r]
    spread = first["deadlines"]
    full = s["full"]
    all_n = full["commit_seconds"] + full["rows_us"] * a["customers"] / 1e6
    n = a["customers"]
    lines = [
        "# Restart time and snapshot cost",
        "",
        f"Script: `scripts/bench_restart.py` (its docstring says exactly what it does). "
        f"Run on {report.date}.",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine and code",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, shared with other "
        f"engineers running tests (load average {report.load_start} at the start, "
        f"{report.load_end} at the end): compare ratios within the run.",
        f"- Python {m['python']}, SQLite {m['sqlite']}, msgspec {m['msgspec']}, aiosqlite "
        f"{m['aiosqlite']}, nats-py {m['nats_py']}; the store on the local disk (temporary "
        "directory).",
        f"- Code: {m['code']}; md5 (first 8 hex digits) of the files the restarts ran: "
        + ", ".join(f"`{k}` {v}" for k, v in report.restarts[0]["code"].items())
        + (
            "."
            if all(r["code"] == report.restarts[0]["code"] for r in report.restarts)
            else " for the first restart; THE CODE CHANGED DURING THE RUN: "
            + "; ".join(f"{r['label']}: {r['code']}" for r in report.restarts)
        ),
        "",
        "## The store",
        "",
        f"- {n:,} customers cloned from {b['templates']:,} templates; "
        f"{b['template_events']:,} template events really applied with `Customer.apply` in "
        f"{b['template_seconds']} s ({b['apply_us']} us per event, default segments).",
        f"- Log: {b['events']:,} events ({b['events'] / n:.2f} per customer), outbox: "
        f"{b['transitions']:,} transitions ({b['transitions'] / n:.2f} per customer), all "
        f"published; written in {b['seconds']} s.",
        f"- Downtime {a['downtime']} h: the templates were advanced to "
        f"now - {a['downtime']} h, so deadlines that fell in the downtime (and in the minutes "
        "the build took) are overdue at restart a. Deadlines of the stored snapshots at "
        "restart a:",
        "",
        "| overdue | < 1 h | < 1 d | < 7 d | < 30 d | later | none |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{v:,} ({v / n:.1%})" for v in spread.values()) + " |",
        "",
        f"- SQLite file before the snapshots: {b['db_before_snapshots']['pages']:,} MiB; "
        f"after: {s['db_after']['pages']:,} MiB, of which the snapshots table and its "
        f"indexes {s['db_after']['snapshots_table']:,} MiB; at the end: "
        f"{s['db_end']['pages']:,} MiB (WAL {s['db_end']['wal']:,} MiB).",
        "",
        "## Snapshot cost",
        "",
        f"Per customer, in microseconds. Bytes per snapshot: {s['full']['bytes_mean']:.0f} "
        f"on average ({s['full']['bytes_min']} to {s['full']['bytes_max']}). "
        "`from_snapshot` is the builder making the actor from the template's snapshot "
        "(what loading one costs at restart, without the SQL and the checks; GC included); "
        "encode is `Customer.snapshot()` alone; rows is the list `Engine._write_snapshots` "
        "makes (encode plus the `store.Snapshot` around it); commit is "
        "`Store.commit(snapshots=...)` wall time (parameter tuples, then the SQLite "
        'thread\'s work). "total" is what the engine spends per snapshot written: rows + '
        "commit. GC is the builder's garbage collections during that write.",
        "",
        *snapshot_table(s),
        "",
        f"All {n:,} written at a clean stop's part size: {all_n:.1f} s. "
        f"`SegmentSet.needs.fingerprint()` costs {s['needs_fingerprint_us']} us a call "
        "(before commit 2884e2c the engine paid it for every snapshot it loaded).",
        "",
        "## Restarts",
        "",
        "Each restart is a fresh process. *ready* is the instant the engine calls "
        "`task_status.started()` in `await tg.start(engine.run)` (consuming events, firing "
        "deadlines); *warm* is `engine.warm` (every customer in memory); *caught up*: no "
        'deadline left that was due when the restart began ("of them overdue": customers '
        'in memory at ready with such a deadline). "events replayed" is '
        "`stats.rebuilt_events` at ready. The clean stop is `cancel` to the task group's "
        "exit; it snapshots every customer that changed.",
        "",
        *restart_table(ok),
        "",
        "Where the time goes (CPU from `/proc`: the main thread runs the event loop, "
        "decoding and the actors; the other threads are aiosqlite's SQLite thread; GC is "
        "the main thread's garbage collections, timed with `gc.callbacks`):",
        "",
        *cpu_table(ok),
        "",
        "The event-loop stall is the longest a 50 ms sleep of a watcher task overslept: the "
        "longest stretch the loop spent in one piece of synchronous work. nats-py answers "
        "the server's PINGs only between such pieces; nats-server drops a client that "
        "leaves 2 PINGs, sent every 2 minutes, unanswered.",
        "",
    ]
    for i, t in enumerate(report.tails):
        lines.append(
            f"- Tail {i + 1}: {t['events']:,} events for {t['customers']:,} customers, "
            f"{t['transitions']:,} transitions, appended in {t['seconds']} s."
        )
    if failed:
        lines += ["", "Failed restarts:", ""]
    for r in failed:
        rebuild = r.get("timers_failed", {}).get("_rebuild", ["?", 0])[0]
        lines.append(
            f"- {r['label']}: **failed** after {r.get('failed_after_s', '?')} s: "
            f"`{r['failed']}`. `_rebuild` took {rebuild} s; longest event-loop stall "
            f"{r.get('stalls', {}).get('start to failure', '?')} s; NATS reconnects "
            f"{r.get('reconnects', '?')}; stalls of 1 s or more (s from the start, s long): "
            f"{r.get('long_stalls', '?')}."
        )
    lines += ["", "Engine stats:", ""]
    for r in ok:
        lines.append(
            f"- {r['label']}: at ready {_stats_text(r['stats_ready'])}; caught up "
            f"{_stats_text(r['stats_caught_up'])}; snapshots written while running "
            f"{r['stats_stop']['snapshots_written']:,} in "
            f"{r['stats_stop']['snapshot_rounds']} complete rounds; pending deadlines "
            f"{r['pending_deadlines']:,}; "
            f"customers changed at stop {r['dirty_at_stop']:,}; log open {r['open_s']} s; "
            f"`tg.start` returned {r['tg_start_returned_s']} s after the start; "
            f"peak RSS {r['rss_peak']:,} MiB; load average at its end {r['loadavg']}; "
            f"nats-server CPU {r['cpu_broker']} s; NATS "
            f"reconnects {r['reconnects']}; stalls of 1 s or more (s from the start, s long): "
            f"{r['long_stalls'] or 'none'}."
        )
    lines += [
        "",
        "Wrapped engine methods, wall seconds / calls (nested: `_page` and `_load` run inside "
        "`_rebuild` before ready):",
        "",
        "| restart | method | start to ready | ready to caught up | clean stop |",
        "|---|---|---:|---:|---:|",
    ]
    for r in ok:
        lines += breakdown_lines(r)
    lines += ["", "## Reading", "", *reading(report), ""]
    for r in report.restarts:
        for phase, text in r.get("profile", {}).items():
            lines += [
                f"### cProfile, {r['label']}: {phase} (main thread)",
                "",
                "```",
                text,
                "```",
                "",
            ]
    return "\n".join(lines)


def _stats_text(st: dict[str, int]) -> str:
    keys = ("rebuilt_customers", "snapshots_loaded", "deadlines_fired", "transitions")
    return ", ".join(f"{k} {st[k]:,}" for k in keys)


def reading(report: Report) -> Iterator[str]:
    """Facts the figures say, written out (the run's own numbers)."""
    for r in report.restarts:
        if "cProfile" in r["label"] or "failed" in r:
            continue
        cr, cw = r["to_ready"], r["to_warm"]
        rebuild = r["timers_ready"].get("_rebuild", [0.0, 0])[0]
        busy = cr["cpu_main"] + cr["cpu_threads"]
        text = (
            f"- {r['label']}: ready in {r['ready_s']:.2f} s, of which `_rebuild` "
            f"{rebuild:.2f} s ({rebuild / r['ready_s']:.0%}; the rest is streams, "
            f"publisher and consumer set-up). CPU to ready: main thread "
            f"{cr['cpu_main']:.2f} s (GC {cr['gc_seconds']:.2f} s), SQLite thread "
            f"{cr['cpu_threads']:.2f} s ({busy / r['ready_s']:.0%} of a core on average)."
        )
        if not r["warm_at_ready"]:
            pages = r["timers_warm"].get("_page", [0.0, 0])
            before = r["timers_ready"].get("_page", [0.0, 0])
            loaded = r["loaded_at_warm"] - r["loaded_at_ready"]
            text += (
                f" Warm-up: {loaded:,} more customers in {cw['seconds']:.2f} s "
                f"({cw['seconds'] / max(loaded, 1) * 1e6:.1f} us each), `_page` "
                f"{pages[0] - before[0]:.2f} s in {pages[1] - before[1]} calls; CPU main "
                f"{cw['cpu_main']:.2f} s (GC {cw['gc_seconds']:.2f} s), SQLite thread "
                f"{cw['cpu_threads']:.2f} s."
            )
        cc = r["to_caught_up"]
        if cc["seconds"] >= 0.05:
            fired = r["stats_caught_up"]["deadlines_fired"] - r["stats_warm"]["deadlines_fired"]
            made = r["stats_caught_up"]["transitions"] - r["stats_warm"]["transitions"]
            text += (
                f" Once warm, {cc['seconds']:.2f} s more until caught up: {fired:,} deadlines "
                f"fired ({made:,} transitions), CPU main {cc['cpu_main']:.2f} s."
            )
        yield text


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers N")
    parser.add_argument(
        "--tail", type=int, default=100_000, help="events appended after the snapshots"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20000 customers, a 2000-event tail"
    )
    parser.add_argument(
        "--templates", type=int, default=TEMPLATES, help="customers really built (K)"
    )
    parser.add_argument(
        "--downtime",
        type=float,
        default=1.0,
        help="hours the engine was down: deadlines in them are overdue at restart",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="two more restarts with cProfile on; their top entries to FILE and the results",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help=f"markdown results (default {RESULTS.relative_to(RESULTS.parent.parent.parent)}; "
        "none for --quick)",
    )
    parser.add_argument("--json", metavar="FILE", help="all figures as one JSON document")
    parser.add_argument("--tmpdir", metavar="DIR", help="where the store and broker go")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds any one wait may take"
    )
    parser.add_argument(
        "--profile-log",
        action="store_true",
        help="with --profile, also profile a restart from the whole log (slow at 1M)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.customers, args.tail = 20_000, 2_000
        args.out = args.out or None
    elif args.out is None:
        args.out = str(RESULTS)
    if args.customers < 1 or args.tail < 0 or args.templates < 1:
        parser.error("--customers and --templates must be >= 1, --tail >= 0")
    return args


async def main_async(args: argparse.Namespace) -> int:
    report = await run(args)
    print()
    for line in snapshot_table(report.snapshots):
        print(line)
    print()
    ok = [r for r in report.restarts if "failed" not in r]
    for line in restart_table(ok):
        print(line)
    print()
    for line in cpu_table(ok):
        print(line)
    print()
    for r in report.restarts:
        if "failed" in r:
            print(f"FAILED: {r['label']}: {r['failed']}")
    for line in reading(report):
        print(line)
    command = "python " + " ".join([f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    if args.profile:
        texts = [
            f"## {r['label']}: {phase}\n{text}\n"
            for r in report.restarts
            for phase, text in r.get("profile", {}).items()
        ]
        Path(args.profile).write_text("\n".join(texts), encoding="utf-8")
        print(f"profiles written to {args.profile}")
    if args.out:
        Path(args.out).write_text(markdown(report, command), encoding="utf-8")
        print(f"results written to {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.__dict__, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from scripts._logging import configure_logging

    configure_logging("warning")
    if args.child:
        result = anyio.run(restart_child, json.loads(args.child))
        print(json.dumps(result), flush=True)
        return 0
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
