"""No password, token or seed ever shows in what shoal prints: its logs (at debug level),
its errors, its status replies. Each kind of credential is used against a real nats-server
that requires it, by ``serve --nats``, ``publish``, ``tail`` and ``status``, and by commands
that fail (a wrong secret, a server that is not there); every line they print is searched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nkeys
import pytest

from scripts import cli
from scripts._logging import Scrubber, secrets_of
from tests.helpers import SHOAL, NatsServer, Proc, free_port
from tests.nats_auth import new_key, operator_setup, public, seed

PASSWORD = "pw-Xy93-s3cret"
TOKEN = "tok-Lm58-s3cret"
VISIT = ("--customer", "ann", "--event", "Visit")
SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '1h'"
"""


@dataclass
class Setup:
    """A server that requires one kind of credential, and how a client gives it."""

    server: NatsServer
    url: str
    """The URL to give with --nats (it may hold the secret)."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    wrong: tuple[tuple[str, ...], dict[str, str]] = ((), {})
    """Arguments and environment that give a wrong secret of the same kind."""
    secrets: list[str] = field(default_factory=list)


def _user(tmp: Path, where: str) -> Setup:
    server = NatsServer(tmp / "nats", "--user", "alice", "--pass", PASSWORD)
    plain = server.url
    wrong_pw = "wrong-" + PASSWORD
    if where == "flags":
        return Setup(
            server,
            plain,
            args=("--nats-user", "alice", "--nats-password", PASSWORD),
            wrong=(("--nats-user", "alice", "--nats-password", wrong_pw), {}),
        )
    if where == "env":
        return Setup(
            server,
            plain,
            env={"NATS_USER": "alice", "NATS_PASSWORD": PASSWORD},
            wrong=((), {"NATS_USER": "alice", "NATS_PASSWORD": wrong_pw}),
        )
    return Setup(server, plain.replace("nats://", f"nats://alice:{PASSWORD}@"))


def _token(tmp: Path, where: str) -> Setup:
    server = NatsServer(tmp / "nats", "--auth", TOKEN)
    if where == "flag":
        return Setup(
            server, server.url, args=("--token", TOKEN), wrong=(("--token", "wrong-" + TOKEN), {})
        )
    return Setup(server, server.url.replace("nats://", f"nats://{TOKEN}@"))


def _nkey(tmp: Path) -> Setup:
    key, stranger = new_key(nkeys.PREFIX_BYTE_USER), new_key(nkeys.PREFIX_BYTE_USER)
    config = tmp / "nkey.conf"
    config.write_text(f"authorization {{ users: [ {{ nkey: {public(key)} }} ] }}\n")
    files = []
    for name, k in (("user.nk", key), ("stranger.nk", stranger)):
        files.append(tmp / name)
        files[-1].write_text(seed(k) + "\n")
    server = NatsServer(tmp / "nats", "-c", str(config))
    return Setup(
        server,
        server.url,
        args=("--nkey", str(files[0])),
        wrong=(("--nkey", str(files[1])), {}),
        secrets=[seed(key), seed(stranger)],
    )


def _creds(tmp: Path) -> Setup:
    op = operator_setup(tmp / "operator")
    server = NatsServer(tmp / "nats", "-c", str(op.config))
    stranger_seed = op.stranger_creds.read_text().split("SEED-----\n")[1].split("\n")[0]
    return Setup(
        server,
        server.url,
        args=("--creds", str(op.creds)),
        wrong=(("--creds", str(op.stranger_creds)), {}),
        secrets=[op.user_seed, stranger_seed],
    )


KINDS: dict[str, Callable[[Path], Setup]] = {
    "user-password-in-flags": lambda tmp: _user(tmp, "flags"),
    "user-password-in-env": lambda tmp: _user(tmp, "env"),
    "user-password-in-url": lambda tmp: _user(tmp, "url"),
    "token-in-flag": lambda tmp: _token(tmp, "flag"),
    "token-in-url": lambda tmp: _token(tmp, "url"),
    "nkey-seed-file": _nkey,
    "creds-file": _creds,
}


@pytest.fixture(params=list(KINDS))
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    made = KINDS[request.param](tmp_path)
    made.secrets += [PASSWORD, TOKEN]
    made.server.start()
    yield made
    made.server.stop()


def shoal(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [*SHOAL, "--log-level", "debug", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
    )


class Printed:
    """Everything the commands of a test printed, by command."""

    def __init__(self) -> None:
        self.by_command: list[tuple[str, str]] = []

    def add(self, what: str, text: str) -> None:
        self.by_command.append((what, text))

    def run(
        self, *args: str, env: dict[str, str] | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = shoal(*args, env=env)
        self.add(" ".join(args), done.stdout + done.stderr)
        assert (done.returncode == 0) == ok, (args, done.stderr)
        return done


def test_no_secret_shows_in_any_output(
    setup: Setup, tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = Printed()
    connection = ("--nats", setup.url, *setup.args)
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    for name in [k for k in os.environ if k.startswith("NATS_")]:
        monkeypatch.delenv(name)
    for name, value in setup.env.items():  # for serve and tail, which inherit it
        monkeypatch.setenv(name, value)
    serve = Proc(
        "--log-level", "debug", "serve", "--data-dir", str(tmp_path / "data"),
        "--segments", str(segments), "--metrics-port", "0", *connection,
    )  # fmt: skip
    procs.append(serve)
    serve.wait_err("shoal is serving")
    tail = Proc("--log-level", "debug", "tail", *connection)
    procs.append(tail)
    time.sleep(0.5)  # let tail subscribe
    env = setup.env
    done = printed.run("publish", *connection, *VISIT, env=env)
    assert done.stderr.strip().endswith("published 1 event(s): SHOAL_EVENTS sequence 1")
    [line] = tail.out_lines(1)
    assert json.loads(line)["customer_id"] == "ann"
    done = printed.run("status", "--json", *connection, env=env)
    assert json.loads(done.stdout)["customers"] == 1
    printed.run("status", *connection, env=env)
    printed.run("customer", "ann", *connection, env=env)
    # A wrong secret of the same kind: refused.
    if setup.wrong != ((), {}):
        args, wrong_env = setup.wrong
        done = printed.run("status", "--nats", setup.url, *args, env=wrong_env, ok=False)
        assert "uthorization" in done.stderr
    # No server there, with the secret in the URL or in the options; a URL nats-py rejects.
    gone = setup.url.replace(str(setup.server.port), str(free_port()))
    done = printed.run("status", "--nats", gone, *setup.args, "--timeout", "2", env=env, ok=False)
    assert "cannot reach NATS" in done.stderr
    bad = setup.url.replace(str(setup.server.port), "not-a-port")
    done = printed.run("publish", "--nats", bad, *setup.args, *VISIT, env=env, ok=False)
    assert "cannot reach NATS" in done.stderr
    assert tail.stop(signal.SIGINT) in (0, 130)
    assert serve.stop() == 0
    serve.wait_err("shoal stopped")
    printed.add("tail", "\n".join([line, *tail.err, *tail.rest()]))
    printed.add("serve", "\n".join([*serve.err, *serve.rest()]))
    assert '"level": "debug"' in "".join(text for _, text in printed.by_command)
    for what, text in printed.by_command:
        for secret in setup.secrets:
            assert secret not in text, f"{what} printed a secret:\n{text}"


AT_PASSWORD = "pw@Rk40-s3cret"
"""A password with an ``@``: URL parsers split the user information at the last one."""


@pytest.mark.parametrize(
    "userinfo",
    [
        f"alice:{PASSWORD}",
        f"alice:{AT_PASSWORD}",
        f"alice:{AT_PASSWORD.replace('@', '%40')}",
        TOKEN,
    ],
)
@pytest.mark.parametrize("scheme", ["nats://", ""])
def test_urls_of_every_form_are_redacted(userinfo: str, scheme: str, tmp_path: Path) -> None:
    # No server there: nats-py takes a URL without a scheme as nats://.
    url = f"{scheme}{userinfo}@127.0.0.1:{free_port()}"
    for args in (
        ("status", "--nats", url, "--timeout", "1"),
        ("serve", "--data-dir", str(tmp_path / "data"), "--nats", url),
    ):
        done = shoal(*args)
        assert done.returncode == 1
        assert done.stderr.startswith(f"shoal: error: cannot reach NATS at {scheme}***@127.0.0.1:")
        for secret in (PASSWORD, TOKEN, AT_PASSWORD, AT_PASSWORD.split("@")[1]):
            assert secret not in done.stdout + done.stderr, args


def test_the_log_scrubber_is_the_last_defence() -> None:
    scrub = Scrubber(secrets_of(cli._parser().parse_args(["status", "--token", TOKEN])))
    event = scrub.processor(
        None,
        "warning",
        {
            "event": f"oops {TOKEN}",
            "nested": [{"url": f"nats://{TOKEN}@host"}, (1, None, TOKEN)],
            "error": ValueError(f"bad {TOKEN}"),
            "path": Path("/tmp/x"),
            "count": 3,
        },
    )
    assert event == {
        "event": "oops ***",
        "nested": [{"url": "nats://***@host"}, [1, None, "***"]],
        "error": "ValueError('bad ***')",
        "path": Path("/tmp/x"),
        "count": 3,
    }
    assert scrub(f"shoal: error: {TOKEN}") == "shoal: error: ***"


def test_a_seed_file_that_holds_no_seed_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "user.nk"
    bad.write_text(f"SU{TOKEN}\n")
    done = shoal("status", "--nats", f"nats://127.0.0.1:{free_port()}", "--nkey", str(bad))
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot read an NKey seed from {bad} (nkeys: invalid seed)\n",
    )


def test_a_creds_file_without_a_jwt_or_a_seed_is_one_line(tmp_path: Path) -> None:
    # nats-py would look for the JWT for ever.
    creds = tmp_path / "user.creds"
    for text, what in (
        (f"-----BEGIN USER NKEY SEED-----\nSU{TOKEN}\n", "a user JWT (-----BEGIN NATS USER JWT"),
        ("-----BEGIN NATS USER JWT-----\neyJ0\n", "an NKey seed (-----BEGIN USER NKEY SEED"),
    ):
        creds.write_text(text)
        done = shoal("status", "--nats", f"nats://127.0.0.1:{free_port()}", "--creds", str(creds))
        assert (done.returncode, done.stderr) == (
            1,
            f"shoal: error: {creds} is not a NATS credentials file: it holds no {what}-----)\n",
        )
