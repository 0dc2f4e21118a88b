"""``shoal forget`` end to end (issue 20): a history imported and served, two customers
forgotten (one with suppression), then the raw bytes of the SQLite files and of the broker's
store searched for their ids.

Real ``shoal serve`` (a process, with its role keys), on shoal's embedded broker (a real
nats-server with the roles' permissions), real SQLite.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from protocol import (
    HOUR,
    KEYS_DIR,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    ForgottenCause,
    Rejection,
    Transition,
    embedded_broker,
    event_subject,
    forget_hash,
    format_instant,
    role_key_file,
)
from protocol.nats import ApiClient, Credentials, connect, read_stream
from tests.helpers import Proc, free_port, now, published, run

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
