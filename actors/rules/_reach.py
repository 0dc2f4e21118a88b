"""What rules read how far back: checks of definitions against a retention policy.

A log cut ``retain`` back keeps each customer's all-time facts in its state (its *base*:
see :mod:`actors._retention`); what it cannot serve is a window longer than the retention
(:func:`check_retention`), and an all-time fact the bases were not keeping when the log was
cut (:func:`unserved`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from actors._errors import DefinitionError

from ._facts import Needs
from ._nodes import Score, walk
from ._rule import Rule
from ._segments import SegmentSet
from ._windows import Window

_DAY = 86_400_000_000


def duration_text(us: int) -> str:
    """A duration as the rules write it: ``400d``, ``36h``, ``90m``, ``45s`` (the largest
    unit that divides it)."""
    for unit, size in (("d", _DAY), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000)):
        if us % size == 0:
            return f"{us // size}{unit}"
    return f"{us / 1_000_000:g}s"


def _rules(segments: SegmentSet) -> Iterator[tuple[str, Rule]]:
    for s in segments.segments:
        yield s.name, s.rule
        if s.exit is not None:
            yield s.name, s.exit


def _nodes(rule: Rule) -> Iterator[object]:
    return walk(rule._root)


def _window_text(w: Window) -> str:
    args = "" if w.name is None else repr(w.name)
    if w.prop is not None:
        args += f", {w.prop!r}"
    within = "" if w.within is None else f"within={duration_text(w.within)}"
    return f"{w.func}({', '.join(a for a in (args, within) if a)})"


def check_retention(segments: SegmentSet, retain: int | None) -> None:
    """Refuse definitions a log cut ``retain`` (microseconds) back cannot serve exactly: a
    window (``within``) longer than the retention reads events the cut removed. All-time
    aggregates (counts without a window, ``since_first()``, the score) are kept in the
    customers' state and need no log.

    Raises:
        DefinitionError: a segment's rule (or exit rule) has such a window; the message names
            the segment, the window and the retention.
    """
    if retain is None:
        return
    for name, rule in _rules(segments):
        for node in _nodes(rule):
            if isinstance(node, Window) and node.within is not None and node.within > retain:
                raise DefinitionError(
                    f"`{_window_text(node)}` reads {duration_text(node.within)} back, longer "
                    f"than the retention of {duration_text(retain)}: the events it reads are "
                    "cut from the log. Shorten the window, or retain longer (--retain)",
                    source=segments.source,
                    segment=name,
                )


def _sorted(names: Iterable[str | None]) -> list[str | None]:
    return sorted(names, key=lambda n: (n is not None, n or ""))


def unserved(kept: Needs, segments: SegmentSet) -> list[str]:
    """What ``segments`` read for all time that bases keeping ``kept`` lack (empty: the
    bases serve them): each as a phrase naming the segment.

    Counts and last instants of an event name, and traits, are all-time facts; so are the
    retained events of a window without ``within`` and of a score. A window with ``within``
    (no longer than the retention: :func:`check_retention`) reads only events after the cut.
    """
    problems: list[str] = []

    def retained(name: str | None) -> bool:
        return None in kept.retained or name in kept.retained

    for segment, rule in _rules(segments):
        n = rule.needs
        for name in _sorted(n.event_names - kept.event_names):
            what = "track events" if name is None else f"{name!r} events"
            problems.append(f"segment {segment!r} reads {what} for all time (count, since_last)")
        for key in sorted(n.trait_keys - kept.trait_keys):
            problems.append(f"segment {segment!r} reads trait {key!r}")
        for node in _nodes(rule):
            if isinstance(node, Window) and not node.simple and node.within is None:
                if not retained(node.name):
                    problems.append(f"segment {segment!r} reads `{_window_text(node)}`")
                elif (node.where or node.prop is not None) and not kept.properties:
                    problems.append(
                        f"segment {segment!r} reads properties in `{_window_text(node)}`"
                    )
            elif isinstance(node, Score):
                config = node.config
                names: list[str | None] = (
                    [None]
                    if config.default_weight != 0
                    else _sorted(k for k, w in config.weights.items() if w != 0)
                )
                if not all(retained(k) for k in names):
                    problems.append(f"segment {segment!r} reads the score of events not kept")
    return list(dict.fromkeys(problems))
