"""``shoal history``: a customer's membership intervals, from the outbox or from a replay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest
from nats.aio.client import Client

from actors import (
    Interval,
    import_history,
    load_segments,
    outbox_entry,
    outbox_history,
    replayed_history,
)
from protocol import DAY, SECOND, event_subject, format_instant, parse_timestamp
from store import Store
from tests.actors.test_history import ALICE, HISTORY
from tests.helpers import NatsServer, eventually, running_engine

SHOAL = [sys.executable, "-m", "scripts.cli"]
SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=60)


# --- the command, over an outbox written with Store.commit ---------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store whose outbox holds HISTORY (and no events: alice is known by her outbox)."""

    async def write() -> None:
        async with await Store.open(tmp_path / "shoal.db") as store:
            await store.commit([], [outbox_entry(t) for t in HISTORY])

    anyio.run(write)
    return tmp_path


def test_history_as_json_lines(data_dir: Path) -> None:
    done = run("history", "alice", "--data-dir", str(data_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        '{"customer_id":"alice","segment":"vip","entered_at":"2026-02-01T00:00:00Z",'
        '"entered_by":{"kind":"definition"},"entered_version":5,"exited_at":null,'
        '"exited_by":null,"exited_version":null}'
    )
    got = [msgspec.json.decode(x, type=Interval) for x in done.stdout.splitlines()]
    assert got == ALICE


def test_history_at_an_instant_as_json_lines(data_dir: Path) -> None:
    done = run(
        "history", "alice", "--data-dir", str(data_dir), "--json", "--at", "2026-01-16T00:00:00Z"
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(x) for x in done.stdout.splitlines()]
    assert [(a["segment"], a["member"], a["at"]) for a in answers] == [
        ("lapsed", True, "2026-01-16T00:00:00Z"),
        ("new", True, "2026-01-16T00:00:00Z"),
        ("vip", False, "2026-01-16T00:00:00Z"),
    ]
    assert answers[0]["interval"]["exited_at"] == "2026-01-20T08:30:00.500000Z"
    assert answers[2]["interval"] is None


def test_history_as_a_table(data_dir: Path) -> None:
    done = run("history", "alice", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("│")
    ]
    # Times for people: to the millisecond, always (JSON keeps the wire's RFC 3339 text).
    assert rows == [
        [
            "lapsed",
            "2026-01-15T10:00:00.000Z",
            "time (v2)",
            "2026-01-20T08:30:00.500Z",
            "event v2 (v3)",
        ],
        ["lapsed", "2026-02-03T08:30:00.500Z", "time (v6)", "(still in)", ""],
        [
            "new",
            "2026-01-01T10:00:00.000Z",
            "event v1 (v1)",
            "2026-01-31T10:00:00.000Z",
            "time (v4)",
        ],
        ["vip", "2026-02-01T00:00:00.000Z", "definition (v5)", "(still in)", ""],
    ]
    assert f"alice: segment memberships as published (the outbox of {data_dir / 'shoal.db'})" in (
        " ".join(done.stdout.split())
    )
    at_table = run("history", "alice", "--data-dir", str(data_dir), "--at", "2026-01-16")
    assert [
        [cell.strip() for cell in line.split("│")[1:3]]
        for line in at_table.stdout.splitlines()
        if line.startswith("│")
    ] == [["lapsed", "yes"], ["new", "yes"], ["vip", "no"]]


def test_unknown_customer_is_one_line(data_dir: Path) -> None:
    done = run("history", "carol", "--data-dir", str(data_dir))
    assert (done.returncode, done.stdout) == (4, "")  # not found
    assert done.stderr == f"shoal: error: no customer 'carol' in {data_dir / 'shoal.db'}\n"


def test_history_flags_are_checked(data_dir: Path, tmp_path: Path) -> None:
    done = run("history", "alice", "--data-dir", str(data_dir), "--until", "2026-01-01")
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --segments and --until go with --replay\n",
    )
    done = run("history", "alice", "--data-dir", str(data_dir), "--at", "yesterday")
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --at 'yesterday' is not a date (2026-01-31), an ISO-8601 date and time "
        "(2026-01-31T09:00:00Z) or 'now'\n",
    )
    done = run("history", "alice", "--data-dir", str(tmp_path / "nowhere"))
    assert (done.returncode, done.stderr) == (
        4,
        f"shoal: error: no event log at {tmp_path / 'nowhere' / 'shoal.db'}\n",
    )


