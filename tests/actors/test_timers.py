"""actors.TimerQueue: one pending deadline per customer, popped earliest first."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from actors import TimerQueue


def test_empty_queue() -> None:
    q = TimerQueue()
    assert len(q) == 0
    assert q.next() is None
    assert q.get("a") is None
    assert q.pop_due(10**18, 100) == []


def test_set_and_get() -> None:
    q = TimerQueue()
    q.set("a", 10)
    assert q.get("a") == 10
    assert len(q) == 1
    assert q.next() == 10


def test_set_replaces_the_deadline() -> None:
    q = TimerQueue()
    q.set("a", 10)
    q.set("a", 30)
    assert q.get("a") == 30
    assert len(q) == 1
    assert q.next() == 30
    assert q.pop_due(20, 10) == []
    assert q.pop_due(30, 10) == ["a"]


def test_set_earlier_replaces_the_deadline() -> None:
    q = TimerQueue()
    q.set("a", 30)
    q.set("a", 10)
    assert q.pop_due(10, 10) == ["a"]
    assert q.pop_due(30, 10) == []
    assert len(q) == 0


def test_set_none_clears_the_deadline() -> None:
    q = TimerQueue()
    q.set("a", 10)
    q.set("a", None)
    assert q.get("a") is None
    assert len(q) == 0
    assert q.next() is None
    assert q.pop_due(100, 10) == []


def test_set_none_without_deadline_is_a_no_op() -> None:
    q = TimerQueue()
    q.set("a", None)
    assert len(q) == 0


def test_setting_the_same_deadline_twice_pops_once() -> None:
    q = TimerQueue()
    q.set("a", 10)
    q.set("a", 10)
    assert q.pop_due(10, 10) == ["a"]
    assert q.pop_due(10, 10) == []


def test_back_to_an_earlier_deadline_pops_once() -> None:
    q = TimerQueue()
    q.set("a", 10)
    q.set("a", 20)
    q.set("a", 10)
    assert q.pop_due(100, 10) == ["a"]
    assert len(q) == 0


def test_pop_due_is_inclusive_of_until() -> None:
    q = TimerQueue()
    q.set("a", 10)
    assert q.pop_due(9, 10) == []
    assert q.pop_due(10, 10) == ["a"]


def test_pop_due_earliest_first() -> None:
    q = TimerQueue()
    for cid, at in [("c", 30), ("a", 10), ("b", 20), ("d", 40)]:
        q.set(cid, at)
    assert q.pop_due(30, 10) == ["a", "b", "c"]
    assert q.next() == 40
    assert len(q) == 1


def test_pop_due_respects_limit() -> None:
    q = TimerQueue()
    for i in range(5):
        q.set(f"c{i}", i)
    assert q.pop_due(10, 2) == ["c0", "c1"]
    assert q.pop_due(10, 0) == []
    assert q.pop_due(10, 10) == ["c2", "c3", "c4"]


def test_stale_entries_do_not_count_toward_limit() -> None:
    q = TimerQueue()
    q.set("a", 1)
    q.set("a", 5)
    q.set("b", 2)
    q.set("b", 6)
    q.set("c", 3)
    assert q.pop_due(10, 1) == ["c"]


def test_popped_customer_can_be_set_again() -> None:
    q = TimerQueue()
    q.set("a", 10)
    assert q.pop_due(10, 10) == ["a"]
    q.set("a", 10)
    assert q.get("a") == 10
    assert q.pop_due(10, 10) == ["a"]


def test_next_skips_replaced_and_cleared_entries() -> None:
    q = TimerQueue()
    q.set("a", 1)
    q.set("b", 2)
    q.set("a", 5)
    q.set("b", None)
    assert q.next() == 5


def test_many_replacements_keep_one_deadline_per_customer() -> None:
    q = TimerQueue()
    for i in range(5000):
        q.set("a", 10_000 - i)
        q.set("b", i)
    assert len(q) == 2
    assert q.next() == 4999
    assert q.pop_due(10**9, 10) == ["b", "a"]
    assert q.next() is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("set"),
                st.sampled_from("abcde"),
                st.one_of(st.none(), st.integers(0, 50)),
            ),
            st.tuples(st.just("pop"), st.integers(0, 50), st.integers(0, 4)),
        ),
        max_size=60,
    )
)
def test_matches_a_dict_reference(ops: list[tuple[Any, ...]]) -> None:
    q = TimerQueue()
    ref: dict[str, int] = {}
    for op in ops:
        if op[0] == "set":
            cid, at = op[1], op[2]
            q.set(cid, at)
            if at is None:
                ref.pop(cid, None)
            else:
                ref[cid] = at
        else:
            until, limit = op[1], op[2]
            due = sorted((at, cid) for cid, at in ref.items() if at <= until)
            expected = [cid for _, cid in due[:limit]]
            assert q.pop_due(until, limit) == expected
            for cid in expected:
                del ref[cid]
        assert len(q) == len(ref)
        assert q.next() == min(ref.values(), default=None)
        for cid in "abcde":
            assert q.get(cid) == ref.get(cid)
