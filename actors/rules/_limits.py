"""The limits on segment definitions, and reading definition files within them.

Definitions come from files and over the network (the query service applies them), so they
are untrusted; those from the network read no file at all (their lists carry their ids by
value: :mod:`actors.rules._lists`). Each limit is checked while a file is parsed, before the
work it bounds, and breaking one is a :class:`~actors.DefinitionError` naming the file, the
segment and the limit. Whatever passes them also runs: a date written in a rule plus or
minus any duration is still a date shoal can write (years 1 to 9999). (A deadline past
9999-12-31, reached from a trait's date, never comes: queries and explanations show none.)

=========================  =============  ====================================================
limit                      value          what it bounds
=========================  =============  ====================================================
MAX_SEGMENTS_FILE_BYTES    1 MiB          a segments file (and the ``toml`` the API applies,
                                          its lists' ids by value included)
MAX_SEGMENTS               1,000          segments in one file
MAX_RULE_CHARS             10,000         the text of one ``rule`` or ``exit``
MAX_RULES_CHARS            200,000        the text of all rules of one file together
MAX_RULE_NODES             2,000          syntax nodes of one rule (its compile time)
MAX_RULE_DEPTH             50             nesting of one rule's syntax (parentheses, ``not``)
MAX_DURATION               36,525 days    any duration: in rules, ``min_dwell``,
                                          ``half_life`` (100 years; negative alike)
MIN_/MAX_RULE_YEAR         1000, 8999     the years of a date written in a rule
MAX_RULE_NUMBER            10**15         a number in a rule or a score weight (finite)
MAX_LIST_FILE_BYTES        64 MiB         a ``[lists.NAME] file``
=========================  =============  ====================================================

A segments file and a list file must be regular files: a FIFO, a device or a directory is
refused before it is opened for reading, so nothing can block or stream without end.
"""

from __future__ import annotations

import functools
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from protocol import DAY, to_instant

MAX_SEGMENTS_FILE_BYTES = 1 << 20
MAX_SEGMENTS = 1_000
MAX_RULE_CHARS = 10_000
MAX_RULES_CHARS = 200_000
MAX_RULE_NODES = 2_000
MAX_RULE_DEPTH = 50
MAX_DURATION = 36_525 * DAY
MIN_RULE_YEAR = 1000
MAX_RULE_YEAR = 8999
MAX_RULE_NUMBER = 10**15
MAX_LIST_FILE_BYTES = 64 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@functools.cache
def rule_date_range() -> tuple[int, int]:
    """The first and the last instant a date written in a rule may be."""
    first = datetime(MIN_RULE_YEAR, 1, 1, tzinfo=UTC)
    after = datetime(MAX_RULE_YEAR + 1, 1, 1, tzinfo=UTC)
    return to_instant(first), to_instant(after) - 1


class FileLimitError(ValueError):
    """A definitions file that is not a regular file, or is larger than its limit."""


def _check_regular(mode: int, size: int, limit: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise FileLimitError(f"it is {kind}, not a regular file")
    if size > limit:
        raise FileLimitError(f"it has {size:,} bytes; the limit is {limit:,}")


def read_text_file(path: Path, limit: int) -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``limit`` bytes.

    The file is checked before it is opened (a FIFO is never waited on, a device never read)
    and again once open, in case it was replaced in between; at most ``limit`` bytes are read
    even if it grows meanwhile.

    Raises:
        OSError: it cannot be read.
        FileLimitError: it is not a regular file, or is larger than ``limit``.
        UnicodeDecodeError: it is not UTF-8.
    """
    info = os.stat(path)
    _check_regular(info.st_mode, info.st_size, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        _check_regular(info.st_mode, info.st_size, limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileLimitError(f"it has more than {limit:,} bytes, the limit")
    return data.decode("utf-8")
