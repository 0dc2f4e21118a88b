"""Customer lookups on the query service while the engine ingests at full speed.

It starts a ``nats-server -js`` (``_common.broker``: free port, temp store),
publishes a backlog of N ``track`` events over C customers, then starts ``shoal serve
--nats URL`` as a child process (default segments) and, as soon as the service answers,
sends ``shoal.api.customer.<partition>.<random known customer>`` requests from K concurrent callers
(nats-py request API) until the engine has applied the backlog; then as many seconds again
with the engine idle. It prints requests/s and latency percentiles for both phases, and
the engine's ingest rate while it answered.

    python -m scripts.bench.api [--events N] [--customers C] [--callers K] [--idle S]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from protocol import (
    EngineUnavailable,
    customer_api_subject,
    event_subject,
    format_instant,
    partition,
)
from protocol.nats import ApiClient, ensure_streams

from ._common import ROOT, broker, now_us, percentiles, publish


def _events(n: int, customers: int) -> list[tuple[str, bytes]]:
    rng = random.Random(42)
    now = now_us()
    out = []
    for i in range(n):
        user = f"c{rng.randrange(customers)}"
        at = now - 60 * 86_400_000_000 + i * (59 * 86_400_000_000 // n)
        doc = {
            "type": "track",
            "userId": user,
            "event": "Visit" if rng.random() < 0.6 else "Email Opened",
            "timestamp": format_instant(at),
            "messageId": f"m{i}",
        }
        out.append((event_subject(user), msgspec.json.encode(doc)))
    return out


def _line(name: str, lat: list[float], seconds: float, errors: int) -> str:
    p = percentiles([x * 1000 for x in lat])
    return (
        f"| {name} | {len(lat):,} | {seconds:.1f} | {len(lat) / seconds:,.0f} | "
        f"{p['p50']:.2f} | {p['p99']:.2f} | {p['max']:.1f} | {errors} |"
    )


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-api-") as tmp:
        async with broker(Path(tmp)) as url:
            nc = await nats.connect(url)
            js = nc.jetstream()
            await ensure_streams(js)
            events = _events(args.events, args.customers)
            t = time.perf_counter()
            await publish(js, events)
            print(f"published {len(events):,} events in {time.perf_counter() - t:.1f} s")
            # The customers that have events (ids are plain tokens, c<i>): any other is a 404.
            ids = sorted({subject.rsplit(".", 1)[1] for subject, _ in events})
            engine = subprocess.Popen(
                [sys.executable, "-m", "scripts.cli", "--log-level", "warning", "serve"]
                + ["--nats", url, "--data-dir", str(Path(tmp) / "data")],
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            try:
                await _measure(nc, args, ids)
            finally:
                engine.terminate()
                engine.wait(30)
                await nc.close()


async def _measure(nc: Client, args: argparse.Namespace, ids: list[str]) -> None:
    api = ApiClient(nc, timeout=10)
    started = time.perf_counter()
    while True:
        try:
            status = await api.status()
            break
        except EngineUnavailable:
            await anyio.sleep(0.05)
    print(f"service answering {time.perf_counter() - started:.1f} s after the engine started")
    rng = random.Random(7)
    phase: dict[str, list[float]] = {"ingest": [], "idle": []}
    errors = {"ingest": 0, "idle": 0}
    reasons: Counter[tuple[str, str]] = Counter()
    current = "ingest"
    stop = anyio.Event()

    count = status.partition_count

    async def caller() -> None:
        while not stop.is_set():
            cid = rng.choice(ids)
            # On the customer's partition (the old subject would cost a forwarding hop).
            where = None if count is None else partition(cid, count)
            subject = customer_api_subject("customer", cid, where)
            name = current
            t0 = time.perf_counter()
            try:
                msg = await nc.request(subject, b"", timeout=10)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                errors[name] += 1
                continue
            elapsed = time.perf_counter() - t0
            if msg.headers and "Nats-Service-Error-Code" in msg.headers:
                errors[name] += 1  # a customer with no event applied yet: 404
                reasons[(name, msg.headers["Nats-Service-Error-Code"])] += 1
                continue
            phase[name].append(elapsed)

    applied0, t_ingest = status.events_applied, time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(args.callers):
            tg.start_soon(caller)
        while True:
            await anyio.sleep(0.5)
            status = await api.status()
            if status.events_applied >= args.events:
                break
        ingest_s = time.perf_counter() - t_ingest
        rate = (status.events_applied - applied0) / ingest_s
        current = "idle"
        t_idle = time.perf_counter()
        await anyio.sleep(args.idle)
        idle_s = time.perf_counter() - t_idle
        stop.set()
    print(
        f"engine applied {status.events_applied - applied0:,} events in {ingest_s:.1f} s "
        f"({rate:,.0f} ev/s) while answering"
    )
    print("| phase | requests | s | requests/s | p50 ms | p99 ms | max ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(_line("during ingest", phase["ingest"], ingest_s, errors["ingest"]))
    print(_line("idle", phase["idle"], idle_s, errors["idle"]))
    for (name, code), n in sorted(reasons.items()):
        print(f"error replies during {name}: {n} with code {code}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--events", type=int, default=150_000)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--idle", type=float, default=10.0)
    args = p.parse_args(argv)
    anyio.run(run, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
