"""Sorting more items than memory holds: sorted runs spilled to temporary files, then merged.

A :class:`Spill` takes items (tuples of msgpack-encodable values, all of one type) one at a
time, holds up to ``run`` of them, and writes each full batch sorted to a temporary file (a
run). :meth:`Spill.sorted` merges the runs and what is left in memory (``heapq.merge``), so
its memory is the batch plus one block of each run, whatever the number of items. Input that
arrives already in order never starts a second run: a batch that sorts after the last one
written is appended to the same file, and one run is read back as it is, with no merge.
Nothing is written until a batch is full: a small input stays in memory.

The files live in one directory (:class:`SpillFiles`), made on first use in the system's
temporary directory (``TMPDIR``) and removed, with everything in it, by
:meth:`SpillFiles.close`.
"""

from __future__ import annotations

import contextlib
import heapq
import secrets
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import msgspec

from ._errors import ProtocolError

T = TypeVar("T", bound=tuple[Any, ...])

RUN = 50_000
"""Items held in memory before a batch is written as a sorted run."""
_BLOCK = 256
"""Items per block of a run file: what a merge holds of each run at a time."""
_FAN_IN = 64
"""Runs merged at once; more are first merged into longer runs, so memory stays bounded."""
_LENGTH = struct.Struct("<I")


class SpillError(ProtocolError):
    """Temporary files could not be written (the disk is full, say): free space, or set
    ``TMPDIR`` to a directory with room."""

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(
            f"cannot write temporary files in {directory}: {reason} (free some space, or set "
            "TMPDIR to a directory with room)"
        )
        self.directory = directory
        self.reason = reason


class SpillFiles:
    """The temporary directory that spills write their runs in, made on first use.

    Args:
        directory: where to make it (None: the system's, which ``TMPDIR`` sets).
    """

    __slots__ = ("_parent", "_path", "_count", "_opened")

    def __init__(self, directory: str | Path | None = None) -> None:
        self._parent = directory
        self._path: Path | None = None
        self._count = 0
        self._opened: list[IO[bytes]] = []
        """Every file opened, closed by :meth:`close` should an error or an interrupt
        leave one open."""

    @property
    def used(self) -> bool:
        """Whether anything was written to disk."""
        return self._path is not None

    def new(self) -> tuple[Path, IO[bytes]]:
        """A new empty file, open for writing.

        Raises:
            SpillError: it cannot be made.
        """
        try:
            if self._path is None:
                self._path = self._make_dir()
            self._count += 1
            path = self._path / f"run-{self._count}"
            return path, self._track(path.open("wb"))
        except OSError as e:
            raise self.error(e) from e

    def _make_dir(self) -> Path:
        """A new directory of the owner's alone (as ``tempfile.mkdtemp`` makes one), its path
        kept before it is made: an interrupt (Ctrl-C) just after the ``mkdir`` must still
        find it for :meth:`close` to remove (with ``mkdtemp`` the path came back only after,
        and a CI run saw the directory left behind)."""
        parent = Path(self._parent if self._parent is not None else tempfile.gettempdir())
        while True:
            self._path = parent / f"shoal-spill-{secrets.token_hex(6)}"
            try:
                self._path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            except OSError:
                self._path = None  # not made: the error names where it was to be
                raise
            return self._path

    def read(self, path: Path) -> IO[bytes]:
        """``path``, a run written, open for reading."""
        return self._track(path.open("rb"))

    def _track(self, f: IO[bytes]) -> IO[bytes]:
        self._opened = [o for o in self._opened if not o.closed]
        self._opened.append(f)
        return f

    def error(self, e: OSError) -> SpillError:
        """``e``, met writing a run, as the error a person reads."""
        where = self._parent if self._parent is not None else tempfile.gettempdir()
        return SpillError(str(self._path or where), e.strerror or str(e))

    def close(self) -> None:
        """Close the files and remove the directory with every run in it (again: nothing)."""
        for f in self._opened:
            with contextlib.suppress(OSError):
                f.close()
        self._opened = []
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


class Spill(Generic[T]):
    """Items to read back sorted, in memory bounded by ``run`` items (see the module).

    Args:
        item: the type of the items, a tuple type msgspec can decode (``tuple[int, str]``).
            Items compare as tuples: make them distinct before a field that does not
            compare (a line number before an event, say).
        files: where runs are written.
        run: how many items are held in memory before a batch is written.
    """

    __slots__ = ("_files", "_run", "_batch", "_runs", "_open", "_tail", "_decoder", "_encoder")

    def __init__(self, item: Any, files: SpillFiles, *, run: int = RUN) -> None:
        self._files = files
        self._run = run
        self._batch: list[T] = []
        self._runs: list[Path] = []
        self._open: IO[bytes] | None = None
        """The last run's file while batches keep arriving in order (appended to)."""
        self._tail: T | None = None
        """The last item of the last run."""
        self._decoder = msgspec.msgpack.Decoder(list[item])
        self._encoder = msgspec.msgpack.Encoder()

    def add(self, item: T) -> None:
        """Take one more item.

        Raises:
            SpillError: a full batch could not be written.
        """
        self._batch.append(item)
        if len(self._batch) >= self._run:
            self._write_batch()

    def sorted(self) -> Iterator[T]:
        """Every item added, in ascending order (equal items in the order added). Call it
        once, after the last :meth:`add`.

        Raises:
            SpillError: runs could not be merged (written to disk) when there were many.
        """
        batch = self._batch
        batch.sort()
        self._batch = []
        self._close_open()
        if not self._runs:
            return iter(batch)
        while len(self._runs) >= _FAN_IN:
            self._merge_runs()
        return heapq.merge(*(self._read(path) for path in self._runs), batch)

    def _write_batch(self) -> None:
        batch = self._batch
        batch.sort()  # linear when the batch arrived in order
        self._batch = []
        if self._open is None or self._tail is None or batch[0] < self._tail:
            self._close_open()
            path, self._open = self._files.new()
            self._runs.append(path)
        self._write(self._open, batch)
        self._tail = batch[-1]

    def _write(self, f: IO[bytes], items: list[T]) -> None:
        try:
            for i in range(0, len(items), _BLOCK):
                data = self._encoder.encode(items[i : i + _BLOCK])
                f.write(_LENGTH.pack(len(data)))
                f.write(data)
        except OSError as e:
            raise self._files.error(e) from e

    def _close_open(self) -> None:
        if self._open is not None:
            try:
                self._open.close()
            except OSError as e:
                raise self._files.error(e) from e
            self._open = None

    def _read(self, path: Path) -> Iterator[T]:
        with self._files.read(path) as f:
            while head := f.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(head)
                block: list[T] = self._decoder.decode(f.read(length))
                yield from block

    def _merge_runs(self) -> None:
        """Merge the first :data:`_FAN_IN` runs into one, in their place (the earliest
        added: equal items stay in the order added)."""
        first, self._runs = self._runs[:_FAN_IN], self._runs[_FAN_IN:]
        path, f = self._files.new()
        with f:
            block: list[T] = []
            for item in heapq.merge(*(self._read(p) for p in first)):
                block.append(item)
                if len(block) == _BLOCK:
                    self._write(f, block)
                    block = []
            if block:
                self._write(f, block)
        for p in first:
            p.unlink()
        self._runs.insert(0, path)
