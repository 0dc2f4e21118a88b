"""The rule language and segments files: parsing, exact error messages, exact-time evaluation."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    DefinitionError,
    Segment,
    SegmentSet,
    load_segments,
    parse_duration,
    parse_rule,
    parse_segments,
)
from actors.rules import MISSING, Tracked
from protocol import DAY, HOUR, MINUTE, SECOND

FUNCTIONS = (
    "since_last() or since_last('Event name'), since_first(), count() or count('Event name'), "
    "trait('key')"
)


@dataclass(frozen=True)
class Track:
    """A retained track event (:class:`actors.rules.Tracked`)."""

    at: int
    name: str | None
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Facts:
    """A tiny customer: track events by name, other events, traits and memberships (the
    :class:`actors.rules.Facts` a rule reads)."""

    tracks: dict[str, list[int]] = field(default_factory=dict)
    others: list[int] = field(default_factory=list)
    traits: dict[str, Any] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)
    customer_id: str = "c"

    def first_at(self) -> int | None:
        every = [t for ts in self.tracks.values() for t in ts] + self.others
        return min(every, default=None)

    def last_at(self, name: str | None) -> int | None:
        ts = [t for n, v in self.tracks.items() if name in (None, n) for t in v]
        return max(ts, default=None)

    def count(self, name: str | None) -> int:
        return sum(len(v) for n, v in self.tracks.items() if name in (None, n))

    def trait(self, key: str) -> Any:
        return self.traits.get(key, MISSING)

    def tracked(self) -> Sequence[Tracked]:
        return sorted((Track(t, n) for n, ts in self.tracks.items() for t in ts), key=_at)

    def member(self, segment: str) -> bool:
        return segment in self.members


def _at(track: Track) -> int:
    return track.at


def problem(text: str) -> str:
    with pytest.raises(DefinitionError) as e:
        parse_rule(text)
    return e.value.problem


# --- parse_duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("90s", 90 * SECOND),
        ("15m", 15 * MINUTE),
        ("12h", 12 * HOUR),
        ("14d", 14 * DAY),
        ("1d12h", DAY + 12 * HOUR),
        ("1h30m15s", HOUR + 30 * MINUTE + 15 * SECOND),
        ("1.5h", 90 * MINUTE),
        ("0.5s", SECOND // 2),
        ("0s", 0),
        ("1d 12h", 36 * HOUR),
    ],
)
def test_parse_duration(text: str, us: int) -> None:
    assert parse_duration(text) == us


@pytest.mark.parametrize("text", ["", "14", "d", "14x", "--1d", "1d2", "P14D", "1e3s", "14 days"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert str(e.value) == (
        f"{text!r} is not a duration: write numbers with units s, m, h or d, "
        "like '90s', '14d' or '1d12h'"
    )


# --- parse_rule: accepted ----------------------------------------------------------------


def test_rule_keeps_text_as_written() -> None:
    text = "count('Visit') = 0 AND since_first() >= '7d'"
    assert parse_rule(text).text == text


def test_rule_needs_lists_event_names_and_traits() -> None:
    rule = parse_rule("count('Visit') > 1 or since_last() < '1d' or trait('plan') == 'gold'")
    assert rule.needs.event_names == frozenset({"Visit", None})
    assert rule.needs.trait_keys == frozenset({"plan"})


def test_since_first_needs_no_event_name() -> None:
    assert parse_rule("since_first() < '30d'").needs.event_names == frozenset()


def test_single_equals_means_equality() -> None:
    rule = parse_rule("count('Visit') = 0")
    assert rule.evaluate(Facts(), 0) == (True, None)
    assert rule.evaluate(Facts(tracks={"Visit": [0]}), 0) == (False, None)


def test_equals_inside_text_is_kept() -> None:
    rule = parse_rule("trait('note') = 'a=b'")
    assert rule.evaluate(Facts(traits={"note": "a=b"}), 0) == (True, None)
    assert rule.evaluate(Facts(traits={"note": "a==b"}), 0) == (False, None)


def test_upper_case_and_or_not() -> None:
    rule = parse_rule("count('Visit') = 1 AND NOT trait('plan') = 'gold' OR count('Visit') > 5")
    assert rule.evaluate(Facts(tracks={"Visit": [0]}), 0) == (True, None)
    gold = Facts(tracks={"Visit": [0]}, traits={"plan": "gold"})
    assert rule.evaluate(gold, 0) == (False, None)
    many = Facts(tracks={"Visit": [0] * 6}, traits={"plan": "gold"})
    assert rule.evaluate(many, 0) == (True, None)


def test_upper_case_words_inside_text_are_kept() -> None:
    rule = parse_rule("trait('plan') = 'AND'")
    assert rule.evaluate(Facts(traits={"plan": "AND"}), 0) == (True, None)


def test_since_last_at_least_is_true_from_the_exact_instant() -> None:
    rule = parse_rule("since_last('Visit') >= '14d'")
    f = Facts(tracks={"Visit": [DAY]})
    assert rule.evaluate(f, 15 * DAY - 1) == (False, 15 * DAY)
    assert rule.evaluate(f, 15 * DAY) == (True, None)


def test_since_last_less_than_becomes_false_at_the_exact_instant() -> None:
    rule = parse_rule("since_last('Visit') < '7d'")
    f = Facts(tracks={"Visit": [0]})
    assert rule.evaluate(f, 0) == (True, 7 * DAY)
    assert rule.evaluate(f, 7 * DAY) == (False, None)


def test_strict_greater_changes_one_microsecond_after_the_boundary() -> None:
    rule = parse_rule("since_first() > '1m'")
    f = Facts(others=[0])
    assert rule.evaluate(f, MINUTE) == (False, MINUTE + 1)
    assert rule.evaluate(f, MINUTE + 1) == (True, None)


def test_elapsed_equality_holds_for_one_microsecond() -> None:
    rule = parse_rule("since_first() == '1m'")
    f = Facts(others=[0])
    assert rule.evaluate(f, 0) == (False, MINUTE)
    assert rule.evaluate(f, MINUTE) == (True, MINUTE + 1)
    assert rule.evaluate(f, MINUTE + 1) == (False, None)


def test_duration_on_the_left_is_mirrored() -> None:
    rule = parse_rule("'14d' <= since_last('Visit')")
    f = Facts(tracks={"Visit": [0]})
    assert rule.evaluate(f, 14 * DAY - 1) == (False, 14 * DAY)
    assert rule.evaluate(f, 14 * DAY) == (True, None)


def test_chained_comparison_is_a_range() -> None:
    rule = parse_rule("'14d' <= since_last('Visit') < '30d'")
    f = Facts(tracks={"Visit": [0]})
    assert rule.evaluate(f, 0) == (False, 14 * DAY)
    assert rule.evaluate(f, 14 * DAY) == (True, 30 * DAY)
    assert rule.evaluate(f, 30 * DAY) == (False, None)


def test_elapsed_compared_with_elapsed_does_not_depend_on_now() -> None:
    rule = parse_rule("since_last('Visit') < since_first()")
    f = Facts(tracks={"Visit": [5 * DAY]}, others=[0])
    assert rule.evaluate(f, 6 * DAY) == (True, None)
    assert rule.evaluate(Facts(tracks={"Visit": [0]}), 6 * DAY) == (False, None)


def test_since_last_without_name_reads_any_track_event() -> None:
    rule = parse_rule("since_last() < '1h'")
    assert rule.evaluate(Facts(tracks={"Buy": [0]}), 0) == (True, HOUR)


def test_elapsed_with_no_such_event_is_false_for_good() -> None:
    assert parse_rule("since_last('Visit') >= '1d'").evaluate(Facts(), DAY) == (False, None)
    assert parse_rule("since_last('Visit') < '1d'").evaluate(Facts(), DAY) == (False, None)


def test_not_of_missing_elapsed_is_true() -> None:
    rule = parse_rule("not since_last('Visit') < '1d'")
    assert rule.evaluate(Facts(), 0) == (True, None)


def test_missing_trait_compares_false_even_with_not_equal() -> None:
    assert parse_rule("trait('plan') != 'gold'").evaluate(Facts(), 0) == (False, None)
    assert parse_rule("trait('plan') == 'gold'").evaluate(Facts(), 0) == (False, None)


def test_missing_trait_is_in_no_list_and_not_in_no_list() -> None:
    assert parse_rule("trait('plan') in ['gold']").evaluate(Facts(), 0) == (False, None)
    assert parse_rule("trait('plan') not in ['gold']").evaluate(Facts(), 0) == (False, None)


def test_in_and_not_in() -> None:
    gold = Facts(traits={"plan": "gold"})
    assert parse_rule("trait('plan') in ['gold', 'platinum']").evaluate(gold, 0) == (True, None)
    assert parse_rule("trait('plan') not in ['gold']").evaluate(gold, 0) == (False, None)
    assert parse_rule("trait('plan') in ('silver',)").evaluate(gold, 0) == (False, None)


def test_incomparable_values_are_unequal_and_not_ordered() -> None:
    f = Facts(traits={"age": 40})
    assert parse_rule("trait('age') > 'x'").evaluate(f, 0) == (False, None)
    assert parse_rule("trait('age') != 'x'").evaluate(f, 0) == (True, None)
    assert parse_rule("trait('age') == '40'").evaluate(f, 0) == (False, None)


def test_bool_trait_is_not_a_number() -> None:
    f = Facts(traits={"vip": True})
    assert parse_rule("trait('vip') == 1").evaluate(f, 0) == (False, None)
    assert parse_rule("trait('vip') == True").evaluate(f, 0) == (True, None)
    assert parse_rule("trait('vip') in [1]").evaluate(f, 0) == (False, None)


def test_int_and_float_compare() -> None:
    f = Facts(traits={"score": 2})
    assert parse_rule("trait('score') < 2.5").evaluate(f, 0) == (True, None)
    assert parse_rule("trait('score') > -1").evaluate(f, 0) == (True, None)


def test_count_by_name_and_all() -> None:
    f = Facts(tracks={"Visit": [0, 1], "Buy": [2]})
    assert parse_rule("count('Visit') == 2").evaluate(f, 3) == (True, None)
    assert parse_rule("count() == 3").evaluate(f, 3) == (True, None)


def test_constant_condition() -> None:
    assert parse_rule("True").evaluate(Facts(), 0) == (True, None)


def test_and_waits_for_the_false_part() -> None:
    rule = parse_rule("since_first() >= '1d' and since_first() < '2d'")
    assert rule.evaluate(Facts(others=[0]), 0) == (False, DAY)


def test_and_false_for_good_has_no_next_change() -> None:
    rule = parse_rule("since_first() >= '1d' and count('Visit') > 0")
    assert rule.evaluate(Facts(others=[0]), 0) == (False, None)


def test_or_true_for_good_has_no_next_change() -> None:
    rule = parse_rule("since_first() < '1d' or count('Visit') == 0")
    assert rule.evaluate(Facts(others=[0]), 0) == (True, None)


# --- parse_rule: rejected ----------------------------------------------------------------


def test_error_names_source_and_segment() -> None:
    with pytest.raises(DefinitionError) as e:
        parse_rule(" ", source="club.toml", segment="lapsing")
    assert str(e.value) == "club.toml: segment 'lapsing': the rule is empty"
    assert (e.value.problem, e.value.source, e.value.segment) == (
        "the rule is empty",
        "club.toml",
        "lapsing",
    )


def test_error_without_segment_names_source_only() -> None:
    with pytest.raises(DefinitionError) as e:
        parse_rule("")
    assert str(e.value) == "<rule>: the rule is empty"


def test_syntax_error_with_column() -> None:
    assert problem("count() >= 1 and (") == (
        "rule `count() >= 1 and (` is not valid syntax at column 18: '(' was never closed"
    )


def test_syntax_error_column_counts_in_the_rule_as_written() -> None:
    # The second `and` starts at column 17 of what the user wrote.
    assert problem("count() > 1 and and count() > 2") == (
        "rule `count() > 1 and and count() > 2` is not valid syntax at column 17: invalid syntax"
    )


def test_separated_operators_are_a_syntax_error_not_a_shift() -> None:
    assert problem("count() > > 1") == (
        "rule `count() > > 1` is not valid syntax at column 11: invalid syntax"
    )


def test_unknown_name() -> None:
    assert problem("plan == 'gold'") == (
        "unknown name 'plan': write text in quotes ('plan'), or call a function such as "
        "since_last() or since_last('Event'), since_first(), since(trait('date_key')), "
        "until(trait('date_key')) (see SEGMENTS.md)"
    )


def test_not_a_condition() -> None:
    assert problem("1") == "`1` is not a condition (true or false)"


def test_not_a_condition_quotes_the_call_as_written() -> None:
    assert problem("since_last()") == "`since_last()` is not a condition (true or false)"


def test_operand_of_and_must_be_a_condition() -> None:
    assert problem("count() > 1 and 'x'") == "`'x'` is not a condition (true or false)"


def test_none_is_not_allowed() -> None:
    assert problem("trait('a') == None") == "`None` is not allowed in a rule"


def test_negated_bool_is_not_allowed() -> None:
    assert problem("trait('a') == -True") == "`-True` is not allowed in a rule"


def test_is_comparison_is_not_allowed() -> None:
    assert problem("trait('a') is True") == "comparison `Is` is not allowed in a rule"


def test_in_needs_a_list() -> None:
    assert problem("trait('a') in 'abc'") == (
        "`in` needs a list of values, like ['gold', 'platinum'], not `'abc'`"
    )


def test_list_items_must_be_plain_values() -> None:
    assert problem("trait('a') in ['x', True and False]") == (
        "list items must be plain values, not `True and False`"
    )


def test_elapsed_compares_with_a_duration_in_quotes() -> None:
    assert problem("since_last('Visit') >= 5") == (
        "an elapsed time compares with a duration in quotes like '14d', not `5`"
    )


def test_elapsed_with_bad_duration_text() -> None:
    assert problem("since_last('Visit') >= '14x'") == (
        "'14x' is not a duration: write numbers with units s, m, h or d, "
        "like '90s', '14d' or '1d12h'"
    )


def test_unknown_function() -> None:
    assert problem("median(1) > 2") == (
        "unknown function in `median(1)`: see SEGMENTS.md for the functions rules can use"
    )


def test_keyword_arguments_are_refused_as_unknown_function() -> None:
    assert problem("count(name='Visit') > 1") == (
        "`count(name='Visit')`: write it as "
        "count('Event', within='30d', where={...}, days=[...], hours=[...])"
    )


def test_function_argument_must_be_text() -> None:
    assert problem("count(1) > 1") == "`count(1)` takes a name in quotes, not `1`"


def test_function_with_wrong_number_of_arguments() -> None:
    assert problem("since_first('x') > '1d'") == "`since_first('x')`: write it as since_first()"


def test_trait_needs_a_key() -> None:
    assert problem("trait() == 1") == "`trait()`: write it as trait('key')"


# --- segments files ----------------------------------------------------------------------


def definition_error(text: str) -> str:
    with pytest.raises(DefinitionError) as e:
        parse_segments(text, source="club.toml")
    return str(e.value)


def test_parse_segments_keeps_file_order_and_descriptions() -> None:
    s = parse_segments(
        '[segments.b]\nrule = "count() > 1"\ndescription = "Bee"\n'
        "[segments.a]\nrule = \"trait('plan') == 'x'\"\n",
        source="club.toml",
    )
    assert s.names == ("b", "a")
    assert [seg.description for seg in s.segments] == ["Bee", ""]
    assert s.source == "club.toml"
    assert s.needs.event_names == frozenset({None})
    assert s.needs.trait_keys == frozenset({"plan"})


def test_bad_toml() -> None:
    assert definition_error("segments = [") == (
        "club.toml: not valid TOML: Invalid value (at end of document)"
    )


def test_toml_duplicate_segment() -> None:
    text = '[segments.a]\nrule = "count() > 1"\n[segments.a]\nrule = "count() > 2"\n'
    assert definition_error(text) == (
        "club.toml: not valid TOML: Cannot declare ('segments', 'a') twice (at line 3, column 12)"
    )


def test_unknown_top_level_keys() -> None:
    text = 'x = 1\nversion = 2\n[segments.a]\nrule = "count() > 1"\n'
    assert definition_error(text) == (
        "club.toml: unknown top-level key(s) version, x; expected [segments.NAME] tables, "
        "and optionally [score] and [lists.NAME]"
    )


@pytest.mark.parametrize("text", ["", "[segments]\n", "segments = 5\n"])
def test_no_segments(text: str) -> None:
    assert definition_error(text) == (
        "club.toml: no segments: define at least one [segments.NAME] table with a rule"
    )


def test_bad_segment_name() -> None:
    assert definition_error("[segments.'a.b']\nrule = \"count() > 1\"\n") == (
        "club.toml: segment 'a.b': segment name 'a.b' must be 1 to 128 letters, digits, "
        "'_' or '-' (it is used as a subject token)"
    )


def test_segment_not_a_table() -> None:
    assert definition_error("[segments]\nactive = 5\n") == (
        "club.toml: segment 'active': must be a table with a `rule`"
    )


def test_segment_unknown_keys() -> None:
    text = '[segments.a]\nrule = "count() > 1"\nwhen = 1\ncolor = "red"\n'
    assert definition_error(text) == (
        "club.toml: segment 'a': unknown key(s) color, when; a segment has `rule` and "
        "optionally `description`, `exit` and `min_dwell`"
    )


def test_segment_without_rule() -> None:
    assert definition_error('[segments.a]\ndescription = "x"\n') == (
        "club.toml: segment 'a': `rule` is missing or not text"
    )


def test_segment_rule_not_text() -> None:
    assert definition_error("[segments.a]\nrule = 1\n") == (
        "club.toml: segment 'a': `rule` is missing or not text"
    )


def test_segment_description_not_text() -> None:
    assert definition_error('[segments.a]\nrule = "count() > 1"\ndescription = 3\n') == (
        "club.toml: segment 'a': `description` must be text"
    )


def test_segment_bad_rule_names_file_and_segment() -> None:
    assert definition_error('[segments.a]\nrule = "count() >"\n') == (
        "club.toml: segment 'a': rule `count() >` is incomplete: something is missing after `>`"
    )


def test_segment_set_rejects_duplicate_names() -> None:
    rule = parse_rule("count() > 1")
    with pytest.raises(DefinitionError) as e:
        SegmentSet.of([Segment("a", rule), Segment("a", rule)])
    assert str(e.value) == "<segments>: segment 'a': defined twice"


def test_segment_rules_evaluate_with_their_next_change() -> None:
    s = parse_segments(
        "[segments.a]\nrule = \"since_first() < '1d'\"\n"
        "[segments.b]\nrule = \"since_first() >= '1h'\"\n"
        '[segments.c]\nrule = "count() > 0"\n'
    )
    got = [seg.rule.evaluate(Facts(others=[0]), 0) for seg in s.segments]
    assert got == [(True, DAY), (False, HOUR), (False, None)]


def test_default_segments_load() -> None:
    s = load_segments()
    assert s.names == (
        "new_customer",
        "inactive_14d",
        "inactive_30d",
        "inactive_60d",
        "engagement_dropped",
        "renewal_due",
        "opens_no_clicks",
        "at_risk",
        "weekend_only",
        "one_time_buyer",
        "loyal",
        "churned",
    )
    assert s.source == "default_segments.toml"
    assert s.needs.trait_keys == frozenset({"renewal_date", "timezone"})
    assert all(seg.description for seg in s.segments)


def test_load_segments_from_file(tmp_path: Path) -> None:
    path = tmp_path / "club.toml"
    path.write_text("[segments.vip]\nrule = \"trait('plan') == 'gold'\"\n", "utf-8")
    s = load_segments(path)
    assert s.names == ("vip",)
    assert s.source == str(path)


def test_load_segments_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    with pytest.raises(DefinitionError) as e:
        load_segments(path)
    assert str(e.value) == (
        f"{path}: cannot read it: [Errno 2] No such file or directory: '{path}'"
    )


def test_load_segments_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff")
    with pytest.raises(DefinitionError) as e:
        load_segments(path)
    assert str(e.value) == (
        f"{path}: cannot read it: 'utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte"
    )


def test_load_segments_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "club.toml"
    path.write_text('[segments.a]\nrule = ""\n', "utf-8")
    with pytest.raises(DefinitionError) as e:
        load_segments(path)
    assert str(e.value) == f"{path}: segment 'a': the rule is empty"


# --- Rule.condition: the public view explanations read ------------------------------------


def test_condition_tree_keeps_text_kinds_and_order() -> None:
    rule = parse_rule(
        "count('Visit') >= 2 and not (trait('plan') == 'gold' or since_last() < '1d')"
    )
    c = rule.condition
    assert (c.kind, c.text, c.op, c.operands) == ("and", rule.text, None, ())
    first, negated = c.children
    assert (first.kind, first.text, first.op) == ("condition", "count('Visit') >= 2", ">=")
    assert negated.kind == "not"
    (inner,) = negated.children
    assert inner.kind == "or"
    assert [p.text for p in inner.children] == ["trait('plan') == 'gold'", "since_last() < '1d'"]
    assert first.children == ()


def test_condition_operands_are_in_the_order_written() -> None:
    # The moving side is kept on the left inside; the view shows the rule as written.
    c = parse_rule("'1d' > since_last('Visit')").condition
    assert c.op == ">"
    left, right = c.operands
    f = Facts(tracks={"Visit": [0]})
    assert (left.kind, left.value(f, HOUR)) == ("duration", DAY)
    assert (right.kind, right.value(f, HOUR)) == ("duration", HOUR)
    assert c.evaluate(f, HOUR) == (True, DAY)
    assert c.evaluate(f, DAY) == (False, None)


def test_condition_operands_of_in_exists_and_missing_values() -> None:
    f = Facts(traits={"plan": "gold", "renewal": "2026-01-02"})
    c = parse_rule("trait('plan') not in ['gold', 'silver']").condition
    assert c.op == "not in"
    plan, options = c.operands
    assert (plan.kind, plan.value(f, 0)) == ("value", "gold")
    assert options.value(f, 0) == ["gold", "silver"]
    assert c.evaluate(f, 0) == (False, None)
    e = parse_rule("exists(trait('nickname'))").condition
    assert e.op == "exists"
    (nick,) = e.operands
    assert nick.value(f, 0) is MISSING
    d = parse_rule("date(trait('renewal')) > '2026-01-01'").condition
    assert d.operands[0].kind == "instant"
    assert parse_rule("contains(trait('plan'), 'ol')").condition.op == "contains"


def test_condition_refs_and_tests_without_operator() -> None:
    rule = parse_rule("in_segment('a') or (count() > 1 and in_segment('b'))")
    assert rule.condition.refs == frozenset({"a", "b"})
    test = rule.condition.children[0]
    assert (test.kind, test.op, test.operands, test.refs) == (
        "condition",
        None,
        (),
        frozenset({"a"}),
    )
    assert test.evaluate(Facts(members={"a"}), 0) == (True, None)
    assert test.evaluate(Facts(), 0) == (False, None)


def test_condition_score_operand() -> None:
    c = parse_rule("score() > 0.5").condition
    score, half = c.operands
    assert score.kind == "score"
    assert score.value(Facts(tracks={"Visit": [0]}), 0) == pytest.approx(1.0)
    assert (half.kind, half.value(Facts(), 0)) == ("value", 0.5)


# --- exactness of time: Rule.evaluate against brute force ------------------------------
#
# A rule is drawn as a small tree; it is rendered to text for parse_rule and evaluated
# directly, at any instant, by the brute-force reference below.

_OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_ELAPSED = {"L": "since_last('Visit')", "F": "since_first()"}

Tree = tuple[Any, ...]


def _duration_text(seconds: int) -> str:
    if seconds and seconds % 60 == 0:
        return f"'{seconds // 60}m'"
    return f"'{seconds}s'"


def render(tree: Tree) -> str:
    kind = tree[0]
    if kind == "cmp":  # elapsed OP duration, written either way round
        _, which, op, seconds, flipped = tree
        if flipped:
            return f"{_duration_text(seconds)} {_MIRROR[op]} {_ELAPSED[which]}"
        return f"{_ELAPSED[which]} {op} {_duration_text(seconds)}"
    if kind == "ee":  # elapsed OP elapsed
        return f"{_ELAPSED[tree[1]]} {tree[2]} {_ELAPSED[tree[3]]}"
    if kind == "range":  # 'a' <= elapsed < 'b'
        _, lo, which, hi = tree
        return f"{_duration_text(lo)} <= {_ELAPSED[which]} < {_duration_text(hi)}"
    if kind == "not":
        return f"not ({render(tree[1])})"
    joiner = " and " if kind == "and" else " or "
    return joiner.join(f"({render(t)})" for t in tree[1:])


def brute(tree: Tree, f: Facts, t: int) -> bool:
    def elapsed(which: str) -> int | None:
        anchor = f.last_at("Visit") if which == "L" else f.first_at()
        return None if anchor is None else t - anchor

    kind = tree[0]
    if kind == "cmp":
        e = elapsed(tree[1])
        return e is not None and _OPS[tree[2]](e, tree[3] * SECOND)
    if kind == "ee":
        a, b = elapsed(tree[1]), elapsed(tree[3])
        return a is not None and b is not None and _OPS[tree[2]](a, b)
    if kind == "range":
        e = elapsed(tree[2])
        return e is not None and tree[1] * SECOND <= e < tree[3] * SECOND
    if kind == "not":
        return not brute(tree[1], f, t)
    parts = [brute(p, f, t) for p in tree[1:]]
    return all(parts) if kind == "and" else any(parts)


def durations_of(tree: Tree) -> set[int]:
    kind = tree[0]
    if kind == "cmp":
        return {tree[3] * SECOND}
    if kind == "range":
        return {tree[1] * SECOND, tree[3] * SECOND}
    if kind in ("not", "and", "or"):
        return set().union(*(durations_of(p) for p in tree[1:]))
    return {0}


_seconds = st.integers(min_value=0, max_value=12).map(lambda k: k * 10)
_which = st.sampled_from(["L", "F"])
_op = st.sampled_from(list(_OPS))
_cmp = st.tuples(st.just("cmp"), _which, _op, _seconds, st.booleans())
_atom = st.one_of(
    _cmp,
    st.tuples(st.just("ee"), _which, _op, _which),
    st.tuples(st.just("range"), _seconds, _which, _seconds),
)
trees = st.recursive(
    _atom,
    lambda sub: st.one_of(
        st.tuples(st.just("not"), sub),
        st.tuples(st.just("and"), sub, sub),
        st.tuples(st.just("or"), sub, sub),
        st.tuples(st.just("and"), sub, sub, sub),
    ),
    max_leaves=6,
)
_instant = st.integers(min_value=0, max_value=20).map(lambda k: k * 10 * SECOND)
histories = st.builds(
    lambda visits, others: Facts(tracks={"Visit": visits} if visits else {}, others=others),
    st.lists(_instant, max_size=4),
    st.lists(_instant, max_size=2),
)


def boundaries(tree: Tree, f: Facts) -> set[int]:
    """The instants at which an atom of ``tree`` can change value for ``f``."""
    anchors = [a for a in (f.first_at(), f.last_at("Visit")) if a is not None]
    return {a + d for a in anchors for d in durations_of(tree)}


@st.composite
def cases(draw: st.DrawFn, tree_strategy: st.SearchStrategy[Tree] = trees) -> tuple[Any, ...]:
    """A rule, a history, and a ``now`` that is often on or right beside a boundary."""
    tree = draw(tree_strategy)
    facts = draw(histories)
    near = sorted(boundaries(tree, facts))
    on_boundary = bool(near) and draw(st.booleans())
    base = draw(st.sampled_from(near) if on_boundary else _instant)
    now = base + draw(st.sampled_from([-1, 0, 0, 1, SECOND // 2]))
    return tree, facts, now


def critical_points(tree: Tree, f: Facts, now: int, horizon: int) -> list[int]:
    """Every instant in (now, horizon] at which some atom can change, +-1 us, plus a grid."""
    points = {now + 1, horizon}
    for b in boundaries(tree, f):
        points.update(b + delta for delta in (-1, 0, 1, 2))
    points.update(range(now + 1, horizon + 1, 5 * SECOND))
    return sorted(p for p in points if now < p <= horizon)


@settings(max_examples=500, deadline=None)
@given(cases())
def test_rule_value_and_next_change_agree_with_brute_force(case: tuple[Any, ...]) -> None:
    tree, facts, now = case
    rule = parse_rule(render(tree))
    value, nxt = rule.evaluate(facts, now)
    assert value == brute(tree, facts, now)
    if nxt is not None:
        assert nxt > now
        for t in critical_points(tree, facts, now, nxt - 1):
            assert brute(tree, facts, t) == value, (render(tree), now, nxt, t)
        assert brute(tree, facts, nxt - 1) == value
        assert rule.evaluate(facts, nxt)[0] == brute(tree, facts, nxt)
    else:
        horizon = now + 2 * max(durations_of(tree)) + 500 * SECOND
        for t in critical_points(tree, facts, now, horizon):
            assert brute(tree, facts, t) == value, (render(tree), now, t)


@settings(max_examples=300, deadline=None)
@given(cases(_cmp))
def test_single_comparison_next_change_is_the_exact_instant(case: tuple[Any, ...]) -> None:
    # For one comparison the next change is not merely safe but exact: the value flips there.
    tree, facts, now = case
    value, nxt = parse_rule(render(tree)).evaluate(facts, now)
    if nxt is not None:
        assert brute(tree, facts, nxt - 1) == value
        assert brute(tree, facts, nxt) != value
    else:
        for t in critical_points(tree, facts, now, now + 1000 * SECOND):
            assert brute(tree, facts, t) == value, (render(tree), now, t)


def test_incomplete_rule_says_what_it_ends_with() -> None:
    assert problem("count('Visit') >= 2 and") == (
        "rule `count('Visit') >= 2 and` is incomplete: something is missing after `and`"
    )
    assert problem("count('Visit') >= ") == (
        "rule `count('Visit') >= ` is incomplete: something is missing after `>=`"
    )


def test_a_count_is_not_compared_with_text() -> None:
    assert problem("count('Visit') >= '2'") == (
        "a count, sum, min or max compares with a number, not `'2'`"
    )
