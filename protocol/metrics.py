"""Prometheus metrics of a running engine, served over HTTP (``shoal serve --metrics-port``).

A module of its own, imported only when metrics are wanted: prometheus-client takes about
70 ms to import, which no other command should pay.

:class:`EngineMetrics` is both the engine's observer (``actors.EngineObserver``: it times
commits and measures how late deadlines fire, into histograms) and the exporter. Everything
else is read from the engine: once a second, on the engine's event loop, a sample is taken of
its counters and gauges, and the broker is asked how far behind the engine's consumer is. A
scrape, served from a thread of prometheus-client's HTTP server, reads only that sample, so
nothing in the engine is touched from another thread and the engine's hot path does no work
for metrics beyond a few counters it keeps anyway.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.abc
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._errors import ProtocolError
from ._inbound import RejectionKind

__all__ = (
    "COMMIT_BUCKETS",
    "LATENESS_BUCKETS",
    "EngineCounters",
    "EngineMetrics",
    "EngineView",
    "MetricsError",
)

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of ``shoal_batch_commit_seconds``."""
LATENESS_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    86400.0,
)
"""Upper bounds (seconds) of ``shoal_deadline_lateness_seconds``: from a busy loop's
milliseconds to the hours a deadline waits while the engine is down."""

_REJECTION_KINDS: tuple[str, ...] = typing.get_args(RejectionKind)
_logger = structlog.get_logger("shoal.metrics")


class MetricsError(ProtocolError):
    """The metrics endpoint cannot be served."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(
            f"cannot serve metrics on {host}:{port}: {why} (choose another with --metrics-port)"
        )
        self.host, self.port = host, port


class EngineCounters(Protocol):
    """The counters of an engine since it started (``actors.EngineStats``)."""

    @property
    def events_applied(self) -> int: ...
    @property
    def events_duplicate(self) -> int: ...
    @property
    def events_rejected(self) -> int: ...
    @property
    def transitions(self) -> int: ...
    @property
    def transitions_published(self) -> int: ...
    @property
    def deadlines_fired(self) -> int: ...
    @property
    def snapshots_written(self) -> int: ...
    @property
    def snapshot_rounds(self) -> int: ...


class EngineView(Protocol):
    """What the exporter reads of an engine (``actors.Engine`` is one)."""

    @property
    def stats(self) -> EngineCounters: ...
    @property
    def transition_counts(self) -> Mapping[tuple[str, str, str], int]: ...
    @property
    def rejection_counts(self) -> Mapping[str, int]: ...
    @property
    def segment_sizes(self) -> Mapping[str, int]: ...
    @property
    def pending_deadlines(self) -> int: ...
    @property
    def unpublished(self) -> int: ...
    @property
    def buffered(self) -> int: ...
    @property
    def customer_count(self) -> int: ...
    @property
    def warm(self) -> bool: ...
    async def consumer_lag(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class _Sample:
    """What a scrape shows, taken on the engine's loop; never changed once made."""

    counters: dict[str, int] = field(default_factory=dict)
    transitions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    lag: int | None = None


# name (without _total), help, EngineCounters attribute
_COUNTERS = (
    (
        "shoal_events_applied",
        "Events applied to customers and committed to the log.",
        "events_applied",
    ),
    (
        "shoal_events_duplicate",
        "Events dropped as repeats (same customer and message id already in the log).",
        "events_duplicate",
    ),
    (
        "shoal_transitions_published",
        "Transitions confirmed by the broker.",
        "transitions_published",
    ),
    (
        "shoal_deadlines_fired",
        "Customer deadlines fired (time-based evaluations).",
        "deadlines_fired",
    ),
    ("shoal_snapshots_written", "Customer snapshots written.", "snapshots_written"),
    ("shoal_snapshot_rounds", "Completed rounds of snapshots.", "snapshot_rounds"),
)
# name, help, EngineView attribute
_GAUGES = (
    (
        "shoal_deadlines_pending",
        "Customers with a deadline armed in the timer queue.",
        "pending_deadlines",
    ),
    (
        "shoal_outbox_unpublished",
        "Committed transitions not yet confirmed published.",
        "unpublished",
    ),
    ("shoal_feed_buffered", "Deliveries received from the broker, not yet applied.", "buffered"),
    ("shoal_customers", "Customers in memory.", "customer_count"),
    ("shoal_warm", "1 once every customer is in memory (0 while loading after a restart).", "warm"),
)


