"""``shoal forget`` end to end (issue 20): a history imported and served, two customers
forgotten (one with suppression), then the raw bytes of the SQLite files and of the broker's
store searched for their ids.

Real ``shoal serve`` (a process, with its role keys), on shoal's embedded broker (a real
nats-server with the roles' permissions), real SQLite.
"""

from __future__ import annotations

import functools
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import nats
from nats.aio.client import Client

from protocol import (
    HOUR,
    KEYS_DIR,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    ForgetOrder,
    ForgottenCause,
    Rejection,
    Transition,
    embedded_broker,
    event_subject,
    forget_hash,
    forget_order_subject,
    format_instant,
    partition,
    role_key_file,
)
from protocol.nats import (
    ApiClient,
    Credentials,
    LeaseBucket,
    connect,
    ensure_streams,
    read_stream,
)
from scripts._serving import unfinished_erasures
from store import Store
from tests.helpers import (
    NatsServer,
    Proc,
    free_port,
    now,
    published,
    run,
    serve_engine,
    track,
)

P = 32

GONE = ("zq-gone-1", "zq-gone-2")
"""The customers forgotten: ids no other byte sequence in the store holds."""
KEPT = tuple(f"kept-{i:02d}" for i in range(12))


def creds(data: Path, role: str) -> Credentials:
    return Credentials(nkey=role_key_file(data, role), role=role)


def history(start: int) -> str:
    lines = []
    for i, customer in enumerate((*GONE, *KEPT)):
        for k in range(2 + i % 3):
            at = format_instant(start + (i * 7 + k * 13) * HOUR)
            kind = "Visit" if k % 2 == 0 else "Email Opened"
            lines.append(
                {
                    "type": "track",
                    "userId": customer,
                    "event": kind,
                    "messageId": f"h-{customer}-{k}",
                    "timestamp": at,
                    "receivedAt": at,
                }
            )
    return "".join(json.dumps(x) + "\n" for x in lines)


def by_customer(ts: list[Transition]) -> dict[str, list[tuple[str, str, int]]]:
    out: dict[str, list[tuple[str, str, int]]] = {}
    for t in ts:
        out.setdefault(t.customer_id, []).append((t.segment, t.change, t.version))
    return out


def occurrences(root: Path, needle: bytes) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            n = f.read_bytes().count(needle)
            if n:
                found[str(f.relative_to(root))] = n
    return found


async def wait_applied(api: ApiClient, live: int, rejected: int, timeout: float = 60.0) -> None:
    """Until the live events are applied, the rejected ones rejected, and nothing is left to
    consume or publish (the import was applied before: ``import --wait``)."""
    with anyio.fail_after(timeout):
        while True:
            s = await api.status()
            if (
                s.events_applied >= live
                and s.events_rejected >= rejected
                and not s.consumer_lag
                and not s.unpublished
            ):
                return
            await anyio.sleep(0.2)


async def rejections(url: str, data: Path) -> list[Rejection]:
    nc = await connect([url], credentials=creds(data, "operator"))
    try:
        return [
            msgspec.json.decode(d.data, type=Rejection)
            async for chunk in read_stream(nc, REJECTED_STREAM, REJECTED_SUBJECT)
            for d in chunk
        ]
    finally:
        await nc.close()


