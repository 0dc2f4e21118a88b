"""Changing segment definitions while the engine runs: Engine.apply_segments, the reloading
`shoal serve --segments FILE`, and `shoal segments validate`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client

from actors import ActorsError, DefinitionError, Engine, VirtualClock, load_segments
from protocol import (
    SECOND,
    DefinitionCause,
    EventCause,
    TimeCause,
    Transition,
    format_instant,
    to_instant,
)
from protocol.nats import jetstream_ports
from store import Store
from tests.helpers import (
    NatsServer,
    Proc,
    collect,
    eventually,
    now,
    run,
    running_engine,
    segments,
    summary,
    track,
)

VISITOR = "[segments.visitor]\nrule = \"count('Visit') >= 1\"\n"
REGULAR = "[segments.regular]\nrule = \"count('Visit') >= 2\"\n"


def identify(user: str, at: int, mid: str, **traits: Any) -> bytes:
    doc = {"type": "identify", "userId": user, "traits": traits, "messageId": mid}
    return json.dumps(doc | {"timestamp": format_instant(at)}).encode()


def of(customer: str, ts: list[Transition]) -> list[tuple[str, str, str, Any, int]]:
    return summary([t for t in ts if t.customer_id == customer])


async def test_a_new_segment_is_evaluated_at_once_for_every_customer(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", segments(VISITOR)) as engine:
        t0 = now()
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="a1"))
        await client.publish("shoal.events.alice", track("alice", at=t0 + 1, mid="a2"))
        await client.publish("shoal.events.bob", track("bob", at=t0, mid="b1"))
        await eventually(lambda: engine.stats.events_applied == 3 and len(seen.msgs) == 2)

        applied_at = now()
        assert await engine.apply_segments(segments(VISITOR + REGULAR)) == 1
        assert engine.segments.names == ("visitor", "regular")
        await eventually(lambda: len(seen.msgs) == 3)
        # The new rule applies to what comes next, too.
        await client.publish("shoal.events.bob", track("bob", mid="b2"))
        await eventually(lambda: len(seen.msgs) == 4)
        await anyio.sleep(0.2)  # nothing more may come

    ts = seen.transitions()
    assert of("alice", ts) == [
        ("alice", "visitor", "entered", EventCause(message_id="a1"), 1),
        ("alice", "regular", "entered", DefinitionCause(), 2),
    ]
    # Stamped with the instant the change took effect; true since the rule became true by
    # a replay of the log under the new rules: the second visit (issue 17, item 2).
    assert to_instant(ts[2].true_since) == t0 + 1
    assert to_instant(ts[2].at) >= applied_at > t0 + 1
    assert of("bob", ts) == [
        ("bob", "visitor", "entered", EventCause(message_id="b1"), 1),
        ("bob", "regular", "entered", EventCause(message_id="b2"), 2),
    ]
    assert [m.subject for m in seen.msgs][2] == "shoal.segments.regular.entered"


async def test_a_removed_segments_members_exit(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    before = segments(VISITOR + REGULAR)
    async with running_engine(nats_server.url, tmp_path / "shoal.db", before) as engine:
        for i in (1, 2):
            await client.publish("shoal.events.alice", track("alice", mid=f"a{i}"))
        await client.publish("shoal.events.bob", track("bob", mid="b1"))
        await eventually(lambda: len(seen.msgs) == 3)

        assert await engine.apply_segments(segments(REGULAR)) == 2
        await eventually(lambda: len(seen.msgs) == 5)
        await anyio.sleep(0.2)

    ts = seen.transitions()
    assert of("alice", ts) == [
        ("alice", "visitor", "entered", EventCause(message_id="a1"), 1),
        ("alice", "regular", "entered", EventCause(message_id="a2"), 2),
        ("alice", "visitor", "exited", DefinitionCause(), 3),
    ]
    assert of("bob", ts) == [
        ("bob", "visitor", "entered", EventCause(message_id="b1"), 1),
        ("bob", "visitor", "exited", DefinitionCause(), 2),
    ]


CHANGED = """
[segments.visitor]
rule = "count('Visit') >= 1 and count('Email Opened') >= 2"

[segments.reader]
rule = "since_last('Email Opened') < '4s'"

