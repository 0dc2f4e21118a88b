"""The engine: one partition of customers, run from an event source to a transition sink.

It is assembled from parts, each with one job: ingest (a batch from decoding to
acknowledgement), deadlines (the live side of the scheduler), recovery (snapshots plus the
log tail), snapshot rounds, definitions (switching while running), queries, the outbox
(commit and publish) and counts. The synchronous core they share with replay is the
:class:`Partition`.
"""

from ._config import EngineConfig as EngineConfig
from ._config import EngineObserver as EngineObserver
from ._config import EngineStats as EngineStats
from ._engine import Engine as Engine
from ._forget import Erased as Erased
from ._forget import Eraser as Eraser
from ._partition import Partition as Partition
from ._startup import RebuildReport as RebuildReport
from ._startup import StoreBehindError as StoreBehindError
from ._startup import rebuild_from_stream as rebuild_from_stream
from ._stored_definitions import DefinitionsKeeper as DefinitionsKeeper
from ._stored_definitions import content_hash as content_hash
from ._stored_definitions import segments_of as segments_of
from ._stored_definitions import served_origin as served_origin
from ._takeover import PartitionCut as PartitionCut
from ._takeover import TakeoverReport as TakeoverReport
from ._takeover import take_over as take_over

__all__ = (
    "DefinitionsKeeper",
    "Engine",
    "EngineConfig",
    "EngineObserver",
    "EngineStats",
    "Erased",
    "Eraser",
    "Partition",
    "PartitionCut",
    "RebuildReport",
    "StoreBehindError",
    "TakeoverReport",
    "content_hash",
    "rebuild_from_stream",
    "segments_of",
    "served_origin",
    "take_over",
)
