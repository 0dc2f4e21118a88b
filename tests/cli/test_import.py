"""``shoal import`` and ``shoal export``: history into the events stream and out of the event
log (issue 17, item 3: through the stream, receivedAt kept, an export round-trips)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from actors import VirtualClock, event_of, load_segments, logged_event
from actors.population import generate, write_history
from protocol import (
    DAY,
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    SECOND,
    Delivery,
    Event,
    event_from_line,
    is_control_subject,
    parse_timestamp,
)
from protocol.nats import connect, read_stream
from store import Store
from tests.helpers import NatsServer, Proc, declare_streams, eventually, free_port, running_engine
from tests.history_lines import NOW, T1, T2, line, visit

SHOAL = [sys.executable, "-m", "scripts.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], input=stdin, capture_output=True, text=True, timeout=60)


async def logged(db: Path) -> list[Event]:
    async with await Store.open_read_only(db) as store:
        return [event_of(e) async for part in store.events.read() for e in part]


async def streamed(url: str, subject: str = EVENTS_WILDCARD) -> list[Delivery]:
    nc = await connect([url])
    try:
        return [d async for chunk in read_stream(nc, EVENTS_STREAM, subject) for d in chunk]
    finally:
        await nc.close()


def summary(events: list[Event]) -> list[tuple[Any, ...]]:
    return [
        (e.customer_id, e.message_id, e.kind, e.name, e.at, e.properties, e.traits) for e in events
    ]


# --- the command, as a user runs it ----------------------------------------------------------


def test_import_reports_bad_lines_exactly_and_publishes_the_good_ones(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    declare_streams(nats_server.url)
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
    done = run("import", str(history), "--nats", nats_server.url)
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
    assert err[6:] == [
        "imported 3 event(s), 0 duplicate(s), 6 line(s) skipped; the engine applies them "
        "once it reaches the import's end"
    ]
    stored = anyio.run(streamed, nats_server.url)
    deliveries = [d for d in stored if not is_control_subject(d.subject)]
    events = [d.event(received=int(d.received_at or 0)) for d in deliveries]
    (import_id,) = {d.import_id for d in deliveries}
    # A begin and an end marker in each partition, around the events.
    markers = [d for d in stored if is_control_subject(d.subject)]
    assert sorted(d.subject for d in markers) == sorted(
        f"shoal.events.{p}.ctl.import.{import_id}.{stage}"
        for p in range(DEFAULT_PARTITIONS)
        for stage in ("begin", "end")
    )
    begins = [d.stream_sequence for d in markers if d.subject.endswith(".begin")]
    ends = [d.stream_sequence for d in markers if d.subject.endswith(".end")]
    seqs = [d.stream_sequence for d in deliveries]
    assert max(begins) < min(seqs) and max(seqs) < min(ends)
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


def test_import_from_stdin_of_good_lines_exits_0(nats_server: NatsServer) -> None:
    declare_streams(nats_server.url)
    lines = visit("a") + "\n" + visit("b") + "\n" + visit("a") + "\n"
    done = run("import", "-", "--nats", nats_server.url, stdin=lines)
    assert (done.returncode, done.stderr) == (
        0,
        "imported 2 event(s), 1 duplicate(s), 0 line(s) skipped; the engine applies them "
        "once it reaches the import's end\n",
    )
    # Imported again: the broker drops the repeats (its duplicate window).
    again = run("import", "-", "--nats", nats_server.url, stdin=lines)
    assert again.stderr.startswith("imported 0 event(s), 3 duplicate(s), 0 line(s) skipped")


def test_import_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    done = run("import", str(tmp_path / "nope.jsonl"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 4  # not found
    assert done.stderr == (
        f"shoal: error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory\n"
    )
    assert not (tmp_path / "data").exists()  # no store is created for nothing


def test_export_then_import_with_no_engine_running_then_serve_round_trips_exactly(
    tmp_path: Path, procs: list[Proc]
) -> None:
    first = tmp_path / "first" / "shoal.db"
    # A log as an engine writes it: in receive order (import publishes in that order).
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
            received=NOW,  # late, and received with the first: file order kept
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
    # No engine runs: import starts the data directory's embedded broker for the import.
    second, port = tmp_path / "second", str(free_port())
    done = run("import", str(dump), "--data-dir", str(second), "--port", port)
    assert (done.returncode, done.stderr) == (
        0,
        "imported 3 event(s), 0 duplicate(s), 0 line(s) skipped; the next `shoal serve` "
        "applies them\n",
    )
    # The next serve applies it.
    serve = Proc("serve", "--data-dir", str(second), "--port", port)
    procs.append(serve)
    serve.wait_err("import applied")
    assert serve.stop() == 0
    assert summary(anyio.run(logged, second / "shoal.db")) == summary(originals)
    # receivedAt kept (issue 17, item 3): exported again, the same file byte for byte.
    assert run("export", "--data-dir", str(second)).stdout == dump.read_text()


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


@pytest.mark.parametrize("customers", [40])
def test_a_file_replayed_equals_the_file_imported_then_replayed(
    tmp_path: Path, nats_server: NatsServer, customers: int
) -> None:
    """Issue 17, item 3: late events (received after their timestamp) replay in the same order
    from the file and from the log it was imported into."""
    history = tmp_path / "h.jsonl"
    with history.open("wb") as out:
        write_history(generate(customers, 40, 7), out)
    text = history.read_bytes()
    assert b'"receivedAt"' in text
    late = [json.loads(x) for x in text.splitlines()]
    assert any(d["timestamp"] != d["receivedAt"] for d in late)
    declare_streams(nats_server.url)
    data = tmp_path / "data"

    async def imported() -> None:
        last = max(parse_timestamp(d["receivedAt"]) for d in late)
        async with running_engine(
            nats_server.url,
            data / "shoal.db",
            load_segments(None),
            clock=VirtualClock(last + DAY),
        ) as engine:
            done = await anyio.to_thread.run_sync(
                lambda: run("import", str(history), "--nats", nats_server.url)
            )
            assert done.returncode == 0, done.stderr
            await eventually(lambda: engine.stats.imports_applied == 1, timeout=60)

    anyio.run(imported)
    from_file = run("replay", str(history), "--transitions", str(tmp_path / "a.jsonl"))
    from_log = run("replay", "--data-dir", str(data), "--transitions", str(tmp_path / "b.jsonl"))
    assert from_file.returncode == from_log.returncode == 0, from_file.stderr + from_log.stderr
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert from_file.stdout == from_log.stdout


def test_import_wait_returns_once_the_running_engine_applied_it(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data, port = tmp_path / "data", str(free_port())
    serve = Proc("serve", "--data-dir", str(data), "--port", port)
    procs.append(serve)
    serve.wait_err("shoal is serving")
    history = tmp_path / "history.jsonl"
    history.write_text("\n".join(visit(c, messageId=f"{c}-1") for c in ("ann", "bob", "cy")) + "\n")
    done = run("import", str(history), "--data-dir", str(data), "--port", port, "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "imported 3 event(s), 0 duplicate(s), 0 line(s) skipped; the engine applied them"
    )
    # Applied when it returned: the status lists it, and the customers are there.
    status = run("status", "--json", "--data-dir", str(data), "--nats", f"nats://127.0.0.1:{port}")
    reply = json.loads(status.stdout)
    assert reply["imports_open"] == []
    assert len(reply["imports_applied"]) == 1
    assert reply["imports_applied"][0] in done.stderr
    assert reply["customers"] == 3
