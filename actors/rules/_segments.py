"""Segment definitions: a TOML file of named rules, score settings and static lists.

SEGMENTS.md documents the file and the language.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from actors._errors import DefinitionError
from protocol import SubjectError, validate_segment_name

from ._check import Env
from ._dates import parse_duration
from ._facts import Facts, Needs
from ._limits import (
    MAX_RULE_NUMBER,
    MAX_RULES_CHARS,
    MAX_SEGMENTS,
    MAX_SEGMENTS_FILE_BYTES,
    read_text_file,
)
from ._lists import by_value, file_lists, list_file_ids, toml_text
from ._parse import too_long
from ._rule import Rule, parse_rule
from ._scores import ScoreConfig
from ._steps import StepsRunner, compile_steps

_SEGMENT_KEYS = {"description", "rule", "exit", "min_dwell"}
_TOP_KEYS = {"segments", "score", "lists"}


@dataclass(frozen=True, slots=True)
class Segment:
    """One named, dynamic segment.

    A non-member enters when ``rule`` holds; a member leaves when ``exit`` holds (``not
    rule`` when there is no ``exit``) and it has been a member for ``min_dwell``.
    """

    name: str
    rule: Rule
    description: str = ""
    exit: Rule | None = None
    min_dwell: int = 0

    @property
    def refs(self) -> frozenset[str]:
        """The segments whose membership this one reads."""
        return self.rule.refs | (self.exit.refs if self.exit else frozenset())


@dataclass(frozen=True, slots=True)
class Plan:
    """How a customer evaluates a :class:`SegmentSet`: its rules by number, and which
    segments each kind of fact can change, so an outcome kept for a segment can be dropped
    when, and only when, a fact its rules read changes."""

    rules: tuple[Rule, ...]
    """Each segment's rule, then its exit if it has one, in evaluation order."""
    evaluators: tuple[Callable[[Facts, int], tuple[bool, int | None, int | None]], ...]
    """``Rule.evaluator`` of each rule."""
    steps: tuple[tuple[Segment, int, int, bool], ...]
    """In evaluation order: the segment, its rule's number, its exit's (-1: none), and
    whether its outcome may be kept (its rules are all ``cacheable``)."""
    by_name: Mapping[str | None, tuple[int, ...]]
    """Track event name -> the steps whose outcome such an event can change."""
    by_any_name: tuple[int, ...]
    """The steps any track event can change (rules reading all track events)."""
    by_trait: Mapping[str, tuple[int, ...]]
    by_first: tuple[int, ...]
    """The steps a new earliest event can change."""
    run: StepsRunner
    """The steps compiled into one function (:func:`compile_steps`)."""

    @classmethod
    def of(cls, order: Sequence[Segment]) -> Plan:
        rules: list[Rule] = []
        steps: list[tuple[Segment, int, int, bool]] = []
        for seg in order:
            rules.append(seg.rule)
            if seg.exit is not None:
                rules.append(seg.exit)
                both = seg.rule.cacheable and seg.exit.cacheable
                steps.append((seg, len(rules) - 2, len(rules) - 1, both))
            else:
                steps.append((seg, len(rules) - 1, -1, seg.rule.cacheable))

        def reading(reads: Callable[[Rule], bool]) -> tuple[int, ...]:
            return tuple(
                j
                for j, seg in enumerate(order)
                if reads(seg.rule) or (seg.exit is not None and reads(seg.exit))
            )

        def tracks(r: Rule) -> frozenset[str | None]:
            return r.needs.event_names | r.needs.retained

        def named(n: str) -> Callable[[Rule], bool]:
            return lambda r: n in tracks(r) or None in tracks(r)

        def keyed(k: str) -> Callable[[Rule], bool]:
            return lambda r: k in r.needs.trait_keys

        names = {n for r in rules for n in tracks(r) if n is not None}
        traits = {k for r in rules for k in r.needs.trait_keys}
        evaluators = tuple(r.evaluator for r in rules)
        return cls(
            rules=tuple(rules),
            evaluators=evaluators,
            steps=tuple(steps),
            by_name={n: reading(named(n)) for n in names},
            by_any_name=reading(lambda r: None in tracks(r)),
            by_trait={k: reading(keyed(k)) for k in traits},
            by_first=reading(lambda r: r.reads_first),
            run=compile_steps(steps, evaluators),
        )


