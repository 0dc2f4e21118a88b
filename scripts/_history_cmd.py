"""``shoal history CUSTOMER``: when a customer was in each segment.

A customer's transitions, from the outbox (what the engine published) or from a replay of
its events in the log, become membership intervals per segment: entered at, exited at (or
still a member), and the cause of each end. "Was X in S at T" is answered by reading them.
From Python: :func:`membership_intervals` and :func:`memberships_at` (pure), and
:func:`outbox_history` and :func:`replayed_history` (read a store).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from actors import SegmentSet, load_segments, replay
from protocol import Cause, Transition, format_instant, from_instant, to_instant
from store import EventLog

from ._errors import UsageError
from ._import_cmd import event_of


class Interval(msgspec.Struct, frozen=True, kw_only=True):
    """One stay of a customer in a segment: from ``entered_at`` until just before
    ``exited_at`` (None: still a member when the history ends)."""

    customer_id: str
    segment: str
    entered_at: datetime
    entered_by: Cause
    entered_version: int
    exited_at: datetime | None = None
    exited_by: Cause | None = None
    exited_version: int | None = None

    def holds(self, at: datetime) -> bool:
        """Whether the customer was a member at ``at`` (an aware datetime): in from the
        instant it entered, out from the instant it left."""
        return self.entered_at <= at and (self.exited_at is None or at < self.exited_at)


class Membership(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a customer was in a segment at an instant, and the stay that covers it."""

    customer_id: str
    segment: str
    at: datetime
    member: bool
    interval: Interval | None
    """The stay ``at`` falls in (None when not a member)."""


def membership_intervals(transitions: Iterable[Transition]) -> list[Interval]:
    """The membership intervals that transitions describe.

    Args:
        transitions: each customer's transitions, complete from its version 1 (an outbox,
            or a replay); in any order, as they are taken in version order per customer.

    Returns:
        The intervals, ordered by customer, segment and entry.

    Raises:
        ValueError: they are not a consistent history (an entry into a segment the customer
            is in, or an exit from one it is not in).
    """
    current: dict[tuple[str, str], Interval] = {}
    out: list[Interval] = []
    for t in sorted(transitions, key=lambda t: (t.customer_id, t.version)):
        key = (t.customer_id, t.segment)
        stay = current.pop(key, None)
        if t.change == "entered":
            if stay is not None:
                raise ValueError(
                    f"customer {t.customer_id!r} enters {t.segment!r} at version {t.version} "
                    f"but is in it since version {stay.entered_version}"
                )
            current[key] = Interval(
                customer_id=t.customer_id,
                segment=t.segment,
                entered_at=t.at,
                entered_by=t.cause,
                entered_version=t.version,
            )
        else:
            if stay is None:
                raise ValueError(
                    f"customer {t.customer_id!r} leaves {t.segment!r} at version {t.version} "
                    "but is not in it"
                )
            out.append(
                msgspec.structs.replace(
                    stay, exited_at=t.at, exited_by=t.cause, exited_version=t.version
                )
            )
    out += current.values()
    out.sort(key=lambda i: (i.customer_id, i.segment, i.entered_version))
    return out


def memberships_at(intervals: Iterable[Interval], at: datetime) -> list[Membership]:
    """Whether each customer was in each of its segments at ``at`` (an aware datetime).

    Returns:
        One answer per customer and segment that has an interval, ordered by customer and
        segment. A segment the customer was never in has none: the answer there is no.
    """
    found: dict[tuple[str, str], Interval | None] = {}
    for i in intervals:
        key = (i.customer_id, i.segment)
        if i.holds(at):
            found[key] = i
        else:
            found.setdefault(key, None)
    return [
        Membership(customer_id=c, segment=s, at=at, member=i is not None, interval=i)
        for (c, s), i in sorted(found.items())
    ]


_transition_decoder = msgspec.json.Decoder(Transition)


async def outbox_history(log: EventLog, customer_id: str) -> list[Transition]:
    """What the engine published for ``customer_id`` (its outbox), in version order."""
    return [
        _transition_decoder.decode(o.body) for o in await log.customer_transitions([customer_id])
    ]


async def replayed_history(
    log: EventLog, customer_id: str, segments: SegmentSet, *, until: int
) -> list[Transition]:
    """The transitions of replaying ``customer_id``'s events from the log under
    ``segments`` (:func:`actors.replay`), events received after ``until`` left out, and
    deadlines fired up to ``until``.

    Customers are independent, so one customer replayed alone gives the transitions a
    replay of the whole log gives it: for a log a live engine wrote, those the engine
    published (except for definition changes, and static-list customers without events).
    """
    events = [event_of(e) for e in await log.customer_events([customer_id])]
    return list(replay((e for e in events if e.received <= until), segments, until=until))


