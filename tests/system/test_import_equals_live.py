"""Import equals live (issue 17): history imported through the events stream, applied by a
running engine, gives what a replay of the same log gives at the same instant.

Real nats-server, real store in a temporary directory, the engine on a virtual clock so that
"the same instant" is one instant.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from actors import Engine, Replay, SegmentSet, VirtualClock, event_of, rebuild_from_stream
from protocol import (
    DAY,
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    HOUR,
    MINUTE,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    Event,
    ImportCause,
    OrderedHistory,
    Transition,
    format_instant,
    import_marker_subject,
    partition,
    to_instant,
)
from protocol.nats import connect, publish_import, read_stream
from store import Store
from tests.helpers import (
    NatsServer,
    collect,
    eventually,
    now,
    published,
    running_engine,
    segments,
)

T = now() // HOUR * HOUR - DAY
"""The engine's (virtual) now: before the wall clock, which the broker stamps with."""
START = T - 20 * DAY

SEGMENTS = segments(
    """
[segments.active]
rule = "count('Visit', within='3d') >= 2"
min_dwell = "2d"

[segments.lapsed]
rule = "since_last('Visit') >= '4d'"

[segments.sticky]
rule = "count('Visit', within='5d') >= 3"
exit = "count('Visit', within='5d') = 0"

[segments.gold]
rule = "trait('plan') = 'gold'"
"""
)

_CUSTOMERS = ("ann", "bob", "c.d", "zoë")

# (customer, hours after START, hours late, identify gold?)
_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(_CUSTOMERS),
        st.integers(0, 19 * 24),
        st.sampled_from([0, 0, 0, 1, 30, 60]),
        st.booleans(),
    ),
    min_size=1,
    max_size=25,
)


def _lines(events: Sequence[tuple[str, int, int, bool]], prefix: str) -> list[bytes]:
    out: list[bytes] = []
    for i, (customer, hours, late, identify) in enumerate(events):
        at = START + hours * HOUR + i * MINUTE
        doc: dict[str, object] = {"userId": customer, "messageId": f"{prefix}{i}"}
        if identify and i % 3 == 0:
            doc |= {"type": "identify", "traits": {"plan": "gold" if i % 2 else "free"}}
        else:
            doc |= {"type": "track", "event": "Visit"}
        doc["timestamp"] = format_instant(at)
        doc["receivedAt"] = format_instant(min(at + late * HOUR, T))
        out.append(json.dumps(doc).encode())
    return out


async def _pieces(history: OrderedHistory) -> AsyncIterator[list[Event]]:
    yield list(history)


async def _import(url: str, lines: list[bytes]) -> None:
    with OrderedHistory(now=T) as history:
        history.read(lines)
        history.finish()
        nc = await connect([url])
        try:
            await publish_import(nc, _pieces(history))
        finally:
            await nc.close()


async def _replayed(db: Path, segment_set: SegmentSet) -> Replay:
    """A replay of the engine's log, at T."""
    replay = Replay(segment_set)
    async with await Store.open_read_only(db) as store:
        async for chunk in store.events.read():
            for e in chunk:
                replay.apply(event_of(e))
    replay.advance(T)
    return replay


def _state(engine: Engine, replay: Replay) -> tuple[dict[str, object], dict[str, object]]:
    live: dict[str, object] = {}
    want: dict[str, object] = {}
    for customer in _CUSTOMERS:
        r = replay.customer(customer)
        c = engine.customer(customer)
        want[customer] = None if r is None else (dict(r.members), r.deadline)
        live[customer] = None if c is None else (dict(c.members), c.deadline)
    return live, want


def _check_catch_up(
    new: list[Transition], before: dict[str, object], replay: Replay, versions: dict[str, int]
) -> None:
    """One catch-up transition per changed membership, cause import, at T, true_since from
    the replay, versions continuing gap-free."""
    for customer in _CUSTOMERS:
        mine = [t for t in new if t.customer_id == customer]
        was = before.get(customer)
        old = set(was[0]) if isinstance(was, tuple) else set()
        r = replay.customer(customer)
        now_in = dict(r.members) if r is not None else {}
        assert sorted((t.segment, t.change) for t in mine) == sorted(
            [(s, "entered") for s in now_in.keys() - old]
            + [(s, "exited") for s in old - now_in.keys()]
        )
        start = versions.get(customer, 0)
        assert [t.version for t in mine] == list(range(start + 1, start + 1 + len(mine)))
        for t in mine:
            assert t.cause == ImportCause()
            assert to_instant(t.at) == T
            if t.change == "entered":
                assert to_instant(t.true_since) == now_in[t.segment]
            else:
                assert to_instant(t.true_since) <= T
        if mine:
            versions[customer] = mine[-1].version


