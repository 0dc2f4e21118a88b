"""Queries routed by partition: requests about one customer on its partition's subject (and
the subjects of earlier versions, forwarded), and the gathered endpoints merged from several
engines that each own some partitions (over a real nats-server)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest
from nats.aio.client import Client

from protocol import (
    DEFAULT_PARTITIONS,
    ApiError,
    CustomerReply,
    DefinitionsReply,
    DefinitionsRequest,
    EnginesDisagree,
    EngineUnavailable,
    ExplainReply,
    ExplainRequest,
    MembersReply,
    MembersRequest,
    SearchReply,
    SearchRequest,
    SegmentInfo,
    SegmentSize,
    SegmentsReply,
    StatusReply,
    UnknownCustomer,
    UnparkReply,
    UnparkRequest,
    partition,
)
from protocol._gather import Gathering, merge_members, merge_search
from protocol.nats import ApiClient, connect, serve_api
from tests.actors.test_api import ask, error, with_alice
from tests.helpers import NatsServer, run

# Routed requests against a real engine ------------------------------------------------------


async def test_a_request_about_one_customer_goes_on_its_partition(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path):
        api = ApiClient(client)
        reply = await api.customer("alice")
        assert reply.customer_id == "alice"
        # The number of partitions came from the service's $SRV.INFO.
        assert api.partitions == DEFAULT_PARTITIONS
        explained = await api.explain("alice", "gold")
        assert [s.segment for s in explained.segments] == ["gold"]
        p = partition("alice", DEFAULT_PARTITIONS)
        msg = await ask(client, f"shoal.api.customer.{p}.alice")
        assert msgspec.json.decode(msg.data, type=CustomerReply).customer_id == "alice"


async def test_a_request_on_another_partition_is_refused(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path):
        right = partition("alice", DEFAULT_PARTITIONS)
        wrong = (right + 1) % DEFAULT_PARTITIONS
        for endpoint in ("customer", "explain"):
            msg = await ask(client, f"shoal.api.{endpoint}.{wrong}.alice")
            assert error(msg) == (
                "400",
                f"invalid request: customer 'alice' is in partition {right} of "
                f"{DEFAULT_PARTITIONS}, not {wrong}: ask on shoal.api.{endpoint}.{right}.alice",
            )
            assert msg.data == b""


async def test_the_subjects_of_earlier_versions_are_forwarded(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with with_alice(nats_server, client, tmp_path):
        msg = await ask(client, "shoal.api.customer.alice")
        assert error(msg) == ("", "")
        assert msgspec.json.decode(msg.data, type=CustomerReply).customer_id == "alice"
        msg = await ask(client, "shoal.api.explain.alice", {"segment": "gold"})
        explained = msgspec.json.decode(msg.data, type=ExplainReply)
        assert [s.segment for s in explained.segments] == ["gold"]
        # The body goes along: the owner checks it.
        msg = await ask(client, "shoal.api.explain.alice", {"segment": "vip"})
        assert error(msg)[0] == "404"


# Gathered endpoints over two services, each owning half the partitions -----------------------

P = 4
IDS = [f"c{i:02d}" for i in range(40)]
T = datetime(2026, 1, 1, tzinfo=UTC)


class Shard:
    """A query handler over the customers of ``owned`` partitions (of :data:`P`), all in
    the one segment ``all``: what an engine owning those partitions answers."""

    def __init__(self, owned: Iterable[int], fingerprint: str = "f1") -> None:
        mine = set(owned)
        self.ids = sorted(i for i in IDS if partition(i, P) in mine)
        self.fingerprint = fingerprint
        self.asked: list[list[str]] = []

    async def customer(self, customer_id: str) -> CustomerReply:
        raise UnknownCustomer(customer_id)

    async def explain(self, customer_id: str, request: ExplainRequest) -> ExplainReply:
        raise UnknownCustomer(customer_id)

    async def segments(self) -> SegmentsReply:
        info = SegmentInfo(
            name="all", description="", rule="true", exit=None, min_dwell_seconds=0, size=0
        )
        return SegmentsReply(
            source="s.toml",
            fingerprint=self.fingerprint,
            customers=len(self.ids),
            complete=True,
            segments=[msgspec.structs.replace(info, size=len(self.ids))],
        )

    async def members(self, request: MembersRequest) -> MembersReply:
        after = [i for i in self.ids if request.cursor is None or i > request.cursor]
        page = [] if request.count_only else after[: request.limit]
        return MembersReply(
            segment=request.segment,
            count=len(self.ids),
            complete=True,
            members=page,
            next_cursor=page[-1] if len(after) > len(page) and page else None,
            true_since=[T] * len(page),
        )

    async def search(self, request: SearchRequest) -> SearchReply:
        found = [i for i in self.ids if i.startswith(request.prefix)]
        return SearchReply(
            prefix=request.prefix,
            customers=found[: request.limit],
            more=len(found) > request.limit,
            complete=True,
        )

    async def definitions(
        self, request: DefinitionsRequest, *, client: str | None = None
    ) -> DefinitionsReply:
        raise EngineUnavailable("not here")

    async def status(self) -> StatusReply:
        return StatusReply(
            at=T,
            consumer=f"shoal-engine-{self.ids[0]}",
            filter_subject="shoal.events.>",
            warm=True,
            customers=len(self.ids),
            events_applied=len(self.ids),
            events_duplicate=0,
            events_rejected=1,
            events_per_second=1.5,
            consumer_lag=2,
            buffered=0,
            transitions=len(self.ids),
            unpublished=0,
            deadlines_fired=0,
            pending_deadlines=0,
            next_deadline=None,
            definitions="s.toml",
            fingerprint=self.fingerprint,
            segments=[SegmentSize(name="all", size=len(self.ids))],
        )

    async def unpark(self, request: UnparkRequest) -> UnparkReply:
        # Parked here: its customers with an even number; any other id is not parked.
        self.asked.append(list(request.customer_ids))
        parked = [i for i in request.customer_ids if i in self.ids and int(i[1:]) % 2 == 0]
        return UnparkReply(
            unparked=parked,
            parked=[],
            not_parked=[i for i in request.customer_ids if i not in parked],
        )


class Shards:
    """Query services on their own connections, each stoppable alone."""

    def __init__(self, url: str, tg: anyio.abc.TaskGroup) -> None:
        self._url = url
        self._tg = tg
        self.scopes: list[anyio.CancelScope] = []
        self.handlers: list[Shard] = []

    async def start(self, handler: Shard, owned: Iterable[int]) -> None:
        self.handlers.append(handler)
        await self._tg.start(self._serve, handler, list(owned))

    async def _serve(
        self,
        handler: Shard,
        owned: list[int],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        nc = await connect([self._url])
        try:
            with anyio.CancelScope() as scope:
                self.scopes.append(scope)
                await serve_api(nc, handler, partitions=P, owned=owned, task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()

    async def stop(self, index: int) -> None:
        self.scopes[index].cancel()
        await anyio.sleep(0.2)  # its connection closed: no more subscriptions


@contextlib.asynccontextmanager
async def two_halves(url: str, second: str = "f1") -> AsyncIterator[Shards]:
    """Two services: one owns partitions 0 and 1, the other 2 and 3 (definitions
    ``second``)."""
    async with anyio.create_task_group() as tg:
        shards = Shards(url, tg)
        await shards.start(Shard([0, 1]), [0, 1])
        await shards.start(Shard([2, 3], second), [2, 3])
        try:
            yield shards
        finally:
            tg.cancel_scope.cancel()


async def test_members_are_gathered_from_every_engine_and_paged_in_id_order(
    nats_server: NatsServer, client: Client
) -> None:
    async with two_halves(nats_server.url):
        api = ApiClient(client, timeout=5)
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await api.members("all", limit=7, cursor=cursor)
            assert (page.count, page.complete, page.missing_partitions) == (40, True, [])
            assert (page.partition_count, page.partitions) == (P, [0, 1, 2, 3])
            assert len(page.members) <= 7 and page.true_since == [T] * len(page.members)
            seen += page.members
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == IDS and pages == 6
        count = await api.members("all", count_only=True)
        assert (count.count, count.members, count.next_cursor) == (40, [], None)
        assert api.partitions == P


async def test_search_segments_and_status_are_gathered(
    nats_server: NatsServer, client: Client
) -> None:
    async with two_halves(nats_server.url):
        api = ApiClient(client, timeout=5)
        found = await api.search("c1")
        assert (found.customers, found.more, found.complete) == (IDS[10:20], False, True)
        found = await api.search("c1", limit=3)
        assert (found.customers, found.more) == (IDS[10:13], True)
        listed = await api.segments()
        assert (listed.customers, [s.size for s in listed.segments]) == (40, [40])
        status = await api.status()
        assert [e.partitions for e in status.engines] == [[0, 1], [2, 3]]
        assert (status.customers, status.events_rejected, status.consumer_lag) == (40, 2, 4)
        assert status.events_per_second == 3.0
        assert [(s.name, s.size) for s in status.segments] == [("all", 40)]
        assert (status.complete, status.missing_partitions) == (True, [])


async def test_unpark_reaches_the_owner_of_each_id_and_the_replies_are_merged(
    nats_server: NatsServer, client: Client
) -> None:
    asked = ["c07", "c04", "nobody", "c10", "c13", "c04"]
    async with two_halves(nats_server.url) as shards:
        reply = await ApiClient(client, timeout=5).unpark(asked)
        # Each engine was asked only the ids of its own partitions (none: not asked at all).
        for shard, owned in zip(shards.handlers, ([0, 1], [2, 3]), strict=True):
            mine = [i for i in asked if partition(i, P) in owned]
            assert shard.asked == ([mine] if mine else [])
        # In the order asked, each id once.
        assert (reply.unparked, reply.parked) == (["c04", "c10"], [])
        assert reply.not_parked == ["c07", "nobody", "c13"]
        assert (reply.partition_count, reply.partitions) == (P, [0, 1, 2, 3])
        assert (reply.missing_partitions, reply.unanswered) == ([], [])

        await shards.stop(1)
        reply = await ApiClient(client, timeout=0.5).unpark(asked)
        missing = [i for i in dict.fromkeys(asked) if partition(i, P) in (2, 3)]
        assert (reply.missing_partitions, reply.unanswered) == ([2, 3], missing)
        assert not set(missing) & {*reply.unparked, *reply.not_parked}


async def test_definitions_that_differ_between_engines_are_reported(
    nats_server: NatsServer, client: Client
) -> None:
    async with two_halves(nats_server.url, second="f2"):
        with pytest.raises(EnginesDisagree) as caught:
            await ApiClient(client).segments()
        assert (caught.value.code, caught.value.message) == (
            "409",
            "the engines answering on shoal.api.segments hold different definitions "
            "(partitions 0-1 have f1; partitions 2-3 have f2): definitions being applied "
            "reach them one at a time; ask again",
        )


async def test_partitions_no_engine_answers_for_are_reported(
    nats_server: NatsServer, client: Client
) -> None:
    async with two_halves(nats_server.url) as shards:
        await shards.stop(1)
        api = ApiClient(client, timeout=0.5)
        page = await api.members("all", limit=100)
        first_half = Shard([0, 1]).ids
        assert (page.members, page.count, page.next_cursor) == (first_half, 20, None)
        assert (page.complete, page.missing_partitions) == (False, [2, 3])
        status = await api.status()
        assert (status.complete, status.missing_partitions, len(status.engines)) == (
            False,
            [2, 3],
            1,
        )

        # The CLI says so on one line, and --json marks the answer incomplete.
        url = nats_server.url
        ask_cli = functools.partial(run, "members", "all", "--nats", url, "--timeout", "0.5")
        done = await anyio.to_thread.run_sync(ask_cli)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == first_half
        assert done.stderr.splitlines() == [
            "shoal: warning: no engine answered for partition(s) 2-3 of 4: this answer leaves "
            "their customers out",
            "20 of 20 member(s)",
        ]
        done = await anyio.to_thread.run_sync(functools.partial(ask_cli, "--json"))
        answer = json.loads(done.stdout)
        assert (answer["complete"], answer["missing_partitions"]) == (False, [2, 3])
        assert done.stderr.startswith("shoal: warning: no engine answered for partition(s) 2-3")

        await shards.stop(0)
        with pytest.raises(EngineUnavailable) as caught:
            await api.members("all")
        assert caught.value.message == (
            "no shoal engine answers on shoal.api.members (is `shoal serve` running, and "
            "connected to this NATS server?)"
        )


async def test_an_error_every_engine_gives_is_the_answer(
    nats_server: NatsServer, client: Client
) -> None:
    async with two_halves(nats_server.url):
        msg = await client.request("shoal.api.members", b"{}", timeout=5)
        assert error(msg) == ("400", "invalid request: Object missing required field `segment`")
        with pytest.raises(ApiError) as caught:
            await ApiClient(client).search("c", limit=0)
        assert caught.value.code == "400"


# The merge alone ------------------------------------------------------------------------


def _page(ids: list[str], partitions: list[int], more: bool) -> MembersReply:
    return MembersReply(
        segment="s",
        count=len(ids),
        complete=True,
        members=ids,
        next_cursor=ids[-1] if more else None,
        true_since=[T] * len(ids),
        partition_count=2,
        partitions=partitions,
    )


def test_a_page_cut_short_bounds_the_merged_page() -> None:
    # The first engine's page was cut (max_payload) after "b"; the second's went to "z".
    # Ids past "b" wait for the next page, or "c" (the first engine's next) would be lost.
    g: Gathering[MembersReply] = Gathering("shoal.api.members")
    g.add(_page(["a", "b"], [0], more=True))
    g.add(_page(["a2", "x", "z"], [1], more=False))
    merged = merge_members(g, limit=10)
    assert (merged.members, merged.next_cursor) == (["a", "a2", "b"], "b")
    assert merged.true_since == [T] * 3


def test_a_reply_for_partitions_already_covered_is_not_counted_twice() -> None:
    g: Gathering[MembersReply] = Gathering("shoal.api.members")
    g.add(_page(["a"], [0], more=False))
    g.add(_page(["a"], [0], more=False))
    assert not g.done and g.missing == [1]
    g.add(_page(["b"], [1], more=False))
    assert g.done and merge_members(g, limit=5).count == 2


def test_search_keeps_the_first_ids_of_all_engines() -> None:
    g: Gathering[SearchReply] = Gathering("shoal.api.search")
    for ids, part, more in ((["c1", "c4"], 0, True), (["c2", "c3", "c5"], 1, False)):
        g.add(
            SearchReply(
                prefix="c",
                customers=ids,
                more=more,
                complete=True,
                partition_count=2,
                partitions=[part],
            )
        )
    merged = merge_search(g, limit=2)
    assert (merged.customers, merged.more) == (["c1", "c2"], True)
