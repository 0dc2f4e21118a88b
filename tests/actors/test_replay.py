"""``shoal replay`` and ``actors.replay``: the live engine's transitions from its log, byte for
byte the same run after run, backtests of other definitions, sizes over time and the chart."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from actors import Replay, event_of, load_segments, logged_event, replay, transition_of
from protocol import (
    DAY,
    HOUR,
    SECOND,
    Event,
    EventCause,
    TimeCause,
    Transition,
    events_from_lines,
    format_instant,
    from_instant,
    to_instant,
)
from scripts import cli
from scripts._replay_cmd import size_chart
from store import Store
from tests.helpers import NatsServer, collect, eventually, running_engine, segments

ROOT = Path(__file__).resolve().parents[2]
SHOAL = [sys.executable, "-m", "scripts.cli"]
PNG = b"\x89PNG\r\n\x1a\n"

LIVE = """
[segments.active]
rule = "since_last('Visit') < '1s'"

[segments.regular]
rule = "count('Visit', within='2s') >= 2"

[segments.idle]
rule = "since_last('Visit') >= '1s'"

[segments.premium]
rule = "trait('plan') == 'premium'"
"""

BACKTEST = """
[segments.twice]
rule = "count('Visit') >= 2"

[segments.lapsed]
rule = "since_last('Visit') >= '3s'"
"""

_transition = msgspec.json.Decoder(Transition)


def now() -> int:
    return time.time_ns() // 1000


def track(user: str, name: str = "Visit") -> bytes:
    return json.dumps({"type": "track", "userId": user, "event": name}).encode()


def identify(user: str, **traits: Any) -> bytes:
    return json.dumps({"type": "identify", "userId": user, "traits": traits}).encode()


def by_version(ts: Iterable[Transition]) -> list[Transition]:
    return sorted(ts, key=lambda t: (t.customer_id, t.version))


def transitions_in(path: Path) -> list[Transition]:
    return [_transition.decode(line) for line in path.read_bytes().splitlines()]


async def shoal(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    done = await anyio.run_process(
        [*SHOAL, *args], cwd=ROOT, check=False, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done


async def logged_events(db: Path) -> list[Event]:
    async with await Store.open_read_only(db) as store:
        return [event_of(e) async for chunk in store.events.read() for e in chunk]


async def live_run(nats_server: NatsServer, client: Client, data: Path) -> list[Transition]:
    """Run an engine with data in ``data`` on LIVE's second-scale rules while three customers
    send events (no timestamps: event time is receive time) until every deadline has fired
    and every transition is published; return what it published."""
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, data / "shoal.db", segments(LIVE)) as engine:
        await client.publish("shoal.events.alice", track("alice"))
        await client.publish("shoal.events.bob", track("bob"))
        await client.publish("shoal.events.carol", identify("carol", plan="premium"))
        await anyio.sleep(0.4)
        await client.publish("shoal.events.alice", track("alice"))
        await client.publish("shoal.events.carol", track("carol", "Email Opened"))
        await anyio.sleep(0.4)
        await client.publish("shoal.events.bob", track("bob"))
        await client.publish("shoal.events.carol", identify("carol", plan="basic"))
        await client.flush()

        # Settled: all applied, nothing left to fire, everything published and received.
        def settled() -> bool:
            s = engine.stats
            return (
                s.events_applied == 7
                and engine.pending_deadlines == 0
                and s.transitions_published == s.transitions
                and len(seen.msgs) == s.transitions
            )

        await eventually(settled)
    return seen.transitions()


# Replay equals live ------------------------------------------------------------------------------


async def test_replay_of_a_live_log_equals_what_the_engine_published(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    published = await live_run(nats_server, client, data)
    stopped = now()
    seg_file = tmp_path / "live.toml"
    seg_file.write_text(LIVE)
    events = await logged_events(data / "shoal.db")
    last = max(e.received for e in events)
    # Events, time and both changes of one instant are all there to compare.
    kinds = {(t.segment, t.change, type(t.cause)) for t in published}
    assert ("active", "exited", TimeCause) in kinds
    assert ("idle", "entered", TimeCause) in kinds
    assert ("regular", "entered", EventCause) in kinds
    assert ("premium", "exited", EventCause) in kinds
    assert any(to_instant(t.at) > last for t in published)

    # The command, until the last event (its default): all but what came after it.
    out = tmp_path / "replayed.jsonl"
    await shoal("replay", "--data-dir", str(data), "--segments", str(seg_file),
                "--transitions", str(out))  # fmt: skip
    up_to_last = [t for t in published if to_instant(t.at) <= last]
    assert by_version(transitions_in(out)) == by_version(up_to_last)

    # With the clock run on to when the engine stopped: everything it published.
    await shoal("replay", str(data / "shoal.db"), "--segments", str(seg_file),
                "--until", format_instant(stopped), "--transitions", str(out))  # fmt: skip
    assert by_version(transitions_in(out)) == by_version(published)

    # The Python API gives the same.
    api = list(replay(events, load_segments(seg_file), until=stopped))
    assert by_version(api) == by_version(published)
    # ... in the replay's order: each event's own, and time-caused ones in time order.
    assert api == transitions_in(out)
    timed = [to_instant(t.at) for t in api if isinstance(t.cause, TimeCause)]
    assert timed == sorted(timed)


async def test_backtest_of_new_definitions_on_a_live_log(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    published = await live_run(nats_server, client, data)
    db = data / "shoal.db"
    before = db.read_bytes()
    backtest = tmp_path / "backtest.toml"
    backtest.write_text(BACKTEST)
    events = await logged_events(db)
    end = max(e.received for e in events) + 10 * SECOND

    out = tmp_path / "backtest.jsonl"
    await shoal("replay", "--data-dir", str(data), "--segments", str(backtest),
                "--until", format_instant(end), "--transitions", str(out))  # fmt: skip

    # Expected from the log alone: `twice` at each customer's second visit, `lapsed` 3 s
    # after the last one (the visits are well under 3 s apart).
    expected: list[Transition] = []
    for customer in ("alice", "bob"):
        visits = [e for e in events if e.customer_id == customer and e.name == "Visit"]
        assert len(visits) == 2
        expected += [
            Transition(customer_id=customer, segment="twice", change="entered",
                       at=from_instant(visits[1].at),
                       cause=EventCause(message_id=visits[1].message_id), version=1),
            Transition(customer_id=customer, segment="lapsed", change="entered",
                       at=from_instant(visits[1].at + 3 * SECOND), cause=TimeCause(),
                       version=2),
        ]  # fmt: skip
    assert by_version(transitions_in(out)) == by_version(expected)
    # The live store is untouched, its outbox still what the engine published.
    assert db.read_bytes() == before
    async with await Store.open_read_only(db) as store:
        outbox = [transition_of(o) async for c in store.outbox.read() for o in c]
    assert by_version(outbox) == by_version(published)


# Determinism ------------------------------------------------------------------------------------


def history(seed: int, customers: int = 40, events: int = 400) -> str:
    """JSON lines of varied events under the default segments, stamped over 120 days."""
    rng = random.Random(seed)
    t0 = to_instant(from_instant(0).replace(year=2026))
    lines = []
    for i in range(events):
        user = f"c{rng.randrange(customers)}"
        at = t0 + rng.randrange(120 * DAY)
        doc: dict[str, Any] = {"userId": user, "timestamp": format_instant(at)}
        if rng.random() < 0.15:
            doc |= {"type": "identify", "traits": {
                "renewal_date": format_instant(at + rng.randrange(40 * DAY))[:10],
                "timezone": rng.choice(["Europe/Paris", "America/New_York", "UTC"]),
                "plan": rng.choice(["basic", "premium"]),
            }}  # fmt: skip
        else:
            name = rng.choice(
                ["Visit", "Visit", "Visit", "Order Completed", "Email Opened", "Email Link Clicked"]
            )
            doc |= {"type": "track", "event": name, "properties": {"club": rng.choice("ns")}}
        if rng.random() < 0.5:
            doc["messageId"] = f"m{i}"
        lines.append(json.dumps(doc))
    return "\n".join(lines) + "\n"


async def test_two_replays_are_byte_identical_whatever_the_hash_seed(tmp_path: Path) -> None:
    source = tmp_path / "history.jsonl"
    source.write_text(history(5))
    outs = []
    for seed in ("0", "4242"):
        tr, sz = tmp_path / f"t{seed}.jsonl", tmp_path / f"s{seed}.csv"
        await shoal(
            *("replay", str(source), "--transitions", str(tr), "--sizes", str(sz)),
            *("--every", "1d", "--until", "2026-06-01"),
            env={"PYTHONHASHSEED": seed},
        )
        outs.append((tr.read_bytes(), sz.read_bytes()))
    assert outs[0] == outs[1]
    transitions, sizes = outs[0]
    assert transitions.count(b"\n") > 100
    assert sizes.startswith(b"instant,new_customer,inactive_14d,")
    assert len(sizes.splitlines()) > 100

    # The Python API, fed the same file, writes the same bytes.
    events = events_from_lines(source.read_bytes().splitlines())
    until = to_instant(from_instant(0).replace(year=2026, month=6))
    api = replay(events, load_segments(), until=until)
    assert b"".join(msgspec.json.encode(t) + b"\n" for t in api) == transitions


# Sizes, summary and chart -----------------------------------------------------------------------

SMALL = """
[segments.active]
rule = "since_last('Visit') < '1d'"

