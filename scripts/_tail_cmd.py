"""``shoal tail [SEGMENT]``: transitions as they are published, a readable line each on a
terminal and JSON lines in a pipe; with ``--from-start`` or ``--from INSTANT``, first those
``SHOAL_SEGMENTS`` holds.

A segment named is first checked with the engine (its segments query): an unknown one is an
error that lists the known ones, not a wait for transitions that never come.
"""

from __future__ import annotations

import argparse
import os
import select
import stat
import sys
from typing import Any, TextIO

import anyio
import msgspec

from protocol import (
    EngineUnavailable,
    Transition,
    UnknownSegment,
    segment_filter,
    to_instant,
)
from protocol.nats import ApiClient, connect, iter_transitions, permission_guard

from ._connection import credentials_of, servers_of
from ._times import human_instant, parse_instant

_CHECK_TIMEOUT = 5.0


def register(sub: Any) -> None:
    """Add ``tail`` to the ``shoal`` subcommands ``sub``."""
    tail = sub.add_parser(
        "tail",
        help="print segment transitions as they happen",
        description="Print transitions as they are published: a readable line each on a "
        "terminal (times to the millisecond), JSON lines (the payload of "
        "shoal.segments.<segment>.<change>) in a pipe. A SEGMENT named is checked with the "
        "running engine first: an unknown one is an error (exit status 4) listing the "
        "known ones; if no engine answers, tail says so and waits for its transitions.",
    )
    tail.add_argument("segment", nargs="?", help="only this segment")
    tail.add_argument("--nats", action="append", metavar="URL")
    start = tail.add_mutually_exclusive_group()
    start.add_argument(
        "--from-start",
        action="store_true",
        help="first print every transition the SHOAL_SEGMENTS stream holds",
    )
    start.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="first print the transitions SHOAL_SEGMENTS stored from TIME on (when the "
        "broker stored them): ISO-8601 date or date and time (no offset: UTC)",
    )
    tail.add_argument(
        "--timeout",
        type=float,
        default=_CHECK_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the engine to check SEGMENT (default %(default)g)",
    )
    tail.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """``shoal tail``: see :func:`register` for the options."""
    since = None if args.start is None else parse_instant(args.start, "--from")
    subject = segment_filter(args.segment)  # a name that cannot be a segment: usage error
    credentials = credentials_of(args).for_role("subscriber")
    nc = await connect(servers_of(args), name="shoal-tail", credentials=credentials)
    out: TextIO = sys.stdout
    human = out.isatty()
    encoder = msgspec.json.Encoder()
    try:
        async with permission_guard(nc), anyio.create_task_group() as tg:
            if args.segment is not None:
                await _check_segment(ApiClient(nc, timeout=args.timeout), args.segment)
            if _is_pipe(out):
                tg.start_soon(_stop_when_reader_gone, out.fileno(), tg.cancel_scope)
            async for t in iter_transitions(nc, subject, from_start=args.from_start, since=since):
                if human:
                    out.write(readable(t) + "\n")
                else:
                    out.write(encoder.encode(t).decode() + "\n")
                out.flush()
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    return 0


def _is_pipe(out: TextIO) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError):
        return False


async def _stop_when_reader_gone(fd: int, scope: anyio.CancelScope) -> None:
    """Stop tailing once the reader of the pipe ``fd`` has gone (``shoal tail | head -3``
    after three lines), rather than at the next transition: the write end of a pipe reports
    an error (``POLLERR``) when its read end is closed."""
    poll = select.poll()
    poll.register(fd, select.POLLERR)
    while True:
        # The loop's selector wakes on POLLERR too, whatever the events asked for.
        await anyio.wait_readable(fd)
        if poll.poll(0):
            scope.cancel()
            return
        await anyio.sleep(0.1)  # readable, not gone: a pipe opened both ways


async def _check_segment(api: ApiClient, segment: str) -> None:
    """Raise :class:`UnknownSegment` when the engine does not define ``segment``; warn, and
    go on, when no engine answers (tail may well be started before the engine)."""
    try:
        reply = await api.segments()
    except EngineUnavailable as e:
        print(
            f"shoal tail: warning: segment {segment!r} is not checked, no engine answered "
            f"({e}); waiting for its transitions",
            file=sys.stderr,
        )
        return
    known = tuple(s.name for s in reply.segments)
    if segment not in known:
        raise UnknownSegment(segment, known)


def readable(t: Transition) -> str:
    """One transition as a line for people: ``2026-11-22T10:00:00.000Z  alice -> active
    (entered, event m1, v1)``."""
    cause = t.cause
    tag = cause.__struct_config__.tag
    why = (
        "time"
        if tag == "time"
        else (f"event {getattr(cause, 'message_id', '')}".strip() if tag == "event" else str(tag))
    )
    arrow = "->" if t.change == "entered" else "<-"
    return (
        f"{human_instant(to_instant(t.at))}  {t.customer_id} {arrow} {t.segment} "
        f"({t.change}, {why}, v{t.version})"
    )
