"""Every command that connects takes the same credential options, before or after the
subcommand, or from the ``nats`` CLI's environment variables; secrets never show in what
shoal prints. Against real nats-servers that require a user and password, or a token."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from protocol import StatusReply
from protocol.nats import Credentials, redact
from tests.helpers import SHOAL, NatsServer, Proc, declare_streams, free_port, run

PASSWORD = "pw-Zq81-s3cret"
TOKEN = "tok-Hh27-s3cret"


@pytest.fixture
def user_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-user", "--user", "alice", "--pass", PASSWORD)
    server.start()
    declare_streams(f"nats://alice:{PASSWORD}@127.0.0.1:{server.port}")
    yield server
    server.stop()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-token", "--auth", TOKEN)
    server.start()
    declare_streams(f"nats://{TOKEN}@127.0.0.1:{server.port}")
    yield server
    server.stop()


def shoal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [*SHOAL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
    )


VISIT = ("--customer", "ann", "--event", "Visit")


def test_redact_hides_users_passwords_and_tokens() -> None:
    assert redact(f"nats://alice:{PASSWORD}@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact(f"tls://{TOKEN}@nats.example.com") == "tls://***@nats.example.com"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    shown = repr(Credentials(user="alice", password=PASSWORD, token=TOKEN))
    assert PASSWORD not in shown and TOKEN not in shown


def test_user_and_password_from_options_or_the_environment(user_server: NatsServer) -> None:
    url = user_server.url
    # None given: refused, in one line.
    done = shoal("publish", "--nats", url, *VISIT)
    assert done.returncode == 1
    assert done.stderr.startswith(f"shoal: error: cannot reach NATS at {url}: ")
    assert "uthorization" in done.stderr and len(done.stderr.splitlines()) == 1
    creds = ("--nats-user", "alice", "--nats-password", PASSWORD)
    # After the subcommand, before it, and from NATS_URL, NATS_USER and NATS_PASSWORD.
    for args, env in (
        (("publish", "--nats", url, *creds, *VISIT), None),
        ((*creds, "publish", "--nats", url, *VISIT), None),
        (("publish", *VISIT), {"NATS_URL": url, "NATS_USER": "alice", "NATS_PASSWORD": PASSWORD}),
    ):
        done = shoal(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert "published 1 event(s): SHOAL_EVENTS sequence" in done.stderr
    # A wrong password, in the options or in the URL: refused, and never printed.
    done = shoal(
        "publish",
        "--nats",
        url,
        "--nats-user",
        "alice",
        "--nats-password",
        "wrong-" + PASSWORD,
        *VISIT,
    )
    assert done.returncode == 1 and PASSWORD not in done.stderr + done.stdout
    bad_url = url.replace("nats://", f"nats://alice:wrong-{PASSWORD}@")
    done = shoal("publish", "--nats", bad_url, *VISIT)
    assert done.returncode == 1
    assert PASSWORD not in done.stderr + done.stdout
    assert "nats://***@127.0.0.1" in done.stderr


def test_token_and_a_serve_that_never_prints_its_secrets(
    token_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    url = token_server.url
    with_token = url.replace("nats://", f"nats://{TOKEN}@")
    serve = Proc(
        "serve", "--data-dir", str(tmp_path / "data"), "--nats", with_token, "--metrics-port", "0"
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    done = run("publish", "--nats", url, "--token", TOKEN, *VISIT)
    assert done.returncode == 0, done.stderr
    done = run("status", "--token", TOKEN, "--nats", url, "--json")
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout, type=StatusReply).consumer == "shoal-engine"
    done = shoal("status", "--json", env={"NATS_URL": with_token})
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    # A server that is not there: the URL in the error is redacted.
    gone = f"nats://{TOKEN}@127.0.0.1:{free_port()}"
    done = shoal("status", "--nats", gone, "--timeout", "2")
    assert done.returncode == 1 and TOKEN not in done.stderr
    assert "nats://***@127.0.0.1" in done.stderr
    assert serve.stop() == 0
    logged = "\n".join(serve.err)
    assert "shoal is serving" in logged and TOKEN not in logged


def test_publish_user_is_the_old_name_of_customer(token_server: NatsServer) -> None:
    done = run(
        "publish", "--nats", token_server.url, "--token", TOKEN, "--user", "ann", "--event", "Visit"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == (
        "shoal publish: warning: --user is renamed --customer; --user goes in the next release"
    )
    done = run("publish", "--customer", "a", "--user", "b", "--event", "Visit")
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "shoal: error: give --customer, not --user as well",
    )


def test_contradicting_credentials_are_one_line(tmp_path: Path) -> None:
    done = run("status", "--token", TOKEN, "--nats-user", "alice")
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "shoal: error: give one way to authenticate, not --nats-user and --token",
    )
    done = run("status", "--creds", str(tmp_path / "missing.creds"))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"shoal: error: cannot read {tmp_path / 'missing.creds'}: no such file"
    )
