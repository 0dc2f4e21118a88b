"""Watching a segments file: applying it again when it changes, or when asked (SIGHUP).

``shoal serve --segments FILE`` runs :func:`watch_segments` beside the engine.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import structlog

from ._errors import ActorsError, DefinitionError, DefinitionsConflict
from .rules import SegmentSet, load_segments

POLL = 1.0
"""Seconds between two looks at a watched file."""
SETTLE = 0.1
"""Seconds a changed file must hold still before it is read (not half-written)."""

FileStamp = tuple[int, int, int] | None
"""What tells a changed file (see :func:`file_stamp`)."""


def file_stamp(path: Path) -> FileStamp:
    """What tells a changed file: inode (replaced by a rename), size and mtime; None if it
    cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def watch_segments(
    path: Path,
    apply: Callable[[SegmentSet], Awaitable[object]],
    *,
    stamp: FileStamp,
    asked: AsyncIterator[object],
    lists_dir: Path | None = None,
    poll: float = POLL,
    settle: float = SETTLE,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
) -> None:
    """Apply the segments file ``path`` again whenever it changes (looked at every ``poll``
    seconds), or whenever ``asked`` yields; return when ``apply`` raises
    :class:`ActorsError` (the engine stopped: its own error, if any, is what matters).

    A changed file is read once it has held still for ``settle`` seconds: an editor or a
    copy may still be writing it. An invalid file changes nothing: one error line, and the
    definitions in force stay.

    Args:
        path: the segments file.
        apply: gives the engine new definitions (``Engine.apply_segments``); it logs what
            it changed.
        stamp: :func:`file_stamp` of ``path`` as it was read for the definitions in force
            (taken before reading it, so that no change is missed).
        asked: yields each time the file is to be read again, changed or not (SIGHUP).
        lists_dir: the only directory its list files are read from (``serve --lists-dir``):
            a file that names one outside it is refused like any invalid file.
        sleep: waits a number of seconds (injected by tests).
    """
    logger = structlog.get_logger("shoal")
    while True:
        was_asked = False
        with anyio.move_on_after(poll):
            await anext(asked)
            was_asked = True
        now = file_stamp(path)
        if not was_asked and now == stamp:
            continue
        while True:  # an editor or a copy may still be writing it
            await sleep(settle)
            now, before = file_stamp(path), now
            if now == before:
                break
        stamp = now
        try:
            # In a worker thread: list files may be large, and the engine's loop goes on.
            load = functools.partial(load_segments, path, lists_dir=lists_dir)
            segments = await anyio.to_thread.run_sync(load)
        except DefinitionError as e:
            logger.error("segments not reloaded, the previous ones stay in force", error=str(e))
            continue
        try:
            await apply(segments)  # the engine logs what it changed
        except DefinitionsConflict:
            continue  # logged; another engine's version is followed
        except DefinitionError as e:  # what the engine's cut log cannot serve (retention)
            logger.error("segments not reloaded, the previous ones stay in force", error=str(e))
            continue
        except ActorsError:
            return