[segments.idle]
rule = "since_last('Visit') >= '2d'"

[segments.premium]
rule = "trait('plan') == 'premium'"
"""


def small_history() -> str:
    return "\n".join(
        json.dumps(e)
        for e in [
            {"type": "track", "userId": "alice", "event": "Visit",
             "timestamp": "2026-01-01T10:00:00Z", "messageId": "a1"},
            {"type": "track", "userId": "bob", "event": "Visit",
             "timestamp": "2026-01-02T09:00:00Z", "messageId": "b1"},
            # Out of order in the file: replayed at its instant.
            {"type": "identify", "userId": "alice", "traits": {"plan": "premium"},
             "timestamp": "2026-01-01T12:00:00+01:00", "messageId": "a2"},
            {"type": "track", "userId": "dan", "event": "Visit",
             "timestamp": "2026-01-06T00:00:00Z", "messageId": "d1"},
        ]
    )  # fmt: skip


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``shoal ARGS`` in this process (logging left alone: other tests' output stays put)."""
    monkeypatch.setattr(cli, "configure_logging", lambda level, **_: None)
    return cli.main(args)


def test_sizes_summary_and_window_of_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, seg = tmp_path / "h.jsonl", tmp_path / "s.toml"
    source.write_text(small_history())
    seg.write_text(SMALL)
    sizes, tr = tmp_path / "sizes.csv", tmp_path / "t.jsonl"
    code = run_main(["replay", str(source), "--segments", str(seg), "--from", "2026-01-03",
                     "--until", "2026-01-08T12:00:00", "--every", "1d", "--sizes", str(sizes),
                     "--transitions", str(tr)], monkeypatch)  # fmt: skip
    assert code == 0
    assert sizes.read_text().splitlines() == [
        "instant,active,idle,premium",
        "2026-01-03T00:00:00Z,1,0,1",  # what came before --from is the state
        "2026-01-04T00:00:00Z,0,1,1",  # alice idle since 01-03 10:00
        "2026-01-05T00:00:00Z,0,2,1",
        "2026-01-06T00:00:00Z,1,2,1",  # dan's visit at exactly this instant counts
        "2026-01-07T00:00:00Z,0,2,1",
        "2026-01-08T00:00:00Z,0,3,1",
    ]
    # Only the window's transitions; versions count from the first event all the same.
    assert [(t.customer_id, t.segment, t.change, format_instant(to_instant(t.at)), t.version)
            for t in transitions_in(tr)] == [
        ("bob", "active", "exited", "2026-01-03T09:00:00Z", 2),
        ("alice", "idle", "entered", "2026-01-03T10:00:00Z", 4),
        ("bob", "idle", "entered", "2026-01-04T09:00:00Z", 3),
        ("dan", "active", "entered", "2026-01-06T00:00:00Z", 1),
        ("dan", "active", "exited", "2026-01-07T00:00:00Z", 2),
        ("dan", "idle", "entered", "2026-01-08T00:00:00Z", 3),
    ]  # fmt: skip
    # In a pipe, the summary is JSON lines: the window's counts, members at --until.
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"segment": "active", "entered": 1, "exited": 2, "members": 0},
        {"segment": "idle", "entered": 3, "exited": 0, "members": 3},
        {"segment": "premium", "entered": 0, "exited": 0, "members": 1},
    ]
    assert err == ""


