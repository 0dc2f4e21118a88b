"""Output files written whole or not at all.

Every command that writes a file (``export --output``, ``replay --transitions``, ``--sizes``,
``--chart``, ...) writes it under a temporary name in the same directory, and renames it to
its name once complete. An interrupted command (Ctrl-C, exit status 130) or a failed one
leaves no partial file: the file named is as it was before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload

from ._errors import file_error


@contextlib.contextmanager
def output_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write, renamed to ``path`` when the block ends
    without an error, removed when it raises (``KeyboardInterrupt`` and cancellation
    included).

    Raises:
        CliError: the directory cannot be written (:func:`~scripts._errors.file_error`).
    """
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise file_error(target, e, "write") from None
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        # mkstemp makes it private (0600); the file named gets the mode a new file gets.
        temporary.chmod(0o666 & ~_umask())
        temporary.replace(target)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise file_error(target, e, "write") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@overload
def output_file(
    path: str | Path, *, binary: Literal[True]
) -> contextlib.AbstractContextManager[IO[bytes]]: ...
@overload
def output_file(
    path: str | Path, *, binary: Literal[False] = ...
) -> contextlib.AbstractContextManager[IO[str]]: ...
def output_file(
    path: str | Path, *, binary: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """:func:`output_path`, opened: a file to write (text in UTF-8 with ``\\n`` line ends,
    or ``binary``), which becomes ``path`` when the block ends without an error."""
    return _output_file(path, binary)


@contextlib.contextmanager
def _output_file(path: str | Path, binary: bool) -> Iterator[IO[Any]]:
    with output_path(path) as temporary:
        if binary:
            with temporary.open("wb") as f:
                yield f
        else:
            with temporary.open("w", encoding="utf-8", newline="") as f:
                yield f
