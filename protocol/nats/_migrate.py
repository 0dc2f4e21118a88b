"""The broker's side of ``shoal migrate``: an unpartitioned ``SHOAL_EVENTS`` made by an earlier
shoal (events on ``shoal.events.<customer>``, import markers on
``shoal.imports.<id>.<stage>``) replaced by a partitioned one holding the same messages in
the same order; or a partitioned one re-split into another number of partitions
(:class:`Repartitioner`: what the engine had committed first, then the rest).

The steps, each safe to run again after a crash (``scripts/_migrate_cmd.py`` records which
were done): :func:`seal_stream` (the old stream takes no more messages), reading it whole
(:func:`dump_stream`, kept on disk as :class:`OldMessage`), :class:`Planner` or
:class:`Repartitioner` (what to publish), :func:`replace_stream` (the old stream deleted,
the new one made in its staging form), :func:`republish`, :func:`finish_stream` (its final
form, with the partition transform) and :func:`start_consumers`.

In its staging form the new stream takes the stored subjects themselves
(``shoal.events.<partition>.<customer>``, the partition computed here as the broker's
transform computes it) and the control subjects, but not ``shoal.events.<customer>``: a
producer publishing during the migration gets no acknowledgement (and tries again later)
rather than having its event land among the republished ones, before the position the
engine's consumers start from. Its duplicate window is the broker's shortest, so that two
old messages with one ``Nats-Msg-Id`` (the old stream kept both: they came farther apart
than its window) are both stored; :func:`republish` waits out that window before a repeat.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import secrets
from collections.abc import (
    AsyncGenerator,
    Callable,
    Collection,
    Container,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from protocol._definitions import DefinitionsMarker, decode_marker, encode_marker
from protocol._errors import BrokerError, SubjectError
from protocol._partitions import partition_consumer
from protocol._ports import Delivery
from protocol._subjects import (
    CONTROL_WILDCARD,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    IMPORT_HEADER,
    RECEIVED_HEADER,
    STORED_EVENTS,
    definitions_marker_subject,
    import_marker_of,
    import_marker_subject,
    is_definitions_marker,
    token_partition,
    validate_import_id,
)
from protocol.nats._connect import StreamSettings, _events_config, _partitions_of
from protocol.nats._feed import _parse_ack_reply, delivery_of

OLD_IMPORTS_PREFIX = "shoal.imports."
"""The subjects of an earlier shoal's import markers: ``shoal.imports.<id>.<begin|end>``."""
STAGING_SUBJECTS = [STORED_EVENTS, CONTROL_WILDCARD]
"""The subjects of the new stream while it is filled: the stored forms only."""
STAGING_DUPLICATE_WINDOW = 0.1
"""Seconds: the shortest duplicate window nats-server takes (2.15 refuses 0.05)."""
_REPEAT_WAIT = 3 * STAGING_DUPLICATE_WINDOW
"""Waited after a message before publishing one with the same ``Nats-Msg-Id``: the broker
forgets an id once the window has passed, on a timer."""
_REMEMBERED = 1.0
"""Seconds for which an id published is taken to be still known to the broker (ten times
its window)."""
_REPEAT_TRIES = 20
_WINDOW = 1_000
"""Messages published before waiting for the broker's acknowledgements."""
_ACK_TIMEOUT = 60.0


