"""The SQLite store of shoal: the append-only event log, the transitions outbox and the
customers' snapshots, as parts of one :class:`Store`.

``store`` knows nothing of NATS or of segment rules: entries carry opaque bodies.
"""

from ._definitions import Definitions as Definitions
from ._definitions import StoredRow as StoredRow
from ._errors import StoreError as StoreError
from ._errors import StoreFormatError as StoreFormatError
from ._errors import StoreFullError as StoreFullError
from ._errors import StoreLockedError as StoreLockedError
from ._errors import StoreMissingError as StoreMissingError
from ._events import EventLog as EventLog
from ._events import LoggedEvent as LoggedEvent
from ._forgotten import Forgotten as Forgotten
from ._forgotten import ForgottenTable as ForgottenTable
from ._outbox import Outbox as Outbox
from ._outbox import OutboxEntry as OutboxEntry
from ._parked import Parked as Parked
from ._parked import ParkedCustomer as ParkedCustomer
from ._retention import CustomerBase as CustomerBase
from ._retention import CutMark as CutMark
from ._retention import Retention as Retention
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._schema import Synchronous as Synchronous
from ._snapshots import Snapshot as Snapshot
from ._snapshots import SnapshotMarks as SnapshotMarks
from ._snapshots import Snapshots as Snapshots
from ._store import Store as Store

__all__ = (
    "SCHEMA_VERSION",
    "CustomerBase",
    "CutMark",
    "Definitions",
    "EventLog",
    "Forgotten",
    "ForgottenTable",
    "LoggedEvent",
    "Outbox",
    "OutboxEntry",
    "Parked",
    "ParkedCustomer",
    "Retention",
    "Snapshot",
    "SnapshotMarks",
    "Snapshots",
    "Store",
    "StoreError",
    "StoreFormatError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMissingError",
    "StoredRow",
    "Synchronous",
)
