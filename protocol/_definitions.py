"""The definitions in force, as the engine stores them: what they are, their version, when
they were applied and from where; and the port to the shared copy of them (the JetStream KV
bucket ``SHOAL_DEFINITIONS``, in ``protocol.nats``).

The engine keeps two copies: this shared one, and one in its SQLite store (``store``, which
holds the same bytes). Both are written each time definitions are applied; at a start the
engine reads both, and the higher version wins (see ``actors.engine``).

Nothing here imports ``nats``, and nothing here knows segment rules: the definitions are
their TOML text and their static lists' ids.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Protocol

import msgspec

from ._errors import ProtocolError
from ._formats import DEFINITIONS_FORMAT, check_format

DEFINITIONS_BUCKET = "SHOAL_DEFINITIONS"
"""The JetStream KV bucket of the definitions in force (and, chunked, their lists)."""
DEFINITIONS_STREAM = f"KV_{DEFINITIONS_BUCKET}"
"""The stream that holds the bucket (JetStream's naming)."""
DEFINITIONS_KEYS = f"$KV.{DEFINITIONS_BUCKET}.>"
"""The subjects of the bucket's keys: a write is a publish there."""

MAX_STORED_DEFINITIONS_BYTES = 1 << 30
"""The most a stored record may hold, encoded (its lists' ids included): a record said to be
larger is refused as corrupt before anything more is read."""


class FileOrigin(msgspec.Struct, frozen=True, kw_only=True, tag="file"):
    """Definitions read from the served segments file (``shoal serve --segments FILE``, or
    the one shipped with shoal)."""

    path: str
    """The file, as ``serve`` was given it (``default_segments.toml`` for the shipped one)."""
    content_hash: str
    """SHA-256 of its text and of the ids of its lists: what tells a changed file."""


class ApiOrigin(msgspec.Struct, frozen=True, kw_only=True, tag="api"):
    """Definitions applied over the query API (``shoal.api.definitions``: ``shoal segments
    apply``)."""

    source: str
    """The name the request gave them (``shoal segments apply`` sends the file's path)."""
    client: str | None = None
    """Who sent them, when the request said (``shoal segments apply`` says which user on
    which host)."""


Origin = FileOrigin | ApiOrigin


class StoredDefinitions(msgspec.Struct, frozen=True, kw_only=True):
    """The definitions in force, as stored: enough to apply them again with no file read."""

    version: int
    """1 for the first definitions stored, one more for each applied after: never reused."""
    applied_at: datetime
    """When the engine applied them (its clock)."""
    origin: Origin
    """Where they came from."""
    last_file: FileOrigin | None
    """The served file as it was last applied from it (the same as ``origin`` when they came
    from it): a start applies the served file only when its content changed since."""
    fingerprint: str
    """``SegmentSet.fingerprint`` of the definitions: equal for definitions that evaluate
    alike; checked when they are read back."""
    source: str
    """Their name in messages (``SegmentSet.source``)."""
    toml: str
    """Their TOML text without its ``[lists]`` tables."""
    lists: dict[str, list[str]]
    """The static lists' ids, by list name, sorted."""
    applied_through: dict[int, int] | None = None
    """Where in each partition of ``SHOAL_EVENTS`` they were switched to, when they replaced
    earlier ones: every event up to that stream position (0 for a partition not listed) was
    applied under the definitions before, every later one under these. None for the first
    definitions of a store, and in records of a shoal before definitions markers."""
    format: int = DEFINITIONS_FORMAT
    """The record's format (:data:`~protocol.DEFINITIONS_FORMAT`). A record read without it
    (written by shoal 484eaec or earlier) reads as 0, and the engine writes it again."""

    @property
    def origin_kind(self) -> Literal["file", "api"]:
        """``file`` or ``api``."""
        return "file" if isinstance(self.origin, FileOrigin) else "api"


class DefinitionsMarker(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a definitions marker (``shoal.events.<partition>.ctl.definitions.<version>``,
    published by the engine in each partition once it switched to new definitions).

    It makes the switch part of the partition's history, so that the partition can be
    rebuilt from the stream alone: apply its events up to ``applied_through`` under the
    definitions before, switch at ``applied_at`` to those of ``version`` (the record in
    ``SHOAL_DEFINITIONS``, whose ``fingerprint`` must match), then apply the rest."""

    version: int
    fingerprint: str
    applied_at: datetime
    applied_through: int
    """The partition's last stream position applied under the definitions before (0:
    none)."""


_marker_encoder = msgspec.json.Encoder()
_marker_decoder = msgspec.json.Decoder(DefinitionsMarker)


def encode_marker(marker: DefinitionsMarker) -> bytes:
    """A definitions marker's body (JSON)."""
    return _marker_encoder.encode(marker)


def decode_marker(data: bytes) -> DefinitionsMarker:
    """The marker :func:`encode_marker` made.

    Raises:
        msgspec.DecodeError: ``data`` is not one.
    """
    return _marker_decoder.decode(data)


class StoredDefinitionsError(ProtocolError):
    """A stored copy of the definitions cannot be read (corrupt, incomplete, or of an
    unknown form); ``where`` says which copy. The engine uses the other copy, or the served
    file, and writes this one again."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"the definitions stored in {where} cannot be read: {problem}")
        self.where = where
        self.problem = problem


class _Format(msgspec.Struct):
    """A stored record's ``format`` alone (0: it has none)."""

    format: int | str = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StoredDefinitions)
