"""Every NATS subject shoal uses is built and parsed here, and nowhere else.

A customer id becomes one subject token. NATS reserves ``.`` (token separator), ``*`` and
``>`` (wildcards), and a subject cannot hold whitespace, so those characters (and ``%``, the
escape character itself, and control characters, Unicode category Cc) are percent-escaped as
the hex of their UTF-8 bytes: ``a.b c`` becomes ``a%2Eb%20c``. Everything else, non-ASCII
included, is kept.
"""

from __future__ import annotations

import functools
import re

from ._errors import SubjectError

EVENTS_PREFIX = "shoal.events."
EVENTS_PUBLISHED = "shoal.events.*"
"""The subjects producers publish events on, one customer token each: the only event
subjects ``SHOAL_EVENTS`` takes. It stores each as ``shoal.events.<partition>.<customer>``
(see :func:`stored_event_subject`)."""
STORED_EVENTS = "shoal.events.*.*"
"""The stored form of the event subjects (``shoal.events.<partition>.<customer>``): only
``shoal migrate`` publishes there, into the new stream it fills (which takes them only then)."""
PARTITION_HEADER = "Shoal-Partition"
"""The header of a published transition: its customer's partition, in decimal."""
SEGMENTS_PREFIX = "shoal.segments."
EVENTS_WILDCARD = "shoal.events.>"
SEGMENTS_WILDCARD = "shoal.segments.>"
REJECTED_SUBJECT = "shoal.rejected"
CONTROL_TOKEN = "ctl"
CONTROL_WILDCARD = "shoal.events.*.ctl.>"
"""Control messages in a partition's own subjects (``shoal.events.<partition>.ctl....``:
the markers of ``shoal import``), in ``SHOAL_EVENTS`` under its partition's subjects so
that the partition's consumer reads them in order with its events, through one filter
(nats-server serves a consumer of several filters far slower). The stream's transform
takes one token only, so they are stored as published; and a producer, who may publish
on ``shoal.events.*`` (one token), cannot publish one."""
IMPORT_STAGES = ("begin", "end")
IMPORT_HEADER = "Shoal-Import"
"""The header of an imported event (and of the markers): its import's id."""
RECEIVED_HEADER = "Shoal-Received-At"
"""The header of an imported event: its original receive instant, microseconds since the
epoch in decimal (the broker's own stamp is when it was imported)."""
API_PREFIX = "shoal.api."
API_SERVICE = "shoal"
"""The name of the query service (``$SRV.PING.shoal``) and the queue group of its endpoints."""
API_ENDPOINTS = (
    "customer",
    "explain",
    "segments",
    "members",
    "search",
    "definitions",
    "status",
    "unpark",
    "forget",
)
CUSTOMER_ENDPOINTS = ("customer", "explain")
"""Endpoints about one customer: its partition and the customer are the last tokens of the
subject, so a request reaches the engine that owns the customer."""
GATHERED_ENDPOINTS = ("segments", "members", "status", "search", "unpark")
"""Endpoints every engine answers (each for the partitions it owns): a client gathers their
replies until every partition is covered."""

EVENTS_STREAM = "SHOAL_EVENTS"
SEGMENTS_STREAM = "SHOAL_SEGMENTS"
REJECTED_STREAM = "SHOAL_REJECTED"

CHANGES = ("entered", "exited")

_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_IMPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ESCAPE_HEX = re.compile(r"%([0-9A-F]{2})")


# Every character str.isspace() calls whitespace is matched by \s, and category Cc is exactly
# U+0000-U+001F and U+007F-U+009F (tests check both over all of Unicode).
_RESERVED = re.compile(r"[.*>%\s\x00-\x1f\x7f-\x9f]")


def _needs_escape(ch: str) -> bool:
    return _RESERVED.match(ch) is not None


def escape_token(customer_id: str) -> str:
    """Return ``customer_id`` as a single subject token (percent-escaping reserved characters).

    Raises:
        SubjectError: the id is empty.
    """
    if not customer_id:
        raise SubjectError("a customer id cannot be empty")
    if _RESERVED.search(customer_id) is None:
        return customer_id
    out: list[str] = []
    for ch in customer_id:
        if _needs_escape(ch):
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


