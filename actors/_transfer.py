"""History in and out of the event log: importing JSON lines, exporting them, and reading
the log as it stood.

Import validates each line as the engine validates a live event and writes straight into the
log (it needs the store open for writing, so the engine must be stopped): the next engine
start folds the imported events in. Export reads the log beside a running engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import IO

import anyio
import anyio.to_thread

from protocol import InvalidEvent, event_from_line, event_line
from store import CutMark, LoggedEvent, Store

from ._retention import before_cut
from ._stored import event_of, logged_event

IMPORT_BATCH = 50_000
"""Events written per transaction by an import."""
_READ_LINES = 5_000
"""Lines validated per turn (off the event loop) between two reports of progress."""


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

    def __init__(self, lines: Iterable[bytes], now: int, cut: CutMark | None = None) -> None:
        self._lines: Iterator[bytes] = iter(lines)
        self._now = now
        self._cut = cut
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
                    event = event_from_line(text, now=self._now)
                    if self._cut is not None and event.at <= self._cut.at:
                        raise before_cut(event, self._cut.at)
                    events.append(logged_event(event))
                except InvalidEvent as e:
                    problems.append((self._number, e.reason))
            count -= 1
            if not count:
                return _Chunk(events, problems, size, done=False)
        return _Chunk(events, problems, size, done=True)


def _nothing(*_: object) -> None:
    pass


async def import_history(
    store: Store,
    lines: Iterable[bytes],
    *,
    now: int,
    on_skip: Callable[[int, str], None] = _nothing,
    on_progress: Callable[[int, int], None] = _nothing,
    batch: int = IMPORT_BATCH,
) -> ImportReport:
    """Load JSON lines of history into the event log, de-duplicated by message id.

    Each line is validated by :func:`protocol.event_from_line` (and one stamped at or
    before the log's cut, under retention, is refused: :func:`actors._retention.before_cut`);
    an invalid one is reported
    through ``on_skip`` and left out, and every valid one lands. Events are written
    ``batch`` at a time, each batch in one transaction (:meth:`store.Store.import_events`),
    so an interrupted import keeps the batches already written, and running it again
    completes it.

    Args:
        store: the store, opened for writing (the engine must not be running on it).
        lines: the input, one event per line (blank lines are skipped); lines are numbered
            from 1.
        now: the current instant, for timestamps ahead of it (see
            :func:`protocol.event_from_line`).
        on_skip: called with the number and the reason of each invalid line, in order.
        on_progress: called with the bytes read and the valid events read since last time.
        batch: events per transaction.

    Raises:
        StoreError: a batch could not be written (those before it were).
    """
    report = ImportReport()
    source = _Lines(lines, now, store.retention.cut)
    pending: list[LoggedEvent] = []
    while True:
        # Never more than a batch pending: a line holds at most one event.
        chunk = await anyio.to_thread.run_sync(source.take, min(_READ_LINES, batch - len(pending)))
        for number, reason in chunk.problems:
            on_skip(number, reason)
        report.skipped += len(chunk.problems)
        pending += chunk.events
        if len(pending) >= batch or (chunk.done and pending):
            added = await store.import_events(pending)
            report.imported += added
            report.duplicates += len(pending) - added
            pending = []
        on_progress(chunk.size, len(chunk.events))
        if chunk.done:
            return report


async def read_log(store: Store, *, chunk: int = 10_000) -> AsyncIterator[list[LoggedEvent]]:
    """The event log as it stood when the reading began, in log order, in lists of up to
    ``chunk`` entries: events appended meanwhile (by an engine running beside a read-only
    store) are left for the next reading.

    Raises:
        StoreError: the log cannot be read.
    """
    through = store.events.last_seq
    async for entries in store.events.read(chunk=chunk):
        kept = [e for e in entries if e.seq <= through]
        if kept:
            yield kept
        if len(kept) < len(entries):
            return


async def export_history(
    store: Store,
    out: IO[bytes],
    *,
    on_progress: Callable[[int], None] = _nothing,
) -> int:
    """Write every event of the log, in log order, as JSON lines
    (:func:`protocol.event_line`), the log as it stood when this began (:func:`read_log`).

    Args:
        store: the store (:meth:`store.Store.open_read_only` works beside an engine).
        out: where to write the lines.
        on_progress: called with the number of events written since last time.

    Returns:
        How many events were written.

    Raises:
        StoreError: the log cannot be read.
    """
    written = 0
    async for entries in read_log(store):
        data = b"".join(event_line(event_of(e)) + b"\n" for e in entries)
        await anyio.to_thread.run_sync(out.write, data)
        written += len(entries)
        on_progress(len(entries))
    await anyio.to_thread.run_sync(out.flush)
    return written
