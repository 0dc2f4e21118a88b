"""History as JSON lines: one Segment Spec event per line, to and from :class:`Event`.

A line of history is validated as the engine validates a live event (:func:`decode_event`),
except that it must carry its ``timestamp``: a file has no broker receive time, so the
timestamp is both the event's instant and its receive instant. ``shoal import``, ``shoal
replay FILE`` and ``shoal export`` read and write these lines; :func:`read_history` reads a
file of them into time order in bounded memory (``protocol._spill``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from ._inbound import MAX_FUTURE_SKEW, InvalidEvent, decode_event, parse_timestamp
from ._spill import RUN, Spill, SpillFiles
from ._subjects import event_subject
from ._time import SECOND, format_instant, to_instant
from ._types import Event


class _Head(msgspec.Struct, kw_only=True, rename="camel"):
    """The fields read before validating the whole line."""

    user_id: Any = None
    timestamp: Any = None
    message_id: Any = None
    received_at: Any = None


_head_decoder = msgspec.json.Decoder(_Head)
_NOBODY = event_subject("-")
"""The subject to validate a line against when its ``userId`` is missing or not text: the
event is refused before its customer is compared with the subject's."""
_END_OF_TIME = to_instant(datetime(9999, 12, 31, tzinfo=UTC))
"""The "now" a file's lines are read at: a file replays its own time, none of it ahead."""


