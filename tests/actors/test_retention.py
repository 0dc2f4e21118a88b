"""Retention: the event log cut behind a retention, each customer's facts kept in its base.

The same history is served by two engines on one virtual clock, one keeping everything and
one retaining 10 days; their transitions, and a rebuild of each from its log alone, must be
the same. Definitions the cut log cannot serve are refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from actors import (
    DefinitionError,
    Engine,
    EngineApi,
    EngineConfig,
    Replay,
    VirtualClock,
    event_of,
    read_bases,
    read_log,
)
from actors._retention import base_of, base_row, decode_needs, encode_needs, fold_bases
from actors._stored import logged_event
from actors.engine._partition import Partition
from actors.engine._retention import Cutter
from actors.rules import check_retention, unserved
from protocol import (
    DefinitionsRequest,
    Event,
    InvalidRequest,
    Transition,
    format_instant,
    partition,
    to_instant,
)
from protocol.memory import MemoryBroker
from scripts._times import human_instant
from store import CustomerBase, LoggedEvent, ParkedCustomer, SnapshotMarks, Store
from tests.helpers import eventually, run, segments

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000_000
DAY = 24 * HOUR
RETAIN = 10 * DAY

SEGMENTS = """
[score]
half_life = "7d"
weights = { "Visit" = 1.0 }
default_weight = 0.0

[segments.active]
rule = "since_last('Visit') < '2d'"

[segments.loyal]
rule = "count('Visit') >= 6"

[segments.old_timer]
rule = "since_first() >= '20d'"

[segments.engaged]
rule = "score() >= 1.5"

[segments.weekly]
rule = "count('Visit', within='7d') >= 2"

[segments.buyer]
rule = "count('Buy') >= 1"

[segments.plan]
rule = "trait('plan') == 'pro'"
"""
RECENT_BUYER = """
[segments.recent_buyer]
rule = "count('Buy', within='5d') >= 1"
"""


def track(customer: str, name: str) -> bytes:
    return msgspec.json.encode({"type": "track", "userId": customer, "event": name})


def identify(customer: str, plan: str) -> bytes:
    return msgspec.json.encode({"type": "identify", "userId": customer, "traits": {"plan": plan}})


def history() -> list[tuple[int, str, bytes]]:
    """(instant, customer, body) over 30 days for 8 customers, in time order."""
    out: list[tuple[int, str, bytes]] = []
    for day in range(30):
        for i in range(8):
            customer = f"c{i}"
            at = T0 + day * DAY + (i + 1) * HOUR
            if (day + i) % 3 == 0 and not (i == 5 and day > 12):  # c5 stops visiting
                out.append((at, customer, track(customer, "Visit")))
            if (day + 2 * i) % 11 == 0:
                out.append((at + 1, customer, track(customer, "Buy")))
            if day in (1, 17) and i % 2 == 0:
                out.append((at + 2, customer, identify(customer, "pro" if day == 1 else "free")))
    return out


def key(t: Transition) -> tuple[str, int, str, str, int, str]:
    return (
        t.customer_id,
        t.version,
        t.segment,
        t.change,
        to_instant(t.at),
        str(t.cause.__struct_config__.tag),
    )


class _Served:
    def __init__(self, clock: VirtualClock, store: Store, config: EngineConfig) -> None:
        self.broker = MemoryBroker(clock.now)
        self.store = store
        self.engine = Engine(
            self.broker.source(),
            self.broker.sink(),
            store,
            segments(SEGMENTS),
            clock=clock,
            config=config,
        )


def _settled(clock: VirtualClock, served: list[_Served], applied: int) -> bool:
    for s in served:
        if s.engine.stats.events_applied != applied:
            return False
        nxt = s.engine.next_deadline
        if nxt is not None and nxt < clock.now():  # (one due right now may wait for time)
            return False
        if s.engine.unpublished:
            return False
    return True


async def _rebuilt(db: Path, clock: VirtualClock, config: EngineConfig) -> dict[str, bytes]:
    """Every customer's state after a start from the log alone (no snapshots)."""
    async with await Store.open(db) as store:
        s = _Served(clock, store, config)
        await s.engine.recover()
        ids = sorted(await store.customer_ids())
        out = {}
        for i in ids:
            c = s.engine.customer(i)
            assert c is not None, i
            out[i] = c.snapshot()
        return out


