"""Segment rules: the language, the definitions file, and explanations.

A rule is checked when it is parsed and compiled to one function; :class:`Rule` evaluates it
at an exact instant, and says the next instant its value can change. :class:`SegmentSet`
holds a definitions file's segments; :func:`explain` says why a customer is in a segment or
not. SEGMENTS.md is the specification.
"""

from ._check import Env as Env
from ._conditions import Condition as Condition
from ._conditions import Operand as Operand
from ._dates import LocalFilter as LocalFilter
from ._dates import local_time as local_time
from ._dates import parse_duration as parse_duration
from ._explain import explain as explain
from ._facts import MISSING as MISSING
from ._facts import Facts as Facts
from ._facts import Indexed as Indexed
from ._facts import Needs as Needs
from ._facts import Tracked as Tracked
from ._facts import earliest as earliest
from ._rule import Rule as Rule
from ._rule import parse_rule as parse_rule
from ._scores import ScoreConfig as ScoreConfig
from ._scores import ScoreTerms as ScoreTerms
from ._segments import Plan as Plan
from ._segments import Segment as Segment
from ._segments import SegmentSet as SegmentSet
from ._segments import load_segments as load_segments
from ._segments import parse_segments as parse_segments

__all__ = (
    "MISSING",
    "Condition",
    "Env",
    "Facts",
    "Indexed",
    "LocalFilter",
    "Needs",
    "Operand",
    "Plan",
    "Rule",
    "ScoreConfig",
    "ScoreTerms",
    "Segment",
    "SegmentSet",
    "Tracked",
    "earliest",
    "explain",
    "load_segments",
    "local_time",
    "parse_duration",
    "parse_rule",
    "parse_segments",
)