# No shrinking: each example runs a broker and an engine, and a failure prints its example.
@settings(max_examples=25, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(first=_EVENTS, second=_EVENTS, seed=st.integers(0, 2**16), repeats=st.integers(0, 5))
def test_import_then_serve_equals_a_replay_of_the_log(
    first: list[tuple[str, int, int, bool]],
    second: list[tuple[str, int, int, bool]],
    seed: int,
    repeats: int,
) -> None:
    shuffle = random.Random(seed).shuffle
    lines = _lines(first, "m")
    # Duplicates, and any line order.
    lines += [lines[i % len(lines)] for i in range(repeats)]
    shuffle(lines)
    # A second import, received after the first (a later export of the same source), with
    # repeats of the first that the log drops.
    later = [
        line.replace(b'"m', b'"n')
        for line in _lines([(c, min(h + 24, 19 * 24), lt, g) for c, h, lt, g in second], "n")
    ]
    later += lines[:repeats]

    async def scenario(tmp: Path) -> None:
        server = NatsServer(tmp / "nats")
        server.start()
        try:
            db = tmp / "shoal.db"
            clock = VirtualClock(T)
            async with running_engine(server.url, db, SEGMENTS, clock=clock) as engine:
                await _import(server.url, lines)
                await eventually(lambda: engine.stats.imports_applied == 1)
                await eventually(lambda: engine.unpublished == 0)
                replay = await _replayed(db, SEGMENTS)
                live, want = _state(engine, replay)
                assert live == want
                after_first = await published(server.url)
                versions: dict[str, int] = {}
                _check_catch_up(after_first, {}, replay, versions)

                await _import(server.url, later)
                await eventually(lambda: engine.stats.imports_applied == 2)
                await eventually(lambda: engine.unpublished == 0)
                replay2 = await _replayed(db, SEGMENTS)
                live2, want2 = _state(engine, replay2)
                assert live2 == want2
                everything = await published(server.url)
                _check_catch_up(everything[len(after_first) :], want, replay2, versions)
        finally:
            server.stop()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(scenario, Path(tmp))


async def test_an_event_claiming_an_import_that_is_not_open_is_rejected(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    """A producer may set any header: one claiming an import is never taken for live traffic
    (nor applied with its claimed receive instant) unless an operator opened that import."""
    rejected = await collect(client, "shoal.rejected")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", SEGMENTS) as engine:
        js = client.jetstream()
        await js.publish(
            "shoal.events.ann",
            b'{"type": "track", "userId": "ann", "event": "Visit", "messageId": "x"}',
            headers={"Shoal-Import": "0123abcd", "Shoal-Received-At": str(START)},
        )
        # An end marker of no open import: ignored, nothing rebuilt.
        await js.publish(
            import_marker_subject("0123abcd", "end", partition("ann", DEFAULT_PARTITIONS)),
            b"",
            headers={"Shoal-Import": "0123abcd"},
        )
        await eventually(lambda: len(rejected.msgs) == 1)
        (rejection,) = rejected.rejections()
        assert rejection.reason == (
            "the event claims import '0123abcd', which is not open in its partition (no begin "
            "marker, or it ended): imported events are published by `shoal import`"
        )
        await eventually(lambda: engine.stats.events_rejected == 1)
        assert engine.customer("ann") is None
        assert engine.stats.imports_applied == 0
        assert engine.stats.events_applied == engine.stats.imported_events == 0


async def test_a_store_rebuilt_from_the_stream_keeps_imported_receive_instants(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Imported history is in the stream: a store rebuilt from it logs the imported events
    with their original receive instants, as the engine did."""
    lines = _lines([("ann", 10, 30, False), ("bob", 20, 0, True), ("ann", 30, 60, False)], "m")
    async with running_engine(
        nats_server.url, tmp_path / "shoal.db", SEGMENTS, clock=VirtualClock(T)
    ) as engine:
        await _import(nats_server.url, lines)
        await eventually(lambda: engine.stats.imports_applied == 1)
    nc = await connect([nats_server.url])
    try:
        async with await Store.open(tmp_path / "again.db") as store:
            report = await rebuild_from_stream(
                store,
                read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD),
                read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD),
                through=None,
            )
            assert report.logged == 3
            rebuilt = [event_of(e) async for chunk in store.events.read() for e in chunk]
    finally:
        await nc.close()
    async with await Store.open_read_only(tmp_path / "shoal.db") as store:
        logged = [event_of(e) async for chunk in store.events.read() for e in chunk]
    assert rebuilt == logged
    assert any(e.received > e.at for e in logged)