def _content_id(line: bytes) -> str:
    """``import:`` and a hash of the line's JSON with its keys sorted: the same content,
    however spaced or ordered, gets the same id."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(line), order="sorted")
    except (msgspec.MsgspecError, RecursionError):
        canonical = line.strip()
    return "import:" + hashlib.sha256(canonical).hexdigest()[:32]


def event_from_line(line: bytes, *, now: int) -> Event:
    """Validate one line of history (Segment Spec JSON) as a live event, and return it.

    Unlike a live event, it must carry its ``timestamp``. Its receive instant is its
    ``receivedAt`` when given (what ``shoal export`` writes, so an export imports back
    exactly), else its timestamp; its instant is its timestamp, or its receive instant when
    stamped ahead of it (at most :data:`MAX_FUTURE_SKEW`), as for a live event. Its message id is
    its ``messageId``, or else ``import:`` and a hash of its content, so importing the same
    line twice gives one event (two identical lines without ``messageId`` are one event).

    Args:
        line: one JSON line.
        now: the current instant (microseconds since the epoch). A timestamp more than
            :data:`MAX_FUTURE_SKEW` ahead of it is refused, and one less far ahead
            counts from ``now``, as a live event stamped ahead counts from its receipt.

    Raises:
        InvalidEvent: the line cannot be read as an event; ``reason`` says why, in the
            words the engine uses for a live event where it has them.
    """
    try:
        head = _head_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError):
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
    if head.received_at is None:
        return msgspec.structs.replace(event, received=event.at)
    return _received_at(event, head.timestamp, head.received_at, now)


def _received_at(event: Event, timestamp: str, received_at: Any, now: int) -> Event:
    """``event`` as received at its line's ``receivedAt``: its instant is its timestamp,
    or its receive instant when stamped ahead of it, as for a live event."""
    if not isinstance(received_at, str):
        raise InvalidEvent(
            "field `receivedAt` must be an ISO-8601 date and time with a UTC offset, when given"
        )
    try:
        received = parse_timestamp(received_at)
    except InvalidEvent as e:
        raise InvalidEvent(e.reason.replace("timestamp", "receivedAt", 1)) from None
    if received - now > MAX_FUTURE_SKEW:
        raise InvalidEvent(
            f"receivedAt {received_at!r} is ahead of now ({format_instant(now)}): an event "
            "cannot have been received in the future",
            kind="future",
        )
    # The event's instant is its timestamp, unless that was ahead of ``now`` (then it is
    # ``now``): read again only then.
    stamped = event.at if event.at < now else parse_timestamp(timestamp)
    if stamped - received > MAX_FUTURE_SKEW:
        raise InvalidEvent(
            f"timestamp {timestamp!r} is {(stamped - received) / SECOND:g} s ahead of "
            f"receivedAt ({format_instant(received)}); at most "
            f"{MAX_FUTURE_SKEW // SECOND} s ahead is allowed",
            kind="future",
        )
    return msgspec.structs.replace(event, at=min(stamped, received), received=received)


def _ignore(number: int, detail: Any) -> None:
    pass


def events_from_lines(
    lines: Iterable[bytes],
    *,
    on_skip: Callable[[int, str], None] = _ignore,
    on_repeat: Callable[[int, int], None] = _ignore,
) -> list[Event]:
    """The valid events of a file of history, in timestamp order (stable: equal timestamps
    keep their file order), as a list: :func:`read_history`'s events, which for a large file
    are better iterated than held.

    Args:
        lines: the file's lines, numbered from 1.
        on_skip: called with the number and the reason of each line that is not a valid
            event, as it is read.
        on_repeat: called, once every line is read, with the number of each event of a
            customer with the message id of an earlier line, and that line's number, in
            line order: the engine applies an event once, so the repeat is left out.
    """
    with read_history(lines, on_skip=on_skip, on_repeat=on_repeat) as history:
        return list(history)


_Entry = tuple[int, int, Event]
"""An event to sort by time: its receive instant, its line number (stable), the event."""
_Key = tuple[str, str, int]
"""An event to find repeats by: its customer, its message id, its line number."""
_Repeat = tuple[int, int]
"""A repeat: its line number, and that of the line it repeats."""


class OrderedHistory:
    """A file of history read into timestamp order (stable: equal timestamps keep their file
    order) in memory that does not grow with its length. Blank lines are ignored.

    Give it the file's lines with :meth:`read` (in one call or several: numbering goes on),
    then :meth:`finish`, then iterate it (once) for the valid events in order; close it (or
    use it in a ``with`` block) to remove its temporary files, whatever happened.
    :func:`read_history` does the reading in one call.

    Each line is read by :func:`event_from_line` at the end of time: a file replays its own
    time, and none of it is "ahead". So a file replayed gives the transitions the same file
    imported (``shoal import``) then replayed gives.

    Beyond ``run`` events, they are sorted in runs written to temporary files, and so are
    the keys repeats are found by; the runs are merged as the result is iterated. A file
    already in timestamp order is written as one run, never merged.

    Args:
        on_skip: called with the number and the reason of each line that is not a valid
            event, as it is read.
        on_repeat: called by :meth:`finish` with the number of each event of a customer
            with the message id of an earlier line, and that line's number, in line order:
            the engine applies an event once, so the repeat is left out.
        directory: where to make the temporary directory (None: ``TMPDIR``, else the
            system's).
        run: how many events to hold in memory at most while reading.
        now: the instant lines are read at (default: the end of time, for a replay);
            ``shoal import`` gives the current one, refusing history from the future.
    """

    __slots__ = (
        "_on_skip",
        "_on_repeat",
        "_run",
        "_files",
        "_entries",
        "_keys",
        "_lines",
        "_valid",
        "_sorted",
        "_repeats",
        "events",
        "skipped",
        "_now",
    )

    def __init__(
        self,
        *,
        on_skip: Callable[[int, str], None] = _ignore,
        on_repeat: Callable[[int, int], None] = _ignore,
        directory: str | Path | None = None,
        run: int = RUN,
        now: int = _END_OF_TIME,
    ) -> None:
        self._now = now
        self._on_skip = on_skip
        self._on_repeat = on_repeat
        self._run = run
        self._files = SpillFiles(directory)
        self._entries: Spill[_Entry] = Spill(_Entry, self._files, run=run)
        self._keys: Spill[_Key] = Spill(_Key, self._files, run=run)
        self._lines = 0
        self._valid = 0
        self._sorted: Iterator[_Entry] | None = None
        self._repeats: bytearray | None = None
        self.events = 0
        """How many events it yields: the valid lines less the repeats (after
        :meth:`finish`)."""
        self.skipped = 0
        """How many lines were not valid events."""

    @property
    def repeated(self) -> int:
        """How many valid lines repeat an earlier one's customer and message id (after
        :meth:`finish`): left out."""
        return self._valid - self.events if self._sorted is not None else 0

    @property
    def spilled(self) -> bool:
        """Whether temporary files were written (the events were too many to hold)."""
        return self._files.used

    def read(self, lines: Iterable[bytes]) -> int:
        """Read more lines of the file (numbered on from the last line read); return how
        many.

        Raises:
            SpillError: the temporary files cannot be written.
        """
        if self._sorted is not None:
            raise RuntimeError("finish() was called: no more lines")
        entries, keys, on_skip = self._entries, self._keys, self._on_skip
        number = start = self._lines
        for raw in lines:
            number += 1
            line = raw.strip()
            if not line:
                continue
            try:
                event = event_from_line(line, now=self._now)
            except InvalidEvent as e:
                self.skipped += 1
                on_skip(number, e.reason)
                continue
            self._valid += 1
            entries.add((event.received, number, event))
            keys.add((event.customer_id, event.message_id, number))
        self._lines = number
        return number - start

    def finish(self) -> int:
        """Find the repeats (reporting each), and return how many events there are.

        Raises:
            SpillError: the temporary files cannot be written.
        """
        if self._sorted is None:
            self._repeats = _repeats(
                self._keys, self._files, self._run, self._lines, self._on_repeat
            )
            self._sorted = self._entries.sorted()
            repeated = 0 if self._repeats is None else _ones(self._repeats)
            self.events = self._valid - repeated
        return self.events

    def __iter__(self) -> Iterator[Event]:
        self.finish()
        assert self._sorted is not None
        entries, repeats = self._sorted, self._repeats
        if repeats is None:
            for _, _, event in entries:
                yield event
            return
        for _, number, event in entries:
            if not repeats[number >> 3] & (1 << (number & 7)):
                yield event

    def close(self) -> None:
        """Remove the temporary files (again: nothing)."""
        self._files.close()

    def __enter__(self) -> OrderedHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_history(
    lines: Iterable[bytes],
    *,
    on_skip: Callable[[int, str], None] = _ignore,
    on_repeat: Callable[[int, int], None] = _ignore,
    directory: str | Path | None = None,
    run: int = RUN,
    now: int = _END_OF_TIME,
) -> OrderedHistory:
    """Read every line of a file of history into an :class:`OrderedHistory` (see it for the
    arguments), and find its repeats: skips are reported as they are met, then repeats in
    line order. Iterate the result (once) for the events in timestamp order, and close it.

    Raises:
        SpillError: the temporary files cannot be written.
    """
    history = OrderedHistory(
        on_skip=on_skip, on_repeat=on_repeat, directory=directory, run=run, now=now
    )
    try:
        history.read(lines)
        history.finish()
    except BaseException:
        history.close()
        raise
    return history


def _repeats(
    keys: Spill[_Key],
    files: SpillFiles,
    run: int,
    lines: int,
    on_repeat: Callable[[int, int], None],
) -> bytearray | None:
    """Report the repeats in line order; return their line numbers as a bitmap (one bit per
    line: 400 KB for 3.25M lines), or None when there are none."""
    found: Spill[_Repeat] = Spill(_Repeat, files, run=run)
    customer = message_id = None
    first = 0
    any_found = False
    for c, m, number in keys.sorted():
        if m == message_id and c == customer:
            found.add((number, first))
            any_found = True
        else:
            customer, message_id, first = c, m, number
    if not any_found:
        return None
    bitmap = bytearray(lines // 8 + 1)
    for number, first in found.sorted():
        bitmap[number >> 3] |= 1 << (number & 7)
        on_repeat(number, first)
    return bitmap


def _ones(bitmap: bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


class _Line(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """One written event: Segment Spec fields, plus when it was received."""

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
