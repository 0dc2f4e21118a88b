"""Request and reply bodies of the query service ``shoal`` (endpoints under ``shoal.api.``).

JSON on the wire. Instants are RFC 3339 text in UTC, as in transitions. Requests reject
unknown fields, so a misspelt one is an error rather than silently ignored. A request that
needs no body (``customer``, ``segments``, ``status``) may be sent empty.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from ._explain import SegmentExplanation
from ._limits import MAX_ID_CHARS

MAX_PAGE = 10_000
"""The most members one ``members`` request returns."""
MAX_PARKED_SHOWN = 100
"""The most parked customers ``status`` lists (it counts them all)."""
MAX_SEARCH = 1_000
"""The most customer ids one ``search`` request returns."""
MAX_PREFIX_CHARS = MAX_ID_CHARS
"""The longest prefix a ``search`` request takes: no customer id is longer."""


# Requests ---------------------------------------------------------------------------------


class CustomerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.customer.<customer>``: no fields (the customer is in the subject)."""


class ExplainRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.explain.<customer>``: explain one segment, or every segment when None."""

    segment: str | None = None


class SegmentsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.segments``: no fields."""


class MembersRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.members``: a page of a segment's members, in customer id order.

    ``cursor`` is the ``next_cursor`` of the previous page (the last id it held); the page
    starts after it. ``count_only`` leaves the members out and answers with the count alone.
    """

    segment: str
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 100
    cursor: str | None = None
    count_only: bool = False


class SearchRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.search``: the ids of customers that start with ``prefix``, in id order.

    ``limit`` caps the ids returned; the reply says whether there were more.
    """

    prefix: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PREFIX_CHARS)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEARCH)] = 100


CLIENT_HEADER = "Shoal-Client"
"""The header of a ``definitions`` request that says who sends it (``shoal segments apply``:
``user@host``); the engine stores it with the definitions it applies. Optional."""
MAX_CLIENT_CHARS = 200
"""The most of :data:`CLIENT_HEADER` the engine keeps."""


def client_of(value: str | None) -> str | None:
    """The :data:`CLIENT_HEADER` value as the engine keeps it: printable, at most
    :data:`MAX_CLIENT_CHARS` characters; None when absent or empty."""
    if not value:
        return None
    shown = "".join(c if c.isprintable() else "?" for c in value[:MAX_CLIENT_CHARS])
    return shown.strip() or None


class DefinitionsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.definitions``: a segments file (TOML text) to validate, and to apply when
    ``apply`` is true. ``source`` names it in error messages (usually its file name).

    Definitions sent over the network are data: the engine reads no file for them, so their
    lists carry their ids by value (``customers = [...]``) and a ``[lists.NAME] file`` is
    refused. ``shoal segments apply`` reads list files on the user's machine and sends
    their ids.
    """

    toml: str
    source: str = "<request>"
    apply: bool = False
    legacy_base_dir: str | None | msgspec.UnsetType = msgspec.field(
        default=msgspec.UNSET, name="base_dir"
    )
    """``base_dir``, which older clients send (it was where list files were looked up): it
    is accepted and ignored, so their requests without list files still work. Never sent."""


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.status``: no fields."""


MAX_UNPARK = 1_000
"""The most customers one ``unpark`` request names."""


class UnparkRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.unpark``: try these parked customers again (an operator's request)."""

    customer_ids: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_UNPARK)]


# Replies ----------------------------------------------------------------------------------


class Membership(msgspec.Struct, frozen=True, kw_only=True):
    """A segment the customer is in, and the instant it entered."""

    segment: str
    entered_at: datetime


class EventCounter(msgspec.Struct, frozen=True, kw_only=True):
    """What the rules read of one track event name (``event`` None: any track event).

    ``count`` and ``last_at`` cover all the customer's events of that name. ``within_7d`` and
    ``within_30d`` count those of the last 7 and 30 days; they are None when the rules keep
    no instants of that name (no window or score reads it).
    """

    event: str | None
    count: int
    last_at: datetime | None
    within_7d: int | None = None
    within_30d: int | None = None