def unescape_token(token: str) -> str:
    """Return the customer id that :func:`escape_token` turned into ``token``.

    Only the canonical form is accepted (upper-case hex, and only for characters that
    must be escaped), so each customer has exactly one subject.

    Raises:
        SubjectError: the token is empty, has a bad escape, or is not in canonical form.
    """
    if not token:
        raise SubjectError("the customer token is empty")
    if "%" not in token:
        if _RESERVED.search(token) is not None:
            raise SubjectError(f"customer token {token!r} holds a character that must be escaped")
        return token
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            m = _ESCAPE_HEX.match(token, i)
            if m is None:
                raise SubjectError(
                    f"customer token {token!r} has a bad escape at position {i}: "
                    "'%' must be followed by two upper-case hex digits"
                )
            raw.append(int(m.group(1), 16))
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    try:
        customer_id = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SubjectError(f"customer token {token!r} escapes bytes that are not UTF-8") from e
    if escape_token(customer_id) != token:
        raise SubjectError(
            f"customer token {token!r} is not in canonical form; "
            f"escape the id as {escape_token(customer_id)!r}"
        )
    return customer_id


def event_subject(customer_id: str) -> str:
    """The subject on which events of ``customer_id`` are published."""
    return EVENTS_PREFIX + escape_token(customer_id)


_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


@functools.lru_cache(maxsize=65536)
def token_partition(token: str, partitions: int) -> int:
    """The partition of a subject token as nats-server's ``partition()`` computes it
    (:func:`protocol.partition` is this over a customer's escaped token)."""
    # FNV-1a, 32 bits (xor the byte, then multiply), over the token's UTF-8 bytes: what
    # nats-server's partition() subject-transform function computes for the token.
    h = _FNV_OFFSET
    for b in token.encode("utf-8"):
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


def stored_event_subject(customer_id: str, partitions: int) -> str:
    """The subject ``SHOAL_EVENTS`` stores an event of ``customer_id`` under when it splits
    customers into ``partitions``: ``shoal.events.<partition>.<customer>``, where the
    producer published it on :func:`event_subject`.

    Raises:
        SubjectError: the id is empty.
    """
    token = escape_token(customer_id)
    return f"{EVENTS_PREFIX}{token_partition(token, partitions)}.{token}"


_PARTITION_TOKEN = re.compile(r"0|[1-9][0-9]{0,9}")


def _unpartitioned(subject: str) -> SubjectError:
    return SubjectError(
        f"subject {subject!r} was published by hand on a wildcard subject and stored without "
        "a partition: it names no customer (publish each event on shoal.events.<customer>)"
    )


def customer_of_stored_subject(subject: str) -> tuple[int, str]:
    """The partition and customer id of a stored event subject
    ``shoal.events.<partition>.<customer>``.

    Raises:
        SubjectError: the subject is not in that form: the literal ``shoal.events.*`` or
            ``shoal.events.>``, which the stream stores untransformed when someone publishes
            on it by hand; or anything but a decimal partition and one customer token.
    """
    if not subject.startswith(EVENTS_PREFIX):
        raise SubjectError(f"subject {subject!r} is not under {EVENTS_PREFIX!r}")
    rest = subject[len(EVENTS_PREFIX) :]
    if rest in ("*", ">"):
        raise _unpartitioned(subject)
    number, dot, token = rest.partition(".")
    if not dot or not _PARTITION_TOKEN.fullmatch(number) or not token or "." in token:
        raise SubjectError(
            f"subject {subject!r} is not a stored event subject "
            f"{EVENTS_PREFIX}<partition>.<customer> (a decimal partition, then one customer "
            "token; escape '.' in customer ids as %2E)"
        )
    return int(number), unescape_token(token)