class EngineMetrics:
    """An engine's Prometheus metrics: its observer, a registry, and the HTTP endpoint.

    Give it to the engine (``Engine(..., observer=metrics)``), then run :meth:`serve` in the
    engine's task group. Each instance has its own registry (:attr:`registry`), so several
    engines in one process do not collide.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._commit = Histogram(
            "shoal_batch_commit_seconds",
            "Time to commit a batch (events, transitions, or both) to the store.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self._lateness = Histogram(
            "shoal_deadline_lateness_seconds",
            "How late each deadline fired: the engine clock when it fired, less the instant "
            "it was due.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self._sample = _Sample()
        self.registry.register(_SampleCollector(self))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.url: str | None = None
        """``http://host:port/metrics`` once :meth:`serve` has started."""

    # actors.EngineObserver ------------------------------------------------------------------

    def timing_commit(self) -> contextlib.AbstractContextManager[object]:
        return self._commit.time()

    def deadlines_fired(self, fired_at: int, due: Sequence[int]) -> None:
        observe = self._lateness.observe
        for instant in due:
            observe((fired_at - instant) / 1e6)

    # Serving ----------------------------------------------------------------------------------

    async def serve(
        self,
        engine: EngineView,
        *,
        host: str = "127.0.0.1",
        port: int = 9464,
        interval: float = 1.0,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``/metrics`` on ``host:port`` until cancelled, sampling ``engine`` (and
        asking the broker for its consumer's lag) every ``interval`` seconds.

        ``task_status.started()`` is given the endpoint's URL (with the port chosen when
        ``port`` is 0).

        Raises:
            MetricsError: the address cannot be listened on.
        """
        try:
            server, thread = await anyio.to_thread.run_sync(
                lambda: start_http_server(port, addr=host, registry=self.registry)
            )
        except OSError as e:
            raise MetricsError(host, port, e.strerror or str(e)) from e
        try:
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{server.server_port}/metrics"
            await self._take(engine)
            _logger.info("metrics endpoint ready", url=self.url)
            task_status.started(self.url)
            while True:
                await anyio.sleep(interval)
                await self._take(engine)
        finally:
            with anyio.CancelScope(shield=True):
                # shutdown() waits for the serving thread's next poll (at most 0.5 s).
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()
                thread.join()

    async def _take(self, engine: EngineView) -> None:
        # None (left out of the scrape) while not consuming, or the broker does not answer.
        lag = await engine.consumer_lag()
        stats = engine.stats
        self._sample = _Sample(
            counters={attr: getattr(stats, attr) for _, _, attr in _COUNTERS},
            transitions=dict(engine.transition_counts),
            rejections=dict(engine.rejection_counts),
            sizes=dict(engine.segment_sizes),
            gauges={attr: int(getattr(engine, attr)) for _, _, attr in _GAUGES},
            lag=lag,
        )


class _SampleCollector(Collector):
    """Turns the latest sample into metric families, at scrape time (in the HTTP thread)."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self._metrics._sample  # one read: a sample is never changed once made
        for name, text, attr in _COUNTERS:
            yield CounterMetricFamily(name, text, value=s.counters.get(attr, 0))
        rejected = CounterMetricFamily(
            "shoal_events_rejected",
            "Events rejected (published on shoal.rejected), by class of reason.",
            labels=["reason"],
        )
        for kind in (*_REJECTION_KINDS, *sorted(s.rejections.keys() - set(_REJECTION_KINDS))):
            rejected.add_metric([kind], s.rejections.get(kind, 0))
        yield rejected
        transitions = CounterMetricFamily(
            "shoal_transitions",
            "Membership transitions committed, by segment, change and cause.",
            labels=["segment", "change", "cause"],
        )
        for (segment, change, cause), n in sorted(s.transitions.items()):
            transitions.add_metric([segment, change, cause], n)
        yield transitions
        for name, text, attr in _GAUGES:
            yield GaugeMetricFamily(name, text, value=s.gauges.get(attr, 0))
        sizes = GaugeMetricFamily(
            "shoal_segment_members",
            "Members of each segment in force (while warming up: among customers loaded).",
            labels=["segment"],
        )
        for segment, n in s.sizes.items():
            sizes.add_metric([segment], n)
        yield sizes
        if s.lag is not None:
            yield GaugeMetricFamily(
                "shoal_consumer_lag_messages",
                "Events in the stream not yet acknowledged by the engine's consumer "
                "(pending plus delivered and unacknowledged).",
                value=s.lag,
            )
