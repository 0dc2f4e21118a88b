"""``shoal import`` and ``shoal export``: history into and out of the event log."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import pytest

from protocol import (
    SECOND,
    DefinitionCause,
    Event,
    InvalidEvent,
    TimeCause,
    Transition,
    format_instant,
    from_instant,
    parse_timestamp,
)
from scripts._import_cmd import event_from_line, event_of, import_history, logged_event
from store import EventLog
from tests.helpers import NatsServer, eventually, running_engine, segments

SHOAL = [sys.executable, "-m", "scripts.cli"]
NOW = parse_timestamp("2025-06-01T09:00:00Z")
T1 = "2025-05-01T10:00:00Z"
T2 = "2025-05-02T10:00:00.250000+01:00"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def line(**fields: Any) -> str:
    return json.dumps(fields)


def visit(user: str, ts: str = T1, **extra: Any) -> str:
    return line(type="track", userId=user, event="Visit", timestamp=ts, **extra)


async def logged(db: Path) -> list[Event]:
    async with await EventLog.open_read_only(db) as log:
        return [event_of(e) async for part in log.read_events() for e in part]


def summary(events: list[Event]) -> list[tuple[Any, ...]]:
    return [
        (e.customer_id, e.message_id, e.kind, e.name, e.at, e.properties, e.traits) for e in events
    ]


# --- the command, as a user runs it ----------------------------------------------------------


def test_import_reports_bad_lines_exactly_and_keeps_the_good_ones(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text(
        "\n".join(
            [
                visit("alice", messageId="a1", properties={"club": "north"}),
                '{"type": "track", "userId": "bob", ',
                line(type="track", event="Visit", timestamp=T1),
                visit("bob", messageId="b1"),
                line(type="track", userId="bob", event="Visit"),
                "",
                line(type="page", userId="bob", name="Home", timestamp=T1),
                line(type="track", userId="bob", timestamp=T1),
                visit("bob", "2999-01-01T00:00:00Z"),
                line(type="identify", userId="bob", traits={"plan": "gold"}, timestamp=T2),
            ]
        )
        + "\n"
    )
    db = tmp_path / "data" / "shoal.db"
    done = run("import", str(history), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert err[:5] == [
        "line 2: invalid JSON: Input data was truncated; skipped",
        "line 3: missing required field `userId`; skipped",
        "line 5: missing required field `timestamp` (a file has no receive time: each event "
        "needs its instant); skipped",
        "line 7: unknown type 'page': expected 'track' or 'identify'; skipped",
        "line 8: missing required field `event` (the event name) on a track event; skipped",
    ]
    # The future is measured from the wall clock, so only the shape of this one is fixed.
    assert re.fullmatch(
        r"line 9: timestamp '2999-01-01T00:00:00Z' is [0-9.]+ s ahead of the time the event "
        r"was received \(\S+Z\); at most 300 s ahead is allowed; skipped",
        err[5],
    )
    assert err[6:] == ["imported 3 event(s), 0 duplicate(s), 6 line(s) skipped"]
    events = anyio.run(logged, db)
    assert summary(events) == [
        ("alice", "a1", "track", "Visit", parse_timestamp(T1), {"club": "north"}, {}),
        ("bob", "b1", "track", "Visit", parse_timestamp(T1), {}, {}),
        (
            "bob",
            events[2].message_id,
            "identify",
            None,
            parse_timestamp(T2),
            {},
            {"plan": "gold"},
        ),
    ]
    # History has no receive time of its own: the timestamp stands for it.
    assert [e.received for e in events] == [e.at for e in events]
    assert events[2].message_id.startswith("import:")


def test_import_from_stdin_of_good_lines_exits_0(tmp_path: Path) -> None:
    done = run(
        "import", "-", "--data-dir", str(tmp_path), stdin=visit("a") + "\n" + visit("b") + "\n"
    )
    assert (done.returncode, done.stderr) == (
        0,
        "imported 2 event(s), 0 duplicate(s), 0 line(s) skipped\n",
    )


def test_import_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    done = run("import", str(tmp_path / "nope.jsonl"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2
    assert done.stderr == (
        f"shoal: error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory\n"
    )
    assert not (tmp_path / "data").exists()  # no store is created for nothing


async def test_import_while_the_store_is_locked_is_one_line(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text(visit("alice") + "\n")
    db = tmp_path / "shoal.db"
    async with await EventLog.open(db) as log:  # as `shoal serve` holds it
        done = await anyio.to_thread.run_sync(
            lambda: run("import", str(history), "--data-dir", str(tmp_path))
        )
        assert done.returncode == 1
        assert done.stderr == (
            f"shoal: error: {db} is in use by another shoal engine; stop it, or give this one "
            "another --data-dir\n"
        )
        assert await log.count_events() == 0


def test_export_then_import_gives_the_same_events(tmp_path: Path) -> None:
    first = tmp_path / "first" / "shoal.db"
    originals = [
        Event(
            kind="track",
            customer_id="ann.lee@example.com",
            name="Order Completed",
            properties={"total": 12.5, "items": [1, 2], "note": "café"},
            traits={},
            at=NOW - 5 * SECOND + 7,
            received=NOW,
            message_id="js:1@1",
        ),
        Event(
            kind="identify",
            customer_id="zoë",
            name=None,
            properties={},
            traits={"plan": "gold", "renewal_date": "2026-12-01", "gone": None},
            at=NOW - 3 * SECOND,
            received=NOW - 3 * SECOND,
            message_id="m-2",
        ),
        Event(
            kind="track",
            customer_id="bob",
            name="Visit",
            properties={},
            traits={},
            at=NOW,
            received=NOW + 1,
            message_id="ünï",
        ),
    ]

    async def write() -> None:
        async with await EventLog.open(first) as log:
            await log.commit([logged_event(e) for e in originals])

    anyio.run(write)
    exported = run("export", "--data-dir", str(first.parent))
    assert (exported.returncode, exported.stderr) == (0, "exported 3 event(s)\n")
    lines = exported.stdout.splitlines()
    assert json.loads(lines[0]) == {
        "type": "track",
        "userId": "ann.lee@example.com",
        "event": "Order Completed",
        "properties": {"total": 12.5, "items": [1, 2], "note": "café"},
        "timestamp": "2025-06-01T08:59:55.000007Z",
        "messageId": "js:1@1",
        "receivedAt": "2025-06-01T09:00:00Z",
    }
    assert json.loads(lines[1])["traits"] == {
        "plan": "gold",
        "renewal_date": "2026-12-01",
        "gone": None,
    }
    assert "event" not in json.loads(lines[1])

    dump = tmp_path / "dump.jsonl"
    assert run("export", "--data-dir", str(first.parent), "--output", str(dump)).returncode == 0
    assert dump.read_text() == exported.stdout
    done = run("import", str(dump), "--data-dir", str(tmp_path / "second"))
    assert (done.returncode, done.stderr) == (
        0,
        "imported 3 event(s), 0 duplicate(s), 0 line(s) skipped\n",
    )
    assert summary(anyio.run(logged, tmp_path / "second" / "shoal.db")) == summary(originals)


async def test_export_beside_a_writer_reads_the_log_as_it_stood(tmp_path: Path) -> None:
    db = tmp_path / "shoal.db"
    async with await EventLog.open(db) as log:
        await log.import_events([logged_event(event_from_line(visit("a").encode(), now=NOW))])
        done = await anyio.to_thread.run_sync(lambda: run("export", "--data-dir", str(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["userId"] for x in done.stdout.splitlines()] == ["a"]


def test_export_of_a_missing_store_is_one_line(tmp_path: Path) -> None:
    done = run("export", "--data-dir", str(tmp_path))
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: no event log at {tmp_path / 'shoal.db'}\n",
    )


# --- the Python API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "invalid JSON: Input data was truncated"),
        ("[]", "invalid event: Expected `object`, got `array`"),
        (line(type="track", event="Visit", timestamp=T1), "missing required field `userId`"),
        (
            line(type="track", userId=7, event="Visit", timestamp=T1),
            "invalid event: Expected `str | null`, got `int` - at `$.userId`",
        ),
        (visit(""), "invalid `userId`: a customer id cannot be empty"),
        (
            line(type="track", userId="a", event="Visit"),
            "missing required field `timestamp` (a file has no receive time: each event "
            "needs its instant)",
        ),
        (
            line(type="alias", userId="a", timestamp=T1),
            "unknown type 'alias': expected 'track' or 'identify'",
        ),
        (
            line(type="track", userId="a", timestamp=T1),
            "missing required field `event` (the event name) on a track event",
        ),
        (
            visit("a", "2025-06-01T09:05:00.000001Z"),
            "timestamp '2025-06-01T09:05:00.000001Z' is 300.000001 s ahead of the time the "
            "event was received (2025-06-01T09:00:00Z); at most 300 s ahead is allowed",
        ),
        (
            visit("a", "2026-11-22 09:00"),
            "timestamp '2026-11-22 09:00' is not an ISO-8601 date and time with a UTC offset "
            "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
        ),
        (visit("a", messageId=""), "field `messageId` must not be empty when given"),
    ],
)
def test_each_bad_line_has_the_reason_a_live_event_would(text: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as e:
        event_from_line(text.encode(), now=NOW)
    assert e.value.reason == reason


def test_a_timestamp_a_little_ahead_counts_from_now() -> None:
    event = event_from_line(visit("a", "2025-06-01T09:04:00Z").encode(), now=NOW)
    assert (event.at, event.received) == (NOW, NOW)


def test_message_id_without_one_follows_the_content_not_its_spelling() -> None:
    def message_id(text: str) -> str:
        return event_from_line(text.encode(), now=NOW).message_id

    one = message_id(f'{{"type":"track","userId":"a","event":"V","timestamp":"{T1}"}}')
    same = message_id(f'{{ "timestamp": "{T1}", "event": "V", "userId": "a", "type": "track" }}')
    assert one == same
    assert re.fullmatch(r"import:[0-9a-f]{32}", one)
    assert message_id(f'{{"type":"track","userId":"a","event":"W","timestamp":"{T1}"}}') != one


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
    async with await EventLog.open(tmp_path / "shoal.db") as log:
        report = await import_history(
            log,
            [(x + "\n").encode() for x in lines],
            now=NOW,
            on_skip=lambda n, r: skipped.append((n, r)),
            batch=2,  # three transactions, and a repeat across two of them
        )
        assert (report.imported, report.duplicates, report.skipped) == (3, 2, 1)
        assert [n for n, _ in skipped] == [6]
        again = await import_history(log, [(x + "\n").encode() for x in lines], now=NOW)
        assert (again.imported, again.duplicates, again.skipped) == (0, 5, 1)
        entries = [e async for part in log.read_events() for e in part]
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

    async with await EventLog.open(tmp_path / "shoal.db") as log:
        report = await import_history(log, data, now=NOW, on_progress=progress)
        assert await log.count_events() == 12_000
    assert report.imported == 12_000
    assert seen == [sum(map(len, data)), 12_000]


# --- the engine folds imported history in -------------------------------------------------


async def test_imported_history_is_applied_when_the_engine_starts(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    t0 = time.time_ns() // 1000 - 20 * SECOND
    async with await EventLog.open(db) as log:
        report = await import_history(
            log, [visit("alice", format_instant(t0), messageId="v").encode()], now=t0 + 20 * SECOND
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
    async with await EventLog.open_read_only(db) as log:
        outbox = [
            msgspec.json.decode(o.body, type=Transition)
            for o in await log.customer_transitions(["alice"])
        ]
    assert [(t.segment, t.change, t.cause, t.at) for t in outbox] == [
        ("active", "entered", DefinitionCause(), from_instant(t0)),
        ("active", "exited", TimeCause(), from_instant(t0 + 2 * SECOND)),
        ("idle", "entered", TimeCause(), from_instant(t0 + 2 * SECOND)),
    ]