async def test_state_and_memberships_are_kept_across_the_cut(tmp_path: Path) -> None:
    clock = VirtualClock(T0)
    keep = EngineConfig(snapshot_interval=3 * 86_400.0)
    retain = EngineConfig(
        snapshot_interval=3 * 86_400.0,
        retain=RETAIN,
        retention_interval=3600.0,
        retention_batch=7,  # many small parts
    )
    events = history()
    async with (
        await Store.open(tmp_path / "all.db") as all_store,
        await Store.open(tmp_path / "cut.db") as cut_store,
    ):
        a, b = _Served(clock, all_store, keep), _Served(clock, cut_store, retain)
        async with anyio.create_task_group() as tg:
            await tg.start(a.engine.run)
            await tg.start(b.engine.run)
            for n, (at, customer, body) in enumerate(events, 1):
                clock.set(at)
                for s in (a, b):
                    s.broker.publish(f"shoal.events.{customer}", body, msg_id=f"m{n}")
                await eventually(lambda n=n: _settled(clock, [a, b], n))  # type: ignore[misc]
            end = T0 + 31 * DAY
            for step in range(1, 25):  # a day on, hour by hour: the cut moves on its own
                clock.set(events[-1][0] + step * HOUR)
                await eventually(lambda: _settled(clock, [a, b], len(events)))
            clock.set(end)
            await eventually(lambda: _settled(clock, [a, b], len(events)))
            # The cut reaches the last event received a retention before the end.
            await eventually(lambda: _cut_at(cut_store) > end - RETAIN - DAY)
            cut = cut_store.retention.cut
            assert cut is not None

            # The same transitions, versions and instants, with and without retention.
            assert sorted(map(key, a.broker.transitions)) == sorted(map(key, b.broker.transitions))
            assert {t.segment for t in b.broker.transitions} >= {
                "active",
                "loyal",
                "old_timer",
                "engaged",
                "weekly",
                "buyer",
                "plan",
            }
            # The same state: all-time counts, first instants, scores, memberships.
            for i in range(8):
                ca, cb = a.engine.customer(f"c{i}"), b.engine.customer(f"c{i}")
                assert ca is not None and cb is not None
                assert cb.snapshot() == ca.snapshot()

            # The events before the cut are gone from the log, the rest are there.
            left = [e async for chunk in cut_store.events.read() for e in chunk]
            assert left and left[0].seq == cut.through + 1
            assert cut.at <= end - RETAIN
            assert len(left) < await all_store.events.count()
            assert all_store.events.last_seq == cut_store.events.last_seq
            assert await cut_store.retention.count() == 8
            # Each partition's events stream may be cut up to its last event folded (the
            # same log, whole, in the other store).
            expected: dict[int, int] = {}
            for e in await all_store.events.part(after=0, limit=cut.through):
                p = partition(e.customer_id, b.broker.partitions)
                assert e.stream_seq is not None
                expected[p] = max(expected.get(p, 0), e.stream_seq)
            assert cut.partitions == expected and len(expected) > 1
            tg.cancel_scope.cancel()

    # A start from the log alone (snapshots off): the base plus the log after the cut give
    # every customer the state the whole log gives.
    off = EngineConfig(use_snapshots=False)
    whole = await _rebuilt(tmp_path / "all.db", clock, off)
    based = await _rebuilt(
        tmp_path / "cut.db", clock, EngineConfig(use_snapshots=False, retain=RETAIN)
    )
    assert based == whole
    assert len(based) == 8

    # A replay of the cut log starts from the bases: after the cut, the same changes at
    # the same instants as a replay of the whole log (these segments' memberships depend on
    # the facts alone: no exit rule, no min_dwell).
    whole_run, cut_run = await _replayed(tmp_path / "all.db"), await _replayed(tmp_path / "cut.db")
    assert cut is not None
    cut_at = cut.at
    after = [k for k in whole_run if k[1] > cut_at]
    assert after and [k for k in cut_run if k[1] > cut_at] == after
    (tmp_path / "s.toml").write_text(SEGMENTS)
    done = run(
        "replay", "--data-dir", str(tmp_path / "replayed"), "--segments", str(tmp_path / "s.toml")
    )
    assert done.returncode == 4  # (no log there)
    (tmp_path / "replayed").mkdir()
    (tmp_path / "cut.db").rename(tmp_path / "replayed" / "shoal.db")
    done = run(
        "replay", "--data-dir", str(tmp_path / "replayed"), "--segments", str(tmp_path / "s.toml")
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"note: the event log is cut (retention) at {human_instant(cut_at)}: the replay "
        "reaches back to there, starting from the state then of 8 customer(s)"
    ) in " ".join(done.stderr.split())
    (tmp_path / "replayed" / "shoal.db").rename(tmp_path / "cut.db")

    # Served on after the restart, from the log alone: the same transitions again.
    async with (
        await Store.open(tmp_path / "all.db") as all_store,
        await Store.open(tmp_path / "cut.db") as cut_store,
    ):
        a = _Served(clock, all_store, off)
        b = _Served(clock, cut_store, EngineConfig(use_snapshots=False, retain=RETAIN))
        async with anyio.create_task_group() as tg:
            await tg.start(a.engine.run)
            await tg.start(b.engine.run)
            clock.set(end + HOUR)
            for s in (a, b):
                s.broker.publish("shoal.events.c5", track("c5", "Visit"), msg_id="late1")
                s.broker.publish("shoal.events.c5", track("c5", "Buy"), msg_id="late2")
            await eventually(lambda: _settled(clock, [a, b], 2))
            assert sorted(map(key, a.broker.transitions)) == sorted(map(key, b.broker.transitions))
            assert any(t.customer_id == "c5" for t in b.broker.transitions)

            # An event stamped before the cut: a repeat of one cut could not be told apart,
            # so it is rejected, with the reason.
            cut = b.store.retention.cut
            assert cut is not None
            old = msgspec.json.encode(
                {
                    "type": "track",
                    "userId": "c1",
                    "event": "Visit",
                    "timestamp": format_instant(cut.at - HOUR),
                }
            )
            b.broker.publish("shoal.events.c1", old, msg_id="m1")
            await eventually(lambda: len(b.broker.rejections) == 1)
            assert b.broker.rejections[0].reason == (
                f"timestamp {format_instant(cut.at - HOUR)} is at or before the event log's "
                f"cut ({format_instant(cut.at)}, retention): history before it is kept only "
                "as each customer's state, where a repeat of an event cut cannot be told from "
                "a new one"
            )

            # A new all-time count the bases never kept: refused, with what and why.
            with pytest.raises(DefinitionError) as refused:
                await b.engine.apply_segments(
                    segments(SEGMENTS + "\n[segments.shopper]\nrule = \"count('Cart') >= 1\"\n")
                )
            assert str(refused.value) == (
                "test.toml: the event log is cut (retention: history before "
                f"{format_instant(_cut_at(b.store))} is kept only as each customer's "
                "state), and the state does not hold what these definitions read for all "
                "time: segment 'shopper' reads 'Cart' events for all time (count, "
                "since_last). Use a window (within=...) no longer than the retention instead"
            )
            # Through the API too, dry run or not: a bad request (400), the same reason.
            for apply in (False, True):
                with pytest.raises(InvalidRequest) as bad:
                    await EngineApi(b.engine).definitions(
                        DefinitionsRequest(
                            toml=SEGMENTS + "\n[segments.shopper]\nrule = \"count('Cart') >= 1\"\n",
                            source="api.toml",
                            apply=apply,
                        )
                    )
                assert "segment 'shopper' reads 'Cart' events for all time" in str(bad.value)
            with pytest.raises(InvalidRequest, match="reads 30d back, longer than the retention"):
                await EngineApi(b.engine).definitions(
                    DefinitionsRequest(
                        toml=SEGMENTS
                        + "\n[segments.m]\nrule = \"count('Visit', within='30d') > 1\"\n"
                    )
                )
            # A window no longer than the retention, on events the bases never kept: served,
            # and the same memberships and versions as with the whole log.
            both = segments(SEGMENTS + RECENT_BUYER)
            assert await a.engine.apply_segments(both) == await b.engine.apply_segments(both)
            await eventually(lambda: _settled(clock, [a, b], 2))
            for i in range(8):
                ca, cb = a.engine.customer(f"c{i}"), b.engine.customer(f"c{i}")
                assert ca is not None and cb is not None
                assert (dict(cb.members).keys(), cb.version) == (
                    dict(ca.members).keys(),
                    ca.version,
                )
            tg.cancel_scope.cancel()