class CustomerReply(msgspec.Struct, frozen=True, kw_only=True):
    """The state of one customer, as the engine holds it, at ``at`` (the engine's now).

    ``evaluated_at`` is the instant up to which its segments are evaluated (its latest event
    or fired deadline). ``score`` is the engagement score now, None when the rules read no
    score. ``traits`` holds the traits the rules read (others are not kept). ``next_deadline``
    is the next instant a membership can change without an event.
    """

    customer_id: str
    at: datetime
    evaluated_at: datetime | None
    first_seen_at: datetime | None
    version: int
    segments: list[Membership]
    score: float | None
    traits: dict[str, Any]
    events: list[EventCounter]
    next_deadline: datetime | None


class ExplainReply(msgspec.Struct, frozen=True, kw_only=True):
    """Why the customer is or is not in each segment asked about (in file order), evaluated
    at ``at`` (the engine's now)."""

    customer_id: str
    at: datetime
    segments: list[SegmentExplanation]


class SegmentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One definition in force, and how many customers are in it."""

    name: str
    description: str
    rule: str
    exit: str | None
    min_dwell_seconds: float
    size: int


class SegmentsReply(msgspec.Struct, frozen=True, kw_only=True):
    """The definitions in force (in file order) with their sizes.

    ``complete`` is false while the engine still loads customers after a restart: sizes then
    count only those loaded so far (``customers``).

    Gathered from every engine (API 1.2): ``partition_count`` is P, the number of
    partitions, and ``partitions`` those the reply covers (the answering engine's, or, merged
    by the client, those of every engine that answered); ``missing_partitions``, set by the
    client that gathers (:class:`protocol.nats.ApiClient`), those no engine answered for in
    time, and ``complete`` is then false. An engine older than 1.2 sends none of them.
    """

    source: str
    fingerprint: str
    customers: int
    complete: bool
    segments: list[SegmentInfo]
    partition_count: int | None = None
    partitions: list[int] = msgspec.field(default_factory=list)
    missing_partitions: list[int] = msgspec.field(default_factory=list)


class MembersReply(msgspec.Struct, frozen=True, kw_only=True):
    """A page of members (empty with ``count_only``) and the segment's size.

    ``next_cursor`` is the cursor of the next page, None after the last one. A page holds at
    most the ``limit`` asked for, and fewer when more would not fit in one message of the
    broker (its ``max_payload``): page on with ``next_cursor`` either way.

    Gathered from every engine (API 1.2): ``partition_count`` is P, the number of
    partitions, and ``partitions`` those the reply covers (the answering engine's, or, merged
    by the client, those of every engine that answered); ``missing_partitions``, set by the
    client that gathers (:class:`protocol.nats.ApiClient`), those no engine answered for in
    time, and ``complete`` is then false. An engine older than 1.2 sends none of them.
    """

    segment: str
    count: int
    complete: bool
    members: list[str]
    next_cursor: str | None
    true_since: list[datetime] = msgspec.field(default_factory=list)
    """The instant each member entered the segment (the rule became true), in the order of
    ``members``. Absent from the replies of engines older than API 1.1."""
    partition_count: int | None = None
    partitions: list[int] = msgspec.field(default_factory=list)
    missing_partitions: list[int] = msgspec.field(default_factory=list)


class SearchReply(msgspec.Struct, frozen=True, kw_only=True):
    """The customers whose id starts with ``prefix``, in id order, at most the ``limit``
    asked for (fewer when more would not fit in one message). ``more`` is true when others
    match too: ask with a longer prefix. ``complete`` is false while the engine still loads
    customers after a restart (only those loaded so far are searched).

    Gathered from every engine (API 1.2): ``partition_count`` is P, the number of
    partitions, and ``partitions`` those the reply covers (the answering engine's, or, merged
    by the client, those of every engine that answered); ``missing_partitions``, set by the
    client that gathers (:class:`protocol.nats.ApiClient`), those no engine answered for in
    time, and ``complete`` is then false. An engine older than 1.2 sends none of them.
    """

    prefix: str
    customers: list[str]
    more: bool
    complete: bool
    partition_count: int | None = None
    partitions: list[int] = msgspec.field(default_factory=list)
    missing_partitions: list[int] = msgspec.field(default_factory=list)


class DefinitionsReply(msgspec.Struct, frozen=True, kw_only=True):
    """A segments file that is valid, how it differs from the definitions in force, and
    whether it was applied.

    ``transitions``: how many membership changes applying it made (None when not applied).
    """

    source: str
    fingerprint: str
    segments: list[str]
    added: list[str]
    removed: list[str]
    changed: list[str]
    """Segments whose rule, exit or ``min_dwell`` differ from those in force."""
    refolds: bool
    """Whether the rules read facts the ones in force do not: applying them first reads the
    whole event log again (as long as a rebuild at start)."""
    applied: bool
    transitions: int | None


class ParkedInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A customer the engine set aside after an error no message could be blamed for: not
    evaluated until tried again (``shoal unpark``, a change of definitions, an upgrade); its
    events are still logged, and applied then. ``during`` says what the engine was doing
    (``deadline``, ``snapshot``, ``definitions``, ``load``, ``quarantine``, ``unpark``)."""

    customer_id: str
    reason: str
    during: str
    parked_at: datetime


