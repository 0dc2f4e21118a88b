"""``shoal rejected``: the events the engine rejected, read from the quarantine stream
``SHOAL_REJECTED``, and ``--republish`` to send them again once their cause is fixed.

Reading changes nothing: an ordered consumer of the operator's own reads the stream from its
start (or ``--from`` an instant) to where it ended when the command started.

``--republish`` publishes each quarantined event again on its original subject with its
original payload, when the payload was kept whole and passes the engine's own validation
now; then it deletes that rejection from ``SHOAL_REJECTED``: a rejection republished is out
of quarantine, so a second run does not send it again. Each republished message carries a
``Nats-Msg-Id`` derived from the rejection (the broker drops a repeat within its duplicate
window, and the engine, which never logs a message id twice, drops a later one: a crash
between the publish and the delete duplicates nothing) and the header
``Shoal-Republished-From: SHOAL_REJECTED:<position>`` (where it came from, kept in
``SHOAL_EVENTS``). If the engine rejects it again, a new rejection with the new reason
lands in the stream.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import re
import sys
import unicodedata
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from protocol import (
    EVENTS_STREAM,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    BrokerError,
    Delivery,
    InvalidEvent,
    Rejection,
    decode_event,
    event_subject,
    format_instant,
    to_instant,
)
from protocol.nats import connect, permission_guard, read_stream

from ._connection import credentials_of, servers_of
from ._errors import UsageError
from ._times import human_instant

REPUBLISHED_HEADER = "Shoal-Republished-From"
"""The header of a republished event: ``SHOAL_REJECTED:<position of its rejection>``."""
_SHOWN_CHARS = 400
"""The most characters of a payload shown to a person (``--json`` gives it whole)."""
_CHUNK = 64
"""Rejections read per hop: each may be as large as the broker's maximum payload."""
_ESCAPED_BYTE = re.compile(r"\\x[0-9a-f]{2}")
_decoder = msgspec.json.Decoder(Rejection)
_encoder = msgspec.json.Encoder()


def register(sub: Any) -> None:
    """Add the ``rejected`` command to the ``shoal`` subparsers ``sub``."""
    p = sub.add_parser(
        "rejected",
        help="the events the engine rejected (SHOAL_REJECTED), with their reasons; "
        "--republish sends them again once their cause is fixed",
        description="Print the rejected events the quarantine stream SHOAL_REJECTED holds, "
        "oldest first: the reason, the subject, when the broker received it, its size and "
        "its payload. Times are UTC, to the millisecond. It reads the stream as it is when "
        "the command starts, and changes nothing (but with --republish).",
    )
    p.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="only the rejections stored at or after TIME (ISO-8601 date, or date and time; "
        "no offset: UTC)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: the rejection as published on shoal.rejected, with "
        "its position `seq` in SHOAL_REJECTED",
    )
    p.add_argument(
        "--republish",
        action="store_true",
        help="publish each rejected event again (original subject and payload) when its "
        "payload was kept whole and is valid now, and take it out of SHOAL_REJECTED; report "
        "what was republished and what was skipped, and why",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --republish: say what would be republished, publish nothing",
    )
    p.add_argument("--nats", action="append", metavar="URL", help="NATS server URL")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the broker (default %(default)g)",
    )
    p.set_defaults(run=run)


def _instant(text: str) -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--from {text!r} is not a date (2026-01-31) or an ISO-8601 date and time "
            "(2026-01-31T09:00:00Z)"
        ) from None
    return to_instant(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))


def printable(text: str) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences,
    bidirectional overrides) shown as ``\\xNN`` / ``\\uNNNN`` instead of acting."""
    if text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if ch == " " or not unicodedata.category(ch).startswith(("C", "Z")):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


# Reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One message of ``SHOAL_REJECTED``: its position, when it was stored, and the
    :class:`Rejection` it holds (None with ``problem`` when it holds none)."""

    seq: int
    stored: int
    rejection: Rejection | None
    problem: str | None = None


async def read_rejected(nc: Client, since: int | None) -> AsyncGenerator[Quarantined, None]:
    """The rejections ``SHOAL_REJECTED`` holds (stored at or after ``since``), oldest first,
    up to the last one when called.

    Raises:
        BrokerError: the stream does not exist (no engine ever ran on this broker), or the
            broker stops answering.
    """
    chunks = read_stream(nc, REJECTED_STREAM, REJECTED_SUBJECT, since=since, chunk=_CHUNK)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            for d in chunk:
                yield _quarantined(d)


