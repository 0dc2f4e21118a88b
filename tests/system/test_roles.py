"""Least privilege, checked on a real broker: each role's key can do its job and nothing more.

The broker here is an external nats-server whose configuration is pasted together from
``shoal auth permissions``, with NKeys made in the test. The fixtures give a broker and the
role keys (:class:`Secured`), so the same tests can run on the embedded broker too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import anyio.from_thread
import msgspec
import nats
import nats.errors
import nkeys
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig

from protocol import (
    DEFAULT_PARTITIONS,
    DEFINITIONS_BUCKET,
    EVENTS_STREAM,
    KEYS_DIR,
    LEASES_BUCKET,
    REJECTED_STREAM,
    ROLES,
    SEGMENTS_STREAM,
    SNAPSHOTS_BUCKET,
    BrokerError,
    PermissionDenied,
    Rejection,
    Transition,
    embedded_broker,
    role_key_file,
    stored_event_subject,
)
from protocol.nats import Credentials, DefinitionsKV, LeaseBucket, connect, permission_guard
from tests.helpers import NatsServer, Proc, claimed_consumer, free_port, run

STREAMS = (EVENTS_STREAM, SEGMENTS_STREAM, REJECTED_STREAM)


@dataclass(frozen=True)
class Secured:
    """A broker that enforces the roles, a seed file per role, and the engine once it runs
    (with the engine's key, its data in ``data``)."""

    url: str
    keys: dict[str, Path]
    data: Path
    engine: Proc | None = None

    def as_role(self, role: str) -> list[str]:
        """The options of a ``shoal`` command that connects with ``role``'s key."""
        return ["--nats", self.url, "--nkey", str(self.keys[role])]

    @asynccontextmanager
    async def client(self, role: str) -> AsyncIterator[Client]:
        """A client connected with ``role``'s key, using the role's inboxes."""
        nc = await connect([self.url], credentials=Credentials(nkey=self.keys[role], role=role))
        try:
            yield nc
        finally:
            await nc.close()


def _user_entry(role: str, public_key: str) -> str:
    """A user of a server configuration: the key, and ``shoal auth permissions ROLE`` pasted."""
    done = run("auth", "permissions", role)
    assert done.returncode == 0, done.stderr
    return f"    {{\n      nkey: {public_key}\n{done.stdout}    }}\n"


@contextmanager
def _external_broker(tmp_path: Path) -> Iterator[Secured]:
    """A nats-server configured from ``shoal auth permissions``, with an NKey per role and
    no anonymous access."""
    keys: dict[str, Path] = {}
    users = []
    for role in ROLES:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        keys[role] = tmp_path / f"{role}.nk"
        keys[role].write_bytes(seed + b"\n")
        keys[role].chmod(0o600)
        users.append(_user_entry(role, nkeys.from_seed(bytearray(seed)).public_key.decode()))
    config = tmp_path / "server.conf"
    config.write_text("authorization {\n  users = [\n" + "".join(users) + "  ]\n}\n")
    server = NatsServer(tmp_path / "nats", "-c", str(config))
    server.start()
    try:
        yield Secured(server.url, keys, tmp_path / "data")
    finally:
        server.stop()


@pytest.fixture
def external(tmp_path: Path) -> Iterator[Secured]:
    """The external nats-server, no engine running yet."""
    with _external_broker(tmp_path) as broker:
        yield broker


@contextmanager
def _on_external(tmp_path: Path, procs: list[Proc]) -> Iterator[Secured]:
    """The engine on the external nats-server, with its key."""
    with _external_broker(tmp_path) as broker:
        engine = Proc("serve", "--data-dir", str(broker.data), *broker.as_role("engine"))
        procs.append(engine)
        engine.wait_err("shoal is serving")
        yield dataclasses.replace(broker, engine=engine)


@contextmanager
def _on_embedded(tmp_path: Path, procs: list[Proc]) -> Iterator[Secured]:
    """The engine on shoal's embedded broker, whose keys it made in the data directory; the
    engine is given none: it finds its own there. (The broker runs apart from the engine,
    so that it outlives it, as the external one does.)"""
    data = tmp_path / "data"
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(
            embedded_broker(data / "nats", port=free_port(), keys=data / KEYS_DIR)
        ) as url,
    ):
        engine = Proc("serve", "--data-dir", str(data), "--nats", url)
        procs.append(engine)
        engine.wait_err("shoal is serving")
        yield Secured(url, {role: role_key_file(data, role) for role in ROLES}, data, engine)


