"""``shoal serve --retain``: the event log is cut behind the retention, and an engine
rebuilt from what is left (``--rebuild``: bases plus the log after the cut) answers as before.

Real nats-server and ``shoal`` processes. History is imported with its receive instants
(``receivedAt``), 20 days of it, so that a 5-day retention has something to cut at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio

from protocol import DAY, DEFAULT_PARTITIONS, EVENTS_STREAM, HOUR, format_instant, partition
from protocol.nats import connect
from tests.helpers import NatsServer, Proc, declare_streams, now, run

RULES = """
[segments.regular]
rule = "count('Visit') >= 8"

[segments.veteran]
rule = "since_first() >= '15d'"

[segments.recent]
rule = "count('Visit', within='3d') >= 1"

[segments.buyer]
rule = "count('Buy') >= 2"
"""
SEGMENTS = ("regular", "veteran", "recent", "buyer")
RETAIN = 5 * DAY


def _history(end: int) -> str:
    lines = []
    for day in range(20):
        for i in range(6):
            at = end - (20 - day) * DAY + i * HOUR
            if (day + i) % 2 == 0 and not (i == 3 and day > 15):  # c3 stops after the cut
                name = "Visit"
            elif (day * i) % 7 == 1:
                name = "Buy"
            else:
                continue
            stamp = format_instant(at)
            lines.append(
                json.dumps(
                    {
                        "type": "track",
                        "userId": f"c{i}",
                        "event": name,
                        "messageId": f"h-{day}-{i}",
                        "timestamp": stamp,
                        "receivedAt": stamp,
                    }
                )
            )
    return "\n".join(lines) + "\n"


def _members(url: str) -> dict[str, str]:
    out = {}
    for segment in SEGMENTS:
        done = run("members", segment, "--nats", url)
        assert done.returncode == 0, done.stderr
        out[segment] = done.stdout
    return out


def _cut(db: Path) -> tuple[dict[str, Any], int, int]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        (mark,) = c.execute("SELECT value FROM meta WHERE key = 'log_cut'").fetchone()
        (bases,) = c.execute("SELECT count(*) FROM bases").fetchone()
        (events,) = c.execute("SELECT count(*) FROM events").fetchone()
    return json.loads(mark), bases, events


def _imported(url: str, tmp_path: Path) -> tuple[Path, int]:
    """The segments file, written; 20 days of history imported through the stream, and how
    many events."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    history = tmp_path / "history.jsonl"
    history.write_text(_history(now()))
    declare_streams(url)
    done = run("import", str(history), "--nats", url)
    assert done.returncode == 0, done.stderr
    return rules, len(history.read_text().splitlines())


