"""A round of snapshots hands its customers out in key order, sorted a slice per turn."""

from __future__ import annotations

import random

import pytest

from actors.engine import _snapshots
from actors.engine._snapshots import _Round


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
