"""shoal's benchmark suite (issue 7): one command, every figure, against the targets; the
sizes of its modes and what its measurements share.

Each measurement is a function that runs alone (``--only``); together they run in one
process, each with its own embedded ``nats-server`` (``protocol.embedded_broker``, free
loopback port) and SQLite files in a temporary directory, under the default segments
(``actors.load_segments()``). The engine runs in a child process (``_harness``); this
process is the producer and the subscriber (``_engine_measures``, ``_other_measures``).

- ``ingest``: sustained end-to-end ingest at each size: a store of C customers built
  directly (snapshots, ``_stores``), an engine started on it and
  warm, then N live events (Visit, email opens and clicks, orders, identifies; stamped now)
  published with ``js.publish_async`` while it consumes. Events/s from the first publish
  until every event is applied and every transition it caused is published.
- ``latency``: paced publishing (core ``publish`` every 2 ms, to the offered rate) for a
  few seconds per rate, 30 % of events for new customers; a subscriber on
  ``shoal.segments.>`` takes, for every transition with an event cause, its arrival
  minus the publish time of the causing event (matched by message id).
- ``deadlines``: N customers, all with a pending deadline: 10 % due within one and the same
  second (clones of 50 actors whose one visit was 14 days before it), 10 % spread over the
  next seconds, the rest over the coming weeks. The store is built first, with the
  instants chosen so that they fall due after the engine has restarted on it and is warm;
  lateness is the engine's clock when it fired minus the instant due
  (``EngineObserver.deadlines_fired``).
- ``uniform``: N customers, every one with a pending deadline, due uniformly at R per second
  from after the engine is warm (full: 1,000,000 at 10,000/s, so 100 s of firing; clones of
  10,000 actors whose one visit was 14 days before their instant, due 1/R s apart per
  clone group); lateness as for ``deadlines``.
- ``replay``: ``actors.replay`` over a generated history (``actors.population``; small
  here: ``python -m scripts.bench.replay`` has the big figure).
- ``rebuild``: ready and warm times of the engine restarts above (from snapshots); if none
  ran, one restart of the deadline store's size.
- ``memory``: RSS of the warm engine (after ``gc.collect()``) less its RSS before opening the
  store, per customer: ``typical`` customers (an identify and 1 to 6 track events: event
  windows) and ``bare`` ones (an identify only: no event windows).
- ``sql``: the baseline, ``_sql``: the default segments as one SQL query
  each over an ``events`` table in SQLite holding a generated history (loaded from its
  Segment Spec JSON lines, cloned to size), time per full recompute, staleness if run
  every N minutes, and the count of members per segment against shoal's replay of the
  same events at the same instant.
- ``consumer``: the nats-py consumer ceiling alone (``scripts.bench.consumer``'s fill and
  its push consumer with ``AckPolicy.ALL``), for the limiting factor.

Results: a table on stdout, JSON and a markdown report (machine, load, versions, commit)
in ``--out`` (default ``scripts/bench/results/bench/``) as ``bench-<mode>.json`` and
``.md`` (``_report``).

``--profile`` (needs py-spy, ``pip install -e '.[bench]'``; without it the run stops at
once) adds sampling profiles, each from ``py-spy record --format raw --rate 250 --function
--nonblocking`` wrapped around a child process (``_harness`` says why wrapped,
``_profiles`` why non-blocking), as it sees asyncio and nats-py time as it is where cProfile
inflated call-heavy code:

- ``ingest``: one more run at the smallest size with the engine child under py-spy (its
  start and warm-up included);
- ``deadlines``: one more run, same size, the engine child under py-spy: the whole child
  (loading the store included), then the stacks through ``Engine._fire_due`` alone;
- ``replay``: the same history replayed in a child under py-spy (repeated for 3 s at
  least), the stacks through ``actors.replay`` alone (not the history's generation).

Figures of the profiled runs are not the measurements. Each report: the samples (threads
are sampled while they run), main thread against the others, the share of samples by where
the running function is (``actors/``, ``store/``, ``protocol/``, ``scripts/``, nats-py,
msgspec, SQLite, asyncio/anyio, a wait, other), and the top 20 functions by self and by
inclusive samples (once per sample), in the markdown and the JSON. The collapsed stacks,
files shortened, go to ``--out``'s ``profiles/`` (``bench-<mode>-<name>.txt``, gzipped
above 1 MB).

Usage::

    python -m scripts.bench --quick             # about a minute
    python -m scripts.bench                     # full: 10k/100k/1M customers, ~35 min
    python -m scripts.bench --quick --only ingest,latency
    python -m scripts.bench --quick --profile --only ingest,deadlines,replay
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _profiles
from ._common import ROOT

RESULTS = ROOT / "scripts" / "bench" / "results" / "bench"
MEASUREMENTS = (
    "ingest",
    "latency",
    "deadlines",
    "uniform",
    "replay",
    "rebuild",
    "memory",
    "sql",
    "consumer",
)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement runs in one mode."""

    ingest_customers: tuple[int, ...]
    ingest_events: int
    latency_customers: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    deadline_customers: int
    deadline_spread_s: int
    uniform_customers: int
    uniform_rate: int
    replay_customers: int
    replay_days: int
    memory_bare: int
    sql_base: int
    sql_clones: tuple[int, ...]
    sql_days: int
    consumer_messages: int
    timeout: float


