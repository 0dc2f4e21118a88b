"""The SQLite store of shoal: the append-only event log and the transitions outbox.

``store`` knows nothing of NATS or of segment rules: entries carry opaque bodies.
"""

from ._errors import StoreError as StoreError
from ._errors import StoreFormatError as StoreFormatError
from ._errors import StoreLockedError as StoreLockedError
from ._log import NEVER as NEVER
from ._log import SCHEMA_VERSION as SCHEMA_VERSION
from ._log import EventLog as EventLog
from ._log import LoggedEvent as LoggedEvent
from ._log import OutboxEntry as OutboxEntry
from ._log import Snapshot as Snapshot
from ._log import SnapshotMarks as SnapshotMarks
from ._log import Synchronous as Synchronous

__all__ = (
    "NEVER",
    "SCHEMA_VERSION",
    "EventLog",
    "LoggedEvent",
    "OutboxEntry",
    "Snapshot",
    "SnapshotMarks",
    "StoreError",
    "StoreFormatError",
    "StoreLockedError",
    "Synchronous",
)