class OldMessage(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One message of the old stream, as read (and kept on disk until the migration ends)."""

    seq: int
    """Its position in the old stream."""
    subject: str
    data: bytes
    received: int
    """When the old broker stored it, in microseconds since the epoch."""
    msg_id: str | None
    import_id: str | None
    received_at: str | None

    @classmethod
    def of(cls, d: Delivery) -> OldMessage:
        return cls(
            seq=d.stream_sequence,
            subject=d.subject,
            data=d.data,
            received=d.received,
            msg_id=d.msg_id,
            import_id=d.import_id,
            received_at=d.received_at,
        )

    @property
    def message_id(self) -> str:
        """The log id of an event without a ``messageId`` of its own (as
        :attr:`protocol.Delivery.default_message_id` gives it)."""
        return self.msg_id or f"js:{self.seq}@{self.received}"


class Outgoing(msgspec.Struct, frozen=True, kw_only=True):
    """A message to publish into the new stream."""

    old_seq: int
    """The old message it comes from (0: the migration's own begin and end markers)."""
    subject: str
    data: bytes
    headers: dict[str, str]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`republish` publishes, and where the engine goes on."""

    messages: list[Outgoing]
    """In order: the new stream's positions 1, 2, ..."""
    through: int
    """The new position of the last message the old engine had committed (the migration's
    begin markers count among those): the engine's consumers start after it."""
    events: int
    """Old events republished."""
    markers: int
    """Old import markers republished (one per partition each)."""
    dropped: list[int]
    """Old positions not republished: subjects no version of shoal takes as an event or a
    marker (a literal wildcard, several customer tokens), which an engine rejects."""
    rejected: list[int]
    """Old positions not republished: messages the old engine rejected (in
    ``SHOAL_REJECTED``)."""


class Planner:
    """The messages of the new stream for the old stream's, one old message at a time (in
    bounded memory), and what it counted on the way (:attr:`through`, :attr:`events`...).

    The new stream: the migration's begin marker in every partition; each old event on its
    stored subject ``shoal.events.<partition>.<customer>``, with its log id as
    ``Nats-Msg-Id`` and, as an event of the migration's import, its original receive instant
    (one imported before keeps its own import and instant); each old import marker in every
    partition; the migration's end marker in every partition.

    Args:
        migration_id: the migration's import id.
        partitions: the new stream's.
        committed: the old position through which the old engine had committed.
        rejected: the old positions it rejected (those ``SHOAL_REJECTED`` names), left out:
            they are not in its log, and ``SHOAL_REJECTED`` keeps them (a rebuild from the
            new stream would otherwise log one quarantined because it raised when applied,
            whose old position no longer names it).

    Raises:
        SubjectError: ``migration_id`` is not a valid import id.
    """

    def __init__(
        self,
        *,
        migration_id: str,
        partitions: int,
        committed: int,
        rejected: Collection[int] = (),
    ) -> None:
        self.migration_id = validate_import_id(migration_id)
        self.partitions = partitions
        self.committed = committed
        self._rejected = rejected
        self.count = 0
        """Messages of the new stream so far."""
        self.through = 0
        self.events = 0
        self.markers = 0
        self.dropped: list[int] = []
        self.rejected: list[int] = []

    def messages(self, old: Iterable[Sequence[OldMessage]]) -> Iterator[Outgoing]:
        """The new stream's messages for ``old`` (the old stream's, in order, in pieces),
        from the first; the counts start again."""
        self.count = self.through = self.events = self.markers = 0
        self.dropped, self.rejected = [], []
        yield from self._framing("begin")
        self.through = self.count
        for piece in old:
            for m in piece:
                for new in self._of(m):
                    self.count += 1
                    yield new
                if m.seq <= self.committed:
                    self.through = self.count
        yield from self._framing("end")

    def _framing(self, stage: str) -> Iterator[Outgoing]:
        for p in range(self.partitions):
            self.count += 1
            yield Outgoing(
                old_seq=0,
                subject=import_marker_subject(self.migration_id, stage, p),
                data=b"",
                headers={IMPORT_HEADER: self.migration_id},
            )

    def _of(self, m: OldMessage) -> list[Outgoing]:
        subject = m.subject
        if m.seq <= self.committed and m.seq in self._rejected:
            self.rejected.append(m.seq)
            return []
        if subject.startswith(OLD_IMPORTS_PREFIX):
            import_id, _, stage = subject[len(OLD_IMPORTS_PREFIX) :].partition(".")
            try:
                markers = [
                    Outgoing(
                        old_seq=m.seq,
                        subject=import_marker_subject(import_id, stage, p),
                        data=m.data,
                        headers={IMPORT_HEADER: import_id},
                    )
                    for p in range(self.partitions)
                ]
            except SubjectError:
                self.dropped.append(m.seq)
                return []
            self.markers += 1
            return markers
        token = subject[len(EVENTS_PREFIX) :] if subject.startswith(EVENTS_PREFIX) else ""
        if not token or "." in token or token in ("*", ">"):
            self.dropped.append(m.seq)
            return []
        headers = {"Nats-Msg-Id": m.message_id}
        if m.import_id is not None:
            headers[IMPORT_HEADER] = m.import_id
            if m.received_at is not None:
                headers[RECEIVED_HEADER] = m.received_at
        else:
            headers[IMPORT_HEADER] = self.migration_id
            headers[RECEIVED_HEADER] = str(m.received)
        self.events += 1
        stored = f"{EVENTS_PREFIX}{token_partition(token, self.partitions)}.{token}"
        return [Outgoing(old_seq=m.seq, subject=stored, data=m.data, headers=headers)]


def plan(
    messages: Sequence[OldMessage],
    *,
    migration_id: str,
    partitions: int,
    committed: int,
    rejected: Collection[int] = (),
) -> Plan:
    """All of :class:`Planner`'s work at once, for old ``messages`` that fit in memory.

    Raises:
        SubjectError: ``migration_id`` is not a valid import id.
    """
    planner = Planner(
        migration_id=migration_id, partitions=partitions, committed=committed, rejected=rejected
    )
    out = list(planner.messages([messages]))
    return Plan(
        messages=out,
        through=planner.through,
        events=planner.events,
        markers=planner.markers,
        dropped=planner.dropped,
        rejected=planner.rejected,
    )


class Switch(msgspec.Struct, frozen=True, kw_only=True):
    """A switch to new definitions in an old partitioned stream: what its definitions markers
    (or the store's record of the definitions in force) say."""

    version: int
    fingerprint: str
    applied_at: datetime
    applied_through: dict[int, int]
    """By old partition: its last old position applied under the definitions before (0, or
    not listed: none)."""


def _stored(subject: str, partitions: int) -> tuple[int, str] | None:
    """The partition and the rest of a subject of a partitioned stream
    (``shoal.events.<partition>.<rest>``), or None: not one of its ``partitions``."""
    if not subject.startswith(EVENTS_PREFIX):
        return None
    number, dot, rest = subject[len(EVENTS_PREFIX) :].partition(".")
    if not dot or not rest or not number.isascii() or not number.isdigit():
        return None
    q = int(number)
    return (q, rest) if q < partitions and str(q) == number else None


def _event_headers(m: OldMessage, migration_id: str) -> dict[str, str]:
    """An old event's headers in the new stream: its log id as ``Nats-Msg-Id``; its own
    import and instant, else the migration's import and the instant the old broker stored
    it."""
    headers = {"Nats-Msg-Id": m.message_id}
    if m.import_id is not None:
        headers[IMPORT_HEADER] = m.import_id
        if m.received_at is not None:
            headers[RECEIVED_HEADER] = m.received_at
    else:
        headers[IMPORT_HEADER] = migration_id
        headers[RECEIVED_HEADER] = str(m.received)
    return headers


Reader = Callable[[Container[int] | None], Iterable[Sequence[OldMessage]]]
"""The old stream's messages in order, in pieces: those of the pieces numbered in the
argument only (None: all), so that a pass can skip what it does not need."""


class Repartitioner:
    """The messages of the new stream for an old *partitioned* stream (``old_partitions``
    partitions), re-split into ``partitions``; with the counts of :class:`Planner`.

    The order. Partitions progress independently, so what the old engine had committed is
    not a prefix of the old stream: partition q is committed through its own position
    ``committed[q]``. The new stream must hold every committed message before every
    uncommitted one, since the new consumers start after one position. So the old messages
    are republished in *epochs*, each in old stream order: first those committed, then the
    uncommitted tail (what the engine reads as the migration's import). Each customer's
    messages are in one old partition, whose committed ones precede its uncommitted ones in
    the old stream too, so every customer's events keep their order.

    Switches to new definitions split the committed part further, for the same reason: the
    events applied before the switch to version v are, in each old partition q, those up
    to its marker's ``applied_through`` (a prefix of q again), and a partition lagging at
    the switch applied older events under v than another partition's younger ones. So the
    committed messages go in one epoch per switch (those applied before it and after the
    one before), each followed by v's markers, one per new partition p, stating the new
    position of p's last message so far: every message of p up to it was applied under the
    definitions before v, every later one under v or later, as in the old stream.

    Import markers: an old import had a begin and an end in every old partition; in the new
    stream it has, in every new partition, a begin where its first old begin goes and an
    end where its last old end goes (both in the new order). Every event of it came between
    its old partition's begin and end, so it comes between those too. Events keep their
    import header.

    Left out: messages the old engine rejected (those committed that ``SHOAL_REJECTED``
    names), subjects stored without a partition (the literal ``shoal.events.*`` or
    ``shoal.events.>``, which the engine rejects), control subjects of no known kind, and the
    old definitions markers (each version's are made again, as above).

    Args:
        migration_id: the migration's import id (events of no import of their own belong
            to it, with the instant the old broker stored them, as :class:`Planner` does).
        partitions: the new stream's.
        old_partitions: the old stream's.
        committed: by old partition, the old position through which it was committed.
        rejected: the old positions rejected.
        switch: the store's record of the definitions in force, which wins over the
            markers of its version (and stands for them when some were never published).

    Raises:
        SubjectError: ``migration_id`` is not a valid import id.
    """

    def __init__(
        self,
        *,
        migration_id: str,
        partitions: int,
        old_partitions: int,
        committed: Mapping[int, int],
        rejected: Collection[int] = (),
        switch: Switch | None = None,
    ) -> None:
        self.migration_id = validate_import_id(migration_id)
        self.partitions = partitions
        self.old_partitions = old_partitions
        self.committed = dict(committed)
        self._rejected = rejected
        self._switch = switch
        self.count = 0
        self.through = 0
        self.events = 0
        self.markers = 0
        """Old imports whose markers are republished (one begin and one end per partition)."""
        self.unread = 0
        """Old messages the old engine had not committed, republished."""
        self.dropped: list[int] = []
        self.rejected: list[int] = []
        self.definitions: dict[int, dict[int, int]] = {}
        """By version: the ``applied_through`` of its new markers, by new partition."""

    def _epoch(self, bounds: list[list[int]], q: int, seq: int) -> int:
        return bisect.bisect_left(bounds[q], seq)

    def messages(self, read: Reader) -> Iterator[Outgoing]:
        """The new stream's messages, from the first; the counts start again."""
        p_new, q_old = self.partitions, self.old_partitions
        self.count = self.through = self.events = self.markers = self.unread = 0
        self.dropped, self.rejected, self.definitions = [], [], {}
        # A first pass: the switches, the import markers, and each piece's span per old
        # partition (the epochs it holds, once the switches are known).
        found: dict[int, dict[int, DefinitionsMarker]] = {}
        imports: list[tuple[int, int, str, str]] = []  # (old seq, old partition, id, stage)
        spans: list[dict[int, tuple[int, int]]] = []
        for piece in read(None):
            span: dict[int, tuple[int, int]] = {}
            for m in piece:
                kind, q, rest = self._kind(m)
                if kind == "rejected":
                    self.rejected.append(m.seq)
                elif kind == "dropped":
                    self.dropped.append(m.seq)
                elif kind == "definitions":
                    marker = decode_marker(m.data)
                    found.setdefault(marker.version, {})[q] = marker
                else:
                    lo, hi = span.get(q, (m.seq, m.seq))
                    span[q] = (min(lo, m.seq), max(hi, m.seq))
                    if kind == "import":
                        _, import_id, stage = import_marker_of(m.subject)
                        imports.append((m.seq, q, import_id, stage))
                    else:
                        self.events += 1
                    if m.seq > self.committed.get(q, 0):
                        self.unread += 1
            spans.append(span)
        switches = self._switches(found)
        # bounds[q][i]: the last old position of q in epoch i (one epoch per switch, then
        # the rest committed); past the last, the tail.
        bounds: list[list[int]] = []
        for q in range(q_old):
            top = self.committed.get(q, 0)
            line: list[int] = []
            for s in switches:
                line.append(min(top, max([s.applied_through.get(q, 0), *line[-1:]])))
            bounds.append([*line, top])
        epochs = len(switches) + 2
        # Each import's markers go where its first begin and its last end go.
        first: dict[str, tuple[int, int]] = {}
        last: dict[str, tuple[int, int]] = {}
        for seq, q, import_id, stage in imports:
            key = (self._epoch(bounds, q, seq), seq)
            if stage == "begin" and (import_id not in first or key < first[import_id]):
                first[import_id] = key
            if stage == "end" and (import_id not in last or key > last[import_id]):
                last[import_id] = key
        placed = {seq for _, seq in [*first.values(), *last.values()]}
        self.markers = len(first.keys() | last.keys())
        in_piece = [
            {
                e
                for q, (lo, hi) in span.items()
                for e in range(self._epoch(bounds, q, lo), self._epoch(bounds, q, hi) + 1)
            }
            for span in spans
        ]
        last_of = [0] * p_new  # each new partition's last position so far

        def out(m: Outgoing, p: int) -> Outgoing:
            self.count += 1
            last_of[p] = self.count
            return m

        for p in range(p_new):
            yield out(self._framing("begin", p), p)
        for epoch in range(epochs):
            wanted = {i for i, es in enumerate(in_piece) if epoch in es}
            for piece in read(wanted) if wanted else ():
                for m in piece:
                    kind, q, rest = self._kind(m)
                    if kind in ("rejected", "dropped", "definitions"):
                        continue
                    if self._epoch(bounds, q, m.seq) != epoch:
                        continue
                    if kind == "event":
                        p = token_partition(rest, p_new)
                        stored = f"{EVENTS_PREFIX}{p}.{rest}"
                        headers = _event_headers(m, self.migration_id)
                        yield out(
                            Outgoing(old_seq=m.seq, subject=stored, data=m.data, headers=headers), p
                        )
                    elif m.seq in placed:
                        _, import_id, stage = import_marker_of(m.subject)
                        for p in range(p_new):
                            yield out(
                                Outgoing(
                                    old_seq=m.seq,
                                    subject=import_marker_subject(import_id, stage, p),
                                    data=m.data,
                                    headers={IMPORT_HEADER: import_id},
                                ),
                                p,
                            )
            if epoch < len(switches):
                s = switches[epoch]
                through = {p: last_of[p] for p in range(p_new)}
                self.definitions[s.version] = through
                for p in range(p_new):
                    body = DefinitionsMarker(
                        version=s.version,
                        fingerprint=s.fingerprint,
                        applied_at=s.applied_at,
                        applied_through=through[p],
                    )
                    yield out(
                        Outgoing(
                            old_seq=0,
                            subject=definitions_marker_subject(p, s.version),
                            data=encode_marker(body),
                            # The id the engine publishes it with (actors.engine._definitions).
                            headers={"Nats-Msg-Id": f"shoal-definitions:{s.version}:{p}"},
                        ),
                        p,
                    )
            elif epoch == epochs - 2:
                self.through = self.count
        for p in range(p_new):
            yield out(self._framing("end", p), p)

    def _framing(self, stage: str, p: int) -> Outgoing:
        return Outgoing(
            old_seq=0,
            subject=import_marker_subject(self.migration_id, stage, p),
            data=b"",
            headers={IMPORT_HEADER: self.migration_id},
        )

    def _kind(self, m: OldMessage) -> tuple[str, int, str]:
        """``event``, ``import`` or ``definitions`` (with its old partition and the rest of
        its subject), or ``rejected`` or ``dropped``."""
        where = _stored(m.subject, self.old_partitions)
        if where is None:
            return "dropped", -1, ""
        q, rest = where
        if m.seq <= self.committed.get(q, 0) and m.seq in self._rejected:
            return "rejected", q, rest
        if "." not in rest:
            return "event", q, rest
        if is_definitions_marker(m.subject):
            try:
                decode_marker(m.data)
            except msgspec.DecodeError:
                return "dropped", q, rest
            return "definitions", q, rest
        try:
            import_marker_of(m.subject)
        except SubjectError:
            return "dropped", q, rest
        return "import", q, rest

    def _switches(self, found: Mapping[int, Mapping[int, DefinitionsMarker]]) -> list[Switch]:
        """The switches in version order: each version's markers, the store's record in
        place of those of its version."""
        out: dict[int, Switch] = {}
        for version, markers in found.items():
            one = next(iter(markers.values()))
            out[version] = Switch(
                version=version,
                fingerprint=one.fingerprint,
                applied_at=one.applied_at,
                applied_through={q: m.applied_through for q, m in markers.items()},
            )
        if self._switch is not None:
            out[self._switch.version] = self._switch
        return [out[v] for v in sorted(out)]


def _staging_config() -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=list(STAGING_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=STAGING_DUPLICATE_WINDOW,
        max_age=None,
    )


async def stream_form(js: JetStreamContext) -> tuple[str, int, int | None]:
    """What ``SHOAL_EVENTS`` is now: ``("missing", 0, None)``; ``("old", last, None)``, made
    by an earlier shoal; ``("staging", last, None)``, being filled by a migration;
    ``("partitioned", last, P)``; ``("sealed", last, P)``, partitioned and sealed by a
    re-partitioning under way. ``last``: the position of its last message.

    Raises:
        BrokerError: the broker does not answer.
    """
    try:
        info = await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        return "missing", 0, None
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {EVENTS_STREAM}: {e}") from e
    last = int(info.state.last_seq or 0)
    found = _partitions_of(info.config)
    if found is not None:
        # Sealed: the old stream of a re-partitioning (the new one never is).
        return ("sealed" if info.config.sealed else "partitioned"), last, found
    if sorted(info.config.subjects or []) == sorted(STAGING_SUBJECTS):
        return "staging", last, None
    return "old", last, None


async def consumer_floor(js: JetStreamContext, consumer: str) -> tuple[int | None, bool]:
    """The acknowledgement floor of ``SHOAL_EVENTS``' durable ``consumer`` (None: there is
    none), and whether a client consumes from it now.

    Raises:
        BrokerError: the broker does not answer.
    """
    try:
        info = await js.consumer_info(EVENTS_STREAM, consumer)
    except nats.js.errors.NotFoundError:
        return None, False
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read consumer {consumer!r}: {e}") from e
    floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
    return floor, bool(info.push_bound)


async def dump_stream(nc: Client, *, chunk: int = 10_000) -> AsyncGenerator[list[Delivery], None]:
    """Every message of the sealed ``SHOAL_EVENTS``, in order, in lists of up to ``chunk``.

    Read with a consumer of its own that the broker lets hold at most two lists
    unacknowledged (``max_ack_pending``): each list is acknowledged as it is handed out, so
    the next one comes while the caller writes it, and no more, however slowly it writes.
    (An ordered consumer, as :func:`protocol.nats.read_stream` uses, drops what exceeds its
    pending limit when the caller falls behind: 1,476 of 100,000 messages went missing that
    way, unnoticed.) A pull consumer would do as well, but the engine's role may not pull.

    Raises:
        BrokerError: the broker stops answering, or did not send every message it holds.
    """
    js = nc.jetstream()
    sub: Any = None
    name = f"shoal-migrate-{secrets.token_hex(8)}"
    try:
        info = await js.stream_info(EVENTS_STREAM)
        total, last = int(info.state.messages or 0), int(info.state.last_seq or 0)
        if not total:
            return
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=3 * chunk, pending_bytes_limit=-1)
        # No filter: every message (the stream takes only shoal's subjects); a filter on
        # shoal.> over many subjects reads 3.5 times slower (nats-server 2.15).
        await js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                name=name,
                deliver_subject=inbox,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.ALL,
                max_ack_pending=2 * chunk,
                inactive_threshold=_ACK_TIMEOUT,
            ),
        )
        got, left = 0, total
        while left:
            msgs = [await sub.next_msg(timeout=_ACK_TIMEOUT) for _ in range(min(chunk, left))]
            out = [delivery_of(m, *_parsed(m.reply)) for m in msgs]
            await msgs[-1].ack()  # all of them: the broker sends on
            got += len(out)
            left = total - got
            yield out
            if out[-1].stream_sequence >= last:
                break
        if got != total:
            raise BrokerError(
                f"stream {EVENTS_STREAM} holds {total} messages, but {got} were read: run "
                "the migration again"
            )
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {EVENTS_STREAM}: {e}") from e
    finally:
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await js.delete_consumer(EVENTS_STREAM, name)


