"""Definitions are untrusted (files, and the query service applies them): the limits of
``actors/rules/_limits.py`` refuse what would hang, exhaust or crash the engine, each with one
clear error, and whatever passes them also runs."""

from __future__ import annotations

import os
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from actors import (
    Customer,
    DefinitionError,
    Engine,
    EngineApi,
    EngineConfig,
    VirtualClock,
    load_segments,
    parse_segments,
)
from actors.rules import parse_rule
from actors.rules._dates import zone_of
from actors.rules._limits import (
    MAX_LIST_FILE_BYTES,
    MAX_RULE_CHARS,
    MAX_RULE_NODES,
    MAX_RULES_CHARS,
    MAX_SEGMENTS,
    MAX_SEGMENTS_FILE_BYTES,
)
from actors.rules._lists import NO_FILES_OVER_THE_NETWORK
from protocol import HOUR, SECOND, Event, ExplainRequest
from protocol.memory import MemoryBroker
from store import Store
from tests.actors.test_api import ask, error, serving, start_instant
from tests.helpers import NatsServer, eventually, segments

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
SOURCE = "test.toml"


def refused(text: str, base_dir: Path | None = None) -> str:
    """The error ``parse_segments`` gives ``text``, without the file name."""
    with pytest.raises(DefinitionError) as e:
        parse_segments(text, source=SOURCE, base_dir=base_dir)
    assert str(e.value).startswith(SOURCE + ": ")
    return str(e.value).removeprefix(SOURCE + ": ")


def one(rule: str, **extra: str) -> str:
    """A segments file of segment ``a`` with ``rule`` (and keys ``extra``)."""
    lines = [f"{k} = {v!r}" for k, v in extra.items()]
    return "\n".join(["[segments.a]", f"rule = {rule!r}", *lines]) + "\n"


def listed(file: str) -> str:
    return f'[lists.vip]\nfile = "{file}"\n\n[segments.a]\nrule = "in_list(\'vip\')"\n'


# --- list files and segments files: regular files under a size limit ----------------------


@pytest.mark.timeout(10)
def test_a_fifo_as_list_file_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ids")  # nobody ever writes to it: opening it would block
    assert refused(listed("ids"), tmp_path) == (
        f"[lists.vip] cannot read {tmp_path / 'ids'}: it is a FIFO, not a regular file"
    )


def test_a_device_or_directory_as_list_file_is_refused(tmp_path: Path) -> None:
    # /dev/zero would fill memory; /dev/null is the same kind, and harmless to try.
    # Read from a file on disk (base_dir): parsing text with no base_dir reads no file.
    assert refused(listed("/dev/null"), tmp_path) == (
        "[lists.vip] cannot read /dev/null: it is a character device, not a regular file"
    )
    assert refused(listed(str(tmp_path)), tmp_path) == (
        f"[lists.vip] cannot read {tmp_path}: it is a directory, not a regular file"
    )


def test_a_list_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "ids"
    with big.open("wb") as f:
        f.truncate(MAX_LIST_FILE_BYTES + 1)  # sparse: no disk used
    assert refused(listed("ids"), tmp_path) == (
        f"[lists.vip] cannot read {big}: it has 67,108,865 bytes; the limit is 67,108,864"
    )
    with big.open("wb") as f:
        f.write(b"alice\n")
        f.truncate(MAX_LIST_FILE_BYTES)  # at the limit: read (zeros are not ids)
    s = parse_segments(listed("ids"), source=SOURCE, base_dir=tmp_path)
    assert "alice" in s.lists["vip"]


@pytest.mark.timeout(10)
def test_a_segments_file_must_be_a_regular_file_under_the_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_text(one("count() >= 1") + "#" * MAX_SEGMENTS_FILE_BYTES)
    for path, problem in (
        (fifo, "it is a FIFO, not a regular file"),
        (Path("/dev/null"), "it is a character device, not a regular file"),
        (big, "it has 1,048,611 bytes; the limit is 1,048,576"),
    ):
        with pytest.raises(DefinitionError) as e:
            load_segments(path)
        assert str(e.value) == f"{path}: cannot read it: {problem}"


