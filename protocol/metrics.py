"""Prometheus metrics and health probes of a running engine, served over HTTP (``shoal serve
--metrics-port``): ``/metrics``, ``/healthz`` and ``/readyz``.

A module of its own, imported only when metrics are wanted: prometheus-client takes about
70 ms to import, which no other command should pay.

:class:`EngineMetrics` is both the engine's observer (``actors.EngineObserver``: it times
commits and measures how late deadlines fire, into histograms) and the exporter. Everything
else is read from the engine: once a second, on the engine's event loop, a sample is taken of
its counters and gauges, and the broker is asked how far behind the engine's consumer is. A
scrape, served from a thread of prometheus-client's HTTP server, reads only that sample, so
nothing in the engine is touched from another thread and the engine's hot path does no work
for metrics beyond a few counters it keeps anyway.

Readiness is part of the sample: a list of checks, each giving the reasons it is not ready
(none when it is), taken on the engine's loop with the rest. ``/readyz`` answers 200 when there
are none, else 503 with them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from threading import Thread
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

import anyio
import anyio.abc
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._api import Ownership
from ._errors import ProtocolError
from ._inbound import RejectionKind

__all__ = (
    "COMMIT_BUCKETS",
    "LATENESS_BUCKETS",
    "EngineCounters",
    "EngineMetrics",
    "BrokerLink",
    "EngineView",
    "MetricsError",
    "ReadinessCheck",
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
    @property
    def events_quarantined(self) -> int: ...


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
    @property
    def parked_count(self) -> int: ...
    async def consumer_lag(self) -> int | None: ...
    def not_ready(self) -> Sequence[str]:
        """Why the engine is not ready to serve (nothing once it consumes, warm)."""
        ...


class BrokerLink(Protocol):
    """A connection to the broker (``nats.aio.client.Client`` is one)."""

    @property
    def is_connected(self) -> bool: ...


ReadinessCheck = Callable[[], Iterable[str]]
"""A readiness check: the reasons it is not ready, for people (none when it is). Called on the
engine's loop at each sample: it must be quick and must not block."""

_STARTING = ("starting: no sample taken yet",)


@dataclass(frozen=True, slots=True)
class _Sample:
    """What a scrape shows, taken on the engine's loop; never changed once made."""

    counters: dict[str, int] = field(default_factory=dict)
    transitions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    lag: int | None = None
    broker_connected: bool | None = None
    """None: no broker given to watch."""
    not_ready: tuple[str, ...] = _STARTING
    ownership: Ownership | None = None
    """None: no ownership given to watch (an engine without claims)."""


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
    (
        "shoal_events_quarantined",
        "Events that raised while applied: rejected with the error, their customer restored.",
        "events_quarantined",
    ),
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
    (
        "shoal_customers_parked",
        "Customers parked after an error (not evaluated until tried again; events kept).",
        "parked_count",
    ),
)


