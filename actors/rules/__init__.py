"""Segment rules: the language, the definitions file, and explanations.

SEGMENTS.md is the specification. A rule is an expression in Python syntax, parsed with
:mod:`ast` and checked against a whitelist of nodes and functions (never ``eval``), then
compiled to one function. :class:`SegmentSet` holds a definitions file's segments;
:func:`explain` says why a customer is in a segment or not.

Every part of a rule evaluates at an instant ``now`` to ``(value, next)``: its value, and the
earliest instant after ``now`` at which the value (or its form, for values that move with
time) can change without a new event (``None``: never). A customer's deadline is the earliest
``next`` over its segments: that is what lets shoal fire a time-based change at its exact
instant instead of in a periodic sweep. A ``next`` may be early (the engine re-evaluates then
and finds nothing changed) but never late.

Values that move with time are represented, not sampled: an elapsed time by the instant it is
measured from, a score by its terms, so comparisons can solve for the instant they flip.
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
from ._reach import check_retention as check_retention
from ._reach import duration_text as duration_text
from ._reach import unserved as unserved
from ._rule import Rule as Rule
from ._rule import parse_rule as parse_rule
from ._scores import ScoreConfig as ScoreConfig
from ._scores import ScoreTerms as ScoreTerms
from ._segments import Plan as Plan
from ._segments import Segment as Segment
from ._segments import SegmentSet as SegmentSet
from ._segments import load_segments as load_segments
from ._segments import load_segments_by_value as load_segments_by_value
from ._segments import parse_segments as parse_segments
from ._segments import stored_text as stored_text

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
    "check_retention",
    "duration_text",
    "earliest",
    "explain",
    "load_segments",
    "load_segments_by_value",
    "local_time",
    "parse_duration",
    "parse_rule",
    "parse_segments",
    "stored_text",
    "unserved",
)
