"""Customer actors, segment rules, the shared timer queue and the engine loop.

Actors do no I/O and read no clock; the :class:`Engine` feeds them events and instants.
"""

from ._api import EngineApi as EngineApi
from ._api import customer_state as customer_state
from ._clock import Clock as Clock
from ._clock import SystemClock as SystemClock
from ._clock import VirtualClock as VirtualClock
from ._customer import Customer as Customer
from ._errors import ActorsError as ActorsError
from ._errors import DefinitionError as DefinitionError
from ._replay import Replay as Replay
from ._replay import replay as replay
from ._timers import TimerQueue as TimerQueue
from .engine import Engine as Engine
from .engine import EngineConfig as EngineConfig
from .engine import EngineObserver as EngineObserver
from .engine import EngineStats as EngineStats
from .rules import Rule as Rule
from .rules import Segment as Segment
from .rules import SegmentSet as SegmentSet
from .rules import load_segments as load_segments
from .rules import parse_duration as parse_duration
from .rules import parse_rule as parse_rule
from .rules import parse_segments as parse_segments

__all__ = (
    "ActorsError",
    "Clock",
    "Customer",
    "DefinitionError",
    "Engine",
    "EngineApi",
    "EngineConfig",
    "EngineObserver",
    "EngineStats",
    "Replay",
    "Rule",
    "Segment",
    "SegmentSet",
    "SystemClock",
    "TimerQueue",
    "VirtualClock",
    "customer_state",
    "load_segments",
    "parse_duration",
    "parse_rule",
    "parse_segments",
    "replay",
)
