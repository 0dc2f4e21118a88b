"""Exports of the query commands: a whole segment's members as CSV or JSON lines, written
complete or not at all."""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Iterator
from typing import IO

import anyio.to_thread
import msgspec

from protocol import MAX_PAGE, ApiError, MembersReply, format_instant, to_instant
from protocol.nats import ApiClient

from ._output import output_file

NOT_FOUND = 4
"""The exit status of a command whose subject does not exist (an unknown segment, no
customer matching)."""
_encoder = msgspec.json.Encoder()


@contextlib.contextmanager
def atomic_output(name: str | None) -> Iterator[IO[str]]:
    """A text stream to write an output to: stdout when ``name`` is None, else
    :func:`~scripts._output.output_file` (written whole or not at all).

    Raises:
        CliError: the file cannot be written there (not found: its directory does not
            exist; usage: any other reason).
    """
    if name is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with output_file(name) as out:
        yield out


def _write_page(out: IO[str], fmt: str, page: MembersReply, header: bool) -> None:
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        if header:
            w.writerow(["customer_id", "true_since"])
        w.writerows(
            (cid, format_instant(to_instant(since)))
            for cid, since in zip(page.members, page.true_since, strict=True)
        )
    else:
        for cid, since in zip(page.members, page.true_since, strict=True):
            doc = {"customer_id": cid, "true_since": format_instant(to_instant(since))}
            out.write(_encoder.encode(doc).decode() + "\n")


async def export_members(
    api: ApiClient, segment: str, fmt: str, out: IO[str]
) -> tuple[int, bool, list[int]]:
    """Write every member of ``segment`` with its ``true_since`` to ``out`` as ``csv`` (with
    a header ``customer_id,true_since``) or ``jsonl``, in id order; return how many, whether
    the engines held every customer (false while one still loads them after a restart, or
    when partitions are missing: then only the members loaded so far are written), and the
    partitions no engine answered for on some page.

    It asks a page at a time (each reply fits in one message of the broker), each page
    after the last id of the one before: a customer appears at most once, and one that
    enters or exits meanwhile may or may not appear.

    Raises:
        ApiError: the segment is unknown (code 404), or the engine too old to tell
            ``true_since``.
    """
    cursor: str | None = None
    rows = 0
    complete = True
    missing: set[int] = set()
    while True:
        page = await api.members(segment, limit=MAX_PAGE, cursor=cursor)
        if len(page.true_since) != len(page.members):
            raise ApiError(
                "the engine answered without true_since (its API is older than 1.1): "
                "upgrade it to export members"
            )
        # In a worker thread: a page is up to 10,000 rows.
        await anyio.to_thread.run_sync(_write_page, out, fmt, page, cursor is None)
        rows += len(page.members)
        complete = complete and page.complete
        missing.update(page.missing_partitions)
        cursor = page.next_cursor
        if cursor is None:
            return rows, complete, sorted(missing)
