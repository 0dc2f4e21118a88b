"""shoal on NATS JetStream: connecting, the streams, the engine's two ports (the event source
and the transition sink), the query service and its client.

The only part of ``protocol`` that imports ``nats``: the command line and the service import
it; the engine (``actors``) sees only the ports (``protocol.EventSource`` and
``protocol.TransitionSink``).
"""

from ._connect import Credentials as Credentials
from ._connect import StreamNeedsMigration as StreamNeedsMigration
from ._connect import StreamSettings as StreamSettings
from ._connect import connect as connect
from ._connect import ensure_streams as ensure_streams
from ._connect import redact as redact
from ._connect import stream_partitions as stream_partitions
from ._definitions_kv import DefinitionsKV as DefinitionsKV
from ._feed import EventFeed as EventFeed
from ._import import Published as Published
from ._import import publish_import as publish_import
from ._partitioned import PartitionedFeed as PartitionedFeed
from ._publisher import Publisher as Publisher
from ._refusals import permission_guard as permission_guard
from ._service import ApiClient as ApiClient
from ._service import serve_api as serve_api
from ._snapshot_store import SnapshotInfo as SnapshotInfo
from ._snapshot_store import SnapshotStore as SnapshotStore
from ._snapshot_store import SnapshotUnusable as SnapshotUnusable
from ._stream import read_stream as read_stream
from ._stream import rejected_positions as rejected_positions
from ._wiring import iter_transitions as iter_transitions
from ._wiring import jetstream_ports as jetstream_ports

__all__ = (
    "ApiClient",
    "Credentials",
    "DefinitionsKV",
    "EventFeed",
    "PartitionedFeed",
    "Published",
    "Publisher",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotUnusable",
    "StreamNeedsMigration",
    "StreamSettings",
    "connect",
    "ensure_streams",
    "iter_transitions",
    "jetstream_ports",
    "permission_guard",
    "publish_import",
    "read_stream",
    "redact",
    "rejected_positions",
    "serve_api",
    "stream_partitions",
)
