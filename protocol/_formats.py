"""The versions of what shoal stores on the broker, and the refusal of a newer one.

Every stored format carries a version, so that a newer shoal can upgrade older data in
place and an older shoal refuses newer data instead of misreading it:

- each stream and bucket shoal declares carries ``{"shoal_format": "<n>"}`` in its
  configuration's ``metadata`` (:data:`STREAM_FORMAT`): the layout of its configuration and
  of the messages in it. A stream without it was made before formats were recorded (format
  0, as shoal 484eaec and earlier made them): the declaration at start adds it;
- the stored definitions record (``SHOAL_DEFINITIONS`` and the store's copy) carries
  ``format`` (:data:`DEFINITIONS_FORMAT`); a record without it is format 0, rewritten at
  start;
- a partition's snapshot carries its own (``protocol``'s ``SNAPSHOT_FORMAT``), and so does
  each customer's (``actors``).

The store's schema has its version in the SQLite file (``store``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ._errors import ProtocolError

FORMAT_KEY = "shoal_format"
"""The key of a stream's or bucket's ``metadata`` that holds its format."""
STREAM_FORMAT = 1
"""The format of shoal's streams and buckets (their configuration and the layout of their
messages) this shoal writes: 1 is the first recorded (0: none recorded, made by shoal
484eaec or earlier)."""
DEFINITIONS_FORMAT = 1
"""The format of a stored definitions record this shoal writes: 1 is the first recorded (0:
a record without ``format``, written by shoal 484eaec or earlier)."""


class FormatTooNewError(ProtocolError):
    """Something stored was written by a newer shoal, in a format this one does not know:
    it is refused rather than misread. Run the newer shoal (or a later one) on it.

    ``what`` names the thing (``stream SHOAL_EVENTS``), ``found`` is the format it carries
    (a string when it is not even a number), ``known`` the latest this shoal knows.
    """

    def __init__(self, what: str, found: int | str, known: int) -> None:
        super().__init__(
            f"{what} has format {found}, and this shoal knows formats up to {known}: it was "
            "written by a newer shoal. Run that shoal (or a later one) on this data; this one "
            "stops rather than misread it"
        )
        self.what = what
        self.found = found
        self.known = known


def check_format(what: str, found: int | str, known: int) -> int:
    """``found`` as a number, when this shoal can read it (``known`` or older).

    Raises:
        FormatTooNewError: ``found`` is later than ``known``, or not a number.
    """
    if isinstance(found, str):
        try:
            number = int(found)
        except ValueError:
            raise FormatTooNewError(what, repr(found), known) from None
    else:
        number = found
    if number > known:
        raise FormatTooNewError(what, number, known)
    return max(number, 0)


def metadata_format(what: str, metadata: Mapping[str, str] | None, known: int) -> int:
    """The format a stream's or bucket's ``metadata`` records (0: none).

    Raises:
        FormatTooNewError: it records a later format than ``known``.
    """
    found = (metadata or {}).get(FORMAT_KEY)
    return 0 if found is None else check_format(what, found, known)
