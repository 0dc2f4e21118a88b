"""A round of snapshots hands its customers out in key order, sorted a slice per turn."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from actors import Engine, VirtualClock
from actors._stored import logged_event
from actors.engine import _snapshots
from actors.engine._snapshots import _Round
from protocol import SECOND, Event
from protocol.memory import MemoryBroker
from store import Store
from tests.helpers import segments

SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '2d'"
"""


def test_a_round_is_sorted_a_slice_per_turn_and_handed_out_in_key_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(3)
    ids = [f"c{i}" for i in rng.sample(range(100_000), 1_000)]
    monkeypatch.setattr(_snapshots, "_SORT_SLICE", 300)
    r = _Round(list(ids))
    turns = 1
    while not r.sort_some():
        turns += 1
    assert turns == 4  # 1,000 ids, 300 a turn
    assert r.sort_some()  # and stays so
    got = r.take(250)
    failed = r.take(250)
    r.put_back(failed)  # its write failed: handed out again, first
    assert r.left == 750
    got += r.take(250)
    assert got[250:] == failed
    got += r.take(10_000)
    assert r.left == 0 and r.take(5) == []
    assert got == sorted(ids)


def test_what_a_round_has_not_handed_out_yet() -> None:
    ids = sorted(f"c{i}" for i in range(50))
    r = _Round(list(reversed(ids)))
    assert sorted(r.rest()) == ids  # nothing sorted yet
    assert r.sort_some()
    first = r.take(20)
    assert first == ids[:20]
    r.put_back(first[-5:])
    assert sorted(r.rest()) == ids[15:]


async def test_a_round_waits_while_deadlines_fire_in_a_burst_for_ten_seconds_at_most(
    tmp_path: Path,
) -> None:
    """Parts of a round are put off while the loop is behind on deadlines (``put_off``),
    for at most 10 s of the engine's clock a round; a new round may be put off again."""
    t0 = 1_767_225_600_000_000
    clock = VirtualClock(t0)
    async with await Store.open(tmp_path / "s.db") as store:
        await store.commit(
            [
                logged_event(
                    Event(
                        kind="track",
                        customer_id=f"c{i}",
                        name="Visit",
                        properties={},
                        traits={},
                        at=t0 - i,
                        received=t0 - i,
                        message_id=f"m{i}",
                    )
                )
                for i in range(3)
            ]
        )
        broker = MemoryBroker(clock.now)
        engine = Engine(broker.source(), broker.sink(), store, segments(SEGMENTS), clock=clock)
        await engine.recover()
        snapshots, changed = engine._snapshots, engine._partition.changed
        assert changed is not None
        changed.clear()  # (recovered from the log: all of them)

        async def a_round(ids: set[str]) -> None:
            changed.update(ids)
            snapshots.due_now()
            for _ in range(3):  # put off, turn after turn
                assert not await snapshots.step(put_off=True)
                clock.advance(3 * SECOND)
            clock.advance(SECOND - 1)  # 10 s since it was first put off, less 1 us
            assert not await snapshots.step(put_off=True)
            assert await store.snapshots.count() == written
            clock.advance(1)
            while await snapshots.step(put_off=True):
                pass

        written = 0
        await a_round({"c0", "c1"})
        written = await store.snapshots.count()
        assert written == 2
        await a_round({"c2"})
        assert await store.snapshots.count() == 3
        # Not behind: written at once.
        changed.add("c0")
        snapshots.due_now()
        assert await snapshots.step()
