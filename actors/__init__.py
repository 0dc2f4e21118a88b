"""Customer actors, segment rules, the shared timer queue and the engine loop.

Actors do no I/O and read no clock; the :class:`Engine` feeds them events and instants.
"""

from ._api import EngineApi as EngineApi
from ._api import customer_state as customer_state
from ._clock import Clock as Clock
from ._clock import SystemClock as SystemClock
from ._clock import VirtualClock as VirtualClock
from ._customer import Customer as Customer
from ._customer import SnapshotError as SnapshotError
from ._errors import ActorsError as ActorsError
from ._errors import DefinitionError as DefinitionError
from ._errors import DefinitionsConflict as DefinitionsConflict
from ._history import Interval as Interval
from ._history import MembershipAt as MembershipAt
from ._history import known_customer as known_customer
from ._history import membership_intervals as membership_intervals
from ._history import memberships_at as memberships_at
from ._history import outbox_history as outbox_history
from ._history import replayed_history as replayed_history
from ._part_replay import NO_CLOCK as NO_CLOCK
from ._part_replay import PartReplay as PartReplay
from ._part_replay import merge_parts as merge_parts
from ._reconcile import Reconciled as Reconciled
from ._reconcile import reconcile as reconcile
from ._replay import Replay as Replay
from ._replay import replay as replay
from ._retention import read_bases as read_bases
from ._stored import customer_of as customer_of
from ._stored import event_of as event_of
from ._stored import logged_event as logged_event
from ._stored import outbox_entries as outbox_entries
from ._stored import outbox_entry as outbox_entry
from ._stored import snapshot_row as snapshot_row
from ._stored import transition_of as transition_of
from ._tally import Replayer as Replayer
from ._tally import ReplayTally as ReplayTally
from ._tally import SegmentTally as SegmentTally
from ._timers import TimerQueue as TimerQueue
from ._transfer import IMPORT_BATCH as IMPORT_BATCH
from ._transfer import ImportReport as ImportReport
from ._transfer import export_history as export_history
from ._transfer import import_history as import_history
from ._transfer import read_log as read_log
from ._watch import FileStamp as FileStamp
from ._watch import file_stamp as file_stamp
from ._watch import watch_segments as watch_segments
from .engine import DefinitionsKeeper as DefinitionsKeeper
from .engine import Engine as Engine
from .engine import EngineConfig as EngineConfig
from .engine import EngineObserver as EngineObserver
from .engine import EngineStats as EngineStats
from .engine import PartitionCut as PartitionCut
from .engine import RebuildReport as RebuildReport
from .engine import StoreBehindError as StoreBehindError
from .engine import TakeoverReport as TakeoverReport
from .engine import rebuild_from_stream as rebuild_from_stream
from .engine import served_origin as served_origin
from .engine import take_over as take_over
from .rules import Rule as Rule
from .rules import Segment as Segment
from .rules import SegmentSet as SegmentSet
from .rules import load_segments as load_segments
from .rules import load_segments_by_value as load_segments_by_value
from .rules import parse_duration as parse_duration
from .rules import parse_rule as parse_rule
from .rules import parse_segments as parse_segments

__all__ = (
    "IMPORT_BATCH",
    "NO_CLOCK",
    "ActorsError",
    "Clock",
    "Customer",
    "DefinitionError",
    "DefinitionsConflict",
    "DefinitionsKeeper",
    "Engine",
    "EngineApi",
    "EngineConfig",
    "EngineObserver",
    "EngineStats",
    "FileStamp",
    "ImportReport",
    "Interval",
    "MembershipAt",
    "PartReplay",
    "PartitionCut",
    "RebuildReport",
    "Reconciled",
    "Replay",
    "ReplayTally",
    "Replayer",
    "Rule",
    "Segment",
    "SegmentSet",
    "SegmentTally",
    "SnapshotError",
    "StoreBehindError",
    "TakeoverReport",
    "SystemClock",
    "TimerQueue",
    "VirtualClock",
    "customer_of",
    "customer_state",
    "event_of",
    "export_history",
    "file_stamp",
    "import_history",
    "known_customer",
    "load_segments",
    "load_segments_by_value",
    "logged_event",
    "membership_intervals",
    "merge_parts",
    "memberships_at",
    "outbox_entries",
    "outbox_entry",
    "outbox_history",
    "parse_duration",
    "parse_rule",
    "parse_segments",
    "read_bases",
    "read_log",
    "rebuild_from_stream",
    "reconcile",
    "replay",
    "replayed_history",
    "served_origin",
    "take_over",
    "snapshot_row",
    "transition_of",
    "watch_segments",
)
