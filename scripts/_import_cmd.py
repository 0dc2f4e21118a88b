"""``shoal import`` and ``shoal export``: history in and out of the event log, as JSON lines.

Import validates each line as the engine validates a live event and writes straight into the
SQLite log (taking its single-writer lock), so it is for history while the engine is stopped:
the next ``shoal serve`` folds the imported events in. Export reads the log beside a running
engine. Both are usable from Python: :func:`import_history`, :func:`export_history`,
:func:`event_from_line` and :func:`event_line`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from protocol import Event, InvalidEvent, decode_event, event_subject, format_instant
from store import EventLog, LoggedEvent, StoreError

from ._errors import UsageError

IMPORT_BATCH = 50_000
"""Events written per transaction by an import."""
_READ_LINES = 5_000
"""Lines validated per turn (off the event loop) between two updates of the progress bar."""

_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
# The engine keeps a protocol.Event in the log as msgpack (actors/_engine.py); so must we.


def logged_event(event: Event) -> LoggedEvent:
    """The event log entry of a validated event, as the engine writes it."""
    return LoggedEvent(
        customer_id=event.customer_id,
        message_id=event.message_id,
        at=event.at,
        body=_event_encoder.encode(event),
    )


def event_of(entry: LoggedEvent) -> Event:
    """The event an entry of the log holds.

    Raises:
        StoreError: its body is not an event this shoal can read.
    """
    try:
        return _event_decoder.decode(entry.body)
    except msgspec.DecodeError as e:
        raise StoreError(f"event {entry.seq} of the log cannot be read: {e}") from e


# import -------------------------------------------------------------------------------------


class _Head(msgspec.Struct, kw_only=True, rename="camel"):
    """The fields an import reads before validating the whole line."""

    user_id: Any = None
    timestamp: Any = None
    message_id: Any = None


_head_decoder = msgspec.json.Decoder(_Head)
_NOBODY = event_subject("-")
"""The subject to validate a line against when its ``userId`` is missing or not text: the
event is refused before its customer is compared with the subject's."""


