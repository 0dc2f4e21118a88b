"""``shoal import`` and ``shoal export``: history into and out of the event store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio.to_thread

from actors import event_of, logged_event
from protocol import (
    SECOND,
    Event,
    event_from_line,
    parse_timestamp,
)
from store import Store
from tests.history_lines import NOW, T1, T2, line, visit

SHOAL = [sys.executable, "-m", "scripts.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], input=stdin, capture_output=True, text=True, timeout=60)


async def logged(db: Path) -> list[Event]:
    async with await Store.open_read_only(db) as store:
        return [event_of(e) async for part in store.events.read() for e in part]


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
    assert done.returncode == 3  # bad input
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
    assert done.returncode == 4  # not found
    assert done.stderr == (
        f"shoal: error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory\n"
    )
    assert not (tmp_path / "data").exists()  # no store is created for nothing


async def test_import_while_the_store_is_locked_is_one_line(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text(visit("alice") + "\n")
    db = tmp_path / "shoal.db"
    async with await Store.open(db) as store:  # as `shoal serve` holds it
        done = await anyio.to_thread.run_sync(
            lambda: run("import", str(history), "--data-dir", str(tmp_path))
        )
        assert done.returncode == 1
        assert done.stderr == (
            f"shoal: error: {db} is in use by another shoal engine; stop it, or give this one "
            "another --data-dir\n"
        )
        assert await store.events.count() == 0


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
        async with await Store.open(first) as store:
            await store.commit([logged_event(e) for e in originals])

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
    async with await Store.open(db) as store:
        await store.import_events([logged_event(event_from_line(visit("a").encode(), now=NOW))])
        done = await anyio.to_thread.run_sync(lambda: run("export", "--data-dir", str(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["userId"] for x in done.stdout.splitlines()] == ["a"]


def test_export_of_a_missing_store_is_one_line(tmp_path: Path) -> None:
    done = run("export", "--data-dir", str(tmp_path))
    assert (done.returncode, done.stderr) == (
        4,
        f"shoal: error: no event log at {tmp_path / 'shoal.db'}\n",
    )
