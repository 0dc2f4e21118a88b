"""The query service ``shoal`` on a real nats-server, through nats-py's request API: every
endpoint, its errors with their exact messages, and ``$SRV`` discovery."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from actors import (
    Clock,
    Engine,
    EngineApi,
    EngineConfig,
    SegmentSet,
    SystemClock,
    VirtualClock,
)
from protocol import (
    DAY,
    DEFAULT_PARTITIONS,
    SECOND,
    ApiError,
    CustomerReply,
    DefinitionsReply,
    EngineUnavailable,
    EventCounter,
    ExplainReply,
    Membership,
    MembersReply,
    SegmentsReply,
    StatusReply,
    format_instant,
    from_instant,
    partition,
)
from protocol.nats import ApiClient, connect, serve_api
from store import Store
from tests.helpers import NatsServer, collect, eventually, running_engine, segments, track

SEGMENTS = """
[segments.visitor]
description = "visited at least once"
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit', within='7d') >= 2"

[segments.gold]
rule = "trait('plan') = 'gold'"

[segments.engaged]
rule = "score() >= 1.5"
"""
NAMES = ("visitor", "regular", "gold", "engaged")


def identify(user: str, at: int, mid: str, **traits: Any) -> bytes:
    doc = {"type": "identify", "userId": user, "traits": traits, "messageId": mid}
    return json.dumps(doc | {"timestamp": format_instant(at)}).encode()


def start_instant() -> int:
    """Now, to the second: the virtual clock's start (events must not be ahead of it)."""
    return SystemClock().now() // SECOND * SECOND


@contextlib.asynccontextmanager
async def serving(
    url: str,
    db: Path,
    segment_set: SegmentSet,
    *,
    clock: Clock | None = None,
    config: EngineConfig | None = None,
) -> AsyncIterator[Engine]:
    """An engine with the query service on its own connection, as ``shoal serve`` runs it."""
    async with running_engine(url, db, segment_set, clock=clock, config=config) as engine:
        nc = await connect([url])
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_api, nc, EngineApi(engine))
                try:
                    yield engine
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await nc.close()


async def ask(client: Client, subject: str, body: Any = None) -> Msg:
    data = b"" if body is None else json.dumps(body).encode()
    return await client.request(subject, data, timeout=5)


def error(msg: Msg) -> tuple[str, str]:
    headers = msg.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


Alice = tuple[Engine, int, VirtualClock]


@contextlib.asynccontextmanager
async def with_alice(server: NatsServer, client: Client, tmp_path: Path) -> AsyncIterator[Alice]:
    """An engine serving the API, with alice's two visits and her gold plan applied, on a
    clock standing at ``t0``. (Not a fixture: its task group must stay in the test's task.)"""
    t0 = start_instant()
    clock = VirtualClock(t0)
    async with serving(
        server.url, tmp_path / "shoal.db", segments(SEGMENTS), clock=clock
    ) as engine:
        await client.publish("shoal.events.alice", track("alice", at=t0 - 2 * DAY, mid="a1"))
        await client.publish("shoal.events.alice", track("alice", at=t0 - DAY, mid="a2"))
        await client.publish("shoal.events.alice", identify("alice", t0 - DAY, "a3", plan="gold"))
        await eventually(lambda: engine.stats.events_applied == 3)
        yield engine, t0, clock


