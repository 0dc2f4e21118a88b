"""The role keys of the embedded broker: one NKey seed file per role in a directory, made
once with modes only their owner can read, then checked and reused on every start.

A seed file holds one user seed (``SU...``) and a newline, as ``nsc`` and the ``nats`` CLI
(``--nkey``) read it; nats-server is told only the public keys.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import nkeys

from ._errors import BrokerError

KEYS_DIR = "auth"
"""The folder of a data directory that holds the role seed files."""
_SUFFIX = ".nk"
_SEED_BYTES = 32
"""An Ed25519 seed: 32 random bytes."""


class KeyFileError(BrokerError):
    """A role's seed file cannot be used: it is unreadable, not a user seed, or others may
    read it. ``path`` is the file, ``problem`` what is wrong with it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"the key file {path} {problem}")
        self.path = path
        self.problem = problem


def role_key_file(data_dir: Path, role: str) -> Path:
    """Where ``role``'s seed file of the data directory ``data_dir`` lives:
    ``<data_dir>/auth/<role>.nk``."""
    return data_dir / KEYS_DIR / f"{role}{_SUFFIX}"


def ensure_role_keys(keys_dir: Path, roles: Iterable[str]) -> dict[str, str]:
    """The public NKey of each of ``roles``, from its seed file in ``keys_dir``
    (``<role>.nk``), made first where it is missing: the folder mode 0700, the file 0600.
    Existing files are kept as they are.

    Blocking (small files): call it in a worker thread from async code.

    Raises:
        KeyFileError: a seed file others may read or write, unreadable, or not a user seed.
        BrokerError: the folder or a file cannot be made.
    """
    try:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerError(f"cannot make the key folder {keys_dir}: {e.strerror or e}") from e
    public: dict[str, str] = {}
    for role in roles:
        path = keys_dir / f"{role}{_SUFFIX}"
        if not path.exists():
            _write_new_seed(path)
        public[role] = public_key_of(path)
    return public


def public_key_of(path: Path) -> str:
    """The public key (``U...``) of the user seed in the file ``path``.

    Raises:
        KeyFileError: others may read or write the file, it cannot be read, or it holds no
            user seed.
    """
    try:
        mode = path.stat().st_mode
        # Windows has no such mode bits (its ACLs decide): checked where they mean something.
        if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
            raise KeyFileError(
                path,
                f"may be read by others (mode {stat.S_IMODE(mode):04o}): run `chmod 600 {path}`",
            )
        seed = bytearray(path.read_bytes().strip())
    except OSError as e:
        raise KeyFileError(path, f"cannot be read: {e.strerror or e}") from e
    try:
        if not seed.startswith(b"SU"):
            raise nkeys.ErrInvalidSeed()
        pair = nkeys.from_seed(seed)
        key: bytes = pair.public_key
        pair.wipe()
    except (nkeys.NkeysError, ValueError) as e:
        # binascii.Error is a ValueError: text that is not base32 at all.
        raise KeyFileError(
            path,
            "holds no NKey user seed (a line starting with SU): move it away and start "
            "`shoal serve` again to make a new one",
        ) from e
    finally:
        seed[:] = bytes(len(seed))
    return key.decode("ascii")


def _write_new_seed(path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(_SEED_BYTES), nkeys.PREFIX_BYTE_USER)
    write_private_file(path, seed + b"\n")


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600: to a temporary file first, moved in place,
    so a crash never leaves half a file.

    Raises:
        BrokerError: it cannot be written.
    """
    temporary = path.with_name(f".{path.name}.new")
    try:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        raise BrokerError(f"cannot write {path}: {e.strerror or e}") from e