MODES = {
    "smoke": Sizes(
        ingest_customers=(1_000,),
        ingest_events=2_000,
        latency_customers=1_000,
        latency_rates=(500, 2_000),
        latency_seconds=1.0,
        deadline_customers=3_000,
        deadline_spread_s=1,
        uniform_customers=2_000,
        uniform_rate=1_000,
        replay_customers=100,
        replay_days=120,
        memory_bare=1_000,
        sql_base=100,
        sql_clones=(2, 5),
        sql_days=120,
        consumer_messages=5_000,
        timeout=120,
    ),
    "quick": Sizes(
        ingest_customers=(5_000, 20_000),
        ingest_events=15_000,
        latency_customers=5_000,
        latency_rates=(1_000, 5_000),
        latency_seconds=2.0,
        deadline_customers=20_000,
        deadline_spread_s=3,
        uniform_customers=20_000,
        uniform_rate=5_000,
        replay_customers=500,
        replay_days=120,
        memory_bare=20_000,
        sql_base=500,
        sql_clones=(10, 40),
        sql_days=120,
        consumer_messages=30_000,
        timeout=300,
    ),
    "full": Sizes(
        ingest_customers=(10_000, 100_000, 1_000_000),
        ingest_events=100_000,
        latency_customers=100_000,
        latency_rates=(2_000, 5_000, 20_000, 50_000),
        latency_seconds=8.0,
        deadline_customers=1_000_000,
        deadline_spread_s=20,
        uniform_customers=1_000_000,
        uniform_rate=10_000,
        replay_customers=10_000,
        replay_days=120,
        memory_bare=100_000,
        sql_base=10_000,
        sql_clones=(10, 100),
        sql_days=120,
        consumer_messages=200_000,
        timeout=1_800,
    ),
}

TARGETS = {
    "ingest": "≥ 100,000 events/s end to end",
    "latency": "p99 ≤ 50 ms at 20,000 events/s",
    "deadlines": "lateness p99 ≤ 100 ms with 1M pending",
    "uniform": "p99 ≤ 100 ms with 1M pending due uniformly at 10k/s",
    "replay": "≥ 500,000 events/s",
    "rebuild": "restart of 1M from snapshots ≤ 10 s",
    "memory": "≤ 1 KB per customer (excluding event windows)",
}


@dataclass
class Run:
    """What the measurements of one run share."""

    mode: str
    sizes: Sizes
    tmp: Path
    warm: list[dict[str, Any]] = field(default_factory=list)
    """Every engine start of the run: population, customers, ready/warm seconds, RSS."""
    results: dict[str, Any] = field(default_factory=dict)
    profile: bool = False
    out: Path = RESULTS
    """Where the results go; the profiles' collapsed stacks go to its ``profiles/``."""

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def profile_report(
        self,
        name: str,
        raw: Path,
        parts: Sequence[tuple[str, str | None]],
        spy: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The report of the py-spy profile ``raw`` of measurement ``name``
        (``_profiles.profile_report``), its stacks kept as ``bench-<mode>-<name>.txt``."""
        return _profiles.profile_report(self.out, f"bench-{self.mode}-{name}", raw, parts, spy)