def test_segments_text_over_the_size_limit_is_refused() -> None:
    text = one("count() >= 1", description="é" * (MAX_SEGMENTS_FILE_BYTES // 2))
    assert refused(text) == "the file has 1,048,628 bytes; the limit is 1,048,576"


# --- rules: size, nesting, parts ----------------------------------------------------------


def test_a_long_rule_is_refused_before_it_is_parsed() -> None:
    # A 1 MB rule took 7.8 s to parse and compile, on the engine's loop.
    rule = " or ".join(["count('Visit') >= 1"] * 40_000)
    assert refused(one(rule)) == (
        "segment 'a': the rule has 919,996 characters; the limit is 10,000 (split it into "
        "segments that refer to each other with in_segment)"
    )
    at_limit = "count('Visit') >= 1" + " " * (MAX_RULE_CHARS - 19)
    assert parse_rule(at_limit).text == at_limit


def test_900_nested_nots_are_refused_not_a_recursion_error() -> None:
    # That file killed `serve` with a RecursionError.
    assert refused(one("not " * 900 + "count() >= 1")) == (
        "segment 'a': the rule is nested too deeply: the limit is 50 levels"
    )
    assert parse_rule("not " * 45 + "count() >= 1").text  # deep, under the limit


def test_nesting_pythons_parser_gives_up_on_is_refused_too() -> None:
    # 9,000 unary minus signs: ast.parse itself raises RecursionError.
    assert refused(one("count() >= " + "-" * 9_000 + "1")) == (
        "segment 'a': the rule is nested too deeply: the limit is 50 levels"
    )


def test_a_rule_of_too_many_parts_is_refused() -> None:
    rule = "trait('plan') in [" + ",".join("1" for _ in range(MAX_RULE_NODES)) + "]"
    assert len(rule) < MAX_RULE_CHARS
    assert refused(one(rule)) == (
        "segment 'a': the rule has more than 2,000 parts (names, values, operators); the "
        "limit is 2,000"
    )


def test_the_rules_of_a_file_together_have_a_limit() -> None:
    rule = " or ".join(["count('Visit') >= 1"] * 400)  # 9,196 characters
    count = MAX_RULES_CHARS // len(rule) + 1
    text = "".join(f"[segments.s{i}]\nrule = {rule!r}\n" for i in range(count))
    assert refused(text) == (
        "the rules have 202,312 characters in all; the limit is 200,000 in one file"
    )


def test_a_file_of_too_many_segments_is_refused() -> None:
    text = "".join(f"[segments.s{i}]\nrule = 'count() >= 1'\n" for i in range(MAX_SEGMENTS + 1))
    assert refused(text) == "1,001 segments; the limit is 1,000 in one file"
    text = "".join(f"[segments.s{i}]\nrule = 'count() >= 1'\n" for i in range(MAX_SEGMENTS))
    assert len(parse_segments(text).names) == MAX_SEGMENTS


def test_deeply_nested_toml_is_refused() -> None:
    assert refused("a = " + "[" * 2000 + "]" * 2000 + "\n") == (
        "not valid TOML: values are nested too deeply"
    )


# --- durations, dates and numbers: whatever validates also runs ---------------------------

LONGEST = "'1000000000000d' is longer than the longest duration, 36525d (100 years)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (one("since_last() >= '1000000000000d'"), f"segment 'a': {LONGEST}"),
        (one("since_last() < '-1000000000000d'"), "segment 'a': '-" + LONGEST[1:]),
        (one("count(within='1000000000000d') >= 1"), f"segment 'a': {LONGEST}"),
        (one("score_at('1000000000000d') > 1"), f"segment 'a': {LONGEST}"),
        (
            one("count() >= 1", exit="count() >= 9", min_dwell="1000000000000d"),
            f"segment 'a': min_dwell: {LONGEST}",
        ),
        (
            "[score]\nhalf_life = '1000000000000d'\n" + one("score() > 1"),
            f"[score] half_life: {LONGEST}",
        ),
        (
            one("since_last() >= '36526d'"),
            "segment 'a': '36526d' is longer than the longest duration, 36525d (100 years)",
        ),
        (
            one("date(trait('renewal')) > '9999-12-31'"),
            "segment 'a': '9999-12-31': a date in a rule is in the years 1000 to 8999",
        ),
        (
            one("since(date('0001-01-01T00:30:00+01:00')) > '1d'"),
            "segment 'a': '0001-01-01T00:30:00+01:00': a date in a rule is in the years 1000 "
            "to 8999",
        ),
        (
            one("count() > 100000000000000000000000"),
            "segment 'a': `100000000000000000000000`: a number in a rule is at most "
            "1,000,000,000,000,000 in size",
        ),
        (
            one("score() > -1e999"),
            "segment 'a': `-1e999`: a number in a rule is at most 1,000,000,000,000,000 in size",
        ),
        (
            one("1000000 * 1000000000000 * score() > 1"),
            "segment 'a': `1000000 * 1000000000000`: a number in a rule is at most "
            "1,000,000,000,000,000 in size",
        ),
        (
            "[score]\nweights = { Visit = 1e300 }\n" + one("score() > 1"),
            "[score] weights must map event names to numbers, like { Visit = 1.0 }, of at most "
            "1,000,000,000,000,000 in size",
        ),
        (
            "[score]\ndefault_weight = inf\n" + one("score() > 1"),
            "[score] default_weight must be a number of at most 1,000,000,000,000,000 in size",
        ),
    ],
    ids=[
        "rule",
        "negative",
        "within",
        "score_at",
        "min_dwell",
        "half_life",
        "one day over",
        "date after",
        "date before",
        "integer",
        "infinite",
        "product",
        "weight",
        "default weight",
    ],
)
def test_values_out_of_range_are_refused(text: str, problem: str) -> None:
    assert refused(text) == problem