async def known_customer(log: EventLog, customer_id: str) -> bool:
    """Whether the log holds an event or a transition of ``customer_id``."""
    return bool(
        await log.customer_transitions([customer_id]) or await log.customer_events([customer_id])
    )


# the command --------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add ``history`` to the ``shoal`` subcommands ``sub``."""
    p = sub.add_parser(
        "history",
        help="a customer's membership intervals per segment, from the outbox or a replay",
        description="Print when CUSTOMER entered and left each segment, and why: a table, or "
        'JSON lines with --json (one interval per line: {"customer_id", "segment", '
        '"entered_at", "entered_by", "entered_version", "exited_at", "exited_by", '
        '"exited_version"}, null while still a member). With --at, whether it was a member '
        'of each segment at that instant (JSON lines {"customer_id", "segment", "at", '
        '"member", "interval"}).',
    )
    p.add_argument("customer", metavar="CUSTOMER", help="the customer id (its userId)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data); it may be running",
    )
    p.add_argument(
        "--at",
        metavar="TIME",
        help="was the customer in each segment at TIME? ISO-8601 date or date and time (no "
        "offset: UTC), or 'now'",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument(
        "--replay",
        action="store_true",
        help="compute the history by replaying the customer's events from the log, instead "
        "of reading what the engine published",
    )
    p.add_argument(
        "--segments",
        type=Path,
        metavar="FILE",
        help="with --replay: the segments TOML file (default: the one shipped with shoal)",
    )
    p.add_argument(
        "--until",
        metavar="TIME",
        help="with --replay: stop the clock at TIME (default: now)",
    )
    p.set_defaults(run=_history)


def _now() -> int:
    return time.time_ns() // 1000


def _instant(text: str, flag: str) -> int:
    if text == "now":
        return _now()
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not a date (2026-01-31), an ISO-8601 date and time "
            "(2026-01-31T09:00:00Z) or 'now'"
        ) from None
    return to_instant(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))


def _cause(cause: Cause | None, version: int | None) -> str:
    if cause is None:
        return ""
    kind = cause.__struct_config__.tag
    text = f"event {getattr(cause, 'message_id', '')}" if kind == "event" else str(kind)
    return f"{text} (v{version})"


def _when(at: datetime | None) -> str:
    return "" if at is None else format_instant(to_instant(at))


async def _history(args: argparse.Namespace) -> int:
    if not args.replay and (args.segments is not None or args.until is not None):
        raise UsageError("--segments and --until go with --replay")
    at = None if args.at is None else from_instant(_instant(args.at, "--at"))
    until = _now() if args.until is None else _instant(args.until, "--until")
    segments = load_segments(args.segments) if args.replay else None
    db = args.data_dir / "shoal.db"
    customer: str = args.customer
    async with await EventLog.open_read_only(db) as log:
        if not await known_customer(log, customer):
            print(f"shoal: error: no customer {customer!r} in {db}", file=sys.stderr)
            return 1
        if segments is not None:
            transitions = await replayed_history(log, customer, segments, until=until)
            source = (
                f"as replayed under {args.segments or 'the default segments'} until "
                f"{format_instant(until)}"
            )
        else:
            transitions = await outbox_history(log, customer)
            source = f"as published (the outbox of {db})"
    try:
        intervals = membership_intervals(transitions)
    except ValueError as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 1

    if args.json:
        encoder = msgspec.json.Encoder()
        rows: list[Any] = intervals if at is None else memberships_at(intervals, at)
        sys.stdout.write("".join(encoder.encode(r).decode() + "\n" for r in rows))
        return 0
    # In a pipe, rich would squeeze the table into 80 columns; it is only as wide as it needs.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if at is None:
        table = Table(title=f"{customer}: segment memberships {source}")
        for column in ("segment", "entered", "by", "exited", "by"):
            table.add_column(column)
        for i in intervals:
            table.add_row(
                i.segment,
                _when(i.entered_at),
                _cause(i.entered_by, i.entered_version),
                _when(i.exited_at) or "(still in)",
                _cause(i.exited_by, i.exited_version),
            )
    else:
        table = Table(title=f"{customer} at {_when(at)}: segment memberships {source}")
        for column in ("segment", "member", "since", "until"):
            table.add_column(column)
        for m in memberships_at(intervals, at):
            stay = m.interval
            table.add_row(
                m.segment,
                "yes" if m.member else "no",
                _when(stay.entered_at) if stay else "",
                (_when(stay.exited_at) or "(still in)") if stay else "",
            )
    if not intervals:
        console.print(f"{customer} has been in no segment, {source}", markup=False)
    else:
        console.print(table)
    return 0