def _content_id(line: bytes) -> str:
    """``import:`` and a hash of the line's JSON with its keys sorted: the same content,
    however spaced or ordered, gets the same id."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(line), order="sorted")
    except msgspec.MsgspecError:
        canonical = line.strip()
    return "import:" + hashlib.sha256(canonical).hexdigest()[:32]


def event_from_line(line: bytes, *, now: int) -> Event:
    """Validate one line of history (Segment Spec JSON) as a live event, and return it.

    Unlike a live event, it must carry its ``timestamp``: history has no broker receive
    time, so the timestamp is both its instant and its receive instant. Its message id is
    its ``messageId``, or else ``import:`` and a hash of its content, so importing the same
    line twice gives one event (two identical lines without ``messageId`` are one event).

    Args:
        line: one JSON line.
        now: the current instant (microseconds since the epoch). A timestamp more than
            :data:`protocol.MAX_FUTURE_SKEW` ahead of it is refused, and one less far ahead
            counts from ``now``, as a live event stamped ahead counts from its receipt.

    Raises:
        InvalidEvent: the line cannot be imported; ``reason`` says why, in the words the
            engine uses for a live event where it has them.
    """
    try:
        head = _head_decoder.decode(line)
    except msgspec.DecodeError:
        # Not a JSON object: decode_event says so in its own words.
        decode_event(line, _NOBODY, received=now, default_message_id="-")
        raise InvalidEvent("invalid JSON") from None  # not reached: it refuses the line
    user = head.user_id
    if user == "":
        raise InvalidEvent("invalid `userId`: a customer id cannot be empty")
    event = decode_event(
        line,
        event_subject(user) if isinstance(user, str) else _NOBODY,
        received=now,
        default_message_id="" if head.message_id else _content_id(line),
    )
    if head.timestamp is None:
        raise InvalidEvent(
            "missing required field `timestamp` (a file has no receive time: each event "
            "needs its instant)"
        )
    return msgspec.structs.replace(event, received=event.at)


@dataclasses.dataclass
class ImportReport:
    """What an import did."""

    imported: int = 0
    """Events new to the log."""
    duplicates: int = 0
    """Valid events the log already held, or that came earlier in the same input."""
    skipped: int = 0
    """Lines that were not valid events."""


@dataclasses.dataclass
class _Chunk:
    events: list[LoggedEvent]
    problems: list[tuple[int, str]]
    size: int
    """Bytes read."""
    done: bool


class _Lines:
    """Numbered lines of an input, validated a chunk at a time (in a worker thread)."""

    def __init__(self, lines: Iterable[bytes], now: int) -> None:
        self._lines: Iterator[bytes] = iter(lines)
        self._now = now
        self._number = 0

    def take(self, count: int) -> _Chunk:
        events: list[LoggedEvent] = []
        problems: list[tuple[int, str]] = []
        size = 0
        for line in self._lines:
            self._number += 1
            size += len(line)
            text = line.strip()
            if text:
                try:
                    events.append(logged_event(event_from_line(text, now=self._now)))
                except InvalidEvent as e:
                    problems.append((self._number, e.reason))
            count -= 1
            if not count:
                return _Chunk(events, problems, size, done=False)
        return _Chunk(events, problems, size, done=True)


def _nothing(*_: object) -> None:
    pass


async def import_history(
    log: EventLog,
    lines: Iterable[bytes],
    *,
    now: int,
    on_skip: Callable[[int, str], None] = _nothing,
    on_progress: Callable[[int, int], None] = _nothing,
    batch: int = IMPORT_BATCH,
) -> ImportReport:
    """Load JSON lines of history into the event log, de-duplicated by message id.

    Each line is validated by :func:`event_from_line`; an invalid one is reported through
    ``on_skip`` and left out, and every valid one lands. Events are written ``batch`` at a
    time, each batch in one transaction (:meth:`store.EventLog.import_events`), so an
    interrupted import keeps the batches already written, and running it again completes it.

    Args:
        log: the store, opened for writing (the engine must not be running on it).
        lines: the input, one event per line (blank lines are skipped); lines are numbered
            from 1.
        now: the current instant, for timestamps ahead of it (see :func:`event_from_line`).
        on_skip: called with the number and the reason of each invalid line, in order.
        on_progress: called with the bytes read and the valid events read since last time.
        batch: events per transaction.

    Raises:
        StoreError: a batch could not be written (those before it were).
    """
    report = ImportReport()
    source = _Lines(lines, now)
    pending: list[LoggedEvent] = []
    while True:
        # Never more than a batch pending: a line holds at most one event.
        chunk = await anyio.to_thread.run_sync(source.take, min(_READ_LINES, batch - len(pending)))
        for number, reason in chunk.problems:
            on_skip(number, reason)
        report.skipped += len(chunk.problems)
        pending += chunk.events
        if len(pending) >= batch or (chunk.done and pending):
            added = await log.import_events(pending)
            report.imported += added
            report.duplicates += len(pending) - added
            pending = []
        on_progress(chunk.size, len(chunk.events))
        if chunk.done:
            return report


# export -------------------------------------------------------------------------------------


class _Line(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """One exported event: Segment Spec fields, plus when it was received."""

    type: str
    user_id: str
    event: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    timestamp: str
    message_id: str
    received_at: str


_line_encoder = msgspec.json.Encoder()


def event_line(event: Event) -> bytes:
    """One event as a Segment Spec JSON line (no newline), which :func:`event_from_line`
    reads back: ``type``, ``userId``, ``event`` and ``properties`` or ``traits``,
    ``timestamp`` (its instant), ``messageId`` and ``receivedAt``."""
    track = event.kind == "track"
    return _line_encoder.encode(
        _Line(
            type=event.kind,
            user_id=event.customer_id,
            event=event.name if track else None,
            properties=event.properties if track else None,
            traits=None if track else event.traits,
            timestamp=format_instant(event.at),
            message_id=event.message_id,
            received_at=format_instant(event.received),
        )
    )


async def export_history(
    log: EventLog,
    out: IO[bytes],
    *,
    on_progress: Callable[[int], None] = _nothing,
) -> int:
    """Write every event of the log, in log order, as JSON lines (:func:`event_line`).

    The log is read as it stood when this began: events appended meanwhile (by an engine
    running beside a read-only store) are left for the next export.

    Args:
        log: the store (:meth:`store.EventLog.open_read_only` works beside an engine).
        out: where to write the lines.
        on_progress: called with the number of events written since last time.

    Returns:
        How many events were written.

    Raises:
        StoreError: the log cannot be read.
    """
    through = log.last_event_seq
    written = 0
    async for entries in log.read_events():
        entries = [e for e in entries if e.seq <= through]
        if not entries:
            break
        data = b"".join(event_line(event_of(e)) + b"\n" for e in entries)
        await anyio.to_thread.run_sync(out.write, data)
        written += len(entries)
        on_progress(len(entries))
    await anyio.to_thread.run_sync(out.flush)
    return written


# the commands -------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add ``import`` and ``export`` to the ``shoal`` subcommands ``sub``."""
    imp = sub.add_parser(
        "import",
        help="load history (JSON lines) into the event log, while the engine is stopped",
    )
    imp.add_argument("file", help="JSON-lines file of Segment Spec events ('-': stdin)")
    imp.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data)",
    )
    imp.set_defaults(run=_import)

    exp = sub.add_parser("export", help="write the event log as JSON lines")
    exp.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data); it may be running",
    )
    exp.add_argument(
        "--output", "-o", metavar="FILE", help="file to write (default or '-': stdout)"
    )
    exp.set_defaults(run=_export)