@functools.lru_cache(maxsize=65536)
def customer_of_event_subject(subject: str) -> str:
    """The customer id of an event subject: as published, ``shoal.events.<customer>``, or
    as ``SHOAL_EVENTS`` stores it, ``shoal.events.<partition>.<customer>``.

    A subject of two tokens after ``shoal.events.`` can only be the stored form: a producer
    who publishes on one gets no stream to store it. Cached: every event the engine takes
    asks it, and a customer's subject comes again and again (an error is not cached).

    Raises:
        SubjectError: the subject is neither; in particular the literal ``shoal.events.*``
            or ``shoal.events.>`` (published by hand, stored without a partition).
    """
    if not subject.startswith(EVENTS_PREFIX):
        raise SubjectError(f"subject {subject!r} is not under {EVENTS_PREFIX!r}")
    token = subject[len(EVENTS_PREFIX) :]
    if token in ("*", ">"):
        raise _unpartitioned(subject)
    if "." in token:
        if token.count(".") == 1 and _PARTITION_TOKEN.fullmatch(token.partition(".")[0]):
            return customer_of_stored_subject(subject)[1]
        raise SubjectError(
            f"subject {subject!r} must have exactly one customer token after {EVENTS_PREFIX!r} "
            "(escape '.' in customer ids as %2E)"
        )
    return unescape_token(token)


_TRANSFORM_DEST = re.compile(
    re.escape(EVENTS_PREFIX) + r"\{\{\s*partition\(\s*([0-9]+)\s*,\s*1\s*\)\s*\}\}"
    r"\.\{\{\s*wildcard\(\s*1\s*\)\s*\}\}"
)


def partition_transform(partitions: int) -> tuple[str, str]:
    """The source and destination of ``SHOAL_EVENTS``'s subject transform for
    ``partitions``: ``shoal.events.*`` becomes
    ``shoal.events.{{partition(P,1)}}.{{wildcard(1)}}``.

    Raises:
        ValueError: ``partitions`` is not positive.
    """
    if partitions < 1:
        raise ValueError(f"the number of partitions must be positive, not {partitions}")
    return EVENTS_PUBLISHED, f"{EVENTS_PREFIX}{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"


def partitions_of_transform(src: str | None, dest: str | None) -> int | None:
    """The number of partitions of a subject transform that :func:`partition_transform`
    made, or None when it is not one (no transform: a stream made by an earlier shoal)."""
    if src != EVENTS_PUBLISHED or dest is None:
        return None
    m = _TRANSFORM_DEST.fullmatch(dest)
    return int(m.group(1)) if m is not None and int(m.group(1)) > 0 else None


def validate_segment_name(name: str) -> str:
    """Return ``name`` if it can be a segment name (a subject token), else raise.

    Raises:
        SubjectError: the name is empty, too long, or has characters other than
            letters, digits, ``_`` and ``-``.
    """
    if not _SEGMENT_NAME.fullmatch(name):
        raise SubjectError(
            f"segment name {name!r} must be 1 to 128 letters, digits, '_' or '-' "
            "(it is used as a subject token)"
        )
    return name


@functools.lru_cache(maxsize=4096)
def segment_subject(segment: str, change: str) -> str:
    """The subject of a membership change: ``shoal.segments.<segment>.<entered|exited>``."""
    if change not in CHANGES:
        raise SubjectError(f"change {change!r} must be 'entered' or 'exited'")
    return f"{SEGMENTS_PREFIX}{validate_segment_name(segment)}.{change}"


def segment_filter(segment: str | None = None) -> str:
    """A subscription filter for the changes of one segment, or of all when ``None``."""
    if segment is None:
        return SEGMENTS_WILDCARD
    return f"{SEGMENTS_PREFIX}{validate_segment_name(segment)}.*"


def _endpoint(endpoint: str, per_customer: bool) -> str:
    kinds = (
        CUSTOMER_ENDPOINTS
        if per_customer
        else tuple(e for e in API_ENDPOINTS if e not in CUSTOMER_ENDPOINTS)
    )
    if endpoint not in kinds:
        raise SubjectError(f"API endpoint {endpoint!r} must be one of {', '.join(kinds)}")
    return API_PREFIX + endpoint


def api_subject(endpoint: str) -> str:
    """The subject of an API endpoint that is not about one customer: ``shoal.api.<endpoint>``
    for ``segments``, ``members``, ``search``, ``definitions``, ``status`` and ``unpark``.

    Raises:
        SubjectError: ``endpoint`` is not one of those.
    """
    return _endpoint(endpoint, False)


