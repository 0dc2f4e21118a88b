"""Which of shoal's streams a backup holds (``shoal backup``), and in what order they are
copied; the engine's role may snapshot and restore these (:mod:`protocol._roles`)."""

from __future__ import annotations

from ._definitions import DEFINITIONS_STREAM
from ._subjects import EVENTS_STREAM, REJECTED_STREAM, SEGMENTS_STREAM, SNAPSHOTS_STREAM

BACKUP_STREAMS: tuple[str, ...] = (
    SNAPSHOTS_STREAM,
    DEFINITIONS_STREAM,
    SEGMENTS_STREAM,
    REJECTED_STREAM,
    EVENTS_STREAM,
)
"""The streams a backup copies, in the order it copies them, each after the store: what each
holds was made from what the ones after it hold, so a copy never holds a result without its
cause. A partition's snapshot in ``OBJ_SHOAL_SNAPSHOTS`` is uploaded once the transitions
before it are in ``SHOAL_SEGMENTS``; a transition there was made from events already in
``SHOAL_EVENTS``. The leases bucket is not copied: it is live state, which a restored
engine makes again. (The record of erasures and the suppressed ids of ``shoal forget`` are
in the store.)"""

REQUIRED_STREAMS: frozenset[str] = frozenset({SEGMENTS_STREAM, REJECTED_STREAM, EVENTS_STREAM})
"""The streams every engine makes: a backup without one of them is refused. The others may
not exist yet (no snapshot uploaded, no definitions stored)."""