class _Rate(ProgressColumn):
    """Events per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} events/s", style="progress.data.speed")


@contextlib.contextmanager
def _progress(*columns: str | ProgressColumn) -> Iterator[tuple[Progress, Callable[[str], None]]]:
    """A progress bar on stderr when it is a terminal (quiet otherwise), and a function that
    prints a line to stderr above it."""
    console = Console(stderr=True)
    live = console.is_terminal
    progress = Progress(*columns, console=console, disable=not live, transient=False)

    def say(text: str) -> None:
        if live:
            progress.console.print(Text(text), soft_wrap=True)
        else:
            print(text, file=sys.stderr)

    with progress:
        yield progress, say


def _now() -> int:
    return time.time_ns() // 1000


async def _import(args: argparse.Namespace) -> int:
    name: str = args.file
    try:
        stream = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror}") from None
    try:
        total = os.fstat(stream.fileno()).st_size if name != "-" else None
        async with await EventLog.open(args.data_dir / "shoal.db") as log:
            with _progress(
                TextColumn("importing"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[events]:,} events"),
            ) as (progress, say):
                task = progress.add_task("import", total=total or None, events=0)
                read = 0

                def advance(size: int, events: int) -> None:
                    nonlocal read
                    read += events
                    progress.update(task, advance=size, events=read)

                report = await import_history(
                    log,
                    stream,
                    now=_now(),
                    on_skip=lambda number, reason: say(f"line {number}: {reason}; skipped"),
                    on_progress=advance,
                )
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    print(
        f"imported {report.imported} event(s), {report.duplicates} duplicate(s), "
        f"{report.skipped} line(s) skipped",
        file=sys.stderr,
    )
    return 1 if report.skipped else 0


async def _export(args: argparse.Namespace) -> int:
    async with await EventLog.open_read_only(args.data_dir / "shoal.db") as log:
        total = await log.count_events()
        to_stdout = args.output in (None, "-")
        try:
            out = sys.stdout.buffer if to_stdout else open(args.output, "wb")  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"cannot write {args.output}: {e.strerror}") from None
        try:
            with _progress(
                TextColumn("exporting"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
            ) as (progress, _):
                task = progress.add_task("export", total=total)
                written = await export_history(
                    log, out, on_progress=lambda n: progress.advance(task, n)
                )
        finally:
            if not to_stdout:
                out.close()
    print(f"exported {written} event(s)", file=sys.stderr)
    return 0