async def seal_stream(js: JetStreamContext) -> None:
    """Make the old ``SHOAL_EVENTS`` refuse new messages (a sealed stream takes none, and
    cannot be unsealed): nothing a producer publishes from now on is lost by its deletion.

    Raises:
        BrokerError: the broker refuses.
    """
    try:
        config = (await js.stream_info(EVENTS_STREAM)).config
        if not config.sealed:
            config.sealed = True
            await js.update_stream(config)
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot seal stream {EVENTS_STREAM}: {e}") from e


async def replace_stream(js: JetStreamContext) -> None:
    """Delete the old ``SHOAL_EVENTS`` (made by an earlier shoal, or partitioned and sealed:
    its consumers go with it) and make the new one in its staging form; or make that alone
    when there is none.

    Raises:
        BrokerError: the broker refuses.
    """
    try:
        form, _, _ = await stream_form(js)
        if form in ("old", "sealed"):
            await js.delete_stream(EVENTS_STREAM)
        if form != "staging":
            await js.add_stream(_staging_config())
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot replace stream {EVENTS_STREAM}: {e}") from e


def _parsed(reply: str) -> tuple[int, int, int]:
    seq, _, received, pending = _parse_ack_reply(reply)
    return seq, received, pending


def _nothing(_: int) -> None:
    pass


