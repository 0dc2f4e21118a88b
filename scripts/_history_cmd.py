"""``shoal history CUSTOMER``: when a customer was in each segment.

The intervals come from :func:`actors.membership_intervals`, over the customer's outbox
(:func:`actors.outbox_history`) or a replay of its events (:func:`actors.replayed_history`).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from actors import (
    known_customer,
    load_segments,
    membership_intervals,
    memberships_at,
    outbox_history,
    replayed_history,
)
from protocol import Cause, from_instant, to_instant
from store import Store

from ._errors import NotFound, UsageError
from ._times import human_instant


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
    return "" if at is None else human_instant(at)


async def _history(args: argparse.Namespace) -> int:
    if not args.replay and (args.segments is not None or args.until is not None):
        raise UsageError("--segments and --until go with --replay")
    at = None if args.at is None else from_instant(_instant(args.at, "--at"))
    until = _now() if args.until is None else _instant(args.until, "--until")
    segments = load_segments(args.segments) if args.replay else None
    db = args.data_dir / "shoal.db"
    customer: str = args.customer
    async with await Store.open_read_only(db) as store:
        if not await known_customer(store, customer):
            raise NotFound(f"no customer {customer!r} in {db}")
        if segments is not None:
            transitions = await replayed_history(store, customer, segments, until=until)
            source = (
                f"as replayed under {args.segments or 'the default segments'} until "
                f"{human_instant(until)}"
            )
            cut = store.retention.cut
            if cut is not None:
                # What the cut log can reach: the customer's state then, no earlier change.
                source += f" from the event log's cut at {human_instant(cut.at)} (retention)"
        else:
            transitions = await outbox_history(store, customer)
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
