"""The members reply's ``true_since``, replies cut to what one message of the broker holds,
and the customer search: the query service on a real nats-server."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from actors import VirtualClock
from protocol import (
    DAY,
    HOUR,
    MAX_PREFIX_CHARS,
    MAX_SEARCH,
    ApiError,
    MembersReply,
    SearchReply,
    SegmentsReply,
    from_instant,
)
from protocol.nats import ApiClient, connect
from protocol.nats._service import fit_reply
from tests.actors.test_api import ask, error, serving, start_instant
from tests.helpers import NatsServer, eventually, segments, track

VISITORS = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 2"
"""


async def test_members_carry_the_instant_each_entered(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    t0 = start_instant()
    clock = VirtualClock(t0)
    async with serving(
        nats_server.url, tmp_path / "shoal.db", segments(VISITORS), clock=clock
    ) as engine:
        # Each enters `visitor` at its first visit and `regular` at its second.
        for user, first, second in (("bob", 5, 2), ("ann", 9, 1), ("cid", 3, None)):
            await client.publish(
                f"shoal.events.{user}", track(user, at=t0 - first * DAY, mid=f"{user}1")
            )
            if second is not None:
                await client.publish(
                    f"shoal.events.{user}", track(user, at=t0 - second * DAY, mid=f"{user}2")
                )
        await eventually(lambda: engine.stats.events_applied == 5)
        api = ApiClient(client)
        page = await api.members("visitor", limit=2)
        assert (page.members, page.true_since, page.next_cursor) == (
            ["ann", "bob"],
            [from_instant(t0 - 9 * DAY), from_instant(t0 - 5 * DAY)],
            "bob",
        )
        page = await api.members("visitor", cursor="bob")
        assert (page.members, page.true_since) == (["cid"], [from_instant(t0 - 3 * DAY)])
        page = await api.members("regular")
        assert (page.members, page.true_since) == (
            ["ann", "bob"],
            [from_instant(t0 - DAY), from_instant(t0 - 2 * DAY)],
        )
        # The same as the customer's own reply says.
        ann = await api.customer("ann")
        assert [(m.segment, m.entered_at) for m in ann.segments] == [
            ("visitor", from_instant(t0 - 9 * DAY)),
            ("regular", from_instant(t0 - DAY)),
        ]
        count = await api.members("visitor", count_only=True)
        assert (count.count, count.members, count.true_since) == (3, [], [])


def test_a_reply_is_cut_to_what_fits_and_pages_on() -> None:
    t = from_instant(0)
    ids = [f"c{i:03d}" + "x" * 50 for i in range(100)]
    reply = MembersReply(
        segment="s", count=100, complete=True, members=ids, next_cursor=None, true_since=[t] * 100
    )
    whole = msgspec.json.encode(reply)
    body = fit_reply(reply, 2_000)
    cut = msgspec.json.decode(body, type=MembersReply)
    assert len(body) <= 2_000 < len(whole)
    # The longest beginning that fits: one more member would not.
    k = len(cut.members)
    assert cut.members == ids[:k] and cut.true_since == [t] * k
    assert cut.next_cursor == ids[k - 1]
    one_more = msgspec.structs.replace(cut, members=ids[: k + 1], true_since=[t] * (k + 1))
    assert len(msgspec.json.encode(one_more)) > 2_000
    # What fits is left whole.
    assert fit_reply(reply, len(whole)) == whole

    search = SearchReply(prefix="c", customers=ids, more=False, complete=True)
    found = msgspec.json.decode(fit_reply(search, 1_000), type=SearchReply)
    assert found.more and found.customers == ids[: len(found.customers)]
    with pytest.raises(ApiError, match=r"the reply does not fit in 10 bytes"):
        fit_reply(search, 10)
    # A reply that cannot page on is an error the requester gets, not a silence.
    state = SegmentsReply(source="s", fingerprint="f", customers=0, complete=True, segments=[])
    with pytest.raises(ApiError) as caught:
        fit_reply(state, 20)
    assert caught.value.message == (
        "the reply is 139 bytes, more than the broker takes in one message (20 bytes with its "
        "headers' share of max_payload)"
    )


@pytest.fixture
def small_broker(tmp_path: Path) -> NatsServer:
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 4096\n")
    return NatsServer(tmp_path / "nats", "-c", str(config))


async def test_a_whole_segment_pages_through_a_broker_with_a_small_max_payload(
    small_broker: NatsServer, tmp_path: Path
) -> None:
    small_broker.start()
    try:
        nc = await connect([small_broker.url])
        try:
            t0 = start_instant()
            async with serving(
                small_broker.url,
                tmp_path / "shoal.db",
                segments(VISITORS),
                clock=VirtualClock(t0),
            ) as engine:
                # 200-character ids: a page of 10,000 would be ~50 times the broker's limit.
                users = [f"{i:04d}" + "u" * 196 for i in range(250)]
                for i, user in enumerate(users):
                    await nc.publish(
                        f"shoal.events.{user}", track(user, at=t0 - i * HOUR, mid=f"m{i}")
                    )
                await eventually(lambda: engine.stats.events_applied == len(users), 30)
                api = ApiClient(nc)
                got: list[str] = []
                since = []
                cursor: str | None = None
                pages = 0
                while True:
                    raw = await ask(
                        nc,
                        "shoal.api.members",
                        {"segment": "visitor", "limit": 10_000}
                        | ({} if cursor is None else {"cursor": cursor}),
                    )
                    assert error(raw) == ("", "")
                    assert len(raw.data) <= 4096
                    page = msgspec.json.decode(raw.data, type=MembersReply)
                    got += page.members
                    since += page.true_since
                    pages += 1
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                assert got == users and pages > 10
                assert since == [from_instant(t0 - i * HOUR) for i in range(len(users))]
                found = await api.search("00", limit=MAX_SEARCH)
                assert found.more and found.customers == users[: len(found.customers)]
        finally:
            await nc.close()
    finally:
        small_broker.stop()


async def test_search_finds_customers_by_the_start_of_their_id(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with serving(nats_server.url, tmp_path / "shoal.db", segments(VISITORS)) as engine:
        users = ["c0012", "c0001", "c0120", "c1000", "d0012", "c001"]
        for user in users:
            await client.publish(f"shoal.events.{user}", track(user, mid=f"{user}1"))
        await eventually(lambda: engine.stats.events_applied == len(users))
        api = ApiClient(client)
        found = await api.search("c001")
        assert (found.prefix, found.customers, found.more, found.complete) == (
            "c001",
            ["c001", "c0012"],
            False,
            True,
        )
        found = await api.search("c", limit=2)
        assert (found.customers, found.more) == (["c0001", "c001"], True)
        assert (await api.search("e")).customers == []
        # Bounded: the prefix and the count.
        for body, message in (
            ({"prefix": ""}, "Expected `str` of length >= 1 - at `$.prefix`"),
            (
                {"prefix": "x" * (MAX_PREFIX_CHARS + 1)},
                f"Expected `str` of length <= {MAX_PREFIX_CHARS} - at `$.prefix`",
            ),
            ({"prefix": "c", "limit": MAX_SEARCH + 1}, "Expected `int` <= 1000 - at `$.limit`"),
        ):
            answer = await ask(client, "shoal.api.search", body)
            assert error(answer) == ("400", f"invalid request: {message}"), json.dumps(body)