async def republish(
    js: JetStreamContext,
    messages: Iterable[Outgoing],
    *,
    start: int = 0,
    on_progress: Callable[[int], None] = _nothing,
) -> None:
    """Publish ``messages`` from the one at index ``start`` into the staging stream, in
    order, each acknowledged.

    ``start``: how many the stream holds already (an earlier run stopped there: it stores
    them in order, so those are the first ``start``). A message whose ``Nats-Msg-Id`` one
    published less than a second ago had waits until the broker forgot that one (its
    duplicate window): only those can be taken for repeats, so only the recent ids are kept.

    Raises:
        BrokerError: the broker did not store one (run it again: it goes on from there).
    """
    pending: list[asyncio.Future[Any]] = []
    # Nats-Msg-Id -> when published (the loop's clock), in the order published.
    recent: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def confirm() -> None:
        try:
            acks = await asyncio.wait_for(asyncio.gather(*pending), _ACK_TIMEOUT)
        except TimeoutError as e:
            raise BrokerError(
                f"the broker did not acknowledge the messages republished into {EVENTS_STREAM} "
                f"within {_ACK_TIMEOUT:g} s"
            ) from e
        if any(a.duplicate for a in acks):
            raise BrokerError(f"{EVENTS_STREAM} dropped a republished message as a repeat")
        on_progress(len(pending))
        pending.clear()

    try:
        for i, m in enumerate(messages):
            if i < start:
                continue
            msg_id = m.headers.get("Nats-Msg-Id")
            now = loop.time()
            while recent and now - recent[oldest := next(iter(recent))] >= _REMEMBERED:
                del recent[oldest]  # in the order published: the oldest first
            if msg_id is not None and now - recent.get(msg_id, -_REMEMBERED) < _REMEMBERED:
                # The same id as a message just published: once the broker has forgotten it.
                await confirm()
                await asyncio.sleep(max(0.0, recent[msg_id] + _REPEAT_WAIT - loop.time()))
                for _ in range(_REPEAT_TRIES):
                    ack = await js.publish(
                        m.subject, m.data, stream=EVENTS_STREAM, headers=m.headers
                    )
                    if not ack.duplicate:
                        break
                    await asyncio.sleep(_REPEAT_WAIT)
                else:
                    raise BrokerError(
                        f"{EVENTS_STREAM} keeps dropping a republished message as a repeat of "
                        f"Nats-Msg-Id {msg_id!r}"
                    )
                on_progress(1)
            else:
                pending.append(
                    await js.publish_async(
                        m.subject, m.data, stream=EVENTS_STREAM, headers=m.headers
                    )
                )
                if len(pending) >= _WINDOW:
                    await confirm()
            if msg_id is not None:
                recent.pop(msg_id, None)
                recent[msg_id] = loop.time()
        await confirm()
    except nats.js.errors.NoStreamResponseError as e:
        raise BrokerError(
            f"stream {EVENTS_STREAM} did not take a republished message: was it changed "
            "meanwhile? Run the migration again"
        ) from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"republishing into {EVENTS_STREAM} failed: {e}") from e


