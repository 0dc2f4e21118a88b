"""``shoal auth permissions [ROLE]``: the nats-server permissions of shoal's roles, as blocks
to paste into a server configuration."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from protocol import ROLES, inbox_prefix, permissions_block, role_summary


def register(sub: Any) -> None:
    """Add ``auth`` and its actions to the ``shoal`` subparsers ``sub``."""
    auth = sub.add_parser("auth", help="access control: the roles' NATS permissions")
    actions = auth.add_subparsers(required=True, metavar="ACTION")
    p = actions.add_parser(
        "permissions",
        help="print the nats-server permissions of each role (or one)",
        description="Print the nats-server permissions of each role, or of ROLE: a "
        "`permissions: {...}` block to paste into a user of your server's configuration.",
    )
    # dest is not "role": that attribute names the role a connecting command runs as.
    p.add_argument("which", nargs="?", choices=ROLES, metavar="ROLE", help=", ".join(ROLES))
    p.set_defaults(run=_permissions)


def permissions_text(roles: tuple[str, ...] = ROLES) -> str:
    """What ``shoal auth permissions`` prints for ``roles``: each one's block, under comments
    saying who uses it and which inbox prefix its clients must use."""
    parts = []
    for role in roles:
        header = textwrap.wrap(
            f"{role}: {role_summary(role)}.",
            width=88,
            initial_indent="# ",
            subsequent_indent="#   ",
        )
        header.append(f"# Its clients use the inbox prefix {inbox_prefix(role)}.")
        parts.append("\n".join([*header, permissions_block(role)]))
    return "\n\n".join(parts) + "\n"


async def _permissions(args: argparse.Namespace) -> int:
    print(permissions_text((args.which,) if args.which else ROLES), end="")
    return 0
