"""Segment definitions: a TOML file of named rules.

```toml
[segments.lapsing]
description = "No visit for 14 days"
rule = "since_last('Visit') >= '14d'"
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from protocol import SubjectError, validate_segment_name

from ._errors import DefinitionError
from ._rules import Facts, Needs, Rule, parse_rule

_SEGMENT_KEYS = {"description", "rule"}


@dataclass(frozen=True, slots=True)
class Segment:
    """One named, dynamic segment."""

    name: str
    rule: Rule
    description: str = ""


@dataclass(frozen=True, slots=True)
class SegmentSet:
    """The segments an engine evaluates, in file order (which orders simultaneous changes)."""

    segments: tuple[Segment, ...]
    needs: Needs
    source: str = "<segments>"

    @classmethod
    def of(cls, segments: Sequence[Segment], *, source: str = "<segments>") -> SegmentSet:
        """A set of segments; their names must be distinct.

        Raises:
            DefinitionError: two segments share a name.
        """
        seen: set[str] = set()
        for s in segments:
            if s.name in seen:
                raise DefinitionError("defined twice", source=source, segment=s.name)
            seen.add(s.name)
        names: frozenset[str | None] = frozenset().union(
            *(s.rule.needs.event_names for s in segments)
        )
        traits: frozenset[str] = frozenset().union(*(s.rule.needs.trait_keys for s in segments))
        return cls(tuple(segments), Needs(names, traits), source)

    @property
    def names(self) -> tuple[str, ...]:
        """The segment names, in file order."""
        return tuple(s.name for s in self.segments)

    def evaluate(self, facts: Facts, now: int) -> tuple[list[bool], int | None]:
        """Each segment's rule at ``now`` (in order), and the earliest next change."""
        values: list[bool] = []
        nxt: int | None = None
        for s in self.segments:
            v, n = s.rule.evaluate(facts, now)
            values.append(v)
            if n is not None and (nxt is None or n < nxt):
                nxt = n
        return values, nxt


def parse_segments(text: str, *, source: str = "<segments>") -> SegmentSet:
    """Parse a segments file's text.

    Raises:
        DefinitionError: the file is not valid; the message names the file, the segment and
            the problem.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"not valid TOML: {e}", source=source) from None
    unknown = set(doc) - {"segments"}
    if unknown:
        raise DefinitionError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; expected [segments.NAME] "
            "tables",
            source=source,
        )
    table = doc.get("segments")
    if not isinstance(table, Mapping) or not table:
        raise DefinitionError(
            "no segments: define at least one [segments.NAME] table with a rule", source=source
        )
    segments = [_segment(name, body, source) for name, body in table.items()]
    return SegmentSet.of(segments, source=source)


def _segment(name: str, body: Any, source: str) -> Segment:
    try:
        validate_segment_name(name)
    except SubjectError as e:
        raise DefinitionError(str(e), source=source, segment=name) from None
    if not isinstance(body, Mapping):
        raise DefinitionError("must be a table with a `rule`", source=source, segment=name)
    unknown = set(body) - _SEGMENT_KEYS
    if unknown:
        raise DefinitionError(
            f"unknown key(s) {', '.join(sorted(unknown))}; a segment has `rule` and "
            "optionally `description`",
            source=source,
            segment=name,
        )
    rule = body.get("rule")
    if not isinstance(rule, str):
        raise DefinitionError("`rule` is missing or not text", source=source, segment=name)
    description = body.get("description", "")
    if not isinstance(description, str):
        raise DefinitionError("`description` must be text", source=source, segment=name)
    return Segment(name, parse_rule(rule, source=source, segment=name), description)


def load_segments(path: Path | None = None) -> SegmentSet:
    """Load a segments file, or the default one shipped with shoal when ``path`` is None.

    Raises:
        DefinitionError: the file cannot be read or is not valid.
    """
    if path is None:
        text = resources.files("actors").joinpath("default_segments.toml").read_text("utf-8")
        return parse_segments(text, source="default_segments.toml")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DefinitionError(f"cannot read it: {e}", source=str(path)) from None
    return parse_segments(text, source=str(path))