BROKERS: dict[str, Callable[[Path, list[Proc]], AbstractContextManager[Secured]]] = {
    "external": _on_external,
    "embedded": _on_embedded,
}
"""Where the tests with a running engine run."""


@pytest.fixture(params=sorted(BROKERS))
def secured(request: pytest.FixtureRequest, tmp_path: Path, procs: list[Proc]) -> Iterator[Secured]:
    """A broker that enforces the roles, with the engine running on it with its own key."""
    with BROKERS[request.param](tmp_path, procs) as broker:
        yield broker


Call = Callable[[], Awaitable[object]]


async def _refused(nc: Client, subject: str, call: Call) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as caught:
        async with permission_guard(nc, subject):
            await call()
    return caught.value


def _stream_api(js: JetStreamContext, stream: str) -> list[tuple[str, Call]]:
    """What changes or reads a stream and its consumers through the JetStream API."""
    config = StreamConfig(name=stream, subjects=["shoal.>"])
    return [
        (f"$JS.API.STREAM.CREATE.{stream}", partial(js.add_stream, config)),
        (f"$JS.API.STREAM.UPDATE.{stream}", partial(js.update_stream, config)),
        (f"$JS.API.STREAM.DELETE.{stream}", partial(js.delete_stream, stream)),
        (f"$JS.API.STREAM.PURGE.{stream}", partial(js.purge_stream, stream)),
        (f"$JS.API.STREAM.INFO.{stream}", partial(js.stream_info, stream)),
        (f"$JS.API.STREAM.MSG.GET.{stream}", partial(js.get_msg, stream, 1)),
        (f"$JS.API.STREAM.MSG.DELETE.{stream}", partial(js.delete_msg, stream, 1)),
        (
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.mine",
            partial(js.add_consumer, stream, ConsumerConfig(durable_name="mine")),
        ),
        (
            f"$JS.API.CONSUMER.DELETE.{stream}.shoal-engine-0",
            partial(js.delete_consumer, stream, "shoal-engine-0"),
        ),
    ]


async def test_an_anonymous_client_is_refused(secured: Secured) -> None:
    with pytest.raises(BrokerError, match="uthorization"):
        await connect([secured.url])


async def test_the_producer_cannot_forge_apply_or_touch_the_streams(secured: Secured) -> None:
    async with secured.client("producer") as nc:
        js = nc.jetstream()
        subject = "shoal.segments.vip.entered"
        denied = await _refused(nc, subject, partial(nc.request, subject, b"{}", timeout=5))
        assert str(denied) == f"permission denied: role producer may not publish to {subject}"
        subject = "shoal.api.definitions"
        denied = await _refused(nc, subject, partial(nc.request, subject, b"{}", timeout=5))
        assert (denied.role, denied.action, denied.subject) == ("producer", "publish", subject)
        for stream in STREAMS:
            for subject, call in _stream_api(js, stream):
                denied = await _refused(nc, subject, call)
                assert denied.subject == subject
    async with secured.client("engine") as nc:
        name = await claimed_consumer(nc.jetstream(), 0)
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, name)
        assert info.name == name


