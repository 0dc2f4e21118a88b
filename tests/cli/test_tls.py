"""TLS against real nats-servers with a CA made in the test: shoal trusts the CA given
with --tlsca and presents the client certificate of --tlscert and --tlskey; a certificate it
cannot trust fails at once, in one line that says what to do, for a client command and for
``serve`` alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import trustme

from protocol import BrokerError, StatusReply
from protocol.nats import Credentials, connect
from tests.helpers import SHOAL, NatsServer, Proc

SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '1h'"
"""

FAILS_WITHIN = 5.0
"""Seconds: the issue's bound on an untrusted certificate's failure (a correctness bound,
not a benchmark: it used to hang for minutes)."""


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed the server's and the client's certificates."""
    other_ca: Path
    """A CA that signed nothing here."""
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate signed by the other CA."""
    stranger_key: Path
    server_cert: Path
    server_key: Path
    named_cert: Path
    """A server certificate for ``localhost`` only."""
    named_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("shoal-client@example.com")
    stranger = other.issue_cert("stranger@example.com")
    named = ca.issue_cert("localhost")
    files = {
        "ca": ca.cert_pem,
        "other_ca": other.cert_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "stranger_cert": stranger.cert_chain_pems[0],
        "stranger_key": stranger.private_key_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "named_cert": named.cert_chain_pems[0],
        "named_key": named.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(root / f"{name}.pem"))
    return Pki(**{name: root / f"{name}.pem" for name in files})


def tls_server(store: Path, pki: Pki, *, verify: bool = False, named: bool = False) -> NatsServer:
    """A nats-server that requires TLS, and a client certificate too with ``verify``; its
    certificate names only ``localhost`` with ``named``."""
    config = store.parent / f"{store.name}.conf"
    cert, key = (pki.named_cert, pki.named_key) if named else (pki.server_cert, pki.server_key)
    lines = [f'cert_file: "{cert}"', f'key_file: "{key}"']
    if verify:
        lines += [f'ca_file: "{pki.ca}"', "verify: true"]
    config.write_text("tls {\n  " + "\n  ".join(lines) + "\n}\n")
    return NatsServer(store, "-c", str(config))