_format_decoder = msgspec.json.Decoder(_Format)


def encode_definitions(d: StoredDefinitions) -> bytes:
    """``d`` as stored (JSON)."""
    return _encoder.encode(d)


def decode_definitions(data: bytes, where: str) -> StoredDefinitions:
    """The record :func:`encode_definitions` made.

    A record of format 0 (without ``format``: shoal 484eaec or earlier) reads as it is, with
    ``format`` 0.

    Raises:
        FormatTooNewError: it is of a later format than
            :data:`~protocol.DEFINITIONS_FORMAT` (written by a newer shoal): not read.
        StoredDefinitionsError: ``data`` is not one (``where`` names the copy read).
    """
    try:
        # First the format alone: a newer record is refused before its fields are read as
        # this shoal's (they may mean something else).
        found = check_format(
            f"the definitions record in {where}",
            _format_decoder.decode(data).format,
            DEFINITIONS_FORMAT,
        )
        d = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StoredDefinitionsError(where, str(e)) from e
    if d.format != found:
        d = msgspec.structs.replace(d, format=found)
    if d.version < 1:
        raise StoredDefinitionsError(where, f"version {d.version} is not positive")
    return d


class DefinitionsBoard(Protocol):
    """The shared copy of the definitions in force (``protocol.nats.DefinitionsKV``)."""

    @property
    def where(self) -> str:
        """Which copy this is, for messages (``KV bucket SHOAL_DEFINITIONS``)."""
        ...

    async def load(self) -> StoredDefinitions | None:
        """The stored definitions, or None when none are stored.

        Raises:
            StoredDefinitionsError: what is stored cannot be read.
            BrokerError: the broker does not answer.
        """
        ...

    async def head_version(self) -> int | None:
        """The version stored (None: none, or unreadable), read cheaply: whether
        :meth:`load` would give newer definitions than those in force.

        Raises:
            BrokerError: the broker does not answer.
        """
        ...

    async def save(self, d: StoredDefinitions) -> None:
        """Store ``d`` in place of what is stored (whole, or not at all as far as
        :meth:`load` sees), whatever it is: to repair a copy.

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        ...

    async def propose(self, d: StoredDefinitions) -> bool:
        """Store ``d`` as the next version, only if what is stored is older and nothing else
        was stored meanwhile (a compare-and-set: several engines share the copy, and their
        versions form one sequence). False when another record won; nothing of ``d`` is
        stored then.

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        ...