async def test_the_subscriber_publishes_no_event_and_no_transition(secured: Secured) -> None:
    async with secured.client("subscriber") as nc:
        for subject in ("shoal.events.alice", "shoal.segments.vip.entered", "shoal.rejected"):
            denied = await _refused(nc, subject, partial(nc.request, subject, b"{}", timeout=5))
            assert str(denied) == f"permission denied: role subscriber may not publish to {subject}"
        # Its own durable consumer of the transitions: allowed.
        js = nc.jetstream()
        await js.add_consumer(SEGMENTS_STREAM, ConsumerConfig(durable_name="my-app"))
        await js.delete_consumer(SEGMENTS_STREAM, "my-app")
        denied = await _refused(
            nc,
            f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.mine",
            lambda: js.add_consumer(EVENTS_STREAM, ConsumerConfig(durable_name="mine")),
        )
        assert denied.role == "subscriber"


def test_a_violation_names_the_role_and_the_subject(secured: Secured, tmp_path: Path) -> None:
    segments = tmp_path / "segments.toml"
    segments.write_text("[segments.all]\nrule = \"count('Visit') >= 0\"\n")
    done = run("segments", "apply", str(segments), *secured.as_role("subscriber"))
    assert (done.returncode, done.stderr) == (
        1,
        "shoal: error: permission denied: role subscriber may not publish to "
        "shoal.api.definitions\n",
    )
    done = run("publish", "--customer", "ann", "--event", "Visit", *secured.as_role("subscriber"))
    assert (done.returncode, done.stderr) == (
        1,
        "shoal: error: permission denied: role subscriber may not publish to shoal.events.ann\n",
    )


def test_the_engine_stops_when_its_key_may_not_run_it(external: Secured, tmp_path: Path) -> None:
    done = run("serve", "--data-dir", str(tmp_path / "data"), *external.as_role("subscriber"))
    assert (done.returncode, done.stderr) == (
        1,
        "shoal: error: permission denied: role subscriber may not publish to "
        f"$JS.API.STREAM.INFO.{EVENTS_STREAM}\n",
    )


def test_publish_creates_no_stream(external: Secured) -> None:
    done = run("publish", "--customer", "ann", "--event", "Visit", *external.as_role("producer"))
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: the engine has not created stream {EVENTS_STREAM} on this NATS server "
        "yet, so nothing was stored: start `shoal serve` once (it creates the streams), then "
        "publish again\n",
    )


async def test_the_service_answers_inboxes_only(secured: Secured) -> None:
    """A request names where its answer goes: were the engine to answer on the JetStream API
    with its own rights, anyone who may ask could delete its consumer, and an answer on
    shoal.segments would sit among the transitions."""
    async with secured.client("operator") as nc:
        await nc.publish("$SRV.PING.shoal", b"", reply="shoal.segments.vip.entered")
        await nc.request("$SRV.PING.shoal", b"", timeout=5)  # answered after the one before
    async with secured.client("subscriber") as nc:
        target = f"$JS.API.CONSUMER.DELETE.{EVENTS_STREAM}.shoal-engine-0"
        # Undecodable: the error answer has an empty body, as a delete request has.
        await nc.publish("shoal.api.segments", b"[", reply=target)
        # Answered in order: once this one is, the one before was handled.
        answer = await nc.request("shoal.api.segments", b"[", timeout=5)
        assert answer.headers and answer.headers["Nats-Service-Error-Code"] == "400"
    async with secured.client("engine") as nc:
        name = await claimed_consumer(nc.jetstream(), 0)
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, name)
        assert info.name == name
        # No transition (the stream holds the partitions' claims).
        stored = await nc.jetstream().stream_info(
            SEGMENTS_STREAM, subjects_filter="shoal.segments.>"
        )
        assert not stored.state.subjects
    assert secured.engine is not None
    secured.engine.wait_err("request not answered: its reply subject is not an inbox")


async def _ask_old_subject(secured: Secured, subject: str) -> bytes:
    async with secured.client("operator") as nc:
        answer = await nc.request(subject, b"", timeout=10)
    assert not answer.headers or "Nats-Service-Error" not in answer.headers, answer.headers
    return bytes(answer.data)