@dataclass(frozen=True, slots=True)
class SegmentSet:
    """The segments an engine evaluates, with what their rules need."""

    segments: tuple[Segment, ...]
    """In file order."""
    needs: Needs
    source: str = "<segments>"
    order: tuple[Segment, ...] = ()
    """Evaluation order: file order, except that a segment comes after those it references."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    lists: Mapping[str, frozenset[str]] = field(default_factory=dict)
    text: str | None = field(default=None, compare=False, repr=False)
    """The TOML text these were parsed from, when they were (what the engine stores for the
    definitions in force: :func:`stored_text`)."""
    plan: Plan = field(init=False, repr=False, compare=False)
    """How customers evaluate it (derived from ``order``)."""
    tag: int = field(init=False, repr=False, compare=False)
    """:attr:`fingerprint` as a number: what a customer's stored outcomes name the
    definitions they were computed under by (``Customer.snapshot(outcomes=True)``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", Plan.of(self.order))
        object.__setattr__(self, "tag", int(self.fingerprint, 16))

    @classmethod
    def of(
        cls,
        segments: Sequence[Segment],
        *,
        source: str = "<segments>",
        score: ScoreConfig | None = None,
        lists: Mapping[str, frozenset[str]] | None = None,
        text: str | None = None,
    ) -> SegmentSet:
        """A set of segments (``text``: the TOML text they were parsed from, if any).

        Raises:
            DefinitionError: two segments share a name, a reference names no segment, or
                references form a cycle.
        """
        by_name: dict[str, Segment] = {}
        for s in segments:
            if s.name in by_name:
                raise DefinitionError("defined twice", source=source, segment=s.name)
            by_name[s.name] = s
        for s in segments:
            for ref in sorted(s.refs):
                if ref not in by_name:
                    raise DefinitionError(
                        f"in_segment({ref!r}) names no segment of this file",
                        source=source,
                        segment=s.name,
                    )
        needs = Needs()
        for s in segments:
            needs = needs | s.rule.needs | (s.exit.needs if s.exit else Needs())
        return cls(
            tuple(segments),
            needs,
            source,
            _evaluation_order(segments, source),
            score or ScoreConfig(),
            dict(lists or {}),
            text,
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The segment names, in file order."""
        return tuple(s.name for s in self.segments)

    @property
    def fingerprint(self) -> str:
        """A short text equal for sets that evaluate alike: the same segments in the same
        order, score settings and static lists (descriptions and the source do not count)."""
        text = repr(
            (
                [
                    (s.name, s.rule.text, s.exit.text if s.exit else None, s.min_dwell)
                    for s in self.segments
                ],
                (
                    self.score.half_life,
                    sorted(self.score.weights.items()),
                    self.score.default_weight,
                ),
                sorted((name, sorted(ids)) for name, ids in self.lists.items()),
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evaluation_order(segments: Sequence[Segment], source: str) -> tuple[Segment, ...]:
    placed: list[Segment] = []
    done: set[str] = set()
    waiting = list(segments)
    while waiting:
        ready = next((s for s in waiting if s.refs <= done), None)
        if ready is None:
            cycle = _cycle({s.name: s.refs for s in waiting})
            raise DefinitionError(
                "segments reference each other in a cycle: " + " -> ".join(cycle),
                source=source,
            )
        placed.append(ready)
        done.add(ready.name)
        waiting.remove(ready)
    return tuple(placed)


def _cycle(refs: Mapping[str, frozenset[str]]) -> list[str]:
    path: list[str] = []
    node = next(iter(refs))
    while node not in path:
        path.append(node)
        node = sorted(r for r in refs[node] if r in refs)[0]
    return [*path[path.index(node) :], node]


def parse_segments(
    text: str,
    *,
    source: str = "<segments>",
    base_dir: Path | None = None,
    lists_dir: Path | None = None,
    lists: Mapping[str, frozenset[str]] | None = None,
) -> SegmentSet:
    """Parse a segments file's text.

    Args:
        text: the TOML text.
        source: its name, for error messages.
        base_dir: where a relative list file (``[lists.X] file = ...``) is taken from. None
            (the default) for definitions that came over the network: their lists carry
            their ids by value, and one naming a file is refused; nothing is read.
        lists_dir: when given, list files are read only from this directory (symbolic links
            followed); one outside it is refused before it is read.
        lists: the static lists by value, for definitions the engine stored (their text has
            no ``[lists]`` table: see :func:`stored_text`); None to read them from the text.

    Raises:
        DefinitionError: the file is not valid, or breaks a limit (see
            :mod:`actors.rules._limits`); the message names the file, the segment and the
            problem.
    """
    size = len(text) if len(text) > MAX_SEGMENTS_FILE_BYTES else len(text.encode(errors="replace"))
    if size > MAX_SEGMENTS_FILE_BYTES:
        raise DefinitionError(
            f"the file has {size:,} bytes; the limit is {MAX_SEGMENTS_FILE_BYTES:,}", source=source
        )
    doc = _toml(text, source)
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise DefinitionError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; expected [segments.NAME] "
            "tables, and optionally [score] and [lists.NAME]",
            source=source,
        )
    table = doc.get("segments")
    if not isinstance(table, Mapping) or not table:
        raise DefinitionError(
            "no segments: define at least one [segments.NAME] table with a rule", source=source
        )
    _check_sizes(table, source)
    score = _score(doc.get("score", {}), source)
    if lists is None:
        lists = _lists(doc.get("lists", {}), source, base_dir, lists_dir)
    elif "lists" in doc:
        raise DefinitionError("[lists] given twice: in the text and by value", source=source)
    env = Env(score=score, lists=lists, segments=frozenset(table))
    segments = [_segment(name, body, source, env) for name, body in table.items()]
    return SegmentSet.of(segments, source=source, score=score, lists=lists, text=text)


def stored_text(segments: SegmentSet) -> str:
    """The TOML text the engine stores for ``segments`` beside their lists: the text they
    were parsed from without its ``[lists]`` tables (whose ids, read from files or given by
    value, are stored apart, so the text stays small and names no file).
    :func:`parse_segments` with ``lists=segments.lists`` reads it back to equal definitions.

    Raises:
        DefinitionError: ``segments`` were not parsed from a text.
    """
    if segments.text is None:
        raise DefinitionError(
            "no text to store: the definitions were not parsed from one", source=segments.source
        )
    doc = _toml(segments.text, segments.source)
    if "lists" not in doc:
        return segments.text
    return toml_text({k: v for k, v in doc.items() if k != "lists"})


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"not valid TOML: {e}", source=source) from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise DefinitionError(
            "not valid TOML: values are nested too deeply", source=source
        ) from None


def _check_sizes(table: Mapping[str, Any], source: str) -> None:
    """Refuse too many segments or too much rule text, before any rule is parsed."""
    if len(table) > MAX_SEGMENTS:
        raise DefinitionError(
            f"{len(table):,} segments; the limit is {MAX_SEGMENTS:,} in one file", source=source
        )
    chars = 0
    for name, body in table.items():
        rules = (body.get("rule"), body.get("exit")) if isinstance(body, Mapping) else ()
        for rule in rules:
            if isinstance(rule, str):
                if (problem := too_long(rule)) is not None:
                    raise DefinitionError(problem, source=source, segment=name)
                chars += len(rule)
    if chars > MAX_RULES_CHARS:
        raise DefinitionError(
            f"the rules have {chars:,} characters in all; the limit is {MAX_RULES_CHARS:,} in "
            "one file",
            source=source,
        )


def _number(value: Any) -> bool:
    """Whether ``value`` is a number a definition may hold: finite, and in range."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= MAX_RULE_NUMBER
    )


def _score(table: Any, source: str) -> ScoreConfig:
    if not isinstance(table, Mapping):
        raise DefinitionError("[score] must be a table", source=source)
    unknown = set(table) - {"half_life", "weights", "default_weight"}
    if unknown:
        raise DefinitionError(
            f"[score]: unknown key(s) {', '.join(sorted(unknown))}; it has half_life, weights "
            "and default_weight",
            source=source,
        )
    half_life = ScoreConfig().half_life
    if "half_life" in table:
        text = table["half_life"]
        try:
            half_life = parse_duration(text) if isinstance(text, str) else 0
        except ValueError as e:
            raise DefinitionError(f"[score] half_life: {e}", source=source) from None
        if half_life <= 0:
            raise DefinitionError(
                "[score] half_life must be a positive duration like '14d'", source=source
            )
    weights = table.get("weights", {})
    if not isinstance(weights, Mapping) or not all(_number(w) for w in weights.values()):
        raise DefinitionError(
            "[score] weights must map event names to numbers, like { Visit = 1.0 }, of at "
            f"most {MAX_RULE_NUMBER:,} in size",
            source=source,
        )
    default = table.get("default_weight", 1.0)
    if not _number(default):
        raise DefinitionError(
            f"[score] default_weight must be a number of at most {MAX_RULE_NUMBER:,} in size",
            source=source,
        )
    return ScoreConfig(
        half_life=half_life,
        weights={k: float(v) for k, v in weights.items()},
        default_weight=float(default),
    )


def _lists(
    table: Any, source: str, base_dir: Path | None, lists_dir: Path | None
) -> dict[str, frozenset[str]]:
    if not isinstance(table, Mapping):
        raise DefinitionError("[lists] must hold [lists.NAME] tables", source=source)
    out: dict[str, frozenset[str]] = {}
    for name, body in table.items():
        where = f"[lists.{name}]"
        try:
            validate_segment_name(name)
        except SubjectError as e:
            raise DefinitionError(f"{where}: {e}", source=source) from None
        if not isinstance(body, Mapping) or not set(body) <= {"customers", "file"} or not body:
            raise DefinitionError(
                f"{where} has `customers` (a list of ids) and/or `file` (one id per line)",
                source=source,
            )
        ids: set[str] = set()
        customers = body.get("customers", [])
        if not isinstance(customers, list) or not all(isinstance(c, str) and c for c in customers):
            raise DefinitionError(
                f"{where} customers must be a list of non-empty ids", source=source
            )
        ids.update(customers)
        if "file" in body:
            ids |= list_file_ids(
                where, body["file"], source, base_dir=base_dir, lists_dir=lists_dir
            )
        out[name] = frozenset(ids)
    return out


def _segment(name: str, body: Any, source: str, env: Env) -> Segment:
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
            "optionally `description`, `exit` and `min_dwell`",
            source=source,
            segment=name,
        )
    rule = body.get("rule")
    if not isinstance(rule, str):
        raise DefinitionError("`rule` is missing or not text", source=source, segment=name)
    description = body.get("description", "")
    if not isinstance(description, str):
        raise DefinitionError("`description` must be text", source=source, segment=name)
    exit_text = body.get("exit")
    if exit_text is not None and not isinstance(exit_text, str):
        raise DefinitionError("`exit` must be text (a rule)", source=source, segment=name)
    dwell = 0
    if "min_dwell" in body:
        try:
            raw = body["min_dwell"]
            dwell = parse_duration(raw) if isinstance(raw, str) else -1
        except ValueError as e:
            raise DefinitionError(f"min_dwell: {e}", source=source, segment=name) from None
        if dwell < 0:
            raise DefinitionError(
                "min_dwell must be a duration like '7d'", source=source, segment=name
            )
    return Segment(
        name,
        parse_rule(rule, source=source, segment=name, env=env),
        description,
        parse_rule(exit_text, source=source, segment=name, env=env) if exit_text else None,
        dwell,
    )