def customer_api_subject(endpoint: str, customer_id: str, partition: int | None = None) -> str:
    """The subject of a request about one customer: ``shoal.api.<customer|explain>.<partition>.
    <customer>``, the customer escaped as in its event subject and ``partition`` its partition
    (:func:`protocol.partition`), so that the request reaches the engine that owns it.

    Without ``partition``, the subject of earlier versions, ``shoal.api.<endpoint>.<customer>``:
    still answered, an engine forwards it to the partitioned subject.

    Raises:
        SubjectError: ``endpoint`` is not ``customer`` or ``explain``, the id is empty, or
            ``partition`` is negative.
    """
    if partition is None:
        return f"{_endpoint(endpoint, True)}.{escape_token(customer_id)}"
    return f"{partition_api_filter(endpoint, partition)[:-1]}{escape_token(customer_id)}"


def partition_api_filter(endpoint: str, partition: int) -> str:
    """The subjects of ``endpoint`` requests for the customers of one partition:
    ``shoal.api.customer.<partition>.*`` (an engine listens on those of the partitions it owns).

    Raises:
        SubjectError: ``endpoint`` is not a customer endpoint, or ``partition`` is negative.
    """
    if partition < 0:
        raise SubjectError(f"partition {partition} must be 0 or more")
    return f"{_endpoint(endpoint, True)}.{partition}.*"


def customer_api_wildcard(endpoint: str) -> str:
    """The subjects of ``endpoint`` requests for every partition: ``shoal.api.customer.*.*``
    (for permissions, which name no partition).

    Raises:
        SubjectError: ``endpoint`` is not a customer endpoint.
    """
    return f"{_endpoint(endpoint, True)}.*.*"


def legacy_customer_api_filter(endpoint: str) -> str:
    """The subjects of ``endpoint`` requests as earlier versions sent them, without a
    partition: ``shoal.api.customer.*`` (one token, so no partitioned subject matches).

    Raises:
        SubjectError: ``endpoint`` is not a customer endpoint.
    """
    return f"{_endpoint(endpoint, True)}.*"


def customer_of_api_subject(endpoint: str, subject: str) -> str:
    """The customer id of a request subject without a partition,
    ``shoal.api.<endpoint>.<customer>`` (earlier versions').

    Raises:
        SubjectError: the subject does not have exactly one valid customer token there.
    """
    prefix = _endpoint(endpoint, True) + "."
    token = subject[len(prefix) :] if subject.startswith(prefix) else ""
    if not token or "." in token:
        raise SubjectError(
            f"subject {subject!r} must be {prefix}<customer>, with one customer token "
            "(escape '.' in customer ids as %2E)"
        )
    return unescape_token(token)


def partitioned_customer_of_api_subject(endpoint: str, subject: str) -> tuple[int, str]:
    """The partition and customer id of a request subject
    ``shoal.api.<endpoint>.<partition>.<customer>``.

    Raises:
        SubjectError: the subject does not have a partition number and exactly one valid
            customer token there.
    """
    prefix = _endpoint(endpoint, True) + "."
    rest = subject[len(prefix) :] if subject.startswith(prefix) else ""
    number, _, token = rest.partition(".")
    if not _PARTITION_TOKEN.fullmatch(number) or not token or "." in token:
        raise SubjectError(
            f"subject {subject!r} must be {prefix}<partition>.<customer>, with one customer "
            "token (escape '.' in customer ids as %2E)"
        )
    return int(number), unescape_token(token)


def validate_import_id(import_id: str) -> str:
    """Return ``import_id`` if it can name an import (a subject token and a header value).

    Raises:
        SubjectError: it is not 1 to 64 letters, digits, '_' or '-'.
    """
    if not _IMPORT_ID.fullmatch(import_id):
        raise SubjectError(
            f"import id {import_id[:80]!r} must be 1 to 64 letters, digits, '_' or '-'"
        )
    return import_id