def _quarantined(d: Delivery) -> Quarantined:
    try:
        return Quarantined(d.stream_sequence, d.received, _decoder.decode(d.data))
    except msgspec.DecodeError as e:
        return Quarantined(d.stream_sequence, d.received, None, f"not a rejection: {e}")


def _json_line(q: Quarantined) -> str:
    doc: dict[str, Any] = {"seq": q.seq, "stored_at": format_instant(q.stored)}
    if q.rejection is None:
        doc["problem"] = q.problem
    else:
        doc |= msgspec.to_builtins(q.rejection)
    return _encoder.encode(doc).decode()


def _size(r: Rejection) -> int:
    if r.payload_bytes is not None:
        return r.payload_bytes
    if r.payload is not None:
        return len(r.payload.encode("utf-8", "surrogatepass"))
    return len(base64.b64decode(r.payload_base64 or ""))


def _shown_payload(r: Rejection) -> str:
    size = _size(r)
    if r.payload is None:
        kept = len(base64.b64decode(r.payload_base64 or ""))
        what = f"(not UTF-8 text: {kept} of {size} bytes kept, base64 in --json)"
        return what if r.payload_base64 is not None else "(not kept)"
    text = printable(r.payload)
    if len(r.payload) > _SHOWN_CHARS:
        text = printable(r.payload[:_SHOWN_CHARS]) + (
            f" ... ({len(r.payload) - _SHOWN_CHARS} more characters; --json shows them)"
        )
    if r.truncated:
        kept = len(r.payload.encode("utf-8", "surrogatepass"))
        text += f"  [cut when quarantined: {kept} of {size} bytes kept]"
    return text


def _human(q: Quarantined) -> str:
    if q.rejection is None:
        return f"#{q.seq}  stored {human_instant(q.stored)}  {printable(q.problem or '')}\n"
    r = q.rejection
    origin = "" if r.stream_sequence is None else f", {EVENTS_STREAM} #{r.stream_sequence}"
    return (
        f"#{q.seq}  {human_instant(to_instant(r.received_at))}  {printable(r.subject)}  "
        f"({_size(r):,} bytes{origin})\n"
        f"    reason   {printable(r.reason)}\n"
        f"    payload  {_shown_payload(r)}\n"
    )


# Republishing -------------------------------------------------------------------------------

Outcome = Literal["republished", "skipped", "would republish"]


class Republished(msgspec.Struct, frozen=True, kw_only=True):
    """What ``--republish`` did with one rejection (a line of its ``--json`` output).

    ``events_seq`` is the republished event's position in ``SHOAL_EVENTS`` (None when it
    was not published); ``why`` says why it was skipped, or that the broker had it already.
    """

    seq: int
    outcome: Outcome
    subject: str | None
    msg_id: str | None = None
    events_seq: int | None = None
    why: str | None = None


def republish_id(q: Quarantined) -> str:
    """The ``Nats-Msg-Id`` a republished event carries: the same for the same rejection on
    every run (its original position in ``SHOAL_EVENTS`` when it has one, else its own in
    ``SHOAL_REJECTED``)."""
    r = q.rejection
    if r is not None and r.msg_id is not None:
        return f"republished:{r.msg_id}"
    return f"republished:{REJECTED_STREAM}:{q.seq}"


def republishable(q: Quarantined, now: int) -> tuple[bytes, str] | str:
    """The original payload and subject of a rejection that can be published again, or
    why it cannot: its payload was not kept whole, or does not pass the engine's own
    validation now."""
    r = q.rejection
    if r is None:
        return q.problem or "not a rejection"
    if r.truncated:
        return (
            f"its payload was cut when quarantined (over the broker's maximum payload): "
            f"the original was {_size(r):,} bytes"
        )
    if _ESCAPED_BYTE.search(r.subject):
        # Bytes that were not UTF-8 are shown as \xNN: the original subject is lost.
        return "its subject held bytes that are not UTF-8 (shown as \\xNN): it cannot be restored"
    if r.payload is not None:
        try:
            data = r.payload.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no payload of the engine's has one
            return "its payload is not valid UTF-8 text"
    elif r.payload_base64 is not None:
        try:
            data = base64.b64decode(r.payload_base64, validate=True)
        except ValueError:
            return "its payload_base64 is not base64"
    else:
        return "no payload was kept"
    if r.payload_sha256 is not None and hashlib.sha256(data).hexdigest() != r.payload_sha256:
        return "its payload does not match its payload_sha256"
    try:
        event = decode_event(data, r.subject, received=now, default_message_id=republish_id(q))
    except InvalidEvent as e:
        return f"still invalid: {e.reason}"
    # Rejected from the stream, its subject is the stored one (with a partition), on which
    # no stream takes a publish: it goes back where its producer published it.
    return data, event_subject(event.customer_id)


