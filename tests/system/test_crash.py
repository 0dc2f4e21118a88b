"""Crash safety end to end: ``shoal serve`` SIGKILLed at random moments, again and again,
while a producer streams events and time-based rules fire. Nothing is lost, nothing is
applied twice, every customer's transitions stay ordered and gap-free, and what the engine
ended with is what a fresh process rebuilds from the log alone.

Set ``SHOAL_CRASH_SEED`` to replay a run; every failure message names its seed.

Run as ``python -m tests.system.test_crash DB SEGMENTS UNTIL`` (from the repository root), it is
that fresh process: it reads the event log and prints, as JSON lines, the transitions
``actors.replay`` computes from it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from actors import load_segments, replay
from protocol import (
    DEFAULT_PARTITIONS,
    SECOND,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    Event,
    Transition,
    event_subject,
    to_instant,
)
from protocol.nats import ensure_streams
from store import Store
from tests.helpers import NatsServer, engine_consumers

ROOT = Path(__file__).resolve().parents[2]
SHOAL = [sys.executable, "-m", "scripts.cli"]

# Rules measured in seconds, so that time-based changes fire all through the run: recency,
# tenure, a window with hysteresis, a trait, a reference and a decaying score.
SEGMENTS = """
[score]
half_life = "2s"
weights = { "Visit" = 1.0 }
default_weight = 0.0

[segments.idle]
rule = "since_last('Visit') >= '3s'"

[segments.regular]
rule = "count('Visit', within='8s') >= 3"
exit = "count('Visit', within='8s') < 2"

[segments.newcomer]
rule = "since_first() < '5s'"

[segments.pro]
rule = "trait('plan') == 'pro'"

[segments.pro_idle]
rule = "in_segment('pro') and in_segment('idle')"

