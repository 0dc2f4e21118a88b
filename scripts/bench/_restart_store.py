"""``restart``'s store: each clone's events and transitions in the log and the outbox, its
snapshots written as the engine writes them (with the cost of each step), a tail of events
appended after them, and what the store looks like (sizes, deadlines).
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec

from actors import Customer, SegmentSet, logged_event, outbox_entry, snapshot_row
from protocol import DAY, HOUR, NEVER, Event, Transition
from store import LoggedEvent, OutboxEntry, SnapshotMarks, Store

from ._common import CpuSnapshot, GcClock, now_us, say
from ._stores import Template

BLOCK = 20_000
"""Customers per transaction while building the store."""
TAIL_BATCH = 10_000
"""Events per transaction of a tail."""


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
                clone = msgspec.structs.replace(e, customer_id=cid, message_id=f"{cid}-{j}")
                events.append((e.at, logged_event(clone)))
            for tr in t.transitions:
                entry = outbox_entry(msgspec.structs.replace(tr, customer_id=cid))
                entries.append((entry.at, entry))
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
        bodies = [c.snapshot(outcomes=True) for c in customers]
        t2 = time.perf_counter()
        # The rows as the engine makes them: each actor encoded again, inside its row.
        seq = log.events.last_seq
        rows = [snapshot_row(c, needs=needs, log_seq=seq) for c in customers]
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
            logged.append(logged_event(event))
        entries = [outbox_entry(t) for t in changed]
        await log.commit(logged, entries, published_through=log.outbox.last_seq + len(entries))
        transitions += len(entries)
    return {
        "events": count,
        "customers": len(state),
        "transitions": transitions,
        "seconds": round(time.perf_counter() - t0, 2),
    }
