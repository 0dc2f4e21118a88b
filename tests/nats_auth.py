"""NATS identities made in a test: NKey seed files, and a decentralized (operator mode)
set-up, whose operator, account and user JWTs are signed here with the nkeys package."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys


def new_key(prefix: int) -> nkeys.KeyPair:
    """A fresh key pair of a kind (``nkeys.PREFIX_BYTE_USER`` and so on)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(key: nkeys.KeyPair) -> str:
    return str(key.public_key.decode())


def seed(key: nkeys.KeyPair) -> str:
    return str(key.seed.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign_jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (header.claims.signature, base64url without padding) for ``subject``,
    signed by ``issuer`` with ed25519, as nats-io/jwt writes them (version 2)."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # The id is a hash of the claims without it.
    digest = hashlib.sha256(json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def creds_file(jwt: str, user_seed: str) -> str:
    """The text of a ``.creds`` file, as ``nsc`` writes it."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    # JetStream is enabled for an account by its storage limits.
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


@dataclass(frozen=True)
class Operator:
    """An operator-mode nats-server configuration (``config``) with one JetStream account,
    preloaded in a memory resolver, and a user of it (``creds``, and its seed)."""

    config: Path
    creds: Path
    user_seed: str
    stranger_creds: Path
    """A user signed by another account's key, which the server does not know."""


def operator_setup(directory: Path) -> Operator:
    """Write an operator set-up under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    system, account, other = (new_key(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(3))
    operator_jwt = sign_jwt(operator, public(operator), "shoal-test", {"type": "operator"})
    system_jwt = sign_jwt(operator, public(system), "SYS", {"type": "account"})
    account_jwt = sign_jwt(
        operator, public(account), "SHOAL", {"type": "account", "limits": _UNLIMITED}
    )

    def user(issuer: nkeys.KeyPair, name: str) -> tuple[Path, str]:
        key = new_key(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        jwt = sign_jwt(issuer, public(key), name, claims)
        path = directory / f"{name}.creds"
        path.write_text(creds_file(jwt, seed(key)))
        path.chmod(0o600)
        return path, seed(key)

    creds, user_seed = user(account, "shoal")
    stranger, _ = user(other, "stranger")
    config = directory / "operator.conf"
    config.write_text(
        f"operator: {operator_jwt}\n"
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f"  {public(system)}: {system_jwt}\n"
        f"  {public(account)}: {account_jwt}\n"
        "}\n"
    )
    return Operator(config=config, creds=creds, user_seed=user_seed, stranger_creds=stranger)