AT_THE_LIMITS = """
[score]
half_life = "36525d"
weights = { Visit = 1000000000000000 }

[segments.long_idle]
rule = "since_last('Visit') >= '36525d'"

[segments.long_window]
rule = "count('Visit', within='36525d', hours=[0, 12]) >= 1"
exit = "count('Visit') >= 1000000000000000"
min_dwell = "36525d"

[segments.late_date]
rule = "since(date('8999-12-31T23:59:59Z')) < '36525d' and until(date('1000-01-01')) < '-36525d'"

[segments.big_score]
rule = "score_at('36525d') > -1000000000000000 and score() < 1000000000000000"
"""


async def test_definitions_at_the_limits_run(tmp_path: Path) -> None:
    """Events, deadlines, queries, explanations and snapshots all work at the bounds."""
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    defs = segments(AT_THE_LIMITS)
    async with await Store.open(tmp_path / "shoal.db") as store:
        engine = Engine(
            broker.source(),
            broker.sink(),
            store,
            defs,
            clock=clock,
            config=EngineConfig(snapshot_interval=5.0),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            visit = {"type": "track", "userId": "alice", "event": "Visit"}
            broker.publish("shoal.events.alice", msgspec.json.encode(visit), msg_id="a1")
            await eventually(lambda: engine.stats.events_applied == 1)
            api = EngineApi(engine)
            reply = await api.customer("alice")
            assert [m.segment for m in reply.segments] == ["long_window", "late_date"]
            assert reply.next_deadline is not None
            msgspec.json.encode(reply)
            msgspec.json.encode(await api.explain("alice", ExplainRequest()))
            clock.set(T0 + 10 * SECOND)
            await eventually(lambda: engine.stats.snapshot_rounds == 1)
            tg.cancel_scope.cancel()


async def test_a_deadline_after_year_9999_is_none_in_queries(tmp_path: Path) -> None:
    """A trait dated 9999-12-31 (a common "never") plus a duration: a deadline no date can
    hold. The customer query and explanations answered 500 (OverflowError); it never comes."""
    clock = VirtualClock(T0)
    broker = MemoryBroker(clock.now)
    defs = segments(one("since(trait('renewal')) >= '30d'"))
    async with await Store.open(tmp_path / "shoal.db") as store:
        engine = Engine(broker.source(), broker.sink(), store, defs, clock=clock)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            doc = {"type": "identify", "userId": "alice", "traits": {"renewal": "9999-12-31"}}
            broker.publish("shoal.events.alice", msgspec.json.encode(doc), msg_id="a1")
            await eventually(lambda: engine.stats.events_applied == 1)
            api = EngineApi(engine)
            assert (await api.customer("alice")).next_deadline is None
            (explained,) = (await api.explain("alice", ExplainRequest())).segments
            assert (explained.member, explained.next_change) == (False, None)
            assert explained.rule.next_change is None
            tg.cancel_scope.cancel()


# --- time zones from trait values ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["America", "x" * 300, "../../etc/passwd", "Europe/", "", "\x00", 7, None]
)
def test_a_timezone_trait_never_opens_a_file(name: object) -> None:
    # "America" is a directory of the tz database and 300 characters too long a file name:
    # zoneinfo raised IsADirectoryError and OSError, inside the engine.
    assert zone_of(name) is UTC