def _cut_at(store: Store) -> int:
    cut = store.retention.cut
    return -1 if cut is None else cut.at


async def _replayed(db: Path) -> list[tuple[str, int, str, str]]:
    """(customer, at, segment, change) of a replay of the log of ``db``, in order: from the
    bases, when it was cut."""
    replay = Replay(segments(SEGMENTS))
    out: list[tuple[str, int, str, str]] = []
    async with await Store.open_read_only(db) as store:
        async for bases in read_bases(store):
            for c in bases:
                replay.start_from(c)
        async for entries in read_log(store):
            for e in entries:
                for t in replay.apply(event_of(e)):
                    out.append((t.customer_id, to_instant(t.at), t.segment, t.change))
    return out


def test_a_window_longer_than_the_retention_is_refused() -> None:
    defs = segments(
        """
[segments.fine]
rule = "count('Visit') >= 3 and since_first() > '400d'"

[segments.lapsed]
rule = "count('Visit', within='30d') == 0"
exit = "count('Visit', within='500d') >= 2"
"""
    )
    check_retention(defs, None)  # no retention: anything goes
    check_retention(defs, 500 * DAY)
    with pytest.raises(DefinitionError) as refused:
        check_retention(defs, 400 * DAY)
    assert str(refused.value) == (
        "test.toml: segment 'lapsed': `count('Visit', within=500d)` reads 500d back, longer "
        "than the retention of 400d: the events it reads are cut from the log. Shorten the "
        "window, or retain longer (--retain)"
    )
    assert refused.value.segment == "lapsed"