[segments.gold]
rule = "trait('plan') = 'gold'"
"""


async def test_a_changed_rule_reading_new_facts_is_evaluated_from_the_log(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    seen = await collect(client, "shoal.segments.>")
    after = segments(CHANGED)
    async with running_engine(nats_server.url, db, segments(VISITOR)) as engine:
        # The old rules read only visits: the engine keeps no other facts. (Later events a
        # millisecond apart: at the instant it entered, a customer cannot leave.)
        t0, ms = now() - SECOND, 1000  # in the past: not stamped ahead of receipt
        email = "Email Opened"
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="a1"))
        await client.publish("shoal.events.alice", track("alice", email, at=t0 + ms, mid="a2"))
        await client.publish("shoal.events.alice", track("alice", email, at=t0 + ms, mid="a3"))
        await client.publish("shoal.events.alice", identify("alice", t0 + ms, "a4", plan="gold"))
        await client.publish("shoal.events.bob", track("bob", at=t0, mid="b1"))
        await client.publish("shoal.events.bob", track("bob", email, at=t0 + ms, mid="b2"))
        await eventually(lambda: engine.stats.events_applied == 6 and len(seen.msgs) == 2)
        assert after.needs != engine.segments.needs

        assert await engine.apply_segments(after) == 4
        await eventually(lambda: len(seen.msgs) == 6)
        # Deadlines are re-armed under the new rules: `reader` ends 4 s after the emails.
        await eventually(lambda: len(seen.msgs) == 8, timeout=15)
        await anyio.sleep(0.2)

    ts = seen.transitions()
    assert of("alice", ts) == [
        ("alice", "visitor", "entered", EventCause(message_id="a1"), 1),
        ("alice", "reader", "entered", DefinitionCause(), 2),
        ("alice", "gold", "entered", DefinitionCause(), 3),
        ("alice", "reader", "exited", TimeCause(), 4),
    ]
    assert of("bob", ts) == [
        ("bob", "visitor", "entered", EventCause(message_id="b1"), 1),
        ("bob", "visitor", "exited", DefinitionCause(), 2),
        ("bob", "reader", "entered", DefinitionCause(), 3),
        ("bob", "reader", "exited", TimeCause(), 4),
    ]
    exits = [t for t in ts if isinstance(t.cause, TimeCause)]
    assert [to_instant(t.at) for t in exits] == [t0 + ms + 4 * SECOND] * 2

    # What the switch left is what a restart under the new definitions rebuilds: nothing
    # differs, so nothing is published.
    async with running_engine(nats_server.url, db, after):
        await anyio.sleep(0.5)
    assert len(seen.msgs) == 8


UNSEEN = '[segments.unseen]\nrule = "count() = 0"\n'


def listed(*customers: str) -> str:
    """A static list (that no rule needs to read)."""
    return f"[lists.vip]\ncustomers = {json.dumps(list(customers))}\n"


async def test_customers_of_static_lists_get_an_actor(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    start = now() + 3600 * SECOND  # the engine's clock, far from the wall clock
    clock = VirtualClock(start)
    async with running_engine(
        nats_server.url, tmp_path / "shoal.db", segments(VISITOR), clock=clock
    ) as engine:
        await client.publish("shoal.events.amy", track("amy", mid="m1"))
        await eventually(lambda: len(seen.msgs) == 1)
        amy_watermark = engine.customer("amy").watermark  # type: ignore[union-attr]

        assert await engine.apply_segments(segments(UNSEEN + listed("zed", "amy", "kim"))) == 3
        assert engine.customer_count == 3
        # A listed customer with no events is evaluated from the engine clock's now.
        assert engine.customer("zed").watermark == start  # type: ignore[union-attr]
        assert engine.customer("amy").watermark == amy_watermark  # type: ignore[union-attr]
        await eventually(lambda: len(seen.msgs) == 4)
        await anyio.sleep(0.2)

    ts = seen.transitions()
    # Known customers first, then the new ones in sorted order.
    assert summary(ts[1:]) == [
        ("amy", "visitor", "exited", DefinitionCause(), 2),
        ("kim", "unseen", "entered", DefinitionCause(), 1),
        ("zed", "unseen", "entered", DefinitionCause(), 1),
    ]
    assert [to_instant(t.at) for t in ts if t.customer_id in ("kim", "zed")] == [start, start]


async def test_customers_of_static_lists_get_an_actor_at_start(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    start = now() + 3600 * SECOND
    unseen = segments(UNSEEN + listed("zed"))
    db = tmp_path / "shoal.db"
    async with running_engine(nats_server.url, db, unseen, clock=VirtualClock(start)):
        await eventually(lambda: len(seen.msgs) == 1)
    # Restarted, the customer is known from its transition: nothing changes.
    async with running_engine(nats_server.url, db, unseen, clock=VirtualClock(start + SECOND)):
        await anyio.sleep(0.5)
    assert summary(seen.transitions()) == [("zed", "unseen", "entered", DefinitionCause(), 1)]
    assert to_instant(seen.transitions()[0].at) == start


async def test_apply_segments_needs_a_running_engine(client: Client, tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "shoal.db") as log:
        source, sink = await jetstream_ports(client)
        engine = Engine(source, sink, log, segments(VISITOR))
        with pytest.raises(ActorsError) as e:
            await engine.apply_segments(segments(REGULAR))
    assert str(e.value) == "the engine is not running"


# The command ------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    """Replace the file at once, as an editor's save does, so no half-written file is read."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_line(proc: Proc, event: str) -> dict[str, Any]:
    """The next JSON log line of ``proc`` whose event is ``event``, without its timestamp."""
    doc: dict[str, Any] = json.loads(proc.wait_err(f'"event": "{event}"'))
    doc.pop("timestamp")
    return doc


