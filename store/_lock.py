"""The writer lock: one process at a time may write to a store."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ._errors import StoreLockedError


class WriterLock:
    """An advisory lock on a file beside the store (``<store>.lock``), held while the store
    is open for writing. The operating system releases it if the process dies."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> WriterLock:
        """Take the lock of the store at ``path`` (its directory must exist).

        Raises:
            StoreLockedError: another process holds it.
        """
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise StoreLockedError(path) from e
        return cls(fd)

    def release(self) -> None:
        """Let another process take it. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
