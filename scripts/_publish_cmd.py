"""``shoal publish``: events to ``SHOAL_EVENTS``, each validated here as the engine validates
it (:func:`protocol.decode_event`) and confirmed by JetStream.

Events come from a JSON-lines file, from stdin (``-``, or a pipe), or one is built from
flags. A line the engine would reject is reported with the engine's reason and not sent; the
others are sent, and each acknowledgement's stream sequence is reported.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import PubAck

from protocol import (
    DEFAULT_MAX_EVENT_BYTES,
    EVENTS_STREAM,
    BrokerError,
    InvalidEvent,
    decode_event,
    event_subject,
)
from protocol.nats import connect, permission_guard

from ._connection import credentials_of, servers_of
from ._errors import BadInput, UsageError, file_error
from ._input import read_lines

_NOBODY = event_subject("-")
"""The subject a line is validated against when its ``userId`` is missing or not text: the
engine refuses the event before comparing its customer with the subject's."""
_IN_FLIGHT = 1_000
"""Events sent and not yet acknowledged, at most: memory does not grow with the file."""
_ACK_TIMEOUT = 30.0
"""Seconds to wait for JetStream's acknowledgement of an event sent."""
_FLAGS = ("event", "identify", "prop", "trait", "timestamp", "message_id")
"""The options that build one event, with ``--customer``."""


def register(sub: Any) -> None:
    """Add ``publish`` to the ``shoal`` subcommands ``sub``."""
    pub = sub.add_parser(
        "publish",
        help="publish events (JSON lines from a file or stdin, or one built from flags)",
        description="Publish Segment Spec events to SHOAL_EVENTS. Each is first validated as "
        "the engine validates it: a line it would reject is reported with its reason and not "
        "sent (exit status 3). Each event sent is confirmed by JetStream; the summary on "
        "stderr gives the stream sequences (--json: one JSON line per event on stdout). "
        "Events are read from FILE, from stdin with '-' or when stdin is a pipe, or one is "
        "built from --customer and the flags below.",
    )
    pub.add_argument("file", nargs="?", help="JSON-lines file ('-': stdin)")
    pub.add_argument("--nats", action="append", metavar="URL")
    pub.add_argument("--customer", help="build one event for this customer id")
    pub.add_argument(
        "--user", dest="user_alias", help="deprecated: the same as --customer (one release)"
    )
    pub.add_argument("--event", help="track event name")
    pub.add_argument("--identify", action="store_true", help="an identify event")
    pub.add_argument(
        "--prop",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="track property (VALUE is JSON when it parses, else text); with --event",
    )
    pub.add_argument(
        "--trait",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="identify trait (VALUE is JSON when it parses, else text); with --identify",
    )
    pub.add_argument("--timestamp", help="ISO-8601 with offset (default: when received)")
    pub.add_argument("--message-id", help="idempotency key")
    pub.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per event sent on stdout: {"line", "stream", "seq", "duplicate"}',
    )
    pub.set_defaults(run=run)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: write it as KEY=VALUE")
        out[key] = _value(value)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that contradict each other or go unused: a usage error, never ignored."""
    if args.user_alias is not None:
        if args.customer is not None:
            raise UsageError("give --customer, not --user as well")
        print(
            "shoal publish: warning: --user is renamed --customer; --user goes in the next release",
            file=sys.stderr,
        )
        args.customer = args.user_alias
    given = [_flag(name) for name in _FLAGS if getattr(args, name)]
    if args.customer is None:
        if given:
            raise UsageError(f"{', '.join(given)}: only with --customer ID (to build one event)")
        return
    if args.file is not None:
        raise UsageError("give a FILE or --customer, not both")
    if args.identify == bool(args.event):
        raise UsageError("give --event NAME (a track event) or --identify, not both or neither")
    if args.identify and args.prop:
        raise UsageError("--prop is a property of a track event: with --identify give --trait")
    if args.event and args.trait:
        raise UsageError("--trait is a trait of an identify event: with --event give --prop")


def _event_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    event: dict[str, Any] = {"userId": args.customer}
    if args.identify:
        event |= {"type": "identify", "traits": _pairs(args.trait, "--trait")}
    else:
        event |= {"type": "track", "event": args.event, "properties": _pairs(args.prop, "--prop")}
    if args.timestamp:
        event["timestamp"] = args.timestamp
    if args.message_id:
        event["messageId"] = args.message_id
    return event


def validated(line: bytes, now: int) -> tuple[str, str | None]:
    """The subject and the ``Nats-Msg-Id`` to publish one JSON line with, once validated as
    the engine will validate it on receipt at ``now``.

    Raises:
        InvalidEvent: the engine would reject it; ``reason`` is the engine's own.
    """
    try:
        doc = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError):
        doc = None
    user = doc.get("userId") if isinstance(doc, dict) else None
    if user == "":
        raise InvalidEvent("invalid `userId`: a customer id cannot be empty", kind="user_id")
    subject = event_subject(user) if isinstance(user, str) else _NOBODY
    event = decode_event(
        line, subject, received=now, default_message_id="-", max_bytes=DEFAULT_MAX_EVENT_BYTES
    )
    # Header values must be ASCII; a non-ASCII id is still deduplicated by the engine.
    msg_id = event.message_id if event.message_id != "-" and event.message_id.isascii() else None
    return subject, msg_id


def _now() -> int:
    return time.time_ns() // 1000


async def _lines(args: argparse.Namespace) -> AsyncIterator[list[bytes]]:
    """The lines to publish, in batches: built from the flags, or read from FILE or stdin."""
    if args.customer is not None:
        yield [json.dumps(_event_from_flags(args)).encode()]
        return
    if args.file is None and sys.stdin.isatty():
        # Waiting for lines typed on a terminal is never what a bare `shoal publish` meant.
        raise UsageError(
            "give a FILE of JSON lines, '-' to type them on stdin, or one event with "
            "--customer ID --event NAME (or --identify); stdin is read without '-' only "
            "from a pipe"
        )
    if args.file in (None, "-"):
        async for batch in read_lines(sys.stdin.fileno()):
            yield batch
        return
    try:
        fd = os.open(args.file, os.O_RDONLY)
    except OSError as e:
        raise file_error(args.file, e) from None
    try:
        async for batch in read_lines(fd):
            yield batch
    finally:
        os.close(fd)


class _Tally:
    """What was published: counts, the first and last stream sequences, and the lines."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.sent = self.duplicates = self.failed = self.invalid = 0
        self.stream = EVENTS_STREAM
        self.first: int | None = None
        self.last: int | None = None
        self.duplicate_at = 0

    def acked(self, number: int, ack: PubAck) -> None:
        self.stream = ack.stream
        if ack.duplicate:
            self.duplicates += 1
            self.duplicate_at = ack.seq
        else:
            self.sent += 1
            self.first = ack.seq if self.first is None else min(self.first, ack.seq)
            self.last = ack.seq if self.last is None else max(self.last, ack.seq)
        if self.as_json:
            doc = {"line": number, "stream": ack.stream, "seq": ack.seq}
            sys.stdout.write(json.dumps(doc | {"duplicate": bool(ack.duplicate)}) + "\n")
            sys.stdout.flush()  # as it is confirmed, for whoever reads the pipe

    def summary(self) -> str:
        if self.first is None:
            text = "published 0 event(s)"
        elif self.first == self.last:
            text = f"published 1 event(s): {self.stream} sequence {self.first}"
        else:
            text = (
                f"published {self.sent} event(s): {self.stream} sequences {self.first} to "
                f"{self.last}"
            )
        if self.duplicates:
            at = f" (sequence {self.duplicate_at})" if self.duplicates == 1 else ""
            text += f"; {self.duplicates} already stored{at}, the same Nats-Msg-Id: not again"
        if self.invalid:
            text += f"; {self.invalid} line(s) not valid, not sent"
        if self.failed:
            text += f"; {self.failed} not stored by the broker"
        return text