async def test_srv_discovery_lists_every_endpoint(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path):
        ping = json.loads((await ask(client, "$SRV.PING.shoal")).data)
        assert (ping["name"], ping["version"]) == ("shoal", "1.3.0")
        info = json.loads((await ask(client, "$SRV.INFO.shoal")).data)
        assert info["name"] == "shoal"
        assert (info["metadata"]["partitions"], info["metadata"]["owned"]) == ("32", "0-31")
        # Gathered endpoints listen in a queue group of this engine's own: every engine
        # gets each request.
        everyone = f"shoal-{info['id']}"
        per_partition = {
            (f"{e}-{p}", f"shoal.api.{e}.{p}.*", "shoal")
            for e in ("customer", "explain")
            for p in range(DEFAULT_PARTITIONS)
        }
        assert {(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]} == {
            *per_partition,
            ("customer", "shoal.api.customer.*", "shoal"),
            ("explain", "shoal.api.explain.*", "shoal"),
            ("segments", "shoal.api.segments", everyone),
            ("members", "shoal.api.members", everyone),
            ("search", "shoal.api.search", everyone),
            ("definitions", "shoal.api.definitions", "shoal"),
            ("status", "shoal.api.status", everyone),
            ("unpark", "shoal.api.unpark", everyone),
            ("forget", "shoal.api.forget", "shoal"),
        }
        # On the subject of earlier versions: forwarded, and answered by the partition's.
        await ask(client, "shoal.api.customer.nobody")
        stats = json.loads((await ask(client, "$SRV.STATS.shoal")).data)
        by_name = {e["name"]: e for e in stats["endpoints"]}
        assert (by_name["customer"]["num_requests"], by_name["customer"]["num_errors"]) == (1, 0)
        owner = by_name[f"customer-{partition('nobody', DEFAULT_PARTITIONS)}"]
        assert (owner["num_requests"], owner["num_errors"]) == (1, 1)
        assert owner["last_error"] == "404:unknown customer 'nobody'"