def import_marker_subject(import_id: str, stage: str, partition: int) -> str:
    """The subject of an import's marker in one partition:
    ``shoal.events.<partition>.ctl.import.<import id>.<begin|end>`` (an import has one of
    each per partition).

    Raises:
        SubjectError: a bad import id or partition, or ``stage`` is not ``begin`` or
            ``end``.
    """
    if stage not in IMPORT_STAGES:
        raise SubjectError(f"import stage {stage!r} must be 'begin' or 'end'")
    if partition < 0:
        raise SubjectError(f"partition {partition} must not be negative")
    return (
        f"{EVENTS_PREFIX}{partition}.{CONTROL_TOKEN}.import.{validate_import_id(import_id)}.{stage}"
    )


DEFINITIONS_MARKERS = f"{EVENTS_PREFIX}*.{CONTROL_TOKEN}.definitions.*"
"""The subjects of the definitions markers, which only the engine publishes."""
IMPORT_MARKERS = f"{EVENTS_PREFIX}*.{CONTROL_TOKEN}.import.>"
"""The subjects of the imports' markers, which only the operator publishes."""


def definitions_marker_subject(partition: int, version: int) -> str:
    """The subject of the marker that records, in one partition, where the engine switched
    to the definitions of ``version``: ``shoal.events.<partition>.ctl.definitions.<version>``.

    Raises:
        SubjectError: a negative partition, or a version below 1.
    """
    if partition < 0 or version < 1:
        raise SubjectError(f"no definitions marker for partition {partition}, version {version}")
    return f"{EVENTS_PREFIX}{partition}.{CONTROL_TOKEN}.definitions.{version}"


def is_definitions_marker(subject: str) -> bool:
    """Whether a stored subject of ``SHOAL_EVENTS`` is a definitions marker (see
    :func:`definitions_marker_subject`)."""
    tokens = subject[len(EVENTS_PREFIX) :].split(".") if subject.startswith(EVENTS_PREFIX) else []
    return len(tokens) == 4 and tokens[1:3] == [CONTROL_TOKEN, "definitions"]


def fence_probe_subject(partition: int) -> str:
    """The subject of the engine's probes of a replicated ``SHOAL_EVENTS`` in one partition,
    ``shoal.events.<partition>.ctl.probe``: empty messages that tell the deadline barrier
    how far the stream's stored events reached the engine (see
    ``protocol.nats.PartitionedFeed.fence``). Nothing to apply; each is deleted once used.

    Raises:
        SubjectError: a negative partition.
    """
    if partition < 0:
        raise SubjectError(f"no probe subject for partition {partition}")
    return f"{EVENTS_PREFIX}{partition}.{CONTROL_TOKEN}.probe"


def is_fence_probe(subject: str) -> bool:
    """Whether a stored subject of ``SHOAL_EVENTS`` is an engine's probe (see
    :func:`fence_probe_subject`)."""
    tokens = subject[len(EVENTS_PREFIX) :].split(".") if subject.startswith(EVENTS_PREFIX) else []
    return len(tokens) == 3 and tokens[1:] == [CONTROL_TOKEN, "probe"]


def forget_order_subject(partition: int) -> str:
    """The subject of the orders to forget a customer of ``partition``,
    ``shoal.events.<partition>.ctl.forget`` (see ``protocol.ForgetOrder``).

    Raises:
        SubjectError: a negative partition.
    """
    if partition < 0:
        raise SubjectError(f"no forget subject for partition {partition}")
    return f"{EVENTS_PREFIX}{partition}.{CONTROL_TOKEN}.forget"


def is_forget_order(subject: str) -> bool:
    """Whether a stored subject of ``SHOAL_EVENTS`` is an order to forget a customer (see
    :func:`forget_order_subject`)."""
    tokens = subject[len(EVENTS_PREFIX) :].split(".") if subject.startswith(EVENTS_PREFIX) else []
    return len(tokens) == 3 and tokens[1:] == [CONTROL_TOKEN, "forget"]


def is_control_subject(subject: str) -> bool:
    """Whether a stored subject of ``SHOAL_EVENTS`` is a control message
    (``shoal.events.<partition>.ctl.…``) rather than an event."""
    if not subject.startswith(EVENTS_PREFIX):
        return False
    tokens = subject[len(EVENTS_PREFIX) :].split(".", 2)
    return len(tokens) == 3 and tokens[1] == CONTROL_TOKEN