def test_every_command_works_with_its_own_key(
    secured: Secured, tmp_path: Path, procs: list[Proc]
) -> None:
    live = Proc("tail", *secured.as_role("subscriber"))
    procs.append(live)
    assert run("status", *secured.as_role("operator")).returncode == 0  # tail subscribed by now
    done = run("publish", "--customer", "ann", "--event", "Visit", *secured.as_role("producer"))
    assert (done.returncode, done.stderr) == (0, "published 1 event(s): SHOAL_EVENTS sequence 1\n")
    transition = msgspec.json.decode(live.out_lines(1)[0], type=Transition)
    assert (transition.customer_id, transition.segment) == ("ann", "new_customer")
    replayed = Proc("tail", "--from-start", *secured.as_role("subscriber"))
    procs.append(replayed)
    assert msgspec.json.decode(replayed.out_lines(1)[0], type=Transition) == transition

    segments = tmp_path / "segments.toml"
    segments.write_text("[segments.visitors]\nrule = \"count('Visit') >= 1\"\n")
    for command in (
        ["status"],
        ["customer", "ann"],
        ["explain", "ann"],
        ["members", "new_customer"],
        ["segments", "list"],
        ["segments", "validate", str(segments)],
        ["segments", "apply", str(segments)],
        ["unpark", "ann"],
        ["rejected"],
        ["rejected", "--republish"],
        ["customer", "--search", "a"],
    ):
        done = run(*command, *secured.as_role("operator"))
        assert done.returncode == 0, (command, done.stderr)
    done = run("members", "visitors", *secured.as_role("operator"))
    assert done.stdout == "ann\n"
    done = run("members", "visitors", "--format", "csv", *secured.as_role("operator"))
    assert done.stdout.splitlines()[1].startswith("ann,")
    # A client of an earlier version asks on the one-token subject: an engine forwards it
    # to the owner of the customer's partition and relays the answer (the owner may not
    # answer a request another engine passed on).
    answer = anyio.run(_ask_old_subject, secured, "shoal.api.customer.ann")
    assert msgspec.json.decode(answer)["customer_id"] == "ann"
    # The subscriber may list the segments too.
    done = run("segments", "list", "--json", *secured.as_role("subscriber"))
    assert done.returncode == 0, done.stderr
    assert [s["name"] for s in json.loads(done.stdout)["segments"]] == ["visitors"]


async def test_only_the_engine_touches_the_definitions_bucket(secured: Secured) -> None:
    """The engine stores the definitions in force in SHOAL_DEFINITIONS; an operator changes
    them through the API (test_every_command_works_with_its_own_key), never in the bucket."""
    stream = f"KV_{DEFINITIONS_BUCKET}"
    key = f"$KV.{DEFINITIONS_BUCKET}.current"
    for role in ("operator", "producer", "subscriber"):
        async with secured.client(role) as nc:
            js = nc.jetstream()
            calls: list[tuple[str, Call]] = [
                (f"$JS.API.STREAM.INFO.{stream}", partial(js.key_value, DEFINITIONS_BUCKET)),
                (f"$JS.API.STREAM.MSG.GET.{stream}", partial(js.get_msg, stream, subject=key)),
                (f"$JS.API.STREAM.DELETE.{stream}", partial(js.delete_stream, stream)),
                (key, partial(js.publish, key, b"{}")),
            ]
            for subject, call in calls:
                denied = await _refused(nc, subject, call)
                assert (denied.role, denied.subject) == (role, subject)
    async with secured.client("engine") as nc:
        stored = await (await DefinitionsKV.open(nc)).load()
    assert stored is not None
    assert (stored.version, stored.origin_kind) == (1, "file")


