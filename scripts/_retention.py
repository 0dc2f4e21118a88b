"""``--retain DURATION``: the retention policy of ``serve``, and the check of definitions
against it (``segments validate``, ``serve``'s segments file)."""

from __future__ import annotations

import argparse

from actors.rules import parse_duration

MIN_RETENTION = 86_400_000_000
"""The shortest retention taken (1 day): a shorter one would cut what a restart or an
import may still need while it runs, for no gain."""


def retention(text: str) -> int:
    """The microseconds of a ``--retain`` duration (``400d``, ``36h``...).

    Raises:
        argparse.ArgumentTypeError: it is not a duration of at least a day.
    """
    try:
        us = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if us < MIN_RETENTION:
        raise argparse.ArgumentTypeError(f"{text!r}: a retention is at least '1d'")
    return us


def add_retain(parser: argparse.ArgumentParser, help: str) -> None:
    """Add ``--retain DURATION`` (default: None, keep everything) to ``parser``."""
    parser.add_argument("--retain", type=retention, default=None, metavar="DURATION", help=help)