def test_serve_retain_cuts_the_log_and_a_rebuild_answers_the_same(
    tmp_path: Path, nats_server: NatsServer, procs: list[Proc]
) -> None:
    url = nats_server.url
    rules, imported = _imported(url, tmp_path)
    data = tmp_path / "data"
    args = ("--nats", url, "--data-dir", str(data), "--segments", str(rules))
    serve = Proc("serve", *args, "--retain", "5d", "--snapshot-interval", "1")
    procs.append(serve)
    serve.wait_err("import applied", timeout=60)
    serve.wait_err("event log cut for the first time", timeout=60)
    # The cut goes on to the events received 5 days ago, a part per turn.
    mark, _, _ = _cut(data / "shoal.db")
    for _ in range(100):
        mark, bases, events = _cut(data / "shoal.db")
        if mark["at"] >= now() - RETAIN - DAY:
            break
        time.sleep(0.2)
    assert mark["at"] >= now() - RETAIN - DAY
    assert 0 < events < imported and bases == 6
    before = _members(url)
    assert all(before[s].strip() for s in SEGMENTS), before
    assert serve.stop() == 0

    # From the bases and the log after the cut alone: the same answers.
    again = Proc("serve", *args, "--retain", "5d", "--rebuild")
    procs.append(again)
    again.wait_err("shoal is serving", timeout=60)
    assert _members(url) == before

    # A window longer than the retention is refused, with the segment named.
    longer = tmp_path / "longer.toml"
    longer.write_text(RULES + "\n[segments.month]\nrule = \"count('Visit', within='30d') >= 1\"\n")
    done = run("segments", "validate", str(longer), "--retain", "5d")
    assert done.returncode == 3
    assert "segment 'month': `count('Visit', within=30d)` reads 30d back" in done.stderr

    # A replay beside the running engine starts from the bases, and says how far back.
    done = run("replay", "--data-dir", str(data), "--segments", str(rules))
    assert done.returncode == 0, done.stderr
    assert "note: the event log is cut (retention) at" in done.stderr
    # Split over processes, the bases go to their customers' workers: the same replay.
    split = run("replay", "--data-dir", str(data), "--segments", str(rules), "--processes", "2")
    assert split.returncode == 0, split.stderr
    assert (split.stdout, split.stderr) == (done.stdout, done.stderr)
    for i in range(6):  # each one's memberships at the cut, then its changes after it
        done = run(
            "history", f"c{i}", "--data-dir", str(data), "--replay", "--segments", str(rules)
        )
        assert done.returncode == 0, done.stderr
        assert "from the event log's cut at" in " ".join(done.stdout.split())
    done = run("export", "--data-dir", str(data), "-o", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr
    assert f"exported {events} event(s)" in done.stderr
    assert "note: the event log is cut (retention): events received up to" in done.stderr
    assert again.stop() == 0


def _stream_messages(url: str) -> int:
    async def count() -> int:
        nc = await connect([url])
        try:
            info = await nc.jetstream().stream_info(EVENTS_STREAM)
            return int(info.state.messages or 0)
        finally:
            await nc.close()

    return anyio.run(count)


def test_the_events_stream_is_cut_and_a_new_owner_answers_the_same(
    tmp_path: Path, nats_server: NatsServer, procs: list[Proc]
) -> None:
    """With ``--retain``, each partition's events up to what its snapshot's bases hold are
    removed from ``SHOAL_EVENTS``. Another engine taking the partitions over from those
    snapshots (the first one gone) answers as the first did, and so does a rebuild of its
    store from the bases it took over plus the events it logged after them."""
    url = nats_server.url
    rules, imported = _imported(url, tmp_path)
    stored = _stream_messages(url)
    assert stored >= imported  # (and the import's markers)

    a = Proc(*_engine(url, tmp_path / "a", "a", rules), "--retain", "5d")
    procs.append(a)
    a.wait_err("import applied", timeout=60)
    a.wait_err("event log cut for the first time", timeout=60)
    for _ in range(150):
        mark, _, _ = _cut(tmp_path / "a" / "shoal.db")
        if mark["at"] >= now() - RETAIN - DAY:
            break
        time.sleep(0.2)
    # Then each customer's partition cut from the stream (after a snapshot with its bases).
    waiting = {partition(f"c{i}", DEFAULT_PARTITIONS) for i in range(6)}
    while waiting:
        waiting.discard(json.loads(a.wait_err("events stream cut", timeout=30))["partition"])
    left = _stream_messages(url)
    assert 0 < left < stored
    before = _members(url)
    assert all(before[s].strip() for s in SEGMENTS), before
    assert a.stop() == 0

    # Another engine takes every partition over from its snapshot: the history the stream
    # no longer holds comes from the bases the snapshots carry.
    b = Proc(*_engine(url, tmp_path / "b", "b", rules), "--retain", "5d")
    procs.append(b)
    b.wait_err("shoal is serving", timeout=60)
    assert _members(url) == before
    mark_b, bases_b, events_b = _cut(tmp_path / "b" / "shoal.db")
    assert bases_b == 6 and events_b < imported
    assert mark_b["at"] >= mark["at"] - DAY and mark_b["partitions"]
    assert b.stop() == 0

    # Its store rebuilt from those bases and its log: the same answers.
    again = Proc(*_engine(url, tmp_path / "b", "b", rules), "--retain", "5d", "--rebuild")
    procs.append(again)
    again.wait_err("shoal is serving", timeout=60)
    assert _members(url) == before
    assert again.stop() == 0


def _engine(url: str, data: Path, engine_id: str, rules: Path) -> tuple[str, ...]:
    return (
        "serve", "--nats", url, "--data-dir", str(data), "--engine-id", engine_id,
        "--segments", str(rules), "--snapshot-interval", "1", "--lease-ttl", "2",
    )  # fmt: skip