async def run(args: argparse.Namespace) -> int:
    """``shoal publish``: see :func:`register` for the options."""
    _check_flags(args)
    lines = _lines(args)
    # The first batch is read before connecting: a usage error or a missing file is
    # reported whatever the broker's state.
    first = await anext(lines, None)
    tally = _Tally(args.json)
    credentials = credentials_of(args).for_role("producer")
    nc = await connect(servers_of(args), name="shoal-publish", credentials=credentials)
    try:
        async with permission_guard(nc):
            await _send(nc, first, lines, tally)
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    print(tally.summary(), file=sys.stderr)
    if tally.failed:
        return 1
    return BadInput.code if tally.invalid else 0


async def _send(
    nc: Any, first: list[bytes] | None, rest: AsyncIterator[list[bytes]], tally: _Tally
) -> None:
    js = nc.jetstream()
    pending: collections.deque[tuple[int, Any]] = collections.deque()
    number = 0

    async def settle(keep: int) -> None:
        while len(pending) > keep:
            line, future = pending.popleft()
            try:
                with anyio.fail_after(_ACK_TIMEOUT):
                    ack = await future
            except nats.js.errors.NoStreamResponseError:
                # The engine declares the streams; a producer may not (least privilege).
                raise BrokerError(
                    f"the engine has not created stream {EVENTS_STREAM} on this NATS server "
                    "yet, so nothing was stored: start `shoal serve` once (it creates the "
                    "streams), then publish again"
                ) from None
            except (TimeoutError, nats.errors.Error) as e:
                tally.failed += 1
                reason = "no acknowledgement in time" if isinstance(e, TimeoutError) else repr(e)
                print(f"line {line}: not stored by the broker: {reason}", file=sys.stderr)
                continue
            tally.acked(line, ack)

    async def batches() -> AsyncIterator[list[bytes]]:
        if first is not None:
            yield first
        async for batch in rest:
            yield batch

    async for batch in batches():
        now = _now()
        for raw in batch:
            number += 1
            text = raw.strip()
            if not text:
                continue
            try:
                subject, msg_id = validated(text, now)
            except InvalidEvent as e:
                tally.invalid += 1
                print(f"line {number}: {e.reason}; not sent", file=sys.stderr)
                continue
            headers = {"Nats-Msg-Id": msg_id} if msg_id else None
            pending.append((number, await js.publish_async(subject, text, headers=headers)))
            await settle(_IN_FLIGHT)
        # Each batch confirmed before the next is read: lines typed or piped one at a time
        # are reported as they are stored, not when the input ends.
        await settle(0)
