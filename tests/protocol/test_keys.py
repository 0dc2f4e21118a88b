"""The role keys of the embedded broker: made once with owner-only modes, then reused; a key
file that cannot be trusted or read is a one-line error; the broker refuses anonymous
clients and admits each key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nkeys
import pytest

from protocol import BrokerError, KeyFileError, embedded_broker, role_key_file
from protocol._keys import ensure_role_keys
from protocol.nats import Credentials, connect
from tests.helpers import free_port

ROLES = ("engine", "producer", "subscriber", "operator")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_made_owner_only_then_reused(tmp_path: Path) -> None:
    keys = tmp_path / "data" / "auth"
    first = ensure_role_keys(keys, ROLES)
    assert sorted(p.name for p in keys.iterdir()) == sorted(f"{r}.nk" for r in ROLES)
    assert mode(keys) == 0o700
    seeds = {}
    for role in ROLES:
        path = role_key_file(tmp_path / "data", role)
        assert path == keys / f"{role}.nk"
        assert mode(path) == 0o600
        seeds[role] = path.read_bytes()
        # One user seed and a newline, as nsc and `nats --nkey` read it.
        assert seeds[role].startswith(b"SU") and seeds[role].endswith(b"\n")
        pair = nkeys.from_seed(bytearray(seeds[role].strip()))
        assert first[role] == pair.public_key.decode()
    assert len(set(first.values())) == len(ROLES)

    # A later start keeps them, and makes only what is missing.
    role_key_file(tmp_path / "data", "operator").unlink()
    again = ensure_role_keys(keys, ROLES)
    assert {r: again[r] for r in ROLES if r != "operator"} == {
        r: first[r] for r in ROLES if r != "operator"
    }
    assert again["operator"] != first["operator"]
    for role in ("engine", "producer", "subscriber"):
        assert role_key_file(tmp_path / "data", role).read_bytes() == seeds[role]


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    ensure_role_keys(tmp_path, ROLES)
    path = tmp_path / "producer.nk"
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as e:
        ensure_role_keys(tmp_path, ROLES)
    assert str(e.value) == (
        f"the key file {path} may be read by others (mode 0644): run `chmod 600 {path}`"
    )
    assert e.value.path == path


@pytest.mark.parametrize(
    "content",
    [
        b"not a seed\n",
        b"SUAAAA\n",
        b"",
        # A valid seed, but an account's, not a user's.
        nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT) + b"\n",
    ],
)
def test_a_key_file_without_a_user_seed_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "engine.nk"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as e:
        ensure_role_keys(tmp_path, ROLES)
    assert str(e.value) == (
        f"the key file {path} holds no NKey user seed (a line starting with SU): move it "
        "away and start `shoal serve` again to make a new one"
    )
    assert path.read_bytes() == content  # never replaced


def test_an_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "subscriber.nk").mkdir(mode=0o700)
    with pytest.raises(KeyFileError) as e:
        ensure_role_keys(tmp_path, ROLES)
    assert str(e.value) == (
        f"the key file {tmp_path / 'subscriber.nk'} cannot be read: Is a directory"
    )


async def test_the_broker_with_keys_refuses_anonymous_clients(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    async with embedded_broker(tmp_path / "nats", port=free_port(), keys=keys) as url:
        config = tmp_path / "nats.conf"
        assert mode(config) == 0o600
        with pytest.raises(BrokerError) as e:
            await connect([url])
        assert str(e.value) == f"cannot reach NATS at {url}: nats: 'Authorization Violation'"
        for role in ROLES:
            nc = await connect([url], credentials=Credentials(nkey=keys / f"{role}.nk"))
            assert nc.is_connected
            await nc.close()
        public = ensure_role_keys(keys, ROLES)
    # Public keys only: the server is never told a seed.
    text = config.read_text()
    assert all(key in text for key in public.values())
    assert not any((keys / f"{role}.nk").read_text().strip() in text for role in ROLES)


async def test_the_broker_without_keys_admits_anyone(tmp_path: Path) -> None:
    async with embedded_broker(tmp_path / "nats", port=free_port()) as url:
        nc = await connect([url])
        await nc.close()
    assert "authorization" not in (tmp_path / "nats.conf").read_text()


async def test_a_bad_key_file_stops_the_broker_start(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    keys.mkdir()
    (keys / "engine.nk").write_text("oops\n")
    (keys / "engine.nk").chmod(0o600)
    with pytest.raises(KeyFileError):
        async with embedded_broker(tmp_path / "nats", port=free_port(), keys=keys):
            pass