def test_transitions_to_stdout_move_the_summary_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, seg = tmp_path / "h.jsonl", tmp_path / "s.toml"
    source.write_text(small_history())
    seg.write_text(SMALL)
    assert run_main(["replay", str(source), "--segments", str(seg), "--transitions", "-"],
                    monkeypatch) == 0  # fmt: skip
    out, err = capsys.readouterr()
    # Until the last event (dan's visit): everything up to then, nothing after.
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(t["customer_id"], t["segment"], t["change"], t["at"]) for t in lines][-2:] == [
        ("bob", "idle", "entered", "2026-01-04T09:00:00Z"),
        ("dan", "active", "entered", "2026-01-06T00:00:00Z"),
    ]
    assert json.loads(err.splitlines()[0]) == {
        "segment": "active", "entered": 3, "exited": 2, "members": 1,
    }  # fmt: skip


async def test_chart_is_a_png_with_each_line_labelled_with_its_segment(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    source, seg, png = tmp_path / "h.jsonl", tmp_path / "s.toml", tmp_path / "sizes.png"
    source.write_text(small_history())
    seg.write_text(SMALL)
    await shoal("replay", str(source), "--segments", str(seg), "--until", "2026-01-10",
                "--every", "6h", "--chart", str(png))  # fmt: skip
    assert png.read_bytes().startswith(PNG)
    assert png.stat().st_size > 5_000

    names = ("active", "idle", "premium")
    t0 = to_instant(from_instant(0).replace(year=2026))
    fig = size_chart(names, [t0, t0 + HOUR, t0 + 2 * HOUR], [[0, 1, 2], [1, 1, 2], [1, 0, 3]])
    # Each name at the end of its line (in the order of the sizes there), in its colour.
    (ax,) = fig.axes
    labels = [(t.get_text().strip(), t.get_color()) for t in ax.texts]
    lines = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert labels == [("idle", lines["idle"]), ("active", lines["active"]),
                      ("premium", lines["premium"])]  # fmt: skip


# Bad input --------------------------------------------------------------------------------------


def test_a_missing_event_log_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["replay", "--data-dir", str(tmp_path / "nowhere")], monkeypatch) == 4
    assert capsys.readouterr().err == (
        f"shoal: error: no event log at {tmp_path / 'nowhere' / 'shoal.db'} "
        "(give `shoal serve`'s --data-dir, or a FILE of events)\n"
    )


