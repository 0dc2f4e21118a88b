"""What every ``shoal`` command may raise for a one-line error."""

from __future__ import annotations


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""
