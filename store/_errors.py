"""The exceptions raised by :mod:`store`."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Root of every error raised by :mod:`store`."""


class StoreLockedError(StoreError):
    """Another process has the store open for writing."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is in use by another shoal engine; stop it, or give this one "
            "another --data-dir"
        )
        self.path = path


class StoreMissingError(StoreError, FileNotFoundError):
    """There is no store at ``path`` (to read): a wrong data directory, or an engine that
    never ran there."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no event log at {path}")
        self.path = path

    def __str__(self) -> str:
        # FileNotFoundError would show its (errno, strerror) pair otherwise.
        return f"no event log at {self.path}"


class StoreFormatError(StoreError):
    """The database was written by an incompatible version of shoal: a newer one (``found``
    later than ``expected``, or not a number), or one too old to upgrade."""

    def __init__(self, path: Path, found: int | str, expected: int) -> None:
        if isinstance(found, str) or found > expected:
            message = (
                f"{path} has schema version {found}, and this shoal knows versions up to "
                f"{expected}: it was written by a newer shoal. Run that shoal (or a later "
                "one) on this data directory; this one stops rather than misread it"
            )
        else:
            message = f"{path} has schema version {found}, this shoal reads version {expected}"
        super().__init__(message)
        self.path = path
        self.found = found
        self.expected = expected


class StoreFullError(StoreError):
    """The disk that holds the store is full: nothing of the write was written. The same
    write succeeds once there is room again."""

    def __init__(self, path: Path, doing: str) -> None:
        where = "its disk" if str(path) in doing else f"the disk that holds {path}"
        super().__init__(f"{doing}: {where} is full; free space on it")
        self.path = path
        self.doing = doing
