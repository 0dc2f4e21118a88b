"""actors.import_history, export_history and read_log: history into and out of the event log."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import msgspec

from actors import event_of, export_history, import_history, logged_event, read_log, transition_of
from protocol import (
    SECOND,
    DefinitionCause,
    Event,
    TimeCause,
    event_line,
    format_instant,
    from_instant,
    parse_timestamp,
)
from store import Store
from tests.helpers import NatsServer, eventually, running_engine, segments
from tests.history_lines import NOW, T1, T2, visit


async def test_duplicates_within_a_file_and_across_imports(tmp_path: Path) -> None:
    lines = [
        visit("a", messageId="1"),
        visit("a", T2, messageId="1"),  # same customer and id: the first one stays
        visit("b", messageId="1"),  # ids are per customer
        visit("c"),
        json.dumps(json.loads(visit("c")), indent=None, separators=(",", ":")),
        "nonsense",
    ]
    skipped: list[tuple[int, str]] = []
    async with await Store.open(tmp_path / "shoal.db") as store:
        report = await import_history(
            store,
            [(x + "\n").encode() for x in lines],
            now=NOW,
            on_skip=lambda n, r: skipped.append((n, r)),
            batch=2,  # three transactions, and a repeat across two of them
        )
        assert (report.imported, report.duplicates, report.skipped) == (3, 2, 1)
        assert [n for n, _ in skipped] == [6]
        again = await import_history(store, [(x + "\n").encode() for x in lines], now=NOW)
        assert (again.imported, again.duplicates, again.skipped) == (0, 5, 1)
        entries = [e async for part in store.events.read() for e in part]
    assert [(e.seq, e.customer_id, e.message_id[:7]) for e in entries] == [
        (1, "a", "1"),
        (2, "b", "1"),
        (3, "c", "import:"),
    ]
    assert entries[0].at == parse_timestamp(T1)


async def test_progress_counts_every_byte_and_event(tmp_path: Path) -> None:
    data = [(visit(f"c{i}") + "\n").encode() for i in range(12_000)] + [b"\n", b"bad\n"]
    seen = [0, 0]

    def progress(size: int, events: int) -> None:
        seen[0] += size
        seen[1] += events

    async with await Store.open(tmp_path / "shoal.db") as store:
        report = await import_history(store, data, now=NOW, on_progress=progress)
        assert await store.events.count() == 12_000
    assert report.imported == 12_000
    assert seen == [sum(map(len, data)), 12_000]


async def test_export_writes_the_log_as_lines_and_reads_it_as_it_stood(tmp_path: Path) -> None:
    events = [
        Event(
            kind="track",
            customer_id="a",
            name="Visit",
            properties={"n": 1},
            traits={},
            at=NOW - SECOND,
            received=NOW,
            message_id="m1",
        ),
        Event(
            kind="identify",
            customer_id="b",
            name=None,
            properties={},
            traits={"plan": "gold"},
            at=NOW,
            received=NOW,
            message_id="m2",
        ),
    ]
    out = io.BytesIO()
    progress: list[int] = []
    async with await Store.open(tmp_path / "shoal.db") as store:
        await store.commit([logged_event(e) for e in events])
        assert await export_history(store, out, on_progress=progress.append) == 2
        parts = []
        async for part in read_log(store, chunk=1):
            parts.append([event_of(e).message_id for e in part])
            # Appended while reading: left for the next reading.
            await store.commit(
                [logged_event(msgspec.structs.replace(events[0], message_id=f"late{len(parts)}"))]
            )
        assert parts == [["m1"], ["m2"]]
        assert [e.seq async for part in read_log(store) for e in part] == [1, 2, 3, 4]
    assert out.getvalue() == b"".join(event_line(e) + b"\n" for e in events)
    assert progress == [2]
    assert json.loads(out.getvalue().splitlines()[0])["messageId"] == "m1"


# --- the engine folds imported history in -------------------------------------------------


async def test_imported_history_is_applied_when_the_engine_starts(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    t0 = time.time_ns() // 1000 - 20 * SECOND
    async with await Store.open(db) as store:
        report = await import_history(
            store,
            [visit("alice", format_instant(t0), messageId="v").encode()],
            now=t0 + 20 * SECOND,
        )
        assert report.imported == 1
    rules = segments(
        """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"
"""
    )
    async with running_engine(nats_server.url, db, rules) as engine:
        await eventually(lambda: engine.stats.transitions_published == 3)
    async with await Store.open_read_only(db) as store:
        outbox = [transition_of(o) for o in await store.outbox.of_customers(["alice"])]
    assert [(t.segment, t.change, t.cause, t.at) for t in outbox] == [
        ("active", "entered", DefinitionCause(), from_instant(t0)),
        ("active", "exited", TimeCause(), from_instant(t0 + 2 * SECOND)),
        ("idle", "entered", TimeCause(), from_instant(t0 + 2 * SECOND)),
    ]
