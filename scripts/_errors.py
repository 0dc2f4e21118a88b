"""What every ``shoal`` command may raise for a one-line error, and the one table that maps
an error to the exit status: the same for every command.

=====  ===========================================================================
 code  meaning
=====  ===========================================================================
   0   done
   1   runtime failure: the broker or the engine cannot be reached, refused, or
       failed; a file cannot be written; the engine has not created a stream yet
   2   usage: the command line is wrong (unknown or conflicting options, a value
       that does not parse)
   3   bad input: events or a segments file that are not valid (lines skipped by
       ``publish``, ``import``, ``replay FILE``; a segments file refused)
   4   not found: a segment, customer, file, event log or data directory named does
       not exist
 130   interrupted (Ctrl-C): output files are left as they were
=====  ===========================================================================
"""

from __future__ import annotations

import errno
from enum import IntEnum
from pathlib import Path

from actors import ActorsError, DefinitionError
from protocol import ApiError, InvalidEvent, ProtocolError, SubjectError
from store import StoreError


class ExitCode(IntEnum):
    """The exit statuses of every ``shoal`` command (see the module's table)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    BAD_INPUT = 3
    NOT_FOUND = 4
    INTERRUPTED = 130


class CliError(Exception):
    """An error a command reports as one line (``shoal: error: ...``) and the exit status
    ``code``."""

    code = ExitCode.FAILURE


class UsageError(CliError):
    """Bad command-line input: exit status 2."""

    code = ExitCode.USAGE


class BadInput(CliError):
    """Input data (events, a segments file) that is not valid: exit status 3."""

    code = ExitCode.BAD_INPUT


class NotFound(CliError):
    """Something named on the command line does not exist: exit status 4."""

    code = ExitCode.NOT_FOUND


def file_error(path: str | Path, error: OSError, doing: str = "read") -> CliError:
    """The error to raise when the file ``path`` cannot be ``doing`` (read, write):
    :class:`NotFound` when it (or its directory) does not exist, else a
    :class:`UsageError` (choose another path)."""
    text = f"cannot {doing} {path}: {error.strerror or error}"
    if error.errno == errno.ENOENT:
        return NotFound(text)
    return UsageError(text)


def exit_code(error: BaseException) -> ExitCode:
    """The exit status for ``error``, which a command raised to report as one line: the
    single place the packages' exceptions meet the exit-code table."""
    if isinstance(error, CliError):
        return error.code
    if isinstance(error, DefinitionError):
        # A segments file that does not exist is not found; one that does not parse, bad.
        missing = isinstance(error.__context__, FileNotFoundError)
        return ExitCode.NOT_FOUND if missing else ExitCode.BAD_INPUT
    if isinstance(error, InvalidEvent):
        return ExitCode.BAD_INPUT
    if isinstance(error, SubjectError):
        return ExitCode.USAGE  # a segment or customer id given that cannot be one
    if isinstance(error, ApiError):
        # The engine's HTTP-like codes: the request (a segments file) is wrong, or names
        # what does not exist; anything else is a failure of the engine or the broker.
        return _API_CODES.get(error.code, ExitCode.FAILURE)
    if isinstance(error, FileNotFoundError):
        return ExitCode.NOT_FOUND  # StoreMissingError: no event log there
    return ExitCode.FAILURE


_API_CODES = {"400": ExitCode.BAD_INPUT, "404": ExitCode.NOT_FOUND}

REPORTED: tuple[type[BaseException], ...] = (CliError, ActorsError, ProtocolError, StoreError)
"""The exceptions a command reports as one line and :func:`exit_code`, not a traceback:
this module's, and the roots of the packages' errors."""