def test_what_bases_do_not_keep_is_named() -> None:
    kept = segments(SEGMENTS).needs
    again = decode_needs(encode_needs(kept))
    assert (again.event_names, again.trait_keys, again.retained, again.properties) == (
        kept.event_names,
        kept.trait_keys,
        kept.retained,
        kept.properties,
    )
    assert unserved(again, segments(SEGMENTS + RECENT_BUYER)) == []
    assert unserved(
        again,
        segments(
            """
[segments.a]
rule = "count('Cart') >= 1 and trait('tier') == 'gold'"

[segments.b]
rule = "sum('Buy', 'amount') > 10"
"""
        ),
    ) == [
        "segment 'a' reads 'Cart' events for all time (count, since_last)",
        "segment 'a' reads trait 'tier'",
        "segment 'b' reads `sum('Buy', 'amount')`",
    ]


def test_a_base_folded_in_parts_is_the_whole_fold() -> None:
    defs = segments(SEGMENTS)
    entries = []
    for n, (at, customer, body) in enumerate(history(), 1):
        wire = msgspec.json.decode(body)
        event = Event(
            kind="track" if wire["type"] == "track" else "identify",
            customer_id=customer,
            name=wire.get("event"),
            properties={},
            traits=wire.get("traits", {}),
            at=at,
            received=at,
            message_id=f"m{n}",
        )
        entries.append(msgspec.structs.replace(logged_event(event), seq=n))
    whole = fold_bases({}, entries, defs.needs)
    # In parts of 13 entries, each part from the bases the last one stored.
    stored: dict[str, CustomerBase] = {}
    for start in range(0, len(entries), 13):
        bases = {i: base_of(row) for i, row in stored.items()}
        fold_bases(bases, entries[start : start + 13], defs.needs)
        stored.update({i: base_row(c) for i, c in bases.items()})
    assert {i: row.body for i, row in stored.items()} == {i: c.snapshot() for i, c in whole.items()}