def test_serve_reloads_a_changed_file_and_keeps_the_old_one_when_invalid(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(VISITOR)
    url = nats_server.url
    serve = Proc(
        "serve", "--data-dir", str(tmp_path / "data"), "--nats", url, "--segments", str(path)
    )
    tail = None
    try:
        serve.wait_err("shoal is serving")
        tail = Proc("tail", "--nats", url)
        time.sleep(0.5)  # let tail subscribe

        def publish(user: str, mid: str) -> None:
            args = ("--customer", user, "--event", "Visit", "--message-id", mid)
            assert run("publish", "--nats", url, *args).returncode == 0

        def transitions(n: int) -> list[tuple[str, str, str, str, int]]:
            got = [json.loads(line) for line in tail.out_lines(n)]
            return [
                (t["customer_id"], t["segment"], t["change"], t["cause"]["kind"], t["version"])
                for t in got
            ]

        publish("alice", "a1")
        publish("alice", "a2")
        assert transitions(1) == [("alice", "visitor", "entered", "event", 1)]

        # An invalid file: one error line, and nothing changes.
        write(path, VISITOR + "[segments.regular]\nrule = \"count('Visit') >= 2 2\"\n")
        with pytest.raises(DefinitionError) as e:
            load_segments(path)
        expected = str(e.value)
        assert expected.startswith(f"{path}: segment 'regular': ")
        not_reloaded = "segments not reloaded, the previous ones stay in force"
        assert log_line(serve, not_reloaded) == {
            "event": not_reloaded,
            "error": expected,
            "level": "error",
        }
        publish("bob", "b1")
        assert transitions(1) == [("bob", "visitor", "entered", "event", 1)]

        # Fixed: the new segment takes effect at once.
        write(path, VISITOR + REGULAR)
        applied = log_line(serve, "segments applied")
        assert applied == {
            "event": "segments applied",
            "source": str(path),
            "segments": ["visitor", "regular"],
            "added": ["regular"],
            "removed": [],
            "customers": 2,
            "new_customers": 0,
            "rebuilt_customers": 2,
            "transitions": 1,
            "entered": 1,
            "exited": 0,
            "parked": 0,
            "level": "info",
        }
        assert transitions(1) == [("alice", "regular", "entered", "definition", 2)]

        # SIGHUP reloads it too, here with nothing to change.
        serve.popen.send_signal(signal.SIGHUP)
        assert log_line(serve, "segments applied")["transitions"] == 0
        publish("bob", "b2")
        assert transitions(1) == [("bob", "regular", "entered", "event", 2)]

        assert serve.stop(signal.SIGINT) == 0
        serve.wait_err("shoal stopped")
        assert sum(not_reloaded in line for line in serve.err) == 1  # once per change
    finally:
        serve.close()
        if tail is not None:
            tail.close()


def test_validate_ok(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(VISITOR + REGULAR)
    done = run("segments", "validate", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"{path}: ok, 2 segments (visitor, regular)\n",
        "",
    )
    path.write_text(VISITOR)
    done = run("segments", "validate", str(path))
    assert (done.returncode, done.stdout) == (0, f"{path}: ok, 1 segment (visitor)\n")


def test_validate_reports_the_problem_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(VISITOR + "[segments.lapsed]\nrule = \"since_last('Visit') >= '14 days'\"\n")
    done = run("segments", "validate", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (
        3,  # bad input
        "",
        f"shoal: error: {path}: segment 'lapsed': '14 days' is not a duration: write numbers "
        "with units s, m, h or d, like '90s', '14d' or '1d12h'\n",
    )
    missing = tmp_path / "missing.toml"
    done = run("segments", "validate", str(missing))
    assert (done.returncode, done.stdout, done.stderr) == (
        4,  # not found
        "",
        f"shoal: error: {missing}: cannot read it: [Errno 2] No such file or directory: "
        f"'{missing}'\n",
    )