# --- a store a real engine wrote: the outbox and a replay agree ------------------------------


async def test_replay_of_the_log_equals_what_the_engine_published(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    segments_file = tmp_path / "segments.toml"
    segments_file.write_text(SEGMENTS)
    segments = load_segments(segments_file)
    db = tmp_path / "shoal.db"
    t0 = time.time_ns() // 1000 - 20 * SECOND

    def visit(user: str, instant: int, mid: str) -> bytes:
        doc = {"type": "track", "userId": user, "event": "Visit", "messageId": mid}
        return json.dumps(doc | {"timestamp": format_instant(instant)}).encode()

    async with running_engine(nats_server.url, db, segments) as engine:
        js = client.jetstream()
        await js.publish(event_subject("alice"), visit("alice", t0, "a1"))
        await js.publish(event_subject("bob"), visit("bob", t0 + 1, "b1"))
        await js.publish(event_subject("alice"), visit("alice", t0 + 10 * SECOND, "a2"))
        # alice: active, then idle 2 s later, active again at the second visit, idle again;
        # bob: active, then idle (10 in all).
        await eventually(lambda: engine.stats.transitions_published == 10)

    async with await Store.open_read_only(db) as store:
        published = await outbox_history(store, "alice")
        replayed = await replayed_history(store, "alice", segments, until=time.time_ns() // 1000)
    assert [(t.segment, t.change, t.version) for t in published] == [
        ("active", "entered", 1),
        ("active", "exited", 2),
        ("idle", "entered", 3),
        ("active", "entered", 4),
        ("idle", "exited", 5),
        ("active", "exited", 6),
        ("idle", "entered", 7),
    ]
    assert replayed == published

    def cli(*extra: str) -> list[str]:
        done = run("history", "alice", "--data-dir", str(tmp_path), "--json", *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    from_outbox = await anyio.to_thread.run_sync(cli)
    from_replay = await anyio.to_thread.run_sync(
        lambda: cli("--replay", "--segments", str(segments_file))
    )
    assert from_replay == from_outbox
    assert [json.loads(x)["segment"] for x in from_outbox] == ["active", "active", "idle", "idle"]


def test_replay_until_an_instant_of_imported_history(tmp_path: Path) -> None:
    segments_file = tmp_path / "segments.toml"
    segments_file.write_text(SEGMENTS)
    t0 = parse_timestamp("2025-03-01T09:00:00Z")
    lines = [
        json.dumps({"type": "track", "userId": "alice", "event": "Visit", "timestamp": ts})
        for ts in (format_instant(t0), format_instant(t0 + 10 * SECOND))
    ]

    async def load() -> None:
        async with await Store.open(tmp_path / "shoal.db") as store:
            report = await import_history(store, [x.encode() for x in lines], now=t0 + DAY)
            assert report.imported == 2

    anyio.run(load)
    # The engine has not run: nothing published, but the events are known.
    done = run("history", "alice", "--data-dir", str(tmp_path), "--json")
    assert (done.returncode, done.stdout) == (0, "")
    # Stopping the clock between the visits leaves alice idle since t0 + 2 s.
    done = run(
        "history",
        "alice",
        "--data-dir",
        str(tmp_path),
        "--json",
        "--replay",
        "--segments",
        str(segments_file),
        "--until",
        format_instant(t0 + 5 * SECOND),
    )
    assert done.returncode == 0, done.stderr
    assert [(i["segment"], i["exited_at"]) for i in map(json.loads, done.stdout.splitlines())] == [
        ("active", format_instant(t0 + 2 * SECOND)),
        ("idle", None),
    ]