def import_marker_of(subject: str) -> tuple[int, str, str]:
    """The partition, import id and stage of a marker subject
    ``shoal.events.<partition>.ctl.import.<import id>.<stage>``.

    Raises:
        SubjectError: the subject is not such a marker.
    """
    tokens = subject[len(EVENTS_PREFIX) :].split(".") if subject.startswith(EVENTS_PREFIX) else []
    if (
        len(tokens) != 5
        or tokens[1:3] != [CONTROL_TOKEN, "import"]
        or tokens[4] not in IMPORT_STAGES
        or not (tokens[0].isascii() and tokens[0].isdigit())
    ):
        raise SubjectError(
            f"subject {subject[:200]!r} is not "
            f"{EVENTS_PREFIX}<partition>.{CONTROL_TOKEN}.import.<import id>.<begin|end>"
        )
    return int(tokens[0]), validate_import_id(tokens[3]), tokens[4]


# Several engines: leases, fences, progress -------------------------------------------------

FENCE_PREFIX = "shoal.fence."
FENCE_WILDCARD = "shoal.fence.*"
"""Each partition's claims (``shoal.fence.<partition>``), in ``SHOAL_SEGMENTS``: the
owner's transitions are published expecting the last of these to be its claim."""
PROGRESS_PREFIX = "shoal.progress."
PROGRESS_WILDCARD = "shoal.progress.*"
"""How far each partition's output got (``shoal.progress.<partition>``): one record in
every atomic batch of its transitions, in ``SHOAL_SEGMENTS``."""
LEASES_BUCKET = "SHOAL_LEASES"
"""The KV bucket of the leases (``partition.<p>``) and the engines' heartbeats
(``engine.<id>``)."""
LEASES_STREAM = f"KV_{LEASES_BUCKET}"
"""The stream that holds :data:`LEASES_BUCKET`."""
LEASES_KEYS = f"$KV.{LEASES_BUCKET}.>"
"""The subjects of :data:`LEASES_BUCKET`'s keys."""
SNAPSHOTS_BUCKET = "SHOAL_SNAPSHOTS"
"""The Object Store bucket of the partitions' snapshots."""
SNAPSHOTS_STREAM = f"OBJ_{SNAPSHOTS_BUCKET}"
"""The stream that holds :data:`SNAPSHOTS_BUCKET`."""
SNAPSHOTS_SUBJECTS = f"$O.{SNAPSHOTS_BUCKET}.>"
"""The subjects of :data:`SNAPSHOTS_BUCKET`'s chunks and infos."""
_ENGINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def fence_subject(partition: int) -> str:
    """The subject of ``partition``'s claims: ``shoal.fence.<partition>``."""
    return f"{FENCE_PREFIX}{_partition_token(partition)}"


def progress_subject(partition: int) -> str:
    """The subject of ``partition``'s progress records: ``shoal.progress.<partition>``."""
    return f"{PROGRESS_PREFIX}{_partition_token(partition)}"


def lease_key(partition: int) -> str:
    """The key of ``partition``'s lease in :data:`LEASES_BUCKET`."""
    return f"partition.{_partition_token(partition)}"


def heartbeat_key(engine_id: str) -> str:
    """The key of an engine's heartbeat in :data:`LEASES_BUCKET`."""
    return f"engine.{validate_engine_id(engine_id)}"


def validate_engine_id(engine_id: str) -> str:
    """Return ``engine_id`` if it can name an engine: 1 to 64 of ``A-Z a-z 0-9 _ -``.

    Raises:
        SubjectError: it cannot.
    """
    if _ENGINE_ID.fullmatch(engine_id) is None:
        raise SubjectError(f"engine id {engine_id!r} must be 1 to 64 letters, digits, '_' or '-'")
    return engine_id


def _partition_token(partition: int) -> str:
    if partition < 0:
        raise SubjectError(f"a partition is a number from 0, not {partition}")
    return str(partition)
