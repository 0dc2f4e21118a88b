"""The roles' permissions as nats-server configuration: well formed, and accepted by a real
nats-server (which users paste them into)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nkeys
import pytest
from nats.aio.client import Client

from protocol import ROLES, find_nats_server, inbox_prefix, nkey_users_config, permissions_block
from protocol.nats import Credentials
from protocol.nats._refusals import Refusals


def _public_key() -> str:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def test_each_role_has_its_own_inbox_prefix() -> None:
    prefixes = [inbox_prefix(role) for role in ROLES]
    assert prefixes == [
        "_INBOX.shoal.engine",
        "_INBOX.shoal.producer",
        "_INBOX.shoal.subscriber",
        "_INBOX.shoal.operator",
    ]


def test_a_role_reads_replies_under_its_own_prefix_only() -> None:
    for role in ROLES:
        inboxes = [
            line.strip() for line in permissions_block(role).splitlines() if "_INBOX" in line
        ]
        assert inboxes == [f'"{inbox_prefix(role)}.>"' + ("" if role == "producer" else ",")]


def test_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown role 'admin'; the roles are engine, producer"):
        permissions_block("admin")
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        inbox_prefix("admin")
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        nkey_users_config({"admin": _public_key()})


def test_a_key_that_is_not_a_public_user_key_is_refused() -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    with pytest.raises(ValueError, match="the key of role 'engine' is not a public user NKey"):
        nkey_users_config({"engine": seed})


def test_only_the_engine_answers_requests() -> None:
    assert [role for role in ROLES if "allow_responses: true" in permissions_block(role)] == [
        "engine"
    ]


def test_the_producer_publishes_events_only() -> None:
    assert permissions_block("producer") == "\n".join(
        [
            "permissions: {",
            "  publish: {",
            "    allow: [",
            '      "shoal.events.*"',
            "    ]",
            "  }",
            "  subscribe: {",
            "    allow: [",
            '      "_INBOX.shoal.producer.>"',
            "    ]",
            "  }",
            "}",
        ]
    )


def test_nats_server_accepts_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "server.conf"
    config.write_text(nkey_users_config({role: _public_key() for role in ROLES}))
    result = subprocess.run(
        [str(find_nats_server()), "-c", str(config), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_credentials_take_the_role_of_their_key_file(tmp_path: Path) -> None:
    assert Credentials().for_role("operator").role == "operator"
    assert Credentials(nkey=tmp_path / "subscriber.nk").for_role("operator").role == "subscriber"
    assert Credentials(creds=tmp_path / "producer.creds").for_role("engine").role == "producer"
    assert Credentials(nkey=tmp_path / "mine.nk").for_role("operator").role == "operator"
    assert Credentials(role="engine").for_role("operator").role == "engine"
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        Credentials().for_role("admin")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            'nats: permissions violation for publish to "$js.api.stream.purge.shoal_events"',
            "permission denied: role producer may not publish to $JS.API.STREAM.PURGE.SHOAL_EVENTS",
        ),
        (
            'nats: permissions violation for subscription to "shoal.segments.>"',
            "permission denied: role producer may not subscribe to shoal.segments.>",
        ),
        (
            'nats: permissions violation for subscription to "_inbox.abcdefghijkl.*"',
            "permission denied: role producer may not subscribe to _INBOX.> (its replies' "
            "inbox: are these the producer role's credentials?)",
        ),
    ],
)
def test_a_violation_is_told_with_the_subject_as_written(error: str, message: str) -> None:
    refusals = Refusals(Client(), "producer")
    denied = refusals.report(Exception(error))
    assert str(denied) == message


def test_other_errors_are_no_violation() -> None:
    assert Refusals(Client(), None).report(Exception("nats: stale connection")) is None
