"""``shoal rejected``: the quarantine stream read for people and machines, and
``--republish`` once the cause is fixed, which duplicates nothing when run again. A real
nats-server and engine; the quarantined event raises through a bug injected into the actor,
as in tests/system/test_quarantine.py."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from actors import Customer
from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    REJECTED_STREAM,
    EventCause,
    Rejection,
    Transition,
    stored_event_subject,
)
from tests.helpers import NatsServer, collect, eventually, run, running_engine, segments


def stored(customer: str) -> str:
    return stored_event_subject(customer, DEFAULT_PARTITIONS)


VISITORS = segments("""
[segments.visitor]
rule = "count('Visit') >= 1"
""")
MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def visit(user: str, mid: str) -> bytes:
    return json.dumps(
        {"type": "track", "userId": user, "event": "Visit", "messageId": mid}
    ).encode()


async def shoal(*args: str) -> Any:
    return await anyio.to_thread.run_sync(partial(run, *args))


async def stream_messages(client: Client, stream: str) -> int:
    return int((await client.jetstream().stream_info(stream)).state.messages)


async def test_rejected_shows_each_rejection_with_its_reason(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    url = nats_server.url
    rejected = await collect(client, "shoal.rejected")
    async with running_engine(url, tmp_path / "shoal.db", VISITORS) as engine:
        await client.publish("shoal.events.ann", b"not json")
        # A raw escape sequence (clear the screen) must not reach the terminal as such.
        await client.publish("shoal.events.eve", b'{"type": "track", "userId": "\x1b[2J"}')
        await client.publish("shoal.events.bob", visit("bob", "b1"))
        await eventually(lambda: len(rejected.msgs) == 2 and engine.stats.events_applied == 1)

    done = await shoal("rejected", "--nats", url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6
    # The subjects the stream stored them under, with their partitions.
    ann, eve = (re.escape(stored(c)) for c in ("ann", "eve"))
    assert re.fullmatch(rf"#1  {MS}  {ann}  \(8 bytes, SHOAL_EVENTS #1\)", lines[0])
    assert lines[1].startswith("    reason   invalid JSON: ")
    assert lines[2] == "    payload  not json"
    assert re.fullmatch(rf"#2  {MS}  {eve}  \(35 bytes, SHOAL_EVENTS #2\)", lines[3])
    assert lines[5] == '    payload  {"type": "track", "userId": "\\x1b[2J"}'
    assert "\x1b" not in done.stdout
    assert done.stderr == "2 rejected event(s) in SHOAL_REJECTED\n"

    done = await shoal("rejected", "--json", "--nats", url)
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(d["seq"], d["subject"], d["payload"], d["payload_bytes"]) for d in docs] == [
        (1, stored("ann"), "not json", 8),
        (2, stored("eve"), '{"type": "track", "userId": "\x1b[2J"}', 35),
    ]
    assert docs[0]["reason"] == rejected.rejections()[0].reason
    assert docs[0]["received_at"] == msgspec.json.decode(rejected.msgs[0].data)["received_at"]

    # --from: only what was stored from then on.
    done = await shoal("rejected", "--from", "2999-01-01", "--nats", url)
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "0 rejected event(s) since 2999-01-01T00:00:00.000Z in SHOAL_REJECTED\n"
    done = await shoal("rejected", "--from", "2020-01-01T00:00:00.5Z", "--json", "--nats", url)
    assert len(done.stdout.splitlines()) == 2
    done = await shoal("rejected", "--from", "yesterday", "--nats", url)
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --from 'yesterday' is not a date (2026-01-31) or an ISO-8601 date and "
        "time (2026-01-31T09:00:00Z)\n",
    )
    done = await shoal("rejected", "--dry-run", "--nats", url)
    assert (done.returncode, done.stderr) == (2, "shoal: error: --dry-run goes with --republish\n")


async def test_republish_once_the_cause_is_fixed_and_never_twice(
    nats_server: NatsServer, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, db = nats_server.url, tmp_path / "shoal.db"
    evaluate = Customer.evaluate

    def broken(self: Customer, segments: Any, cause: Any) -> list[Transition]:
        if isinstance(cause, EventCause) and cause.message_id.startswith("boom"):
            raise RuntimeError("a bug in a rule")
        return evaluate(self, segments, cause)

    monkeypatch.setattr(Customer, "evaluate", broken)
    rejected = await collect(client, "shoal.rejected")
    async with running_engine(url, db, VISITORS) as engine:
        await client.publish("shoal.events.ann", visit("ann", "boom-1"))
        await eventually(lambda: len(rejected.msgs) == 1)
        await client.publish("shoal.events.bob", b"not json")
        # Over the engine's 64 KiB, and over what a rejection holds whole (1 MiB).
        big = b'{"type": "track", "userId": "cy", "event": "' + b"x" * 1_048_000 + b'"}'
        await client.publish("shoal.events.cy", big)
        await eventually(lambda: len(rejected.msgs) == 3)
        assert engine.customer("ann") is None
    assert [r.truncated for r in rejected.rejections()] == [False, False, True]

    # The bug is fixed (shoal upgraded): the quarantined event can go again.
    monkeypatch.undo()
    async with running_engine(url, db, VISITORS) as engine:
        events_before = await stream_messages(client, EVENTS_STREAM)
        done = await shoal("rejected", "--republish", "--dry-run", "--nats", url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "#1  would republish shoal.events.ann (--dry-run)"
        assert done.stderr == "would republish 1, skipped 2 of 3 rejected event(s)\n"
        assert await stream_messages(client, EVENTS_STREAM) == events_before

        done = await shoal("rejected", "--republish", "--nats", url)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"#1  republished  shoal.events.ann as SHOAL_EVENTS #{events_before + 1}"
        # Republished on the subject its producer used; a skipped one shows where the
        # stream stored it.
        assert lines[1].startswith(f"#2  skipped      {stored('bob')}: still invalid: invalid JSON")
        assert lines[2] == (
            f"#3  skipped      {stored('cy')}: its payload was cut when quarantined (over the "
            f"broker's maximum payload): the original was {len(big):,} bytes"
        )
        assert done.stderr == "republished 1, skipped 2 of 3 rejected event(s)\n"
        await eventually(
            lambda: (c := engine.customer("ann")) is not None and "visitor" in c.members
        )
        ann = engine.customer("ann")
        assert ann is not None and ann.count("Visit") == 1
        # Out of quarantine: the viewer no longer lists it.
        assert await stream_messages(client, REJECTED_STREAM) == 2

        # A second run sends nothing again.
        done = await shoal("rejected", "--republish", "--json", "--nats", url)
        outcomes = [json.loads(line) for line in done.stdout.splitlines()]
        assert [(o["seq"], o["outcome"]) for o in outcomes] == [(2, "skipped"), (3, "skipped")]
        assert await stream_messages(client, EVENTS_STREAM) == events_before + 1

        # Had a run stopped between the publish and the delete, the rejection would still be
        # there: the next run's publish carries the same message id, and nothing doubles.
        first = rejected.msgs[0]
        headers = {"Nats-Msg-Id": "a copy of the first rejection"}
        await client.jetstream().publish("shoal.rejected", first.data, headers=headers)
        done = await shoal("rejected", "--republish", "--json", "--nats", url)
        outcome = json.loads(done.stdout.splitlines()[-1])
        assert (outcome["outcome"], outcome["why"]) == (
            "republished",
            "the broker had it already (a repeat)",
        )
        assert await stream_messages(client, EVENTS_STREAM) == events_before + 1
        await anyio.sleep(0.5)
        assert ann.count("Visit") == 1 and engine.stats.events_duplicate == 0
        assert msgspec.json.decode(first.data, type=Rejection).subject == stored("ann")
