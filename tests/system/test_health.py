"""Health of ``shoal serve`` with an external broker that stops answering: the log warns, the
``shoal_broker_connected`` gauge and ``/readyz`` say so, and ingestion resumes when it is
back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from protocol.nats import _connect, connect
from tests.helpers import NatsServer, Proc, eventually, free_port, track
from tests.protocol.test_metrics import get, readiness, scrape, value


def gauge(base: str, name: str) -> float | None:
    return value(scrape(f"{base}/metrics"), name)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.05)


def publish(url: str, user: str, mid: str) -> None:
    async def send() -> None:
        nc = await connect([url])
        try:
            await nc.jetstream().publish(f"shoal.events.{user}", track(user, mid=mid))
        finally:
            await nc.close()

    anyio.run(send)


def test_a_stopped_broker_is_reported_and_ingestion_resumes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = str(tmp_path / "data")
    serve = Proc(
        "serve", "--nats", nats_server.url, "--data-dir", data, "--metrics-port", str(port)
    )
    assert nats_server.proc is not None
    broker = nats_server.proc.pid
    try:
        serve.wait_err("metrics endpoint ready")
        assert get(f"{base}/healthz") == (200, b'{"alive": true}\n')
        wait_until(lambda: readiness(base) == (200, {"ready": True, "reasons": []}), 20, "ready")
        assert gauge(base, "shoal_broker_connected") == 1
        # Alone, it owns every partition, claimed in its first term.
        assert gauge(base, "shoal_partitions_owned") == 32
        assert gauge(base, "shoal_terms_total") == 1
        assert gauge(base, "shoal_takeovers_total") == 0
        publish(nats_server.url, "ann", "a1")
        wait_until(lambda: gauge(base, "shoal_events_applied_total") == 1, 20, "a1 applied")

        # The broker stops answering (its connections stay open): noticed by missed pings.
        os.kill(broker, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            warning = json.loads(serve.wait_err("broker connection lost", timeout=5))
            assert time.monotonic() - stopped < 5
            assert warning["level"] == "warning"
            assert warning["servers"] == nats_server.url
            assert warning["error"] == "no answer to pings"
            wait_until(lambda: gauge(base, "shoal_broker_connected") == 0, 5, "gauge at 0")
            status, doc = readiness(base)
            assert status == 503
            assert doc == {"ready": False, "reasons": ["broker disconnected"]}
            assert get(f"{base}/healthz")[0] == 200  # alive all the same
        finally:
            os.kill(broker, signal.SIGCONT)

        serve.wait_err("broker connection restored", timeout=30)
        wait_until(lambda: readiness(base)[0] == 200, 10, "ready again")
        assert gauge(base, "shoal_broker_connected") == 1
        publish(nats_server.url, "bob", "b1")
        wait_until(lambda: gauge(base, "shoal_events_applied_total") == 2, 30, "b1 applied")
        assert serve.stop() == 0
    finally:
        serve.close()


async def test_an_unreachable_broker_is_warned_of_until_it_returns(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_connect, "_STILL_DOWN_EVERY", 0.5)  # a minute, in production
    nc = await connect([nats_server.url], name="probe")
    with capture_logs() as logs:

        def said(event: str) -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == event]

        await anyio.to_thread.run_sync(nats_server.stop)
        await eventually(lambda: len(said("broker still unreachable")) >= 2)
        assert not nc.is_connected
        await anyio.to_thread.run_sync(nats_server.start)
        await eventually(lambda: nc.is_connected)
        await eventually(lambda: len(said("broker connection restored")) == 1)
        await nc.close()
    [lost] = said("broker connection lost; reconnecting")
    assert lost["log_level"] == "warning"
    assert lost["client"] == "probe" and lost["servers"] == nats_server.url
    still = said("broker still unreachable")
    assert all(e["log_level"] == "warning" and e["for_seconds"] >= 0 for e in still)
    assert "error" in still[0]
    # Closing is no loss: nothing more is said.
    assert said("broker connection lost; reconnecting") == [lost]
