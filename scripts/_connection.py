"""How every command that connects to NATS is told where and as whom: one set of options,
accepted before or after the subcommand, with the environment variables the ``nats`` CLI
reads as fallbacks."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import structlog

from protocol import embedded_broker
from protocol.nats import Credentials

DEFAULT_URL = "nats://127.0.0.1:4222"

# (dest, flag, environment variable, help, is a path)
_OPTIONS = (
    ("creds", "--creds", "NATS_CREDS", "a NATS credentials file (JWT and seed)", True),
    ("nkey", "--nkey", "NATS_NKEY", "an NKey seed file", True),
    ("nats_user", "--nats-user", "NATS_USER", "the NATS user name", False),
    ("nats_password", "--nats-password", "NATS_PASSWORD", "the NATS user's password", False),
    ("token", "--token", None, "a NATS authentication token", False),
    ("tlsca", "--tlsca", "NATS_CA", "the CA certificate to trust for TLS", True),
    ("tlscert", "--tlscert", "NATS_CERT", "a client certificate for TLS", True),
    ("tlskey", "--tlskey", "NATS_KEY", "the client certificate's private key", True),
)


def add_connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Add the credential options to ``parser``: the top-level parser (``top``), or a
    subcommand's, whose options only override what was given before the subcommand."""
    group = parser.add_argument_group(
        "connecting to a secured NATS (also from NATS_CREDS, NATS_NKEY, NATS_USER, "
        "NATS_PASSWORD, NATS_CA, NATS_CERT, NATS_KEY)"
    )
    for dest, flag, _, text, is_path in _OPTIONS:
        group.add_argument(
            flag,
            dest=dest,
            type=Path if is_path else str,
            default=None if top else argparse.SUPPRESS,
            metavar="FILE" if is_path else "VALUE",
            help=text,
        )


def credentials_of(args: argparse.Namespace) -> Credentials:
    """The credentials a command's options (else the environment) give."""
    found: dict[str, object] = {}
    for dest, _, env, _, is_path in _OPTIONS:
        value = getattr(args, dest, None)
        if value is None and env is not None and os.environ.get(env):
            value = Path(os.environ[env]) if is_path else os.environ[env]
        found[dest] = value
    return Credentials(
        creds=found["creds"],  # type: ignore[arg-type]
        nkey=found["nkey"],  # type: ignore[arg-type]
        user=found["nats_user"],  # type: ignore[arg-type]
        password=found["nats_password"],  # type: ignore[arg-type]
        token=found["token"],  # type: ignore[arg-type]
        tls_ca=found["tlsca"],  # type: ignore[arg-type]
        tls_cert=found["tlscert"],  # type: ignore[arg-type]
        tls_key=found["tlskey"],  # type: ignore[arg-type]
    )


def servers_of(args: argparse.Namespace) -> list[str]:
    """The servers a client command connects to: ``--nats``, else ``NATS_URL`` (comma
    separated, as the ``nats`` CLI reads it), else the local default."""
    if getattr(args, "nats", None):
        return list(args.nats)
    env = os.environ.get("NATS_URL", "")
    urls = [u.strip() for u in env.split(",") if u.strip()]
    return urls or [DEFAULT_URL]


async def engine_servers(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace, data_dir: Path
) -> list[str]:
    """The servers of a command that works on a data directory (``serve``, ``rebuild``):
    ``--nats``, else the embedded broker on ``data_dir``'s broker store, run until ``stack``
    closes (``NATS_URL`` does not replace it: a user with it set keeps the broker)."""
    if args.nats:
        return list(args.nats)
    url = await stack.enter_async_context(
        embedded_broker(data_dir / "nats", host=args.host, port=args.port)
    )
    structlog.get_logger("shoal").info("embedded nats-server ready", url=url)
    return [url]
