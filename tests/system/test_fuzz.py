"""Fuzzing a running engine: seeded hostile input (JSON structure, types, unicode, sizes,
subjects) with valid events interleaved, published on one raw connection so any subject
bytes can be sent. The engine never stops; every hostile input is rejected on
``shoal.rejected`` with a reason (matched by stream sequence); every valid event is in the log
exactly once, and nothing else is.

``SHOAL_FUZZ_INPUTS`` (default 50,000) and ``SHOAL_FUZZ_SEED`` (default 20261205, printed) set
the run; a long run::

    SHOAL_FUZZ_INPUTS=1000000 SHOAL_FUZZ_SEED=1 pytest -p no:cacheprovider --timeout 7200 \\
        tests/system/test_fuzz.py -s
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import string
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from actors import Engine
from protocol import (
    EVENTS_STREAM,
    MAX_FUTURE_SKEW,
    REJECTED_SUBJECT,
    Event,
    Rejection,
    event_subject,
    format_instant,
)
from protocol._limits import (
    EARLIEST,
    MAX_DEPTH,
    MAX_ID_CHARS,
    MAX_ITEMS,
    MAX_KEYS,
    MAX_NAME_CHARS,
    MAX_STRING_CHARS,
    known_timezones,
)
from store import Store
from tests.helpers import NatsServer, eventually, now, running_engine, segments

SEGMENTS = segments("""
[segments.weekender]
rule = "count('Visit', within='60d', days=['sat', 'sun']) >= 1"

[segments.evening]
rule = "count('Visit', within='30d', hours=[18, 19, 20, 21]) >= 2"

[segments.pro]
rule = "trait('plan') == 'pro'"

[segments.regular]
rule = "count('Visit', within='7d') >= 3"