async def test_only_the_engine_touches_leases_fences_and_snapshots(secured: Secured) -> None:
    """Who owns which partition, the fences that keep a paused owner's output out, and the
    partitions' snapshots are the engines' alone: no other role may forge a claim, a lease,
    a progress record or a snapshot, or read them."""
    leases, snapshots = f"KV_{LEASES_BUCKET}", f"OBJ_{SNAPSHOTS_BUCKET}"
    for role in ("operator", "producer", "subscriber"):
        async with secured.client(role) as nc:
            js = nc.jetstream()
            calls: list[tuple[str, Call]] = [
                (f"$JS.API.STREAM.INFO.{leases}", partial(js.stream_info, leases)),
                (f"$JS.API.STREAM.INFO.{snapshots}", partial(js.stream_info, snapshots)),
                (f"$JS.API.STREAM.PURGE.{snapshots}", partial(js.purge_stream, snapshots)),
            ]
            for subject in (
                f"$KV.{LEASES_BUCKET}.partition.0",
                f"$O.{SNAPSHOTS_BUCKET}.C.x",
                "shoal.fence.0",
                "shoal.progress.0",
            ):
                calls.append((subject, partial(nc.request, subject, b"{}", timeout=5)))
            for subject, call in calls:
                denied = await _refused(nc, subject, call)
                assert (denied.role, denied.subject) == (role, subject)
    async with secured.client("engine") as nc:
        claimed = await claimed_consumer(nc.jetstream(), 0)
        holders = await LeaseBucket(nc).holders()
    assert claimed.startswith("shoal-engine-0-")
    assert len(holders) == DEFAULT_PARTITIONS


async def test_the_operator_reads_the_rejected_events(secured: Secured) -> None:
    async with secured.client("producer") as nc:
        await nc.jetstream().publish("shoal.events.ann", b"not json")
    async with secured.client("operator") as nc:
        sub = await nc.jetstream().subscribe(
            "shoal.rejected", stream=REJECTED_STREAM, ordered_consumer=True
        )
        with anyio.fail_after(20):
            msg = await sub.next_msg(timeout=20)
        rejection = msgspec.json.decode(msg.data, type=Rejection)
        # The subject the stream stored it under, with its partition.
        assert rejection.subject == stored_event_subject("ann", DEFAULT_PARTITIONS)
        # Not the transitions: they are the subscriber's.
        with pytest.raises((PermissionDenied, nats.errors.Error)):
            async with permission_guard(nc):
                await nc.jetstream().subscribe(
                    "shoal.segments.>", stream=SEGMENTS_STREAM, ordered_consumer=True
                )


