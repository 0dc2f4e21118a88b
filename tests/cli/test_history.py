"""``shoal history``: a customer's membership intervals, from the outbox or from a replay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest
from nats.aio.client import Client

from actors import load_segments
from protocol import (
    DAY,
    SECOND,
    Cause,
    DefinitionCause,
    EventCause,
    TimeCause,
    Transition,
    event_subject,
    format_instant,
    from_instant,
    parse_timestamp,
)
from scripts._history_cmd import (
    Interval,
    membership_intervals,
    memberships_at,
    outbox_history,
    replayed_history,
)
from scripts._import_cmd import import_history
from store import EventLog, OutboxEntry
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


def at(text: str) -> datetime:
    return from_instant(parse_timestamp(text))


def tr(
    version: int, segment: str, change: str, when: str, cause: Cause, customer: str = "alice"
) -> Transition:
    return Transition(
        customer_id=customer,
        segment=segment,
        change=change,  # type: ignore[arg-type]
        at=at(when),
        cause=cause,
        version=version,
    )


# Alice: in `new` from her first visit until 30 days later; `lapsed` twice, the second time
# still; `vip` from a change of definitions. Bob enters `new`.
HISTORY = [
    tr(1, "new", "entered", "2026-01-01T10:00:00Z", EventCause(message_id="v1")),
    tr(2, "lapsed", "entered", "2026-01-15T10:00:00Z", TimeCause()),
    tr(1, "new", "entered", "2026-01-03T00:00:00Z", EventCause(message_id="b1"), "bob"),
    tr(3, "lapsed", "exited", "2026-01-20T08:30:00.5Z", EventCause(message_id="v2")),
    tr(4, "new", "exited", "2026-01-31T10:00:00Z", TimeCause()),
    tr(5, "vip", "entered", "2026-02-01T00:00:00Z", DefinitionCause()),
    tr(6, "lapsed", "entered", "2026-02-03T08:30:00.5Z", TimeCause()),
]


def stay(
    segment: str,
    entered: str,
    by: Cause,
    version: int,
    exited: str | None = None,
    exited_by: Cause | None = None,
    exited_version: int | None = None,
    customer: str = "alice",
) -> Interval:
    return Interval(
        customer_id=customer,
        segment=segment,
        entered_at=at(entered),
        entered_by=by,
        entered_version=version,
        exited_at=None if exited is None else at(exited),
        exited_by=exited_by,
        exited_version=exited_version,
    )


ALICE = [
    stay(
        "lapsed",
        "2026-01-15T10:00:00Z",
        TimeCause(),
        2,
        "2026-01-20T08:30:00.5Z",
        EventCause(message_id="v2"),
        3,
    ),
    stay("lapsed", "2026-02-03T08:30:00.5Z", TimeCause(), 6),
    stay(
        "new",
        "2026-01-01T10:00:00Z",
        EventCause(message_id="v1"),
        1,
        "2026-01-31T10:00:00Z",
        TimeCause(),
        4,
    ),
    stay("vip", "2026-02-01T00:00:00Z", DefinitionCause(), 5),
]


# --- the pure functions ------------------------------------------------------------------------


def test_intervals_per_customer_and_segment_in_any_input_order() -> None:
    intervals = membership_intervals(reversed(HISTORY))
    assert intervals == [
        *ALICE,
        stay("new", "2026-01-03T00:00:00Z", EventCause(message_id="b1"), 1, customer="bob"),
    ]
    assert membership_intervals([]) == []


@pytest.mark.parametrize(
    ("history", "problem"),
    [
        (
            [HISTORY[0], tr(2, "new", "entered", "2026-01-02T00:00:00Z", TimeCause())],
            "customer 'alice' enters 'new' at version 2 but is in it since version 1",
        ),
        (
            [HISTORY[0], tr(2, "lapsed", "exited", "2026-01-02T00:00:00Z", TimeCause())],
            "customer 'alice' leaves 'lapsed' at version 2 but is not in it",
        ),
    ],
)
def test_an_inconsistent_history_is_refused(history: list[Transition], problem: str) -> None:
    with pytest.raises(ValueError) as e:
        membership_intervals(history)
    assert str(e.value) == problem


def test_was_alice_in_the_segment_at_an_instant() -> None:
    intervals = membership_intervals(HISTORY)

    def members(when: str) -> dict[str, bool]:
        answers = memberships_at(intervals, at(when))
        return {m.segment: m.member for m in answers if m.customer_id == "alice"}

    # In from the instant of entry, out from the instant of exit.
    assert members("2026-01-01T09:59:59.999999Z") == {"new": False, "lapsed": False, "vip": False}
    assert members("2026-01-01T10:00:00Z") == {"new": True, "lapsed": False, "vip": False}
    assert members("2026-01-20T08:30:00.499999Z") == {"new": True, "lapsed": True, "vip": False}
    assert members("2026-01-20T08:30:00.5Z") == {"new": True, "lapsed": False, "vip": False}
    assert members("2026-01-31T10:00:00Z") == {"new": False, "lapsed": False, "vip": False}
    assert members("2030-01-01T00:00:00+09:00") == {"new": False, "lapsed": True, "vip": True}
    answers = memberships_at(intervals, at("2026-01-16T00:00:00Z"))
    assert [(m.customer_id, m.segment, m.member) for m in answers] == [
        ("alice", "lapsed", True),
        ("alice", "new", True),
        ("alice", "vip", False),
        ("bob", "new", True),
    ]
    assert [m.interval for m in answers[:3]] == [ALICE[0], ALICE[2], None]


# --- the command, over an outbox written with EventLog.commit ---------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store whose outbox holds HISTORY (and no events: alice is known by her outbox)."""

    async def write() -> None:
        async with await EventLog.open(tmp_path / "shoal.db") as log:
            await log.commit(
                [],
                [
                    OutboxEntry(
                        customer_id=t.customer_id,
                        version=t.version,
                        segment=t.segment,
                        at=0,
                        body=msgspec.json.encode(t),
                    )
                    for t in HISTORY
                ],
            )

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
    assert rows == [
        [
            "lapsed",
            "2026-01-15T10:00:00Z",
            "time (v2)",
            "2026-01-20T08:30:00.500000Z",
            "event v2 (v3)",
        ],
        ["lapsed", "2026-02-03T08:30:00.500000Z", "time (v6)", "(still in)", ""],
        ["new", "2026-01-01T10:00:00Z", "event v1 (v1)", "2026-01-31T10:00:00Z", "time (v4)"],
        ["vip", "2026-02-01T00:00:00Z", "definition (v5)", "(still in)", ""],
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
    assert (done.returncode, done.stdout) == (1, "")
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
        1,
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

    async with await EventLog.open_read_only(db) as log:
        published = await outbox_history(log, "alice")
        replayed = await replayed_history(log, "alice", segments, until=time.time_ns() // 1000)
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
        async with await EventLog.open(tmp_path / "shoal.db") as log:
            report = await import_history(log, [x.encode() for x in lines], now=t0 + DAY)
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