def load_segments(path: Path | None = None, *, lists_dir: Path | None = None) -> SegmentSet:
    """Load a segments file, or the default one shipped with shoal when ``path`` is None.

    Its list files are read relative to its directory; with ``lists_dir``, only from within
    that directory (``shoal serve --lists-dir``), symbolic links followed.

    Raises:
        DefinitionError: the file or a list file cannot be read, is outside ``lists_dir``, or
            is not valid.
    """
    if path is None:
        text = resources.files("actors").joinpath("default_segments.toml").read_text("utf-8")
        return parse_segments(text, source="default_segments.toml")
    text = _read_segments_file(path)
    return parse_segments(text, source=str(path), base_dir=path.parent, lists_dir=lists_dir)


def _read_segments_file(path: Path) -> str:
    try:
        return read_text_file(path, MAX_SEGMENTS_FILE_BYTES)
    except (OSError, ValueError) as e:
        raise DefinitionError(f"cannot read it: {e}", source=str(path)) from None


def load_segments_by_value(path: Path) -> tuple[str, SegmentSet]:
    """Load the segments file ``path`` on this machine (as :func:`load_segments`), and the
    text to send the engine for it: the file's own text, or, when a list names a file, the
    same definitions with that list's ids by value. The engine reads no file for definitions
    sent over the network.

    Raises:
        DefinitionError: as :func:`load_segments`; or the text with the ids by value is
            larger than the engine takes (:data:`MAX_SEGMENTS_FILE_BYTES`): the message
            names the largest list read from a file.
    """
    text = _read_segments_file(path)
    segments = parse_segments(text, source=str(path), base_dir=path.parent)
    doc = _toml(text, str(path))
    files = file_lists(doc)
    if not files:
        return text, segments
    text = by_value(doc, segments.lists)
    size = len(text.encode())
    if size > MAX_SEGMENTS_FILE_BYTES:
        raise DefinitionError(
            f"with the ids of its list files by value it has {size:,} bytes; the engine takes "
            f"at most {MAX_SEGMENTS_FILE_BYTES:,} over the network "
            f"({_largest_list(segments, files)}): serve large lists from files instead "
            "(`shoal serve --segments FILE --lists-dir DIR`)",
            source=str(path),
        )
    return text, segments


def _largest_list(segments: SegmentSet, names: Iterable[str]) -> str:
    """``[lists.NAME] has N ids``, of the list among ``names`` with the most ids."""
    name = max(names, key=lambda n: (len(segments.lists[n]), n))
    return f"[lists.{name}] has {len(segments.lists[name]):,} ids"