async def test_the_operator_republishes_rejected_events_and_touches_nothing_else(
    secured: Secured,
) -> None:
    """``shoal rejected --republish`` as the operator: it publishes the event again and
    deletes its rejection, and may do no more to the streams than that."""
    # A quarantined event whose cause is gone (as the engine publishes it after a bug).
    event = b'{"type": "track", "userId": "bo", "event": "Visit", "messageId": "bo-1"}'
    rejection = Rejection.of(
        reason="the event raised an error while applied and was quarantined: RuntimeError",
        subject="shoal.events.bo",
        data=event,
        received=1_800_000_000_000_000,
        stream_sequence=99,
    )
    async with secured.client("engine") as nc:
        await nc.jetstream().publish("shoal.rejected", msgspec.json.encode(rejection))
    done = await anyio.to_thread.run_sync(
        partial(run, "rejected", "--republish", *secured.as_role("operator"))
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("#1  republished  shoal.events.bo as ")
    async with secured.client("operator") as nc:
        js = nc.jetstream()
        # Transitions are the engine's to publish.
        subject = "shoal.segments.vip.entered"
        denied = await _refused(nc, subject, partial(nc.request, subject, b"{}", timeout=5))
        assert str(denied) == f"permission denied: role operator may not publish to {subject}"
        # It reads SHOAL_REJECTED through consumers of its own and deletes a message of it,
        # and reads SHOAL_EVENTS's configuration (shoal import: how many partitions);
        # nothing else of any stream.
        allowed = {
            f"$JS.API.STREAM.{what}.{REJECTED_STREAM}" for what in ("INFO", "MSG.GET", "MSG.DELETE")
        } | {
            "$JS.API.STREAM.INFO.SHOAL_EVENTS",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{REJECTED_STREAM}.mine",
            f"$JS.API.CONSUMER.DELETE.{REJECTED_STREAM}.shoal-engine-0",
        }
        for stream in STREAMS:
            for subject, call in _stream_api(js, stream):
                if subject not in allowed:
                    denied = await _refused(nc, subject, call)
                    assert denied.subject == subject


async def test_tail_skips_what_is_not_a_transition(secured: Secured, procs: list[Proc]) -> None:
    """A producer cannot publish on shoal.segments, but JetStream sends its acknowledgement
    wherever the producer asks: that lands in SHOAL_SEGMENTS too, and is no transition."""
    async with secured.client("producer") as nc:
        event = b'{"type": "track", "userId": "ann", "event": "Visit"}'
        await nc.publish("shoal.events.ann", event, reply="shoal.segments.vip.entered")
        await nc.flush()
    tail = Proc("tail", "--from-start", *secured.as_role("subscriber"))
    procs.append(tail)
    tail.wait_err("not a transition; skipped")
    transition = msgspec.json.decode(tail.out_lines(1)[0], type=Transition)
    assert (transition.customer_id, transition.segment) == ("ann", "new_customer")


async def test_a_campaign_reads_transitions_as_the_readme_shows(secured: Secured) -> None:
    async with secured.client("producer") as nc:
        await nc.jetstream().publish(
            "shoal.events.ann", b'{"type": "track", "userId": "ann", "event": "Visit"}'
        )
    nc = await nats.connect(
        secured.url,
        nkeys_seed=str(secured.keys["subscriber"]),
        inbox_prefix="_INBOX.shoal.subscriber",
    )
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "shoal.segments.>", durable="campaigns", stream=SEGMENTS_STREAM
        )
        (msg,) = await sub.fetch(1, timeout=20)
        await msg.ack()
        transition = msgspec.json.decode(msg.data, type=Transition)
        assert (transition.customer_id, transition.segment) == ("ann", "new_customer")
    finally:
        await nc.close()


def test_rebuild_works_with_the_engine_key(
    secured: Secured, tmp_path: Path, procs: list[Proc]
) -> None:
    done = run("publish", "--customer", "ann", "--event", "Visit", *secured.as_role("producer"))
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 20
    while run("customer", "ann", *secured.as_role("operator")).returncode != 0:  # not yet
        assert time.monotonic() < deadline, "the event was not applied"
        time.sleep(0.1)
    assert secured.engine is not None and secured.engine.stop() == 0
    data = secured.data
    for lost in data.glob("shoal.db*"):
        lost.unlink()
    done = run("rebuild", "--from-stream", "--data-dir", str(data), *secured.as_role("engine"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{data / 'shoal.db'}: 1 events logged and 1 published")


async def test_only_the_operator_may_import(secured: Secured, tmp_path: Path) -> None:
    """Issue 17: import into the stream is the operator's. No other role can open an import
    (its markers), so none can pass events off as imported."""
    for role in ("producer", "subscriber"):
        async with secured.client(role) as nc:
            subject = "shoal.events.3.ctl.import.abc.begin"
            denied = await _refused(nc, subject, partial(nc.request, subject, b"", timeout=5))
            assert str(denied) == f"permission denied: role {role} may not publish to {subject}"
    history = tmp_path / "h.jsonl"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    history.write_text(
        json.dumps({"type": "track", "userId": "ann", "event": "Visit", "timestamp": stamp}) + "\n"
    )
    done = await anyio.to_thread.run_sync(
        lambda: run("import", str(history), *secured.as_role("operator"))
    )
    assert (done.returncode, done.stderr) == (
        0,
        "imported 1 event(s), 0 duplicate(s), 0 line(s) skipped; the engine applies them "
        "once it reaches the import's end\n",
    )
    assert secured.engine is not None
    secured.engine.wait_err("import applied")