def test_known_zones_are_still_zones() -> None:
    zone: tzinfo = zone_of("Europe/Paris")
    assert zone == ZoneInfo("Europe/Paris")


def test_a_customer_with_a_bad_timezone_is_evaluated_in_utc() -> None:
    defs = segments(one("count('Visit', within='7d', days=['thu']) >= 1"))
    for zone in ("America", "y" * 300):
        c = Customer("alice")

        def event(kind: Literal["track", "identify"], at: int, traits: dict[str, str]) -> Event:
            name = "Visit" if kind == "track" else None
            return Event(
                kind=kind,
                customer_id="alice",
                name=name,
                properties={},
                traits=traits,
                at=at,
                received=at,
                message_id=f"{kind}-{at}",
            )

        assert c.apply(event("identify", T0, {"timezone": zone}), defs) == []
        # 2026-01-01 is a Thursday in UTC.
        entered = c.apply(event("track", T0 + HOUR, {}), defs)
        assert [(t.segment, t.change) for t in entered] == [("a", "entered")]


# --- the query service: a clear 400 for every one of them, never a 500 or a hang ----------


API_CASES = {
    # Definitions from the network read no file, whatever it is (tests/actors/
    # test_definitions_data.py); the base_dir of older clients is ignored.
    "fifo": (listed("ids"), "[lists.vip] " + NO_FILES_OVER_THE_NETWORK),
    "900 nots": (
        one("not " * 900 + "count() >= 1"),
        "segment 'a': the rule is nested too deeply: the limit is 50 levels",
    ),
    "1e12 days": (one("since_last() >= '1000000000000d'"), f"segment 'a': {LONGEST}"),
    # Applied on main, then the customer query answered 500 (a deadline past year 9999).
    "1e7 days": (
        one("since_last() >= '10000000d'"),
        "segment 'a': '10000000d' is longer than the longest duration, 36525d (100 years)",
    ),
    "long rule": (
        one(" or ".join(["count('Visit') >= 1"] * 20_000)),
        "segment 'a': the rule has 459,996 characters; the limit is 10,000 (split it into "
        "segments that refer to each other with in_segment)",
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", API_CASES)
async def test_the_api_answers_400_for_definitions_over_the_limits(
    nats_server: NatsServer, client: Client, tmp_path: Path, case: str
) -> None:
    toml, problem = API_CASES[case]
    os.mkfifo(tmp_path / "ids")
    at = VirtualClock(start_instant())
    ours = segments(one("count() >= 1"))
    async with serving(nats_server.url, tmp_path / "shoal.db", ours, clock=at) as engine:
        for apply in (False, True):
            body = {"toml": toml, "source": "new.toml", "base_dir": str(tmp_path), "apply": apply}
            msg = await ask(client, "shoal.api.definitions", body)
            assert error(msg) == ("400", "new.toml: " + problem.format(tmp=tmp_path))
        assert engine.segments is ours  # nothing applied