def _visit(n: int, unit: int) -> LoggedEvent:
    """Customer ``c<n % 3>``'s visit ``n`` units after T0, as logged."""
    return logged_event(
        Event(
            kind="track",
            customer_id=f"c{n % 3}",
            name="Visit",
            properties={},
            traits={},
            at=T0 + n * unit,
            received=T0 + n * unit,
            message_id=f"m{n}",
        )
    )


async def test_the_cut_waits_for_what_a_restart_an_import_or_an_unparking_reads(
    tmp_path: Path,
) -> None:
    defs = segments(SEGMENTS)
    async with await Store.open(tmp_path / "s.db") as store:
        entries = [_visit(n, HOUR) for n in range(1, 11)]
        await store.commit(entries)
        clock = VirtualClock(T0 + RETAIN + 6 * HOUR + 1)  # events 1..6 are past the retention
        config = EngineConfig(retain=RETAIN, retention_interval=0.0, retention_batch=2)
        cutter = Cutter(store, Partition(defs), clock, config)

        async def cut_through() -> int:
            while await cutter.step():
                pass
            cut = store.retention.cut
            return 0 if cut is None else cut.through

        # A parked customer's position, an open import's start, the snapshots' marks.
        await store.parked.put(
            [
                ParkedCustomer(
                    customer_id="c1",
                    reason="boom",
                    during="deadline",
                    at=T0,
                    log_seq=2,
                    definitions="",
                    shoal_version="",
                )
            ]
        )
        assert await cut_through() == 2
        await store.commit([], unparked=["c1"], imports={"i1": 3})
        assert await cut_through() == 3
        marks = SnapshotMarks(events_through=4, outbox_through=0, definitions="", needs="")
        await store.commit([], imports={"i1": None}, marks=marks)
        assert await cut_through() == 4
        marks = SnapshotMarks(events_through=10, outbox_through=0, definitions="", needs="")
        await store.commit([], marks=marks)
        assert await cut_through() == 6  # then the retention itself
        cut = store.retention.cut
        assert cut is not None and cut.at == T0 + 6 * HOUR
        clock.set(T0 + RETAIN + 20 * HOUR)
        assert await cut_through() == 10
        assert await store.events.count() == 0
        # Each base is its customer's events folded, as one fold of them all gives.
        whole = fold_bases({}, entries, defs.needs)
        assert {b.customer_id: b.body for b in await store.retention.of(whole)} == {
            i: c.snapshot() for i, c in whole.items()
        }


async def test_history_logged_into_an_empty_log_is_cut_without_waiting_for_the_interval(
    tmp_path: Path,
) -> None:
    """An engine that found nothing to cut (an empty log, or one cut to its end) looks again
    once events are logged: an import's history is past the retention already, and must not
    wait the interval (ten minutes by default) for its first cut. Events too recent to cut
    still wait for it."""
    defs = segments(SEGMENTS)
    minute = 60_000_000

    def visits(*minutes: int) -> list[LoggedEvent]:
        return [_visit(n, minute) for n in minutes]

    async with await Store.open(tmp_path / "s.db") as store:

        def cut_through() -> int:
            cut = store.retention.cut
            return 0 if cut is None else cut.through

        clock = VirtualClock(T0 + RETAIN + 10 * minute)  # events up to minute 10 are past it
        cutter = Cutter(store, Partition(defs), clock, EngineConfig(retain=RETAIN))
        assert not await cutter.step()  # nothing logged yet
        assert not await cutter.step()  # nor since: no look
        await store.commit(visits(1, 2, 3, 4))
        assert await cutter.step() and cut_through() == 4
        assert not await cutter.step()  # cut to its end
        await store.commit(visits(5, 6))
        assert await cutter.step() and cut_through() == 6
        await store.commit(visits(12))
        assert not await cutter.step()  # too recent: the next look is in 10 minutes
        clock.set(T0 + RETAIN + 15 * minute)
        await store.commit(visits(13))
        assert not await cutter.step() and cut_through() == 6
        clock.set(T0 + RETAIN + 20 * minute)
        assert await cutter.step() and cut_through() == 8
