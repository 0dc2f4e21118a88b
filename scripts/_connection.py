"""How every command that connects to NATS is told where and as whom: one set of options,
accepted before or after the subcommand, with the environment variables the ``nats`` CLI
reads as fallbacks; else the key of the command's role in the data directory, which the
embedded broker of ``shoal serve`` made."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import structlog

from protocol import KEYS_DIR, embedded_broker, is_loopback, role_key_file
from protocol.nats import Credentials, StreamNeedsMigration, redact

from ._errors import UsageError

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


DEFAULT_DATA_DIR = Path("shoal-data")


def add_connection_options(
    parser: argparse.ArgumentParser, *, top: bool, role: str | None = None
) -> None:
    """Add the credential options to ``parser``: the top-level parser (``top``), or the
    parser of a subcommand that acts as ``role``, whose options only override what was
    given before the subcommand.

    A subcommand also takes ``--data-dir`` (unless it has one: ``serve``, ``rebuild``), whose
    key for ``role`` it uses when given no credentials; the engine's commands (they run the
    embedded broker) take ``--no-auth``.
    """
    if role is not None:
        parser.set_defaults(role=role)
        if parser.get_default("data_dir") is None:
            parser.add_argument(
                "--data-dir",
                type=Path,
                default=DEFAULT_DATA_DIR,
                metavar="DIR",
                help=f"the data directory of `shoal serve`: without credentials, connect with "
                f"its {role} key, DIR/auth/{role}.nk (default: ./{DEFAULT_DATA_DIR})",
            )
        if role == "engine":
            embedded = parser.get_default("host") is not None
            parser.add_argument(
                "--no-auth",
                action="store_true",
                help="run the embedded broker without authentication: anyone who reaches it "
                "may do anything (only with a loopback --host)"
                if embedded
                # A command that only connects (`backup`): to a broker run with --no-auth.
                else "connect without credentials, to a broker that runs without "
                "authentication (shoal serve --no-auth)",
            )
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


def add_data_dir_options(p: argparse.ArgumentParser) -> None:
    """Add the options of a command that works on an engine's data directory while the
    engine is stopped (``rebuild``, ``migrate``): ``--data-dir``, and the broker, ``--nats``
    or the embedded one's ``--host``/``--port``."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data)",
    )
    p.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="the NATS server the engine uses (default: start the embedded one on the data "
        "directory's broker store)",
    )
    p.add_argument("--host", default="127.0.0.1", help="embedded broker address")
    p.add_argument("--port", type=int, default=4222, help="embedded broker port")


def credentials_of(args: argparse.Namespace) -> Credentials:
    """The credentials a command's options (else the environment) give; when they give no
    way to authenticate, the key of the command's role in its ``--data-dir``, if there is
    one (see :func:`role_key_file`)."""
    found = _given(args)
    key = _role_key(args, found)
    if key is not None and key.is_file():
        found["nkey"], found["role"] = key, args.role
    return Credentials(
        creds=found["creds"],  # type: ignore[arg-type]
        nkey=found["nkey"],  # type: ignore[arg-type]
        user=found["nats_user"],  # type: ignore[arg-type]
        password=found["nats_password"],  # type: ignore[arg-type]
        token=found["token"],  # type: ignore[arg-type]
        tls_ca=found["tlsca"],  # type: ignore[arg-type]
        tls_cert=found["tlscert"],  # type: ignore[arg-type]
        tls_key=found["tlskey"],  # type: ignore[arg-type]
        role=found.get("role"),  # type: ignore[arg-type]
    )


def _given(args: argparse.Namespace) -> dict[str, object]:
    found: dict[str, object] = {}
    for dest, _, env, _, is_path in _OPTIONS:
        value = getattr(args, dest, None)
        if value is None and env is not None and os.environ.get(env):
            value = Path(os.environ[env]) if is_path else os.environ[env]
        found[dest] = value
    return found


def _role_key(args: argparse.Namespace, found: dict[str, object]) -> Path | None:
    """Where the role's key of the command's data directory is to be looked for: None when
    the command has no role, runs without authentication, or is told how to authenticate
    (options, environment, or a user or token in a server URL)."""
    role: str | None = getattr(args, "role", None)
    if role is None or getattr(args, "no_auth", False):
        return None
    if any(found[dest] for dest in ("creds", "nkey", "nats_user", "token")):
        return None
    urls = (args.nats or []) if role == "engine" else servers_of(args)
    if any(redact(url) != url for url in urls):
        return None
    data_dir: Path = getattr(args, "data_dir", None) or DEFAULT_DATA_DIR
    return role_key_file(data_dir, role)


def explain(error: BaseException, args: argparse.Namespace) -> str:
    """The one line that reports ``error``: a broker's refusal of a command that was given
    no credentials also names the key file of its data directory (refused, or not found),
    and what to do."""
    text = str(error)
    if isinstance(error, StreamNeedsMigration):
        return text.replace("`shoal migrate", f"`{migrate_command(args)}")
    if "authorization violation" not in text.lower():
        return text
    key = _role_key(args, _given(args))
    if key is None:
        return text
    if key.is_file():
        # Another data directory's key: two engines, each with its own broker and keys.
        return f"{text} (with the key {key}: give the --data-dir of the `shoal serve` there)"
    return (
        f"{text} (no key file {key}: give the --data-dir of `shoal serve`, or credentials "
        "with --nkey, --creds, --nats-user or --token)"
    )


def migrate_command(args: argparse.Namespace) -> str:
    """The ``shoal migrate`` command for the data directory, broker and consumer of the
    command ``args`` were given to (``serve``, ``rebuild``)."""
    words = ["shoal migrate"]
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and Path(data_dir) != Path("shoal-data"):
        words.append(f"--data-dir {data_dir}")
    if getattr(args, "nats", None):
        words += [f"--nats {redact(url)}" for url in args.nats]
    else:
        if getattr(args, "host", "127.0.0.1") != "127.0.0.1":
            words.append(f"--host {args.host}")
        if getattr(args, "port", 4222) != 4222:
            words.append(f"--port {args.port}")
        if getattr(args, "no_auth", False):
            words.append("--no-auth")
    if getattr(args, "consumer", "shoal-engine") != "shoal-engine":
        words.append(f"--consumer {args.consumer}")
    return " ".join(words)


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
    closes (``NATS_URL`` does not replace it: a user with it set keeps the broker). The
    broker admits only the role keys of ``data_dir`` (made on its first start), or anyone
    with ``--no-auth``, which only a loopback ``--host`` may have.

    Raises:
        UsageError: ``--no-auth`` with ``--nats``, or with a host that is not loopback.
    """
    if args.nats:
        if args.no_auth:
            raise UsageError("--no-auth is for the embedded broker: give it or --nats, not both")
        return list(args.nats)
    if args.no_auth and not is_loopback(args.host):
        raise UsageError(
            f"--no-auth listens on {args.host}, which is not a loopback address: anyone who "
            "reaches it could forge transitions and read every customer. Drop --no-auth "
            "(clients then use the keys in the data directory), or listen on --host 127.0.0.1"
        )
    keys = None if args.no_auth else data_dir / KEYS_DIR
    url = await stack.enter_async_context(
        embedded_broker(data_dir / "nats", host=args.host, port=args.port, keys=keys)
    )
    structlog.get_logger("shoal").info(
        "embedded nats-server ready",
        url=url,
        auth="none (--no-auth)" if keys is None else f"role keys in {keys}",
    )
    return [url]
