"""``shoal auth permissions [ROLE]``: what it prints, and the README showing the same."""

from __future__ import annotations

from pathlib import Path

from protocol import ROLES, inbox_prefix, permissions_block
from tests.helpers import run

README = Path(__file__).parents[2] / "README.md"
MARKER = "<!-- shoal auth permissions -->"


def test_it_prints_every_role_with_a_header() -> None:
    done = run("auth", "permissions")
    assert (done.returncode, done.stderr) == (0, "")
    blocks = done.stdout.split("\n\n")
    assert len(blocks) == len(ROLES)
    for role, block in zip(ROLES, blocks, strict=True):
        comments = [line for line in block.splitlines() if line.startswith("#")]
        assert comments[0].startswith(f"# {role}: ")
        assert comments[-1] == f"# Its clients use the inbox prefix {inbox_prefix(role)}."
        assert block.rstrip("\n").endswith(permissions_block(role))


def test_it_prints_one_role() -> None:
    done = run("auth", "permissions", "producer")
    assert done.returncode == 0
    assert done.stdout == (
        "# producer: shoal publish: publishes events, and gets JetStream's acknowledgements;\n"
        "#   creates no stream.\n"
        "# Its clients use the inbox prefix _INBOX.shoal.producer.\n"
        f"{permissions_block('producer')}\n"
    )


def test_an_unknown_role_is_a_usage_error() -> None:
    done = run("auth", "permissions", "admin")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "shoal auth permissions: error: argument ROLE: invalid choice: 'admin' (choose from "
        "'engine', 'producer', 'subscriber', 'operator')"
    )


def test_the_readme_shows_the_output_of_auth_permissions() -> None:
    """The README shows the fenced block that follows the marker line: it must be what the
    command prints today (regenerate it with ``shoal auth permissions``)."""
    lines = README.read_text("utf-8").splitlines()
    assert MARKER in lines, f"README.md has no line {MARKER!r} before the permissions"
    start = lines.index(MARKER) + 1
    assert lines[start].startswith("```")
    end = lines.index("```", start + 1)
    shown = "\n".join(lines[start + 1 : end]) + "\n"
    assert shown == run("auth", "permissions").stdout
