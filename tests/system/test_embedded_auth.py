"""The embedded broker enforces the roles by default: ``shoal serve`` makes a key per role in
its data directory, refuses anonymous clients, and every command finds its own key there;
``--no-auth`` is for loopback only.

The least-privilege tests of ``test_roles`` run on the embedded broker too (its ``BROKERS``).
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from protocol import ROLES, BrokerError, Transition, role_key_file
from protocol._keys import ensure_role_keys
from protocol.nats import connect
from scripts import cli
from tests.helpers import Proc, free_port, run
from tests.system.test_roles import Secured

VISIT = ("--customer", "ann", "--event", "Visit")


def keys_of(data_dir: Path) -> dict[str, Path]:
    return {role: role_key_file(data_dir, role) for role in ROLES}


@pytest.fixture
def serving(tmp_path: Path, procs: list[Proc]) -> Secured:
    """``shoal serve`` with its embedded broker, run with no options but a port from
    ``tmp_path``: its keys are in ``tmp_path/shoal-data``."""
    port = free_port()
    engine = Proc("serve", "--port", str(port), cwd=tmp_path)
    procs.append(engine)
    engine.wait_err("shoal is serving")
    data = tmp_path / "shoal-data"
    return Secured(f"nats://127.0.0.1:{port}", keys_of(data), data, engine)


def connecting_commands() -> list[str]:
    """The commands that take the connection options (and so --data-dir), as ``shoal
    --help`` names them: ``serve``, ``segments list``..."""
    return [*cli._CONNECTING, *(f"segments {name}" for name in cli._SEGMENTS_CONNECTING)]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serve_makes_a_key_per_role_once(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    data = tmp_path / "shoal-data"
    for start in range(2):
        serve = Proc("serve", "--port", str(port), cwd=tmp_path)
        procs.append(serve)
        serve.wait_err("shoal is serving")
        assert serve.stop() == 0
        assert sorted(p.name for p in (data / "auth").iterdir()) == sorted(f"{r}.nk" for r in ROLES)
        assert mode(data / "auth") == 0o700
        assert all(mode(path) == 0o600 for path in keys_of(data).values())
        assert mode(data / "nats.conf") == 0o600
        if start == 0:
            seeds = {role: path.read_bytes() for role, path in keys_of(data).items()}
    # The second start reused them.
    assert {role: path.read_bytes() for role, path in keys_of(data).items()} == seeds


def test_every_command_finds_its_key_in_the_data_directory(
    serving: Secured, tmp_path: Path, procs: list[Proc]
) -> None:
    """Run from the directory of ``shoal serve``, as the quick start does: no credentials."""
    url = ("--nats", serving.url)
    segments = tmp_path / "segments.toml"
    segments.write_text("[segments.visitors]\nrule = \"count('Visit') >= 1\"\n")
    history = tmp_path / "history.jsonl"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    history.write_text(
        json.dumps({"type": "track", "userId": "bob", "event": "Visit", "timestamp": stamp}) + "\n"
    )
    # Every command that connects, in the order that gives each something to work on.
    operands: dict[str, list[str]] = {
        "tail": [],
        "publish": list(VISIT),
        "import": [str(history)],
        "status": [],
        "customer": ["ann"],
        "explain": ["ann"],
        "members": ["new_customer"],
        "segments list": [],
        "segments validate": [str(segments)],
        "segments apply": [str(segments)],
        "unpark": ["ann"],
        "rejected": [],
        "forget": ["zed"],  # no such customer: its order is acted on and erased all the same
        "backup": [str(tmp_path / "backup")],  # as the engine, beside it
    }
    # Tested on their own: they run the broker.
    engine_commands = {"serve", "rebuild", "migrate", "restore"}
    assert set(operands) | engine_commands == set(connecting_commands())
    live = Proc("tail", *url, cwd=tmp_path)
    procs.append(live)
    assert run("status", *url, cwd=tmp_path).returncode == 0  # tail subscribed by now
    for command, more in operands.items():
        if command == "tail":
            continue
        done = run(*command.split(), *more, *url, cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        if command == "publish":  # applied once tail sees it
            transition = msgspec.json.decode(live.out_lines(1)[0], type=Transition)
            assert (transition.customer_id, transition.segment) == ("ann", "new_customer")
    # From elsewhere, --data-dir names the directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = ("--data-dir", str(tmp_path / "shoal-data"))
    done = run("members", "visitors", *url, *data, cwd=elsewhere)
    assert (done.returncode, done.stdout) == (0, "ann\nbob\n"), done.stderr  # bob: imported
    again = Proc("tail", "--from-start", "visitors", *url, *data, cwd=elsewhere)
    procs.append(again)
    assert json.loads(again.out_lines(1)[0])["segment"] == "visitors"


def test_anonymous_clients_are_refused_and_told_where_keys_were_looked_for(
    serving: Secured, tmp_path: Path
) -> None:
    async def anonymous() -> None:
        await connect([serving.url])

    with pytest.raises(BrokerError, match="'Authorization Violation'$"):
        anyio.run(anonymous)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run("publish", "--nats", serving.url, *VISIT, cwd=elsewhere)
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot reach NATS at {serving.url}: nats: 'Authorization Violation' "
        "(no key file shoal-data/auth/producer.nk: give the --data-dir of `shoal serve`, or "
        "credentials with --nkey, --creds, --nats-user or --token)\n",
    )
    done = run("status", "--nats", serving.url, "--data-dir", "nowhere", cwd=elsewhere)
    assert done.stderr.endswith(
        "(no key file nowhere/auth/operator.nk: give the --data-dir of `shoal serve`, or "
        "credentials with --nkey, --creds, --nats-user or --token)\n"
    )
    # The key of another data directory.
    other = tmp_path / "other"
    (other / "auth").mkdir(parents=True)
    ensure_role_keys(other / "auth", ["operator"])
    done = run("status", "--nats", serving.url, "--data-dir", str(other), cwd=tmp_path)
    assert done.stderr.endswith(
        f"'Authorization Violation' (with the key {other}/auth/operator.nk: give the "
        "--data-dir of the `shoal serve` there)\n"
    )
    # Given credentials win over the data directory's key: refused as given.
    done = run("status", "--nats", serving.url, "--token", "nope", cwd=tmp_path)
    assert done.stderr == (
        f"shoal: error: cannot reach NATS at {serving.url}: nats: 'Authorization Violation'\n"
    )


def test_no_auth_on_loopback_admits_anyone(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    url = ("--nats", f"nats://127.0.0.1:{port}")
    serve = Proc("serve", "--port", str(port), "--no-auth", cwd=tmp_path)
    procs.append(serve)
    assert "none (--no-auth)" in serve.wait_err("embedded nats-server ready")
    serve.wait_err("shoal is serving")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run("publish", *url, *VISIT, cwd=elsewhere)
    assert (done.returncode, done.stderr) == (0, "published 1 event(s): SHOAL_EVENTS sequence 1\n")
    assert run("status", *url, cwd=elsewhere).returncode == 0
    assert not (tmp_path / "shoal-data" / "auth").exists()


@pytest.mark.parametrize("command", ["serve", "rebuild"])
def test_no_auth_is_refused_off_loopback(tmp_path: Path, command: str) -> None:
    extra = ["--from-stream"] if command == "rebuild" else []
    (tmp_path / "shoal-data" / "nats").mkdir(parents=True)
    done = run(command, *extra, "--no-auth", "--host", "0.0.0.0", cwd=tmp_path)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        2,
        "shoal: error: --no-auth listens on 0.0.0.0, which is not a loopback address: anyone "
        "who reaches it could forge transitions and read every customer. Drop --no-auth "
        "(clients then use the keys in the data directory), or listen on --host 127.0.0.1",
    )
    done = run(command, *extra, "--no-auth", "--nats", "nats://127.0.0.1:1", cwd=tmp_path)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        2,
        "shoal: error: --no-auth is for the embedded broker: give it or --nats, not both",
    )


def test_rebuild_runs_the_embedded_broker_with_the_engine_key(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    serve = Proc("serve", "--port", str(port), cwd=tmp_path)
    procs.append(serve)
    serve.wait_err("shoal is serving")
    done = run("publish", "--nats", f"nats://127.0.0.1:{port}", *VISIT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert serve.stop() == 0
    (tmp_path / "shoal-data" / "shoal.db").unlink()
    done = run("rebuild", "--from-stream", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 events logged" in done.stdout


def test_a_key_others_may_read_stops_serve(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    serve = Proc("serve", "--port", str(port), cwd=tmp_path)
    procs.append(serve)
    serve.wait_err("shoal is serving")
    assert serve.stop() == 0
    key = Path("shoal-data/auth/engine.nk")
    (tmp_path / key).chmod(0o640)
    done = run("serve", "--port", str(port), cwd=tmp_path)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        1,
        f"shoal: error: the key file {key} may be read by others (mode 0640): "
        f"run `chmod 600 {key}`",
    )