async def test_customer_state(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        msg = await ask(client, "shoal.api.customer.alice")
        assert error(msg) == ("", "")
        reply = msgspec.json.decode(msg.data, type=CustomerReply)
        c = engine.customer("alice")
        assert c is not None and c.deadline is not None
        assert reply == CustomerReply(
            customer_id="alice",
            at=from_instant(t0),
            evaluated_at=from_instant(t0 - DAY),
            first_seen_at=from_instant(t0 - 2 * DAY),
            version=4,
            segments=[
                Membership(segment="visitor", entered_at=from_instant(t0 - 2 * DAY)),
                Membership(segment="regular", entered_at=from_instant(t0 - DAY)),
                Membership(segment="gold", entered_at=from_instant(t0 - DAY)),
                Membership(segment="engaged", entered_at=from_instant(t0 - DAY)),
            ],
            score=2.0 ** (-2 / 14) + 2.0 ** (-1 / 14),
            traits={"plan": "gold"},
            events=[
                EventCounter(
                    event=None,
                    count=2,
                    last_at=from_instant(t0 - DAY),
                    within_7d=2,
                    within_30d=2,
                ),
                EventCounter(
                    event="Visit",
                    count=2,
                    last_at=from_instant(t0 - DAY),
                    within_7d=2,
                    within_30d=2,
                ),
            ],
            next_deadline=from_instant(c.deadline),
        )
        # The wire form: RFC 3339 instants in UTC, as transitions carry them.
        assert json.loads(msg.data)["segments"][0] == {
            "segment": "visitor",
            "entered_at": format_instant(t0 - 2 * DAY),
        }


async def test_customer_ids_are_escaped_in_the_subject(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        await client.publish("shoal.events.ann%2Elee@x%2Ecom", track("ann.lee@x.com", mid="b1"))
        await eventually(lambda: engine.stats.events_applied == 4)
        reply = await ApiClient(client).customer("ann.lee@x.com")
        assert reply.customer_id == "ann.lee@x.com"
        assert [m.segment for m in reply.segments] == ["visitor"]
        # Only the canonical form names the customer: unescaped, the id is several tokens,
        # which no engine listens on (neither partition.customer nor the one token of the
        # subjects of earlier versions).
        with pytest.raises(NoRespondersError):
            await ask(client, "shoal.api.customer.ann.lee@x.com")
        msg = await ask(client, "shoal.api.customer.ann%2elee@x%2Ecom")
        assert error(msg) == (
            "400",
            "invalid request: customer token 'ann%2elee@x%2Ecom' has a bad escape at position 3: "
            "'%' must be followed by two upper-case hex digits",
        )


async def test_unknown_customer(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path):
        for endpoint in ("customer", "explain"):
            msg = await ask(client, f"shoal.api.{endpoint}.bob")
            assert error(msg) == ("404", "unknown customer 'bob'")
            assert msg.data == b""
        with pytest.raises(ApiError) as e:
            await ApiClient(client).customer("bob")
        assert (e.value.code, str(e.value)) == ("404", "unknown customer 'bob'")


async def test_bad_request_bodies(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path):
        cases = [
            ("shoal.api.members", {"segment": "visitor", "limit": "ten"}),
            ("shoal.api.members", {"segment": "visitor", "limit": 0}),
            ("shoal.api.members", {"segment": "visitor", "limt": 5}),
            ("shoal.api.members", {}),
            ("shoal.api.definitions", {"apply": True}),
            ("shoal.api.explain.alice", {"segment": 3}),
            ("shoal.api.customer.alice", {"segment": "visitor"}),
            ("shoal.api.status", [1]),
        ]
        got = [error(await ask(client, subject, body)) for subject, body in cases]
        assert got == [
            ("400", "invalid request: Expected `int`, got `str` - at `$.limit`"),
            ("400", "invalid request: Expected `int` >= 1 - at `$.limit`"),
            ("400", "invalid request: Object contains unknown field `limt`"),
            ("400", "invalid request: Object missing required field `segment`"),
            ("400", "invalid request: Object missing required field `toml`"),
            ("400", "invalid request: Expected `str | null`, got `int` - at `$.segment`"),
            ("400", "invalid request: Object contains unknown field `segment`"),
            ("400", "invalid request: Expected `object`, got `array`"),
        ]
        msg = await client.request("shoal.api.members", b"{not json", timeout=5)
        assert error(msg) == (
            "400",
            "invalid request: JSON is malformed: object keys must be strings (byte 1)",
        )


async def test_unknown_segment(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path):
        expected = (
            "404",
            "unknown segment 'vip'; the segments defined are: visitor, regular, gold, engaged",
        )
        assert error(await ask(client, "shoal.api.members", {"segment": "vip"})) == expected
        assert error(await ask(client, "shoal.api.explain.alice", {"segment": "vip"})) == expected


async def test_segments_with_sizes_counted_as_memberships_change(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        api = ApiClient(client)
        reply = await api.segments()
        assert isinstance(reply, SegmentsReply)
        assert (reply.source, reply.customers, reply.complete) == ("test.toml", 1, True)
        assert reply.fingerprint == engine.segments.fingerprint
        assert [(s.name, s.size) for s in reply.segments] == [(n, 1) for n in NAMES]
        assert reply.segments[0].description == "visited at least once"
        assert reply.segments[1].rule == "count('Visit', within='7d') >= 2"
        assert (reply.segments[1].exit, reply.segments[1].min_dwell_seconds) == (None, 0.0)

        await client.publish("shoal.events.bob", track("bob", at=t0 - 10 * DAY, mid="b1"))
        await client.publish("shoal.events.alice", identify("alice", t0 - DAY, "a4", plan="silver"))
        await eventually(lambda: engine.stats.events_applied == 5)
        sizes = {s.name: s.size for s in (await api.segments()).segments}
        assert sizes == {"visitor": 2, "regular": 1, "gold": 0, "engaged": 1}

        # Time passes: alice's first visit leaves the 7-day window (regular exits), and the
        # score decays below 1.5 (engaged exits), each at its instant.
        clock.set(t0 + 30 * DAY)
        await eventually(lambda: engine.stats.transitions == 8)
        sizes = {s.name: s.size for s in (await api.segments()).segments}
        assert sizes == {"visitor": 2, "regular": 0, "gold": 0, "engaged": 0}
        actors = [engine.customer(i) for i in ("alice", "bob")]
        assert sizes == {n: sum(n in c.members for c in actors if c) for n in NAMES}


async def test_members_paged_in_id_order(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with serving(nats_server.url, tmp_path / "shoal.db", segments(SEGMENTS)) as engine:
        users = ["c", "a", "e", "b", "d", "f"]
        for u in users:
            await client.publish(f"shoal.events.{u}", track(u, mid=f"{u}1"))
        g_at = start_instant()
        await client.publish("shoal.events.g", identify("g", g_at, "g1", plan="gold"))
        await eventually(lambda: engine.stats.events_applied == 7)
        api = ApiClient(client)
        pages: list[MembersReply] = []
        cursor: str | None = None
        while True:
            page = await api.members("visitor", limit=4, cursor=cursor)
            pages.append(page)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert [(p.members, p.next_cursor, p.count) for p in pages] == [
            (["a", "b", "c", "d"], "d", 6),
            (["e", "f"], None, 6),
        ]
        # A page that ends exactly at the last member has no next page.
        page = await api.members("visitor", limit=2, cursor="d")
        assert (page.members, page.next_cursor) == (["e", "f"], None)
        count = await api.members("gold", count_only=True)
        assert (count.count, count.members, count.next_cursor, count.complete) == (
            1,
            [],
            None,
            True,
        )
        empty = await api.members("regular")
        assert (empty.count, empty.members, empty.next_cursor) == (0, [], None)
        raw = json.loads((await ask(client, "shoal.api.members", {"segment": "gold"})).data)
        assert raw == {
            "segment": "gold",
            "count": 1,
            "complete": True,
            "members": ["g"],
            "next_cursor": None,
            "true_since": [format_instant(g_at)],
            # The engine owns every partition (API 1.2).
            "partition_count": DEFAULT_PARTITIONS,
            "partitions": list(range(DEFAULT_PARTITIONS)),
            "missing_partitions": [],
        }


NEW = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.loyal]
rule = "count('Visit') >= 2"
"""
BROKEN = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.loyal]
rule = "count('Visit') >="
"""


async def test_definitions_validate_and_apply(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        seen = await collect(client, "shoal.segments.>")
        api = ApiClient(client)

        checked = await api.definitions(NEW, source="new.toml")
        assert checked == DefinitionsReply(
            source="new.toml",
            fingerprint=checked.fingerprint,
            segments=["visitor", "loyal"],
            added=["loyal"],
            removed=["regular", "gold", "engaged"],
            changed=[],
            refolds=True,
            applied=False,
            transitions=None,
        )
        assert engine.segments.names == NAMES  # validating changes nothing

        msg = await ask(client, "shoal.api.definitions", {"toml": BROKEN, "source": "broken.toml"})
        assert error(msg) == (
            "400",
            "broken.toml: segment 'loyal': rule `count('Visit') >=` is incomplete: something is "
            "missing after `>=`",
        )
        msg = await ask(
            client, "shoal.api.definitions", {"toml": "[segments.x]\nrule = 1", "apply": True}
        )
        assert error(msg) == ("400", "<request>: segment 'x': `rule` is missing or not text")
        # An invalid file applies nothing: the definitions in force keep working.
        assert engine.segments.names == NAMES
        await client.publish("shoal.events.carol", identify("carol", t0, "c1", plan="gold"))
        await eventually(lambda: len(seen.msgs) == 1)
        assert seen.msgs[0].subject == "shoal.segments.gold.entered"

        applied = await api.definitions(NEW, source="new.toml", apply=True)
        assert (applied.applied, applied.transitions) == (True, 5)
        assert list(engine.segments.names) == ["visitor", "loyal"]
        assert engine.segments.source == "new.toml"
        await eventually(lambda: len(seen.msgs) == 6)
        assert sorted((t.customer_id, t.segment, t.change) for t in seen.transitions()[1:]) == [
            ("alice", "engaged", "exited"),
            ("alice", "gold", "exited"),
            ("alice", "loyal", "entered"),
            ("alice", "regular", "exited"),
            ("carol", "gold", "exited"),
        ]
        sizes = {s.name: s.size for s in (await api.segments()).segments}
        assert sizes == {"visitor": 1, "loyal": 1}


async def test_status(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        reply = await ApiClient(client).status()
        assert isinstance(reply, StatusReply)
        c = engine.customer("alice")
        assert c is not None and c.deadline is not None
        assert reply.at == from_instant(t0)
        assert (reply.consumer, reply.filter_subject) == ("shoal-engine", "shoal.events.>")
        assert (reply.warm, reply.customers) == (True, 1)
        assert (reply.events_applied, reply.events_rejected, reply.events_duplicate) == (3, 0, 0)
        # The clock stands still: the three events count over the minimum span of 1 s.
        assert reply.events_per_second == 3.0
        assert reply.consumer_lag == 0
        assert (reply.transitions, reply.pending_deadlines) == (4, 1)
        assert reply.next_deadline == from_instant(c.deadline)
        assert (reply.definitions, reply.fingerprint) == ("test.toml", engine.segments.fingerprint)
        assert [(s.name, s.size) for s in reply.segments] == [(n, 1) for n in NAMES]


async def test_explain(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    async with with_alice(nats_server, client, tmp_path) as alice:
        engine, t0, clock = alice
        reply = await ApiClient(client).explain("alice", "regular")
        assert isinstance(reply, ExplainReply)
        assert (reply.customer_id, reply.at) == ("alice", from_instant(t0))
        [regular] = reply.segments
        assert (regular.segment, regular.member) == ("regular", True)
        # The first visit leaves the 7-day window 5 days from now.
        assert regular.next_change == format_instant(t0 + 5 * DAY)
        every = await ApiClient(client).explain("alice")
        assert [s.segment for s in every.segments] == list(NAMES)


async def test_a_customer_not_loaded_yet_after_a_restart_is_loaded_to_answer(
    nats_server: NatsServer, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "shoal.db"
    users = [f"c{i:02d}" for i in range(20)]
    async with running_engine(nats_server.url, db, segments(SEGMENTS)) as engine:
        for u in users:
            await client.publish(f"shoal.events.{u}", track(u, mid=f"{u}-1"))
        await eventually(lambda: engine.stats.events_applied == 20)
    async with await Store.open(db) as log:
        assert await log.snapshots.count() == 20  # the clean stop took them

    # Customers load one per turn while the engine runs; hold that back.
    config = EngineConfig(page_batch=1)
    async with serving(nats_server.url, db, segments(SEGMENTS), config=config) as engine:

        async def stalled(limit: int) -> list[Any]:
            await anyio.sleep(0.001)
            return []

        monkeypatch.setattr(engine._recovery, "page", stalled)
        assert not engine.warm
        assert engine.customer("c19") is None
        api = ApiClient(client)
        reply = await api.customer("c19")
        assert [m.segment for m in reply.segments] == ["visitor"]
        assert engine.customer("c19") is not None
        with pytest.raises(ApiError, match="^unknown customer 'nobody'$"):
            await api.customer("nobody")
        listed = await api.segments()
        assert not listed.complete and listed.customers < 20
        monkeypatch.undo()
        await eventually(lambda: engine.warm)
        listed = await api.segments()
        assert (listed.complete, listed.customers) == (True, 20)
        assert {s.name: s.size for s in listed.segments}["visitor"] == 20


async def test_no_engine_is_one_clear_error(client: Client) -> None:
    with pytest.raises(EngineUnavailable) as e:
        await ApiClient(client).status()
    assert str(e.value) == (
        "no shoal engine answers on shoal.api.status (is `shoal serve` running, and "
        "connected to this NATS server?)"
    )