@pytest.fixture
def server(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    s = tls_server(tmp_path / "nats", pki)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def verifying_server(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    s = tls_server(tmp_path / "nats-verify", pki, verify=True)
    s.start()
    yield s
    s.stop()


def shoal(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run shoal without the NATS_ variables of the environment; also how long it took."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    started = time.monotonic()
    done = subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return done, time.monotonic() - started


def test_serve_publish_tail_and_status_over_tls_with_a_user_ca(
    server: NatsServer, pki: Pki, tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"tls://127.0.0.1:{server.port}"
    ca = ("--tlsca", str(pki.ca))
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    serve = Proc(
        "serve", "--data-dir", str(tmp_path / "data"), "--segments", str(segments),
        "--nats", url, *ca,
    )  # fmt: skip
    procs.append(serve)
    serve.wait_err("shoal is serving")
    tail = Proc("tail", "--nats", url, *ca)
    procs.append(tail)
    time.sleep(0.5)  # let tail subscribe
    done, _ = shoal("publish", "--nats", url, *ca, "--customer", "ann", "--event", "Visit")
    assert (done.returncode, done.stderr.strip()) == (
        0,
        "published 1 event(s): SHOAL_EVENTS sequence 1",
    )
    [line] = tail.out_lines(1)
    assert (json.loads(line)["customer_id"], json.loads(line)["segment"]) == ("ann", "active")
    # A nats:// URL to a server that requires TLS is upgraded, with the CA given.
    done, _ = shoal("status", "--json", "--nats", f"nats://127.0.0.1:{server.port}", *ca)
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout, type=StatusReply).customers == 1
    assert done.stderr == ""  # no noise from the TLS layer either
    assert tail.stop(signal.SIGINT) in (0, 130)
    assert serve.stop() == 0


def test_a_client_certificate_the_server_requires(
    verifying_server: NatsServer, pki: Pki, tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"tls://127.0.0.1:{verifying_server.port}"
    ca = ("--tlsca", str(pki.ca))
    cert = ("--tlscert", str(pki.client_cert), "--tlskey", str(pki.client_key))
    serve = Proc("serve", "--data-dir", str(tmp_path / "data"), "--nats", url, *ca, *cert)
    procs.append(serve)
    serve.wait_err("shoal is serving")
    done, _ = shoal("publish", *ca, *cert, "--nats", url, "--customer", "ann", "--event", "Visit")
    assert done.returncode == 0, done.stderr
    done, _ = shoal("status", "--json", "--nats", url, *ca, *cert)
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout, type=StatusReply).consumer == "shoal-engine"
    # Without one, or with one the server's CA did not sign: refused at once, in one line.
    done, took = shoal("status", "--nats", url, *ca)
    assert took < FAILS_WITHIN
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot reach NATS at {url}: the server requires a client certificate "
        "(tlsv13 alert certificate required); give it with --tlscert and --tlskey\n",
    )
    stranger = ("--tlscert", str(pki.stranger_cert), "--tlskey", str(pki.stranger_key))
    done, took = shoal("status", "--nats", url, *ca, *stranger)
    assert took < FAILS_WITHIN
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot reach NATS at {url}: the server refused the client "
        "certificate (tlsv1 alert unknown ca); give one signed by a CA the server trusts\n",
    )
    assert serve.stop() == 0


def untrusted(url: str) -> str:
    return (
        f"shoal: error: cannot reach NATS at {url}: the server's certificate is not trusted "
        "(certificate verify failed: unable to get local issuer certificate); "
        "give its CA with --tlsca\n"
    )


@pytest.mark.parametrize("scheme", ["tls", "nats"])
def test_an_untrusted_certificate_fails_within_seconds_in_one_line(
    server: NatsServer, pki: Pki, tmp_path: Path, scheme: str
) -> None:
    url = f"{scheme}://127.0.0.1:{server.port}"
    data, other_ca = str(tmp_path / "data"), str(pki.other_ca)
    for args in (
        ("status", "--nats", url),
        ("publish", "--nats", url, "--customer", "ann", "--event", "Visit"),
        ("tail", "--nats", url, "--tlsca", other_ca),
        ("serve", "--data-dir", data, "--nats", url),
        ("serve", "--data-dir", data, "--nats", url, "--tlsca", other_ca),
    ):  # fmt: skip
        done, took = shoal(*args)
        assert took < FAILS_WITHIN, args
        assert (done.returncode, done.stderr) == (1, untrusted(url)), args


def test_a_certificate_for_another_host(pki: Pki, tmp_path: Path) -> None:
    server = tls_server(tmp_path / "nats", pki, named=True)
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        done, took = shoal("status", "--nats", url, "--tlsca", str(pki.ca))
    finally:
        server.stop()
    assert took < FAILS_WITHIN
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot reach NATS at {url}: the server's certificate is not for this "
        "host (certificate verify failed: IP address mismatch, certificate is not valid for "
        "'127.0.0.1'); connect with a host name or address the certificate names\n",
    )


def test_a_tls_url_to_a_server_without_tls_is_refused(nats_server: NatsServer) -> None:
    url = f"tls://127.0.0.1:{nats_server.port}"
    done, _ = shoal("status", "--nats", url)
    assert (done.returncode, done.stderr) == (
        1,
        f"shoal: error: cannot reach NATS at {url}: the server does not offer TLS, which a "
        "tls:// URL asks for (nats: secure connection not available)\n",
    )


async def test_connect_raises_at_once_on_an_untrusted_certificate(
    server: NatsServer, pki: Pki
) -> None:
    url = f"tls://127.0.0.1:{server.port}"
    with pytest.raises(BrokerError, match="certificate is not trusted"):
        await connect([url], credentials=Credentials(tls_ca=pki.other_ca))
    nc = await connect([url], credentials=Credentials(tls_ca=pki.ca))
    assert nc.is_connected
    await nc.close()