class EngineMetrics:
    """An engine's Prometheus metrics: its observer, a registry, and the HTTP endpoint.

    Give it to the engine (``Engine(..., observer=metrics)``), then run :meth:`serve` in the
    engine's task group. Each instance has its own registry (:attr:`registry`), so several
    engines in one process do not collide.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._checks: tuple[ReadinessCheck, ...] = ()
        self._failing: set[str] = set()
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

    @property
    def not_ready(self) -> tuple[str, ...]:
        """The reasons ``/readyz`` gives, as of the latest sample (none: ready)."""
        return self._sample.not_ready

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
        broker: BrokerLink | None = None,
        checks: Sequence[ReadinessCheck] = (),
        ownership: Callable[[], Ownership] | None = None,
        host: str = "127.0.0.1",
        port: int = 9464,
        interval: float = 1.0,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` until cancelled,
        sampling ``engine`` (and asking the broker for its consumer's lag) every ``interval``
        seconds.

        ``ownership`` (when given) is what the engine owns among several: the partitions it
        owns, its leases' age, and the partitions taken over, handed over and lost.

        Ready means: ``engine.not_ready()`` gives no reason, ``broker`` (when given) is
        connected, and neither does any of ``checks``. ``broker`` is also shown as the gauge
        ``shoal_broker_connected``.

        ``task_status.started()`` is given the metrics URL (with the port chosen when
        ``port`` is 0).

        Raises:
            MetricsError: the address cannot be listened on.
        """
        readiness: list[ReadinessCheck] = [engine.not_ready]
        if broker is not None:
            readiness.append(lambda: () if broker.is_connected else ("broker disconnected",))
        self._checks = (*readiness, *checks)
        try:
            server, thread = await anyio.to_thread.run_sync(
                lambda: _start_server(host, port, self._app())
            )
        except OSError as e:
            raise MetricsError(host, port, e.strerror or str(e)) from e
        try:
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{server.server_port}/metrics"
            await self._take(engine, broker)
            _logger.info("metrics endpoint ready", url=self.url)
            task_status.started(self.url)
            while True:
                await anyio.sleep(interval)
                await self._take(engine, broker, ownership)
        finally:
            with anyio.CancelScope(shield=True):
                # shutdown() waits for the serving thread's next poll (at most 0.5 s).
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()
                thread.join()

    async def _take(
        self,
        engine: EngineView,
        broker: BrokerLink | None,
        ownership: Callable[[], Ownership] | None = None,
    ) -> None:
        # None (left out of the scrape) while not consuming, or the broker does not answer.
        lag = await engine.consumer_lag()
        stats = engine.stats
        self._sample = _Sample(
            broker_connected=None if broker is None else broker.is_connected,
            not_ready=tuple(reason for check in self._checks for reason in self._reasons(check)),
            counters={attr: getattr(stats, attr) for _, _, attr in _COUNTERS},
            transitions=dict(engine.transition_counts),
            rejections=dict(engine.rejection_counts),
            sizes=dict(engine.segment_sizes),
            gauges={attr: int(getattr(engine, attr)) for _, _, attr in _GAUGES},
            lag=lag,
            ownership=None if ownership is None else ownership(),
        )

    def _reasons(self, check: ReadinessCheck) -> list[str]:
        try:
            return list(check())
        except Exception as e:  # noqa: BLE001 - a faulty probe must not stop the engine
            reason = f"readiness check failed: {e!r}"
            if reason not in self._failing:  # logged once, not at every sample
                self._failing.add(reason)
                _logger.exception("readiness check failed", check=getattr(check, "__name__", None))
            return [reason]

    def _app(self) -> _WsgiApp:
        """The HTTP endpoint: the probes, and the metrics at any other path (as
        prometheus-client serves them)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., object]) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                # Answered at all: the process is alive.
                return _json(start_response, "200 OK", {"alive": True})
            if path == "/readyz":
                reasons = list(self._sample.not_ready)  # one read: never changed once made
                status = "503 Service Unavailable" if reasons else "200 OK"
                return _json(start_response, status, {"ready": not reasons, "reasons": reasons})
            body: list[bytes] = metrics_app(environ, start_response)
            return body

        return app


_WsgiApp = Callable[[dict[str, Any], Callable[..., object]], list[bytes]]


def _json(start_response: Callable[..., object], status: str, doc: object) -> list[bytes]:
    body = json.dumps(doc).encode() + b"\n"
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """Logs no request (a probe every few seconds would fill stderr)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def _start_server(host: str, port: int, app: _WsgiApp) -> tuple[ThreadingWSGIServer, Thread]:
    """``app`` served on ``host:port`` by a thread (as ``prometheus_client.start_http_server``
    serves its own)."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = Thread(target=server.serve_forever, name="shoal-metrics", daemon=True)
    thread.start()
    return server, thread


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
        if s.broker_connected is not None:
            yield GaugeMetricFamily(
                "shoal_broker_connected",
                "1 while connected to the broker, 0 while the connection is lost.",
                value=int(s.broker_connected),
            )
        o = s.ownership
        if o is not None:
            yield GaugeMetricFamily(
                "shoal_partitions_owned", "Partitions this engine owns now.", value=len(o.leases)
            )
            yield GaugeMetricFamily(
                "shoal_lease_age_max_seconds",
                "Seconds since the least recently renewed of its leases was written.",
                value=max((lease.lease_age for lease in o.leases), default=0.0),
            )
            for name, text, n in (
                ("shoal_takeovers", "Partitions taken over from another engine.", o.takeovers),
                ("shoal_handovers", "Partitions handed over to another engine.", o.handovers),
                ("shoal_partitions_lost", "Partitions lost (lease passed, fenced out).", o.lost),
                ("shoal_terms", "Terms begun: one per change of the partitions owned.", o.terms),
            ):
                yield CounterMetricFamily(name, text, value=n)
        if s.lag is not None:
            yield GaugeMetricFamily(
                "shoal_consumer_lag_messages",
                "Events in the stream not yet acknowledged by the engine's consumer "
                "(pending plus delivered and unacknowledged).",
                value=s.lag,
            )