async def finish_stream(
    js: JetStreamContext, partitions: int, settings: StreamSettings | None = None
) -> None:
    """Give the filled stream its final form: events taken on ``shoal.events.<customer>``
    and stored under their partition, and the usual duplicate window.

    Raises:
        BrokerError: the broker refuses.
    """
    try:
        await js.update_stream(_events_config(settings or StreamSettings(), partitions))
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot update stream {EVENTS_STREAM}: {e}") from e


async def start_consumers(js: JetStreamContext, prefix: str, partitions: int, after: int) -> None:
    """Make each partition's durable consumer (``<prefix>-<partition>``, on its partition's
    subjects, acknowledging all) start after position ``after``: its acknowledgement floor
    then reads ``after``, where the engine goes on from. One that exists is made again.

    Raises:
        BrokerError: the broker refuses.
    """
    try:
        for p in range(partitions):
            name = partition_consumer(prefix, p)
            try:
                await js.delete_consumer(EVENTS_STREAM, name)
            except nats.js.errors.NotFoundError:
                pass
            await js.add_consumer(
                EVENTS_STREAM,
                ConsumerConfig(
                    durable_name=name,
                    filter_subject=f"{EVENTS_PREFIX}{p}.>",
                    ack_policy=AckPolicy.ALL,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=after + 1,
                ),
            )
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot create the consumers of {EVENTS_STREAM}: {e}") from e