async def republish(
    nc: Client, q: Quarantined, now: int, *, dry_run: bool, timeout: float
) -> Republished:
    """Publish one rejected event again and take its rejection out of ``SHOAL_REJECTED``
    (see the module's docstring), or say why not."""
    r = q.rejection
    subject = None if r is None else r.subject
    checked = republishable(q, now)
    if isinstance(checked, str):
        return Republished(seq=q.seq, outcome="skipped", subject=subject, why=checked)
    data, subject = checked
    msg_id = republish_id(q)
    if dry_run:
        return Republished(seq=q.seq, outcome="would republish", subject=subject, msg_id=msg_id)
    js = nc.jetstream()
    headers = {"Nats-Msg-Id": msg_id, REPUBLISHED_HEADER: f"{REJECTED_STREAM}:{q.seq}"}
    try:
        async with permission_guard(nc, subject):
            ack = await js.publish(subject, data, headers=headers, timeout=timeout)
        # Out of quarantine only once the events stream has it: a failure in between
        # leaves it to a later run, whose publish the broker or the engine drops.
        async with permission_guard(nc):
            await js.delete_msg(REJECTED_STREAM, q.seq)
    except nats.js.errors.NoStreamResponseError as e:
        raise BrokerError(
            f"stream {EVENTS_STREAM} does not exist on this NATS server: start the engine "
            "(`shoal serve`) once, it creates the streams"
        ) from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"could not republish #{q.seq} ({subject}): {e}") from e
    why = "the broker had it already (a repeat)" if ack.duplicate else None
    return Republished(
        seq=q.seq,
        outcome="republished",
        subject=subject,
        msg_id=msg_id,
        events_seq=ack.seq,
        why=why,
    )


def _human_outcome(o: Republished) -> str:
    subject = printable(o.subject or "?")
    if o.outcome == "skipped":
        return f"#{o.seq}  skipped      {subject}: {printable(o.why or '')}\n"
    if o.outcome == "would republish":
        return f"#{o.seq}  would republish {subject} (--dry-run)\n"
    note = f" ({o.why})" if o.why else ""
    return f"#{o.seq}  republished  {subject} as {EVENTS_STREAM} #{o.events_seq}{note}\n"


# The command --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    """``shoal rejected``: see :func:`register` for the options."""
    since = None if args.start is None else _instant(args.start)
    if args.dry_run and not args.republish:
        raise UsageError("--dry-run goes with --republish")
    credentials = credentials_of(args).for_role("operator")
    nc = await connect(servers_of(args), name="shoal-rejected", credentials=credentials)
    out = sys.stdout
    shown = skipped = republished = 0
    try:
        async with (
            permission_guard(nc),
            contextlib.aclosing(read_rejected(nc, since)) as rejections,
        ):
            async for q in rejections:
                shown += 1
                if not args.republish:
                    out.write(_json_line(q) + "\n" if args.json else _human(q))
                    continue
                now = to_instant(datetime.now(UTC))
                outcome = await republish(nc, q, now, dry_run=args.dry_run, timeout=args.timeout)
                if outcome.outcome == "skipped":
                    skipped += 1
                else:
                    republished += 1
                line = _encoder.encode(outcome).decode() + "\n"
                out.write(line if args.json else _human_outcome(outcome))
                out.flush()
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error. Point stdout at /dev/null so
        # that the interpreter's last flush does not fail on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        await nc.close()
    start = "" if since is None else f" since {human_instant(since)}"
    if args.republish:
        verb = "would republish" if args.dry_run else "republished"
        print(
            f"{verb} {republished}, skipped {skipped} of {shown} rejected event(s){start}",
            file=sys.stderr,
        )
    else:
        print(f"{shown} rejected event(s){start} in {REJECTED_STREAM}", file=sys.stderr)
    return 0
