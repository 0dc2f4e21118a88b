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
from ._partition import Partition as Partition

__all__ = ("Engine", "EngineConfig", "EngineObserver", "EngineStats", "Partition")
