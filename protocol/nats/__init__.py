"""shoal on NATS JetStream: connecting, the streams, the engine's two ports (the event source
and the transition sink), the query service and its client; and for several engines sharing
the partitions, the leases and heartbeats (``SHOAL_LEASES``) and the fence claims.

The only part of ``protocol`` that imports ``nats``: the command line and the service import
it; the engine (``actors``) sees only the ports (``protocol.EventSource`` and
``protocol.TransitionSink``).
"""

from ._backup import StreamCopy as StreamCopy
from ._backup import StreamExists as StreamExists
from ._backup import StreamNotFound as StreamNotFound
from ._backup import restore_stream as restore_stream
from ._backup import snapshot_stream as snapshot_stream
from ._backup import stream_info as stream_info
from ._claims import DEFAULT_LEASE_TTL as DEFAULT_LEASE_TTL
from ._claims import Claim as Claim
from ._claims import Claims as Claims
from ._claims import PartitionsLost as PartitionsLost
from ._claims import last_claims as last_claims
from ._connect import Credentials as Credentials
from ._connect import StreamNeedsMigration as StreamNeedsMigration
from ._connect import StreamSettings as StreamSettings
from ._connect import connect as connect
from ._connect import declared as declared
from ._connect import ensure_streams as ensure_streams
from ._connect import redact as redact
from ._connect import stream_partitions as stream_partitions
from ._definitions_kv import DefinitionsKV as DefinitionsKV
from ._erase import BrokerEraser as BrokerEraser
from ._erase import erase_progress as erase_progress
from ._feed import EventFeed as EventFeed
from ._fenced import published_versions as published_versions
from ._fences import claim_fence as claim_fence
from ._fences import fence_headers as fence_headers
from ._fences import fenced as fenced
from ._fences import is_fenced_error as is_fenced_error
from ._fences import last_claim as last_claim
from ._import import Published as Published
from ._import import publish_import as publish_import
from ._leases import ChangeKind as ChangeKind
from ._leases import Heartbeat as Heartbeat
from ._leases import Holder as Holder
from ._leases import Lease as Lease
from ._leases import LeaseBucket as LeaseBucket
from ._leases import LeaseChange as LeaseChange
from ._leases import LeaseWatch as LeaseWatch
from ._partitioned import FeedClaim as FeedClaim
from ._partitioned import PartitionedFeed as PartitionedFeed
from ._partitioned import cut_partition as cut_partition
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
    "BrokerEraser",
    "ChangeKind",
    "Claim",
    "Claims",
    "Credentials",
    "DEFAULT_LEASE_TTL",
    "DefinitionsKV",
    "EventFeed",
    "FeedClaim",
    "Heartbeat",
    "Holder",
    "Lease",
    "LeaseBucket",
    "LeaseChange",
    "LeaseWatch",
    "PartitionedFeed",
    "PartitionsLost",
    "Published",
    "Publisher",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotUnusable",
    "StreamCopy",
    "StreamExists",
    "StreamNeedsMigration",
    "StreamNotFound",
    "StreamSettings",
    "claim_fence",
    "connect",
    "cut_partition",
    "declared",
    "ensure_streams",
    "erase_progress",
    "fence_headers",
    "fenced",
    "is_fenced_error",
    "iter_transitions",
    "jetstream_ports",
    "last_claim",
    "last_claims",
    "permission_guard",
    "publish_import",
    "published_versions",
    "read_stream",
    "redact",
    "rejected_positions",
    "restore_stream",
    "serve_api",
    "snapshot_stream",
    "stream_info",
    "stream_partitions",
)