[segments.engaged]
rule = "score() >= 1.5"
"""
WINDOW = 8.0
"""The longest duration in SEGMENTS, in seconds (the score's is computed from the plan)."""
HALF_LIFE = 2.0
ENGAGED = 1.5

CUSTOMERS = 2_500
EVENTS = 6_000
PRODUCE_FOR = 18.0
"""Seconds over which the producer spreads the events."""
MIN_KILLS = 10
MIN_KILLS_SERVING = 5
"""Of them, at least this many once the engine serves (start-up is slower on a busy machine)."""
MAX_KILLS = 40
KILL_AFTER = (0.2, 2.5)
"""Seconds between starting the engine and killing it: some kills land in start-up and
rebuild, most while it ingests and fires deadlines. A third of the kills then wait for the
engine's next write to its store, and a third for its next acknowledgement, to land where a
wrong order of commit and acknowledgement would lose or repeat events."""
CONSUMER = "crash-check"

_event_decoder = msgspec.msgpack.Decoder(Event)
_transition_decoder = msgspec.json.Decoder(Transition)


# The plan: which events, for whom ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    msg_id: str
    customer: str
    body: bytes


def customer_id(i: int) -> str:
    # Some ids need escaping in subjects and headers.
    return f"member.{i}@club.example" if i % 50 == 0 else f"c{i:04d}"


def plan(rng: random.Random) -> list[Planned]:
    """EVENTS events over CUSTOMERS customers: one each, the rest at random, where a fifth of
    the customers come six times as often, so windows fill up and scores climb. No
    timestamps: an event's instant is when the broker stored it."""
    ids = [customer_id(i) for i in range(CUSTOMERS)]
    weights = [6 if rng.random() < 0.2 else 1 for _ in ids]
    customers = ids + rng.choices(ids, weights, k=EVENTS - CUSTOMERS)
    rng.shuffle(customers)
    out = []
    for k, customer in enumerate(customers):
        msg_id = f"e{k:05d}"
        r = rng.random()
        doc: dict[str, object]
        if r < 0.85:
            doc = {"type": "track", "event": "Visit"}
        elif r < 0.9:
            doc = {"type": "track", "event": "Email Opened"}
        else:
            plan_ = rng.choice(["pro", "pro", "free", None])
            doc = {"type": "identify", "traits": {"plan": plan_}}
        doc |= {"userId": customer, "messageId": msg_id}
        out.append(Planned(msg_id, customer, msgspec.json.encode(doc)))
    return out


def longest_change(events: list[Planned]) -> float:
    """Seconds after its last event by which any customer's last time-based change is due."""
    visits = Counter(e.customer for e in events if b'"Visit"' in e.body)
    most = max(visits.values())
    return max(WINDOW, HALF_LIFE * math.log2(most / ENGAGED))


# The engine under test: a child process, killed and restarted -------------------------------


@dataclass
class Runs:
    """``shoal serve`` runs, each with its stderr in a file of its own."""

    url: str
    data: Path
    segments: Path
    logs: Path
    seed: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = self.logs / f"engine-{len(self.procs):02d}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [*SHOAL, "serve", "--nats", self.url, "--data-dir", str(self.data)]
                + ["--segments", str(self.segments)]
                # Rounds of snapshots complete within a run, so kills land before, during
                # and after them, and restarts load snapshots plus a tail of the log.
                + ["--snapshot-interval", "0.3"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def log(self, n: int) -> str:
        return (self.logs / f"engine-{n:02d}.log").read_text(errors="replace")

    def served(self, n: int) -> bool:
        return "shoal is serving" in self.log(n)

    def context(self) -> str:
        """The seed, every error line of every run, and the tail of the last runs' logs."""
        lines = [f"seed {self.seed} (SHOAL_CRASH_SEED={self.seed} to replay)"]
        for n in range(len(self.procs)):
            for line in self.log(n).splitlines():
                if '"error"' in line or "Traceback" in line or "Error" in line:
                    lines.append(f"engine-{n:02d}: {line[:400]}")
        for n in range(max(0, len(self.procs) - 2), len(self.procs)):
            lines.append(f"--- tail of engine-{n:02d}.log")
            lines += [line[:400] for line in self.log(n).splitlines()[-15:]]
        return "\n".join(lines)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wal_state(data: Path) -> tuple[int, int] | None:
    """(size, mtime) of the engine's SQLite write-ahead log: it changes with every write."""
    try:
        st = (data / "shoal.db-wal").stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


async def next_write(data: Path, limit: float) -> None:
    """Return as soon as the engine writes to its store (or after ``limit`` seconds): a kill
    then lands inside a transaction, or just after one, before its acknowledgement."""
    before = wal_state(data)
    with anyio.move_on_after(limit):
        while wal_state(data) == before:
            await anyio.sleep(0.0005)


async def next_ack(js: JetStreamContext, limit: float) -> None:
    """Return as soon as the broker records a new acknowledgement from the engine (or after
    ``limit`` seconds): an event acknowledged before it was committed would then be lost."""

    async def floor() -> int | None:
        # The partitions' floors added up: any new acknowledgement moves the sum.
        try:
            infos = await engine_consumers(js)
        except (TimeoutError, nats.errors.Error):
            return None  # a slow answer: look again
        if len(infos) < DEFAULT_PARTITIONS + 1:
            return None  # being recreated by a start
        return sum(int(i.ack_floor.stream_seq or 0) if i.ack_floor else 0 for i in infos.values())

    before = await floor()
    with anyio.move_on_after(limit):
        while await floor() == before:
            pass


async def exited(proc: subprocess.Popen[bytes], timeout: float) -> int:
    with anyio.fail_after(timeout):
        while (code := proc.poll()) is None:
            await anyio.sleep(0.02)
    return code


async def stop_cleanly(runs: Runs, after: float) -> None:
    """Stop the latest run with SIGTERM ``after`` seconds once it serves (before, the signal's
    default action would end it); it must exit with status 0."""
    n = len(runs.procs) - 1
    proc = runs.procs[n]
    with anyio.fail_after(60):
        while not runs.served(n):
            assert proc.poll() is None, (
                f"engine run {n} ended by itself with status {proc.returncode}\n" + runs.context()
            )
            await anyio.sleep(0.05)
    await anyio.sleep(after)
    proc.send_signal(signal.SIGTERM)
    code = await exited(proc, 30)
    assert code == 0, f"engine run {n} exited with {code} on SIGTERM\n" + runs.context()


# What a durable subscriber of the transitions saw -------------------------------------------


@dataclass
class Seen:
    deliveries: list[tuple[str, bytes]] = field(default_factory=list)
    """(Nats-Msg-Id, payload) of every delivery, repeats included."""

    async def on_msg(self, msg: Msg) -> None:
        self.deliveries.append(((msg.headers or {}).get("Nats-Msg-Id", ""), msg.data))
        await msg.ack()


async def delivered_all(js: JetStreamContext) -> tuple[bool, int]:
    """(whether our consumer has been handed and has acknowledged everything the stream
    holds, the stream's last sequence)."""
    stream = await js.stream_info(SEGMENTS_STREAM)
    info = await js.consumer_info(SEGMENTS_STREAM, CONSUMER)
    last = int(stream.state.last_seq or 0)
    # Its filter takes the transitions only: the stream's last message may be a partition's
    # claim or progress record, which it is never handed.
    done = not info.num_pending and not info.num_ack_pending
    return done, last


async def engine_drained(js: JetStreamContext) -> bool:
    """Whether the engine has acknowledged every event in the stream."""
    infos = await engine_consumers(js)
    if len(infos) < DEFAULT_PARTITIONS + 1:
        return False  # being recreated by a start
    return all(not i.num_pending and not i.num_ack_pending for i in infos.values())


# Checks -----------------------------------------------------------------------------------


def memberships(transitions: list[Transition]) -> dict[str, frozenset[str]]:
    """Each customer's segments after ``transitions`` (in order per customer)."""
    now: dict[str, set[str]] = defaultdict(set)
    for t in transitions:
        if t.change == "entered":
            now[t.customer_id].add(t.segment)
        else:
            now[t.customer_id].discard(t.segment)
    return {c: frozenset(s) for c, s in now.items() if s}


def by_customer(transitions: list[Transition]) -> dict[str, list[Transition]]:
    """Each customer's transitions, in the order given."""
    out: dict[str, list[Transition]] = defaultdict(list)
    for t in transitions:
        out[t.customer_id].append(t)
    return out


def sequence_differences(
    published: dict[str, list[Transition]], replayed: dict[str, list[Transition]]
) -> list[str]:
    """One line per customer whose published transitions differ from the replayed ones."""

    def row(t: Transition) -> tuple[object, ...]:
        return (t.version, t.segment, t.change, to_instant(t.at), t.cause)

    out = []
    for c in sorted(published.keys() | replayed.keys()):
        got = [row(t) for t in published.get(c, [])]
        want = [row(t) for t in replayed.get(c, [])]
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            out.append(
                f"{c}: from version {first + 1}, published {got[first : first + 3]} "
                f"but replay gives {want[first : first + 3]} ({len(got)} vs {len(want)} in all)"
            )
    return out


async def fresh_replay(db: Path, segments: Path, until: int) -> list[Transition]:
    """The transitions a fresh process computes from the log alone (see the module's
    ``__main__``): a separate interpreter, so nothing of this one's state can leak in."""
    done = await anyio.run_process(
        [sys.executable, "-m", "tests.system.test_crash", str(db), str(segments), str(until)],
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return [_transition_decoder.decode(line) for line in done.stdout.splitlines()]


# The test ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_at_random_moments_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("SHOAL_CRASH_SEED") or random.randrange(1 << 32))
    print(f"crash test seed {seed}")
    rng = random.Random(seed)
    events = plan(rng)
    longest = longest_change(events)
    segments_file = tmp_path / "segments.toml"
    segments_file.write_text(SEGMENTS)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs = Runs(nats_server.url, tmp_path / "data", segments_file, logs, seed)

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    seen = Seen()
    acked: dict[str, str] = {}  # message id -> customer, for each event the broker stored
    try:
        await ensure_streams(js)
        # Durable, and there before the engine first runs: it must see every transition.
        await js.subscribe(
            SEGMENTS_WILDCARD,
            durable=CONSUMER,
            stream=SEGMENTS_STREAM,
            cb=seen.on_msg,
            manual_ack=True,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
        )
        producing = True
        last_stored = 0.0  # time.monotonic() when the last event was stored

        async def produce() -> None:
            nonlocal producing, last_stored
            start = time.monotonic()
            k = 0
            while k < len(events):
                # Due by now, at an even pace over PRODUCE_FOR seconds, in batches.
                due = min(len(events), int((time.monotonic() - start) / PRODUCE_FOR * EVENTS) + 1)
                batch = events[k:due]
                futures = [
                    await js.publish_async(
                        event_subject(e.customer), e.body, headers={"Nats-Msg-Id": e.msg_id}
                    )
                    for e in batch
                ]
                for e, f in zip(batch, futures, strict=True):
                    try:
                        await f
                    except (TimeoutError, nats.errors.Error):
                        # Stored or not, the same Nats-Msg-Id makes the retry safe.
                        while True:
                            try:
                                await js.publish(
                                    event_subject(e.customer),
                                    e.body,
                                    headers={"Nats-Msg-Id": e.msg_id},
                                    timeout=5,
                                )
                                break
                            except (TimeoutError, nats.errors.Error):
                                await anyio.sleep(0.1)
                    acked[e.msg_id] = e.customer
                k = due
                last_stored = time.monotonic()
                await anyio.sleep(0.05)
            producing = False

        kills = 0
        killed_before_serving = 0
        # One run in between stops cleanly, which snapshots every customer: the runs killed
        # after it restart from snapshots plus the log after them.
        clean_stop = rng.randrange(3, 8)
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            # Killing for as long as events stream in (bounded, should the machine crawl).
            while (
                kills < MIN_KILLS or kills - killed_before_serving < MIN_KILLS_SERVING or producing
            ) and kills < MAX_KILLS:
                proc = runs.start()
                if len(runs.procs) - 1 == clean_stop:
                    await stop_cleanly(runs, rng.uniform(*KILL_AFTER))
                    continue
                await anyio.sleep(rng.uniform(*KILL_AFTER))
                trigger = rng.random()
                if trigger < 1 / 3:
                    await next_write(runs.data, 0.5)
                elif trigger < 2 / 3:
                    await next_ack(js, 0.5)
                n = len(runs.procs) - 1
                assert proc.poll() is None, (
                    f"engine run {n} ended by itself with status {proc.returncode}\n"
                    + runs.context()
                )
                killed_before_serving += not runs.served(n)
                proc.send_signal(signal.SIGKILL)
                await exited(proc, 10)
                kills += 1
        print(f"{kills} kills, {killed_before_serving} of them before the engine served")

        # The last run: let it apply everything and fire every deadline still due (no change
        # for longer than any rule's duration), then stop it the clean way.
        final = runs.start()
        quiet_from = last_stored + longest + 1.0
        last_seq, changed_at = -1, time.monotonic()
        with anyio.fail_after(120):
            while True:
                await anyio.sleep(0.25)
                assert final.poll() is None, (
                    f"the last engine run ended by itself with status {final.returncode}\n"
                    + runs.context()
                )
                done, seq = await delivered_all(js)
                if seq != last_seq:
                    last_seq, changed_at = seq, time.monotonic()
                if (
                    time.monotonic() >= quiet_from
                    and time.monotonic() - changed_at >= 2.0
                    and done
                    and await engine_drained(js)
                ):
                    break
        stopped_at = time.time_ns() // 1000
        await stop_cleanly(runs, 0)
    finally:
        runs.kill_all()
        await nc.close()
    ctx = runs.context()
    assert len(acked) == EVENTS, ctx

    # 1. Every event the broker stored is in the log exactly once.
    db = tmp_path / "data" / "shoal.db"
    logged: list[Event] = []
    async with await Store.open(db) as log:
        async for chunk in log.events.read():
            logged += (_event_decoder.decode(entry.body) for entry in chunk)
        outbox = [o async for chunk in log.outbox.by_customer() for o in chunk]
    counts = Counter(e.message_id for e in logged)
    assert {m: n for m, n in counts.items() if n != 1} == {}, ctx
    assert counts.keys() == acked.keys(), (
        f"missing from the log: {sorted(acked.keys() - counts.keys())[:10]}, "
        f"never published: {sorted(counts.keys() - acked.keys())[:10]}\n{ctx}"
    )
    assert {e.message_id: e.customer_id for e in logged} == acked, ctx

    # 2. The subscriber's transitions, repeats dropped by Nats-Msg-Id, in the order received:
    # per customer, versions 1..n; per customer and segment, entered and exited alternate,
    # entered first.
    first: dict[str, bytes] = {}
    for msg_id, data in seen.deliveries:
        if msg_id in first:
            assert data == first[msg_id], f"{msg_id}: a repeat with another payload\n{ctx}"
        else:
            first[msg_id] = data
    transitions = [_transition_decoder.decode(data) for data in first.values()]
    kinds = Counter(
        f"{t.segment} {t.change} by {t.cause.__struct_config__.tag}" for t in transitions
    )
    print(
        f"{len(seen.deliveries)} deliveries, {len(transitions)} transitions: "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    )
    for (msg_id, _), t in zip(first.items(), transitions, strict=True):
        assert msg_id == t.msg_id, ctx
    published = by_customer(transitions)
    gaps = {
        c: [t.version for t in ts]
        for c, ts in published.items()
        if [t.version for t in ts] != list(range(1, len(ts) + 1))
    }
    assert gaps == {}, f"versions received not 1..n: {dict(list(gaps.items())[:5])}\n{ctx}"
    bad_order = []
    for c, ts in published.items():
        last: dict[str, str] = {}
        for t in ts:
            expected = "exited" if last.get(t.segment) == "entered" else "entered"
            if t.change != expected:
                bad_order.append(f"{c} v{t.version}: {t.segment} {t.change}")
            last[t.segment] = t.change
    assert bad_order == [], f"{bad_order[:10]}\n{ctx}"
    # Everything committed was published, as committed: the subscriber's set is the outbox.
    committed = {(o.customer_id, o.version): _transition_decoder.decode(o.body) for o in outbox}
    assert {(t.customer_id, t.version): t for t in transitions} == committed, ctx

    # 3. The final memberships are those of a fresh process that rebuilds from the log alone.
    replayed = await fresh_replay(db, segments_file, stopped_at)
    seen_in, rebuilt_in = memberships(transitions), memberships(replayed)
    differ = sorted(
        f"{c}: subscriber {sorted(seen_in.get(c, ()))}, rebuilt {sorted(rebuilt_in.get(c, ()))}"
        for c in seen_in.keys() | rebuilt_in.keys()
        if seen_in.get(c) != rebuilt_in.get(c)
    )
    assert differ == [], "\n".join(differ[:10]) + "\n" + ctx
    # And so is every customer's whole history: what changed, when, why, in which order.
    diffs = sequence_differences(published, by_customer(replayed))
    assert diffs == [], f"{len(diffs)} customers differ:\n" + "\n".join(diffs[:10]) + "\n" + ctx
    # Settled: the last change was due well before the stop.
    assert max(to_instant(t.at) for t in transitions) < stopped_at - SECOND, ctx


# The fresh process ------------------------------------------------------------------------


async def _print_replay(db: Path, segments_path: Path, until: int) -> None:
    segments = load_segments(segments_path)
    events: list[Event] = []
    async with await Store.open(db) as log:
        async for chunk in log.events.read():
            events += (_event_decoder.decode(entry.body) for entry in chunk)
    encoder = msgspec.json.Encoder()
    out = sys.stdout.buffer
    for t in replay(events, segments, until=until):
        out.write(encoder.encode(t) + b"\n")
    out.flush()


if __name__ == "__main__":
    db_path, segments_path, until = sys.argv[1:]
    anyio.run(_print_replay, Path(db_path), Path(segments_path), int(until))
