"""store.Store's retention part: the bases and the cut of the event log."""

from __future__ import annotations

from pathlib import Path

import pytest

from store import CustomerBase, CutMark, Forgotten, LoggedEvent, Store


def ev(customer_id: str, message_id: str) -> LoggedEvent:
    return LoggedEvent(customer_id=customer_id, message_id=message_id, at=1, body=b"x")


def base(customer_id: str, body: bytes) -> CustomerBase:
    return CustomerBase(customer_id=customer_id, format=1, body=body)


async def test_a_cut_deletes_the_events_and_keeps_the_bases_and_the_positions(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shoal.db"
    async with await Store.open(db) as store:
        await store.commit([ev("a", "1"), ev("b", "2"), ev("a", "3")])
        assert store.retention.cut is None and await store.retention.count() == 0
        await store.cut_log([base("a", b"A1")], CutMark(through=1, at=10, needs="n"))
        assert [e.seq async for chunk in store.events.read() for e in chunk] == [2, 3]
        await store.cut_log(
            [base("a", b"A2"), base("b", b"B")], CutMark(through=3, at=20, needs="n")
        )
        with pytest.raises(ValueError, match="cut up to 3 already"):
            await store.cut_log([], CutMark(through=2, at=20, needs="n"))
        with pytest.raises(ValueError, match="no event at 9 yet"):
            await store.cut_log([], CutMark(through=9, at=20, needs="n"))
        assert await store.events.count() == 0
        assert await store.customer_ids() == {"a", "b"}
    # Reopened with the whole log cut: positions go on after the last one cut.
    async with await Store.open(db) as store:
        assert store.retention.cut == CutMark(through=3, at=20, needs="n")
        assert store.events.last_seq == 3
        assert {b.customer_id: b.body for b in await store.retention.of(["a", "b", "c"])} == {
            "a": b"A2",
            "b": b"B",
        }
        await store.commit([ev("c", "4")])
        assert [e.seq async for chunk in store.events.read() for e in chunk] == [4]
        await store.drop_customers(["a"])
        assert [b.customer_id async for chunk in store.retention.read() for b in chunk] == ["b"]
    async with await Store.open_read_only(db) as store:
        assert store.events.last_seq == 4 and await store.retention.count() == 1


async def test_a_forgotten_customer_s_base_goes_with_the_rest(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "shoal.db") as store:
        await store.commit([ev("a", "1"), ev("b", "2")])
        await store.cut_log([base("a", b"A"), base("b", b"B")], CutMark(through=2, at=9, needs=""))
        gone = Forgotten(
            hash="h",
            customer_id="a",
            partition=0,
            floor=0,
            exits=0,
            at=10,
            by="test",
            request="r",
            suppress_until=None,
            order_seq=1,
            outbox_through=0,
        )
        await store.commit([], forget=[gone])
        assert [b.customer_id for b in await store.retention.of(["a", "b"])] == ["b"]
