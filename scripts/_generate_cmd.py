"""``shoal generate``: a synthetic, reproducible history as Segment Spec JSON lines.

This module parses arguments and writes to stdout; the population model itself is
:mod:`actors.population`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from actors.population import DEFAULT_START, generate, write_history
from protocol import InvalidEvent, format_instant, parse_timestamp

from ._errors import UsageError


def register(sub: Any) -> None:
    """Add the ``generate`` command to the ``shoal`` subparsers ``sub``."""
    p = sub.add_parser(
        "generate",
        help="write a synthetic, reproducible history (a gym's members) as JSON lines",
        description="Write the events of a synthetic population (a gym or club: visits, "
        "newsletter opens and clicks, orders, renewals; steady, fading and dropping-out "
        "customers) as Segment Spec JSON lines on stdout, in receive order. The same "
        "arguments always give the same bytes.",
    )
    p.add_argument("--customers", type=int, default=1000, help="how many (default 1000)")
    p.add_argument("--days", type=int, default=365, help="length of the history (default 365)")
    p.add_argument("--seed", type=int, default=0, help="the same seed, the same events")
    p.add_argument(
        "--start",
        default=format_instant(DEFAULT_START),
        help="first day, ISO-8601 with an offset (default %(default)s)",
    )
    p.set_defaults(run=_generate)


async def _generate(args: argparse.Namespace) -> int:
    if args.customers <= 0 or args.days <= 0:
        raise UsageError("--customers and --days must be positive")
    try:
        start = parse_timestamp(args.start)
    except InvalidEvent as e:
        raise UsageError(f"--start: {e}") from None
    events = generate(args.customers, args.days, args.seed, start=start)
    try:
        write_history(events, sys.stdout.buffer)
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error. Point stdout at /dev/null so
        # that the interpreter's last flush does not fail on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