def test_bad_lines_are_reported_and_the_good_ones_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seg = tmp_path / "s.toml"
    seg.write_text(SMALL)
    good = '{"type":"track","userId":"%s","event":"Visit","timestamp":"2026-01-01T10:00:00Z"}'
    source = tmp_path / "h.jsonl"
    source.write_text("\n".join([
        good % "alice",
        "not json",
        '{"type":"track","userId":"carol","event":"Visit"}',
        "",
        "[1, 2]",
        good % "",
        '{"type":"track","event":"Visit","timestamp":"2026-01-01T10:00:00Z"}',
        '{"type":"track","userId":"dan","event":"Visit","timestamp":"yesterday"}',
        '{"type":"page","userId":"erin","timestamp":"2026-01-01T10:00:00Z"}',
        good % "alice",
        good % "bob",
    ]) + "\n")  # fmt: skip
    tr = tmp_path / "t.jsonl"
    assert run_main(["replay", str(source), "--segments", str(seg), "--transitions", str(tr)],
                    monkeypatch) == 3  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "line 2: invalid JSON: JSON is malformed: invalid character (byte 4); skipped",
        "line 3: missing required field `timestamp` (a file has no receive time: each event "
        "needs its instant); skipped",
        "line 5: invalid event: Expected `object`, got `array`; skipped",
        "line 6: invalid `userId`: a customer id cannot be empty; skipped",
        "line 7: missing required field `userId`; skipped",
        "line 8: timestamp 'yesterday' is not an ISO-8601 date and time with a UTC offset "
        "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z); skipped",
        "line 9: unknown type 'page': expected 'track' or 'identify'; skipped",
        "line 10: the same event as line 1; applied once",
        "7 line(s) skipped",
    ]
    assert [(t.customer_id, t.segment, t.change) for t in transitions_in(tr)] == [
        ("alice", "active", "entered"),
        ("bob", "active", "entered"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--every", "1x"], "--every '1x' is not a duration: write numbers with units s, m, h "
         "or d, like '90s', '14d' or '1d12h'"),
        (["--every", "0s"], "--every '0s' must be a positive duration"),
        (["--every=-1d"], "--every '-1d' must be a positive duration"),
        (["--from", "soon"], "--from 'soon' is not a date (2026-01-31) or an ISO-8601 date and "
         "time (2026-01-31T09:00:00Z)"),
        (["--from", "2026-02-01", "--until", "2026-01-01"],
         "--from 2026-02-01 is after --until 2026-01-01"),
        (["--transitions", "-", "--sizes", "-"],
         "--transitions and --sizes cannot both go to stdout"),
        (["--data-dir", "elsewhere"], "give a FILE or --data-dir, not both"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "h.jsonl"
    source.write_text(small_history())
    assert run_main(["replay", str(source), *args], monkeypatch) == 2
    assert capsys.readouterr().err == f"shoal: error: {message}\n"


def test_chart_without_matplotlib_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, png = tmp_path / "h.jsonl", tmp_path / "c.png"
    source.write_text(small_history())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    assert run_main(["replay", str(source), "--chart", str(png)], monkeypatch) == 2
    assert capsys.readouterr().err == (
        "shoal: error: --chart needs matplotlib: pip install 'shoal[chart]'\n"
    )
    assert not png.exists()


# The API ----------------------------------------------------------------------------------------


def test_replay_in_pieces_equals_replay_in_one_call() -> None:
    events = events_from_lines(history(11, customers=10, events=120).encode().splitlines())
    until = events[-1].received + 30 * DAY
    whole = list(replay(events, load_segments(), until=until))
    r = Replay(load_segments())
    pieces: list[Transition] = []
    for i in range(0, len(events), 7):
        for e in events[i : i + 7]:
            pieces += r.apply(e)
        assert r.now == events[min(i + 7, len(events)) - 1].received - 1
    pieces += r.advance(until)
    assert r.now == until
    assert pieces == whole
    assert r.customers == len({e.customer_id for e in events})


async def test_a_log_out_of_receive_order_replays_in_log_order_with_a_note(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shoal.db"
    t0 = to_instant(from_instant(0).replace(year=2026))
    visits = [("bob", t0 + 4 * DAY), ("alice", t0 + 10 * HOUR)]  # alice's was received first
    async with await Store.open(db) as store:
        await store.commit(
            [
                logged_event(Event(kind="track", customer_id=c, name="Visit", properties={},
                                   traits={}, at=at, received=at, message_id=c))
                for c, at in visits
            ]
        )  # fmt: skip
    seg, tr = tmp_path / "s.toml", tmp_path / "t.jsonl"
    seg.write_text(SMALL)
    done = await shoal("replay", str(db), "--segments", str(seg), "--transitions", str(tr))
    # The clock never goes back: alice's visit applies at bob's, then her deadlines fire.
    assert [(t.customer_id, t.segment, t.change, format_instant(to_instant(t.at)))
            for t in transitions_in(tr)] == [
        ("bob", "active", "entered", "2026-01-05T00:00:00Z"),
        ("alice", "active", "entered", "2026-01-01T10:00:00Z"),
        ("alice", "active", "exited", "2026-01-02T10:00:00Z"),
        ("alice", "idle", "entered", "2026-01-03T10:00:00Z"),
    ]  # fmt: skip
    assert done.stderr.decode().splitlines() == [
        "note: 1 event(s) of the log were received before events logged ahead of them "
        "(imported history?); a replay applies events in log order"
    ]