[segments.buyer]
rule = "count('Order Completed') >= 1 and since_last('Order Completed') < '30d'"
""")

ZONES = sorted(known_timezones())[:: max(1, len(known_timezones()) // 40)] + ["UTC"]
NAMES = ["Visit", "Order Completed", "Email Opened", "Visit", "Visit"]
BATCH = 500
"""Inputs published between two round trips to the broker."""
_event_decoder = msgspec.msgpack.Decoder(Event)
_rejection_decoder = msgspec.json.Decoder(Rejection)


# Random values ------------------------------------------------------------------------------


def text(rng: random.Random, most: int = 12) -> str:
    """Short text from all over Unicode (no surrogates: JSON cannot carry them)."""
    pools = [
        string.ascii_letters,
        'é中文😀\u200f\u0000\t\n"\\%.*> ',
        "".join(chr(c) for c in range(0x80, 0x800, 7)),
    ]
    out = []
    for _ in range(rng.randrange(most + 1)):
        if rng.random() < 0.05:
            c = rng.randrange(0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


def value(rng: random.Random, depth: int) -> Any:
    """A JSON value within the limits, nested at most ``depth`` more levels."""
    r = rng.random()
    if depth > 0 and r < 0.1:
        return [value(rng, depth - 1) for _ in range(rng.randrange(4))]
    if depth > 0 and r < 0.2:
        return {text(rng): value(rng, depth - 1) for _ in range(rng.randrange(4))}
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randrange(-(2**63), 2**63),
            rng.randrange(-1000, 1000),
            rng.uniform(-1, 1) * 1e308,
            rng.random(),
            -0.0,
            text(rng),
            "2026-01-01",
        ]
    )


def values(rng: random.Random) -> dict[str, Any]:
    return {text(rng) or "k": value(rng, 4) for _ in range(rng.randrange(5))}


UNREAD = b"shoal.events.>"
"""A subject the stream stores without a partition and no consumer of the engine reads."""
CUSTOMERS = [f"c{i}" for i in range(150)] + [
    "ann.lee@example.com",
    "a b",
    "100%",
    "zoë",
    "客户",
    "😀",
    "x*y>z",
    "tab\there",
]


def stamp(rng: random.Random, received: int) -> str:
    at = rng.randrange(EARLIEST, received)
    offset = rng.choice(["Z", "+01:00", "-04:30", "+14:00", "-12:00"])
    text_ = format_instant(at)
    if offset == "Z":
        return text_
    # The same instant written at another offset.
    h, m = int(offset[1:3]), int(offset[4:])
    delta = timedelta(hours=h, minutes=m) * (1 if offset[0] == "+" else -1)
    dt = datetime.fromisoformat(text_.replace("Z", "+00:00")).astimezone(timezone(delta))
    return dt.isoformat()


def valid(rng: random.Random, i: int, received: int) -> tuple[bytes, bytes]:
    customer = rng.choice(CUSTOMERS)
    doc: dict[str, Any] = {"userId": customer, "messageId": f"v{i}"}
    if rng.random() < 0.7:
        doc |= {"type": "track", "event": rng.choice(NAMES) if rng.random() < 0.8 else text(rng)}
        doc["event"] = doc["event"] or "E"
        if rng.random() < 0.5:
            doc["properties"] = values(rng)
    else:
        traits = values(rng)
        traits["plan"] = rng.choice(["pro", "free", None])
        if rng.random() < 0.5:
            traits["timezone"] = rng.choice([*ZONES, None])
        else:
            traits.pop("timezone", None)
        doc |= {"type": "identify", "traits": traits}
    if rng.random() < 0.5:
        doc["timestamp"] = stamp(rng, received)
    if rng.random() < 0.2:
        doc["context"] = values(rng)
    return event_subject(customer).encode(), json.dumps(doc).encode()


# Hostile inputs: each is refused by a rule of the README ------------------------------------


def deep(n: int) -> str:
    return "[" * n + "]" * n


def hostile(rng: random.Random, received: int) -> tuple[bytes, bytes]:
    subject, body = valid(rng, -1, received)
    doc = json.loads(body)
    del doc["messageId"]
    key = "properties" if doc["type"] == "track" else "traits"
    kind = rng.randrange(20)
    raw: bytes | None = None
    if kind == 0:  # not JSON, or not an object
        raw = rng.choice(
            [
                rng.randbytes(rng.randrange(64)),
                body[: rng.randrange(len(body))],
                b"[1, 2]",
                b'"text"',
                b"null",
                b"",
            ]
        )
    elif kind == 1:  # nested too deep, a little or a lot
        n = rng.choice([MAX_DEPTH, MAX_DEPTH + 5, 1000, 20_000])
        raw = (
            json.dumps({**doc, key: {"a": 0}})
            .encode()
            .replace(b'"a": 0', b'"a": ' + deep(n).encode())
        )
    elif kind == 2:  # an integer over 64 bits
        big = rng.choice([2**63, -(2**63) - 1, 10**30, 10 ** rng.randrange(19, 400)])
        doc[key] = {"n": [big] if rng.random() < 0.5 else big}
    elif kind == 3:  # a number no float holds
        raw = json.dumps({**doc, key: {"f": 0}}).encode().replace(b'"f": 0', b'"f": -1e999')
    elif kind == 4:  # strings too long
        what = rng.randrange(4)
        if what == 0:
            doc[key] = {"s": "x" * (MAX_STRING_CHARS + 1)}
        elif what == 1:
            doc[key] = {"k" * (MAX_NAME_CHARS + 1): 1}
        elif what == 2:
            doc["messageId"] = "m" * (MAX_ID_CHARS + 1)
        else:
            doc = {**doc, "type": "track", "event": "e" * (MAX_NAME_CHARS + 1)}
    elif kind == 5:  # too many keys or items
        doc[key] = (
            {f"k{j}": j for j in range(MAX_KEYS + 1)}
            if rng.random() < 0.5
            else {"l": [0] * (MAX_ITEMS + 1)}
        )
    elif kind == 6:  # wrong types
        field, bad = rng.choice(
            [
                ("type", rng.choice(["page", "Track", "", 5, None])),
                ("userId", rng.choice([5, None, ["a"], {"a": 1}])),
                ("properties", [1]),
                ("traits", "x"),
                ("timestamp", 1700000000),
                ("messageId", 7),
                ("event", None),
            ]
        )
        if field == "event":
            doc["type"] = "track"
        if field in ("properties", "traits"):
            doc["type"] = "track" if field == "properties" else "identify"
            doc.setdefault("event", "Visit")
        doc[field] = bad
    elif kind == 7:  # timestamps out of range, not timestamps, or in the future
        doc["timestamp"] = rng.choice(
            [
                "0001-01-01T00:30:00+01:00",
                "1899-12-31T23:59:59Z",
                "3000-01-01T00:00:00Z",
                "9999-12-31T23:59:59-01:00",
                "2026-13-01T00:00:00Z",
                "2026-01-01T00:00:00",
                "yesterday",
                "2026" * 100,
                format_instant(received + MAX_FUTURE_SKEW + 10**6 * rng.randrange(1, 10**6)),
            ]
        )
    elif kind == 8:  # time zones zoneinfo does not know
        doc = {**doc, "type": "identify"}
        doc["traits"] = {
            "timezone": rng.choice(
                [
                    "America",
                    "x" * 300,
                    "../../etc/passwd",
                    "europe/london",
                    "",
                    5,
                    [],
                    text(rng) + "/",
                ]
            )
        }
    elif kind == 9:  # a subject byte that is not UTF-8
        subject = subject + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])
    elif kind == 10:  # the subject names someone else, or is not one customer token
        # (A subject of several tokens is stored by no stream, so it is no input here: every
        # input must be stored. The literal wildcards are stored, with no partition: the
        # engine rejects the literal *, and reads no literal >, which no consumer filter can
        # single out.)
        subject = rng.choice(
            [
                b"shoal.events.someone-else",
                b"shoal.events.*",
                b"shoal.events.>",
                b"shoal.events.a%zz",
                b"shoal.events.a%2e",
                b"shoal.events.%41",
            ]
        )
    elif kind == 11:  # a payload over the size limit
        doc[key] = {f"p{j}": "y" * 10_000 for j in range(7)}
    elif kind == 12:  # JSON that is not UTF-8, or escapes half a surrogate pair
        raw = rng.choice(
            [
                body.replace(b'"userId"', b'"user\xffId"'),
                body[:-1] + b', "x": "\\ud800"}',
                json.dumps({**doc, key: {"K": 1}}).encode().replace(b'"K"', b'"\xed\xa0\x80"'),
            ]
        )
    elif kind == 13:  # an empty message id or event name
        doc |= rng.choice([{"messageId": ""}, {"type": "track", "event": ""}])
    elif kind == 14:  # a missing field
        doc.pop(rng.choice(["type", "userId"]))
    elif kind == 15:  # a duplicate key making the type wrong
        raw = body[:-1] + b', "type": "alias"}'
    elif kind == 16:  # a depth bomb in an ignored field
        raw = body[:-1] + b', "context": ' + deep(rng.choice([5000, 30_000])).encode() + b"}"
    elif kind == 17:  # nested deep in a valid-looking way, under the payload limit
        inner: Any = 0
        for _ in range(MAX_DEPTH):
            inner = {"a": inner}
        doc[key] = {"a": inner}
    elif kind == 18:  # an integer near the bound, on the wrong side
        doc[key] = {"big": 2**63 + rng.randrange(10**6)}
    else:  # a string of every bad kind at once, and a bad time zone
        doc = {**doc, "type": "identify", "traits": {"timezone": "\u0000" * 10, "a": "\u200f"}}
    if raw is None:
        raw = json.dumps(doc).encode()
    return subject, raw


# Publishing on one raw connection: the stream sequence of input i is i + 1 --------------------


class RawPublisher:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("nats://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.recv(65536)  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')

    def publish(self, batch: list[tuple[bytes, bytes]]) -> None:
        out = bytearray()
        for subject, payload in batch:
            out += b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)
        self.sock.sendall(bytes(out) + b"PING\r\n")
        got = b""
        while b"PONG" not in got:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed the connection: {got!r}"
            got += chunk
        assert b"-ERR" not in got, got

    def close(self) -> None:
        self.sock.close()


def keeps_up(engine: Engine, published: int) -> bool:
    """Whether the engine is at most 20,000 inputs behind: the stream holds the rest."""
    return published - engine.stats.events_applied - engine.stats.events_rejected < 20_000


async def stream_last(client: Client) -> int:
    info = await client.jetstream().stream_info(EVENTS_STREAM)
    return int(info.state.last_seq or 0)


@pytest.mark.slow
@pytest.mark.timeout(int(os.environ.get("SHOAL_FUZZ_TIMEOUT", "600")))
async def test_fuzz_a_running_engine(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    inputs = int(os.environ.get("SHOAL_FUZZ_INPUTS", "50000"))
    # Fixed by default, so that every run of the suite is the same run; set it to explore.
    seed = int(os.environ.get("SHOAL_FUZZ_SEED") or 20261205)
    print(f"fuzz: {inputs} inputs, seed {seed} (SHOAL_FUZZ_SEED={seed} to replay)")
    rng = random.Random(seed)
    db = tmp_path / "shoal.db"
    rejections: dict[int, str] = {}
    repeats = Counter[int]()

    async def on_rejected(msg: Any) -> None:
        r = _rejection_decoder.decode(msg.data)
        assert r.stream_sequence is not None and r.reason
        if r.stream_sequence in rejections:
            repeats[r.stream_sequence] += 1
        rejections[r.stream_sequence] = r.reason

    await client.subscribe(REJECTED_SUBJECT, cb=on_rejected, pending_msgs_limit=-1)
    await client.flush()
    good: dict[str, int] = {}  # message id -> stream sequence
    bad: dict[int, bytes] = {}  # stream sequence -> the subject, for a failure's message
    started = time.monotonic()
    async with running_engine(nats_server.url, db, SEGMENTS) as engine:
        publisher = await anyio.to_thread.run_sync(RawPublisher, nats_server.url)
        try:
            seq = 0
            while seq < inputs:
                batch: list[tuple[bytes, bytes]] = []
                received = now()
                for _ in range(min(BATCH, inputs - seq)):
                    seq += 1
                    if rng.random() < 1 / 3:
                        good[f"v{seq}"] = seq
                        batch.append(valid(rng, seq, received))
                    else:
                        subject, payload = hostile(rng, received)
                        bad[seq] = subject
                        batch.append((subject, payload))
                await anyio.to_thread.run_sync(publisher.publish, batch)
                # Keep the stream ahead of the engine by a bounded amount.
                await eventually(functools.partial(keeps_up, engine, seq), timeout=120)
                assert engine.running, "the engine stopped"
        finally:
            publisher.close()
        # The broker answers PING before JetStream has stored what came before it.
        with anyio.fail_after(60):
            while (last := await stream_last(client)) < inputs:
                await anyio.sleep(0.1)
        assert last == inputs, "the broker stored more than was published"
        unread = {seq for seq, subject in bad.items() if subject == UNREAD}
        for seq in unread:
            del bad[seq]
        try:
            await eventually(
                lambda: (
                    engine.stats.events_applied + engine.stats.events_rejected
                    >= inputs - len(unread)
                ),
                timeout=300,
            )
        except TimeoutError:
            raise AssertionError(f"not all inputs handled: {engine.stats} (seed {seed})") from None
        await eventually(lambda: len(rejections) >= len(bad), timeout=60)
        counts = engine.rejection_counts
    elapsed = time.monotonic() - started
    print(
        f"fuzz: {inputs} inputs in {elapsed:.1f} s: {len(good)} valid, {len(bad)} hostile; "
        f"rejected by kind: {dict(sorted(counts.items()))}"
    )

    logged: list[Event] = []
    async with await Store.open(db) as log:
        async for chunk in log.events.read():
            logged += (_event_decoder.decode(entry.body) for entry in chunk)
    ids = Counter(e.message_id for e in logged)
    assert {m: n for m, n in ids.items() if n != 1} == {}, "applied more than once"
    unexpected = sorted(ids.keys() - good.keys())
    assert unexpected == [], f"hostile inputs applied: {unexpected[:5]} (seed {seed})"
    missing = sorted(good.keys() - ids.keys(), key=lambda m: good[m])
    assert missing == [], (
        f"valid events not applied: {missing[:5]}, rejected as "
        f"{[rejections.get(good[m]) for m in missing[:5]]} (seed {seed})"
    )
    not_rejected = sorted(bad.keys() - rejections.keys())
    assert not_rejected == [], f"hostile inputs not rejected: {not_rejected[:5]} (seed {seed})"
    assert rejections.keys() == bad.keys(), f"seed {seed}"
    assert all(rejections.values())
    assert sum(counts.values()) == len(bad)