async def test_forget_erases_a_customer_everywhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    nats_url = ["--nats", f"nats://127.0.0.1:{port}", "--data-dir", str(data)]
    start = now() // HOUR * HOUR - 5 * 24 * HOUR
    history_file = tmp_path / "history.jsonl"
    history_file.write_text(history(start))

    async with embedded_broker(data / "nats", port=port, keys=data / KEYS_DIR) as url:
        serve = Proc("serve", *nats_url, "--snapshot-interval", "1")
        try:
            await anyio.to_thread.run_sync(serve.wait_err, "shoal is serving")
            done = await anyio.to_thread.run_sync(
                lambda: run("import", str(history_file), *nats_url, "--wait", timeout=120)
            )
            assert done.returncode == 0, done.stderr
            # Live events too, and one the engine rejects (a track without its name) for
            # each customer to forget: their rejections hold their ids.
            nc = await connect([url], credentials=creds(data, "producer"))
            js = nc.jetstream()
            live = 0
            for customer in (*GONE, *KEPT):
                body = {"type": "track", "userId": customer, "event": "Visit"}
                await js.publish(event_subject(customer), json.dumps(body).encode())
                live += 1
            for customer in GONE:
                await js.publish(
                    event_subject(customer),
                    json.dumps({"type": "track", "userId": customer}).encode(),
                )
            api_nc = await connect([url], credentials=creds(data, "operator"))
            api = ApiClient(api_nc, timeout=10)
            await wait_applied(api, live, len(GONE))
            await anyio.sleep(2.5)  # partition snapshots uploaded with them in
            assert all(
                c.encode()
                in (data / "shoal.db").read_bytes() + (data / "shoal.db-wal").read_bytes()
                for c in GONE
            )
            # Where they are before: the search below finds what it looks for.
            where = {f.split("/")[3] for f in occurrences(data / "nats", b"zq-gone")}
            assert {
                "SHOAL_EVENTS",
                "SHOAL_REJECTED",
                "SHOAL_SEGMENTS",
                "OBJ_SHOAL_SNAPSHOTS",
            } <= where, where
            until = format_instant(now())
            before = by_customer(await published(url, creds(data, "subscriber")))
            assert all(before.get(c) for c in GONE), before
            replay_before = tmp_path / "replay-before.jsonl"
            done = run("replay", "--data-dir", str(data), "--until", until, "--transitions",
                       str(replay_before))  # fmt: skip
            assert done.returncode == 0, done.stderr

            # Forget: the first plainly, the second with its later events refused.
            done = await anyio.to_thread.run_sync(
                lambda: run("forget", GONE[0], *nats_url, "--by", "dpo@example", timeout=60)
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.startswith(f"erased  sha256:{forget_hash(GONE[0])}")
            ids = tmp_path / "ids.txt"
            ids.write_text(f"# one id per line\n{GONE[1]}\n")
            done = await anyio.to_thread.run_sync(
                lambda: run(
                    "forget", "--from-file", str(ids), "--suppress", "30d", *nats_url, timeout=60
                )
            )
            assert done.returncode == 0, done.stdout + done.stderr

            # Exits first: each forgotten customer left every segment it was in.
            after_ts = await published(url, creds(data, "subscriber"))
            after = by_customer(after_ts)
            for c in GONE:
                members: dict[str, bool] = {}
                for segment, change, _ in before[c]:
                    members[segment] = change == "entered"
                exits = [t for t in after_ts if t.customer_id == c]
                assert exits and all(t.cause == ForgottenCause() for t in exits)
                assert {t.segment for t in exits} == {s for s, m in members.items() if m}
                assert all(t.change == "exited" for t in exits)
                assert [t.version for t in exits] == list(
                    range(before[c][-1][2] + 1, before[c][-1][2] + 1 + len(exits))
                )
            # Everyone else: the same transitions, memberships and versions.
            assert {c: v for c, v in after.items() if c not in GONE} == {
                c: v for c, v in before.items() if c not in GONE
            }

            # A suppressed id's later event is refused, naming its hash only.
            await js.publish(
                event_subject(GONE[1]),
                json.dumps({"type": "track", "userId": GONE[1], "event": "Visit"}).encode(),
            )
            with anyio.fail_after(20):
                while not [
                    r for r in await rejections(url, data) if forget_hash(GONE[1]) in r.reason
                ]:
                    await anyio.sleep(0.2)
            refused = [r for r in await rejections(url, data) if forget_hash(GONE[1]) in r.reason]
            assert "forgotten with its events refused until" in refused[0].reason
            assert GONE[1] not in refused[0].subject and not refused[0].payload

            # Exports made now hold none of them; replays of the rest are unchanged.
            for segment in {s for c in GONE for s, _, _ in before[c]}:
                done = run("members", segment, "--format", "jsonl", *nats_url)
                assert done.returncode == 0, done.stderr
                assert not any(c in done.stdout for c in GONE)
            replay_after = tmp_path / "replay-after.jsonl"
            done = run("replay", "--data-dir", str(data), "--until", until, "--transitions",
                       str(replay_after))  # fmt: skip
            assert done.returncode == 0, done.stderr

            def others(path: Path) -> list[str]:
                return [
                    line
                    for line in path.read_text().splitlines()
                    if not any(c in line for c in GONE)
                ]

            assert others(replay_after) == others(replay_before)
            assert not any(c in replay_after.read_text() for c in GONE)
            await anyio.sleep(2.5)  # the refused event's message is erased after its ack
            await nc.close()
            await api_nc.close()
        finally:
            serve.stop(signal.SIGTERM)
            serve.close()
    # The broker stopped cleanly (its index written). Now the raw bytes.
    time.sleep(0.5)
    assert occurrences(data, b"zq-gone") == {
        f: n for f, n in occurrences(data, b"zq-gone").items() if "SHOAL_SEGMENTS" in f
    }, "a forgotten id is left outside the forgotten exits"
    for c in GONE:
        exits = [t for t in after_ts if t.customer_id == c]
        # Each exit holds the id twice: its payload's customer_id, its Nats-Msg-Id header.
        assert sum(occurrences(data / "nats", c.encode()).values()) == 2 * len(exits)


# Several engines: a forgotten customer's record travels with its partition -----------------

RULES = """
[segments.seen]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 2"
"""


async def test_a_forgotten_customer_stays_forgotten_when_its_partition_changes_hands(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    """Two engines; customers of b's partitions forgotten (one suppressed); b killed: a
    takes its partitions over from their snapshots, refuses the suppressed id's next event
    by hash, and continues the other's versions when it comes back."""
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    url = nats_server.url
    nc = await nats.connect(url)
    try:
        a = serve_engine(url, tmp_path / "a", "a", rules)
        procs.append(a)
        await anyio.to_thread.run_sync(lambda: a.wait_err("shoal is serving", timeout=30))
        b = serve_engine(url, tmp_path / "b", "b", rules)
        procs.append(b)
        held = await wait_shares(nc)
        js = nc.jetstream()
        customers = [f"m{i:03d}" for i in range(120)]
        for round_ in (1, 2):
            for c in customers:
                await js.publish(event_subject(c), track(c, mid=f"{c}-{round_}"))
        of_b = [c for c in customers if partition(c, P) in held["b"]]
        suppressed, returning = of_b[0], of_b[1]
        with anyio.fail_after(60):
            while len(await transitions(nc)) < 2 * len(customers):
                await anyio.sleep(0.2)
        for args in ([suppressed, "--suppress", "1d"], [returning]):
            done = await anyio.to_thread.run_sync(
                functools.partial(run, "forget", *args, "--nats", url, "--by", "test", timeout=60)
            )
            assert done.returncode == 0, done.stdout + done.stderr
        await anyio.sleep(2.5)  # a snapshot round of b's partitions after the erasures

        b.popen.send_signal(signal.SIGKILL)
        b.popen.wait()
        await wait_owners(nc, lambda o: set(o) == {"a"} and len(o["a"]) == P)
        for c in (suppressed, returning):
            await js.publish(event_subject(c), track(c, mid=f"{c}-back"))
        with anyio.fail_after(30):
            while True:
                ts = await transitions(nc)
                back = [t for t in ts if t.customer_id == returning and t.version > 4]
                if back:
                    break
                await anyio.sleep(0.2)
        # It had 2 transitions (erased), then 2 forgotten exits (kept): it comes back at 5.
        assert [
            (t.version, t.cause == ForgottenCause()) for t in ts if t.customer_id == returning
        ] == [(3, True), (4, True), (5, False)]
        assert [(t.segment, t.change) for t in back] == [("seen", "entered")]
        assert not [t for t in ts if t.customer_id == suppressed and t.version > 4]
        with anyio.fail_after(30):
            while True:
                rejected = [
                    msgspec.json.decode(d.data, type=Rejection)
                    async for chunk in read_stream(nc, REJECTED_STREAM, REJECTED_SUBJECT)
                    for d in chunk
                ]
                if any(forget_hash(suppressed) in r.reason for r in rejected):
                    break
                await anyio.sleep(0.2)
        a.popen.send_signal(signal.SIGTERM)
        assert a.popen.wait(30) == 0
        with sqlite3.connect(tmp_path / "a" / "shoal.db") as conn:
            assert not conn.execute(
                "SELECT count(*) FROM events WHERE customer_id = ?", (suppressed,)
            ).fetchone()[0]
            hashes = {h for (h,) in conn.execute("SELECT hash FROM forgotten")}
        assert {forget_hash(suppressed), forget_hash(returning)} <= hashes
    finally:
        await nc.close()


async def transitions(nc: Client) -> list[Transition]:
    return [
        msgspec.json.decode(d.data, type=Transition)
        async for chunk in read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD)
        for d in chunk
    ]


async def owners(nc: Client) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p, h in sorted((await LeaseBucket(nc).holders()).items()):
        out.setdefault(h.engine, []).append(p)
    return out


async def wait_owners(
    nc: Client, check: Callable[[dict[str, list[int]]], bool]
) -> dict[str, list[int]]:
    with anyio.fail_after(60):
        while not check(seen := await owners(nc)):
            await anyio.sleep(0.2)
    return seen


async def wait_shares(nc: Client) -> dict[str, list[int]]:
    return await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [P // 2, P // 2])


async def test_a_new_owner_takes_up_the_erasures_its_predecessor_left_unfinished(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A partition's snapshot lists its forgotten customers; one whose order is still in the
    stream (orders are erased last) was not finished: the new owner records it pending, with
    the id the order names, so that its engine finishes it. One whose order is gone, or whose
    order names another customer, is left as done."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        p = partition("half-done", P)
        order = ForgetOrder(customer_id="half-done", request="r1", by="dpo")
        ack = await js.publish(forget_order_subject(p), msgspec.json.encode(order))
        other = await js.publish(
            forget_order_subject(p),
            msgspec.json.encode(ForgetOrder(customer_id="someone", request="r1", by="dpo")),
        )
        forgotten = [
            (forget_hash("half-done"), 7, None, ack.seq),
            (forget_hash("all-done"), 3, None, other.seq + 100),  # its order erased
            (forget_hash("mismatch"), 2, None, other.seq),  # the order names someone else
        ]
        async with await Store.open(tmp_path / "shoal.db") as store:
            found = await unfinished_erasures(nc, store, p, forgotten)
            assert [(f.customer_id, f.floor, f.order_seq, f.by) for f in found] == [
                ("half-done", 7, ack.seq, "dpo")
            ]
            assert [f.customer_id for f in store.forgotten.pending()] == ["half-done"]
    finally:
        await nc.close()