class UnparkReply(msgspec.Struct, frozen=True, kw_only=True):
    """``unparked``: tried again and back in the engine, their events since applied.
    ``parked``: tried again and failed again (with this attempt's error). ``not_parked``:
    named but not parked.

    Gathered from every engine (API 1.3): each engine tries the ids of the partitions it
    owns (``partitions``, of ``partition_count``) and lists only those. The client that
    gathers (:class:`protocol.nats.ApiClient`) merges the replies, and lists in
    ``unanswered`` the ids whose partition no engine answered for in time
    (``missing_partitions``): not tried. An engine older than 1.3 sends none of these: it
    answers for every id.
    """

    unparked: list[str]
    parked: list[ParkedInfo]
    not_parked: list[str]
    partition_count: int | None = None
    partitions: list[int] = msgspec.field(default_factory=list)
    missing_partitions: list[int] = msgspec.field(default_factory=list)
    unanswered: list[str] = msgspec.field(default_factory=list)


class SegmentSize(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    size: int


class DefinitionsApplied(msgspec.Struct, frozen=True, kw_only=True):
    """The stored version of the definitions in force: when and from where they were applied
    (``StatusReply.definitions_applied``)."""

    version: int
    """1 for the first definitions the engine stored, one more for each applied after."""
    applied_at: datetime
    origin: Literal["file", "api"]
    """``file``: the served segments file; ``api``: applied over the query API (``shoal
    segments apply``)."""
    source: str
    """The served file's path, or the name the API request gave (its file's path)."""
    content_hash: str | None = None
    """SHA-256 of the served file's text and lists (``file`` only)."""
    client: str | None = None
    """Who applied them over the API, when the request said."""


class PartitionLease(msgspec.Struct, frozen=True, kw_only=True):
    """A partition the engine owns: its claim (the stream sequence of its fence record),
    how long ago its lease was last renewed, and whether the engine took it over from
    another (rebuilt from its snapshot)."""

    partition: int
    claim: int
    lease_age: float
    """Seconds since the lease was last written (renewed three times per TTL)."""
    taken_over: bool = False


class Ownership(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine among several owns, and how often partitions changed hands."""

    engine_id: str
    leases: list[PartitionLease] = msgspec.field(default_factory=list)
    lease_ttl: int = 0
    takeovers: int = 0
    """Partitions taken over from another engine since it started."""
    handovers: int = 0
    """Partitions handed over to another engine since it started."""
    lost: int = 0
    """Partitions lost since it started (its lease passed, or it was fenced out)."""
    terms: int = 0
    """Terms begun since it started: one per change of the partitions it owns."""


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    """How the engine that answered is doing, at ``at`` (its now).

    ``events_per_second`` is the rate of events applied over the last 10 s. ``consumer_lag``
    counts events the broker holds for the engine not yet acknowledged (None when the broker
    did not answer). ``unpublished`` counts committed transitions not yet confirmed by the
    broker. ``warm`` is false while customers still load after a restart.
    """

    at: datetime
    consumer: str
    filter_subject: str
    warm: bool
    customers: int
    events_applied: int
    events_duplicate: int
    events_rejected: int
    events_per_second: float
    consumer_lag: int | None
    buffered: int
    transitions: int
    unpublished: int
    deadlines_fired: int
    pending_deadlines: int
    next_deadline: datetime | None
    definitions: str
    fingerprint: str
    segments: list[SegmentSize]
    events_quarantined: int = 0
    """Events that raised while applied: rejected with the error (in ``events_rejected``)."""
    parked: int = 0
    """Customers parked now."""
    parked_customers: list[ParkedInfo] = msgspec.field(default_factory=list)
    """The first :data:`MAX_PARKED_SHOWN` of them, in id order."""
    paused: str | None = None
    """Why ingestion is paused (``disk full at <path>``: it resumes by itself), or None."""
    ownership: Ownership | None = None
    """The engine's id, its partitions' leases and the count of takeovers (None: an engine
    run without claims)."""
    definitions_applied: DefinitionsApplied | None = None
    """The stored version of the definitions in force, when and from where they were applied
    (None: an engine that stores none, or an older one)."""
    imports_open: list[str] = msgspec.field(default_factory=list)
    """The imports begun and not yet ended (``shoal import``), by id."""
    imports_applied: list[str] = msgspec.field(default_factory=list)
    """The ids of the latest imports the engine applied since it started (at most 64), the
    latest last."""
    partition_count: int | None = None
    partitions: list[int] = msgspec.field(default_factory=list)
    missing_partitions: list[int] = msgspec.field(default_factory=list)
    """Gathered from every engine (API 1.2), as in :class:`SegmentsReply`."""


class GatheredStatus(StatusReply, frozen=True, kw_only=True):
    """The status of every engine, as :meth:`protocol.nats.ApiClient.status` gathers it:
    ``engines`` holds each engine's reply (in the order of their lowest partition), and the
    fields it shares with :class:`StatusReply` combine them. Counts, rates, sizes and lags
    are summed (``consumer_lag`` None when an engine's is unknown); ``warm`` holds when every
    engine is warm; ``next_deadline`` is the earliest; the parked customers and imports are
    merged. Fields that name one engine's setup (``at``, ``consumer``, ``filter_subject``,
    ``definitions``, ``fingerprint``, ``paused``, ``definitions_applied``) are those of the
    first engine that has one. Never sent by an engine."""

    engines: list[StatusReply] = msgspec.field(default_factory=list)
    complete: bool = True
    """False when partitions are missing (``missing_partitions``): no engine answered for
    them in time, so the counts leave their customers out."""


customer_request_decoder = msgspec.json.Decoder(CustomerRequest)
explain_request_decoder = msgspec.json.Decoder(ExplainRequest)
segments_request_decoder = msgspec.json.Decoder(SegmentsRequest)
members_request_decoder = msgspec.json.Decoder(MembersRequest)
search_request_decoder = msgspec.json.Decoder(SearchRequest)
definitions_request_decoder = msgspec.json.Decoder(DefinitionsRequest)
status_request_decoder = msgspec.json.Decoder(StatusRequest)
unpark_request_decoder = msgspec.json.Decoder(UnparkRequest)
