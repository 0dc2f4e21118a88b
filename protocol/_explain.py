"""Explanations of a customer's segment memberships, as the explain endpoint returns them.

Everything is shown the way a person reads it: instants as RFC 3339 text in UTC
(:func:`protocol.format_instant`), durations as the rule language writes them (``'3d4h'``),
counts and scores as numbers in text. ``null`` means "none" (no next change, not a
comparison), and a missing value (no such trait, no such event) is the text ``missing``.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class ConditionExplanation(msgspec.Struct, frozen=True, kw_only=True):
    """One condition of a rule, evaluated at the explanation's instant."""

    text: str
    """The condition as written in the rule."""
    kind: Literal["and", "or", "not", "condition"]
    """``and``/``or``/``not`` combine ``children``; ``condition`` is a single test."""
    value: bool
    decides: bool
    """Whether this condition is one the membership decision rests on: every part of a true
    ``and`` and of a false ``or``, the false parts of a false ``and``, the true parts of a true
    ``or``, inside a rule (or exit) that decides."""
    op: str | None = None
    """For a test, its operator between ``left`` and ``right``, in the order written:
    ``==`` (also for ``=``), ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``,
    ``contains``, or ``exists`` (with ``left`` alone)."""
    left: str | None = None
    """For a comparison, its left side's value now (``missing`` when there is none)."""
    right: str | None = None
    """For a comparison, its right side's value now."""
    next_change: str | None = None
    """The instant the condition's value next changes with no new event (null: never, or
    not before the explanation's ``horizon`` when it has one)."""
    children: tuple[ConditionExplanation, ...] = ()


class SegmentExplanation(msgspec.Struct, frozen=True, kw_only=True):
    """Why a customer is or is not in one segment, and when that next changes."""

    segment: str
    member: bool
    """Whether the customer is in the segment (the engine's current membership)."""
    entered_at: str | None
    """When the customer entered, if a member."""
    evaluated_at: str
    """The instant the conditions were evaluated at."""
    rule: ConditionExplanation
    exit: ConditionExplanation | None
    """The exit condition, when the segment has one."""
    min_dwell: str | None
    """The segment's ``min_dwell`` (null when it has none)."""
    earliest_exit: str | None
    """For a member not yet free to leave, the first instant it may: ``min_dwell`` after it
    entered, and never the instant it came in (null once that is past, or for a non-member)."""
    held_by_min_dwell: bool
    """A member whose leave condition holds, kept in until ``earliest_exit``."""
    next_change: str | None
    """The exact instant the membership changes if no new event comes (null: it does not,
    or not before ``horizon`` when that is set)."""
    horizon: str | None
    """Set when the search for next changes stopped early (too many steps): no change was
    found up to this instant where a ``next_change`` is null."""
    reason: str
    """One line for a person."""
