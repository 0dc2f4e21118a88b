"""``shoal serve``'s claims on the partitions: the engine's id, its leases and fence claims,
and the consumers and fences its ports get from them."""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

from protocol import SubjectError, validate_engine_id

from ._errors import UsageError

ENGINE_ID_FILE = "engine-id"
"""The file in the data directory that holds the engine's id, made at its first start."""
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


def engine_id_of(data_dir: Path, given: str | None) -> str:
    """The engine's id: ``given`` (``--engine-id``), else the one in the data directory,
    else a new one (the host's name and 6 random hex digits), written there.

    Raises:
        UsageError: ``given`` (or the file) is not a valid id, or differs from the id the
            data directory was first served under.
    """
    path = data_dir / ENGINE_ID_FILE
    stored = path.read_text(encoding="utf-8").strip() if path.is_file() else None
    chosen = given or stored
    if chosen is None:
        host = _NOT_ID.sub("-", socket.gethostname()).strip("-")[:40] or "shoal"
        chosen = f"{host}-{secrets.token_hex(3)}"
    try:
        validate_engine_id(chosen)
    except SubjectError as e:
        raise UsageError(f"--engine-id: {e}") from e
    if stored is not None and chosen != stored:
        raise UsageError(
            f"--engine-id {chosen} differs from the id {stored!r} the data directory "
            f"{data_dir} is served under ({path}): a data directory is one engine"
        )
    if stored is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(chosen + "\n", encoding="utf-8")
    return chosen
