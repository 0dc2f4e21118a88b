"""The roles that connect to shoal's broker and the least NATS permissions each needs: the one
generator of the nats-server configuration that enforces them.

Four roles: ``engine`` (``shoal serve``, ``shoal rebuild`` and ``shoal migrate``: shoal's
streams, its consumer, the transitions, the query service, the definitions in force in the
KV bucket ``SHOAL_DEFINITIONS``, and the republishing of an earlier shoal's events stream),
``producer`` (publishes events, nothing else), ``subscriber`` (reads transitions, through
its own consumers of ``SHOAL_SEGMENTS`` too, and the list of segments) and ``operator``
(every query, definitions, unparking, the rejected events of ``SHOAL_REJECTED``, which it
may publish again as events, and imports of history into ``SHOAL_EVENTS``: besides the
engine migrating a stream, only it may publish the import markers). The
``SHOAL_DEFINITIONS`` bucket (its chunked lists included) is the engine's alone: an operator
changes the definitions through the query API (``shoal.api.definitions``), which the engine
applies and stores, and needs no access to it.

Each role's subjects are listed exactly: the JetStream API subjects name shoal's streams, so
no role can touch the streams of anyone else, and only the engine can create, update or
delete them (the operator deletes one message of ``SHOAL_REJECTED`` once it republished
it). The subjects here are those nats-py sends (``nats.js``), and those
the ``nats`` CLI, nats.js and nats-py use to read the streams a role may read.

Replies come back on inboxes: with NATS's default ``_INBOX.>`` for all, any client allowed to
subscribe to inboxes could read every other client's replies (customers' states, the
engine's JetStream answers). So each role gets its own prefix, ``_INBOX.shoal.<role>``
(:func:`inbox_prefix`): a client of a role must use it (nats-py's ``inbox_prefix``, the
``nats`` CLI's ``--inbox-prefix``, nats.js's ``inboxPrefix``), and may subscribe under it
only. The push consumers a role creates deliver there too.

Later features add their subjects here, and ``shoal auth permissions`` prints the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ._backups import BACKUP_STREAMS
from ._definitions import DEFINITIONS_BUCKET, DEFINITIONS_KEYS, DEFINITIONS_STREAM
from ._subjects import (
    API_ENDPOINTS,
    API_SERVICE,
    CONTROL_WILDCARD,
    CUSTOMER_ENDPOINTS,
    EVENTS_PUBLISHED,
    EVENTS_STREAM,
    FENCE_WILDCARD,
    IMPORT_MARKERS,
    LEASES_KEYS,
    LEASES_STREAM,
    PROGRESS_WILDCARD,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    SNAPSHOTS_STREAM,
    SNAPSHOTS_SUBJECTS,
    STORED_EVENTS,
    api_subject,
    customer_api_wildcard,
    legacy_customer_api_filter,
)

ROLES: tuple[str, ...] = ("engine", "producer", "subscriber", "operator")
"""Every role, in the order ``shoal auth permissions`` prints them."""

_INBOX_ROOT = "_INBOX.shoal"
_JS = "$JS.API"
_STREAMS = (EVENTS_STREAM, SEGMENTS_STREAM, REJECTED_STREAM)


def inbox_prefix(role: str) -> str:
    """The prefix of the reply inboxes a client of ``role`` uses: ``_INBOX.shoal.<role>``.

    Each role may subscribe under its own prefix only, so no role reads another's replies.

    Raises:
        ValueError: ``role`` is not one of :data:`ROLES`.
    """
    return f"{_INBOX_ROOT}.{_known(role)}"


def _known(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    return role


def _read_stream(stream: str) -> list[str]:
    """What reading ``stream`` through consumers of one's own takes: push or pull, durable
    or ephemeral (nats-py's ordered consumer included), and acknowledging them."""
    return [
        f"{_JS}.STREAM.INFO.{stream}",
        # Ephemeral consumers without a name (nats-py's ordered consumer), named ones
        # (nats-server 2.9 and later), and durable ones the older way.
        f"{_JS}.CONSUMER.CREATE.{stream}",
        f"{_JS}.CONSUMER.CREATE.{stream}.>",
        f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{_JS}.CONSUMER.INFO.{stream}.*",
        f"{_JS}.CONSUMER.DELETE.{stream}.*",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{_JS}.CONSUMER.LIST.{stream}",
        f"{_JS}.CONSUMER.NAMES.{stream}",
        f"$JS.ACK.{stream}.>",
        # Flow control of push consumers: the replies to the server's checks.
        f"$JS.FC.{stream}.>",
    ]


# The subjects of the query service's discovery (nats.micro): $SRV.PING, $SRV.PING.shoal,
# $SRV.PING.shoal.<id>, and the same for INFO and STATS.
_SERVICE_DISCOVERY = ("$SRV.*", f"$SRV.*.{API_SERVICE}", f"$SRV.*.{API_SERVICE}.*")


@dataclass(frozen=True, slots=True)
class _Role:
    summary: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def _api_requests() -> tuple[str, ...]:
    """The subjects of every request to the query service: about one customer on its
    partition's subject (``shoal.api.customer.<partition>.<customer>``) and on the subject of
    earlier versions (answered by forwarding), and the others on their own."""
    per_customer = [
        subject
        for endpoint in CUSTOMER_ENDPOINTS
        for subject in (customer_api_wildcard(endpoint), legacy_customer_api_filter(endpoint))
    ]
    others = [api_subject(e) for e in API_ENDPOINTS if e not in CUSTOMER_ENDPOINTS]
    return (*per_customer, *others)


def _engine() -> _Role:
    js: list[str] = []
    for stream in _STREAMS:
        # Declared at start-up: created, or updated to this version's configuration.
        js += [f"{_JS}.STREAM.{op}.{stream}" for op in ("INFO", "CREATE", "UPDATE")]
        # `shoal rebuild --from-stream` reads each with an ordered consumer.
        js += [f"{_JS}.CONSUMER.CREATE.{stream}", f"{_JS}.CONSUMER.INFO.{stream}.*"]
        js.append(f"$JS.FC.{stream}.>")
    js += [
        # The engine's durable consumer, recreated at each start past its floor.
        f"{_JS}.CONSUMER.CREATE.{EVENTS_STREAM}.>",
        f"{_JS}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.*",
        f"{_JS}.CONSUMER.DELETE.{EVENTS_STREAM}.*",
        f"$JS.ACK.{EVENTS_STREAM}.>",
        # On a replicated SHOAL_EVENTS, the deadline barrier reads each partition's last
        # message from the stream's leader, and deletes the probes it publishes.
        f"{_JS}.STREAM.MSG.GET.{EVENTS_STREAM}",
        f"{_JS}.STREAM.MSG.DELETE.{EVENTS_STREAM}",
        # shoal migrate: the stream of an earlier shoal replaced by a partitioned one, into
        # which its messages are republished on their stored subjects, markers included.
        f"{_JS}.STREAM.DELETE.{EVENTS_STREAM}",
        # The definitions in force (KV bucket SHOAL_DEFINITIONS): found or created at start,
        # read key by key, written (and old chunks purged) by publishing on its keys.
        f"{_JS}.STREAM.INFO.{DEFINITIONS_STREAM}",
        f"{_JS}.STREAM.CREATE.{DEFINITIONS_STREAM}",
        # Its format recorded in its metadata (a bucket made by shoal 484eaec or earlier).
        f"{_JS}.STREAM.UPDATE.{DEFINITIONS_STREAM}",
        f"{_JS}.STREAM.MSG.GET.{DEFINITIONS_STREAM}",
        DEFINITIONS_KEYS,
        # Several engines: the leases and heartbeats (KV bucket SHOAL_LEASES: declared,
        # read by direct gets, written on its keys, watched by an ordered consumer) and
        # each partition's last claim, read from SHOAL_SEGMENTS.
        *(f"{_JS}.STREAM.{op}.{LEASES_STREAM}" for op in ("INFO", "CREATE", "UPDATE")),
        f"{_JS}.STREAM.MSG.GET.{LEASES_STREAM}",
        f"{_JS}.DIRECT.GET.{LEASES_STREAM}",
        f"{_JS}.CONSUMER.CREATE.{LEASES_STREAM}",
        f"{_JS}.CONSUMER.CREATE.{LEASES_STREAM}.>",
        f"{_JS}.CONSUMER.INFO.{LEASES_STREAM}.*",
        f"{_JS}.CONSUMER.DELETE.{LEASES_STREAM}.*",
        f"$JS.FC.{LEASES_STREAM}.>",
        LEASES_KEYS,
        f"{_JS}.STREAM.MSG.GET.{SEGMENTS_STREAM}",
        # The partitions' snapshots (Object Store SHOAL_SNAPSHOTS): declared, written in
        # chunks (the replaced ones purged), read by a pull consumer of the engine's own.
        *(f"{_JS}.STREAM.{op}.{SNAPSHOTS_STREAM}" for op in ("INFO", "CREATE", "UPDATE")),
        f"{_JS}.STREAM.MSG.GET.{SNAPSHOTS_STREAM}",
        f"{_JS}.STREAM.PURGE.{SNAPSHOTS_STREAM}",
        f"{_JS}.CONSUMER.CREATE.{SNAPSHOTS_STREAM}.>",
        f"{_JS}.CONSUMER.MSG.NEXT.{SNAPSHOTS_STREAM}.*",
        f"{_JS}.CONSUMER.DELETE.{SNAPSHOTS_STREAM}.*",
        f"$JS.ACK.{SNAPSHOTS_STREAM}.>",
        SNAPSHOTS_SUBJECTS,
        # shoal forget: a forgotten customer's messages are erased one by one (a delete
        # overwrites the bytes, a purge does not), as are replaced snapshots' chunks.
        f"{_JS}.STREAM.MSG.DELETE.{REJECTED_STREAM}",
        f"{_JS}.STREAM.MSG.DELETE.{SEGMENTS_STREAM}",
        f"{_JS}.STREAM.MSG.DELETE.{SNAPSHOTS_STREAM}",
        # serve --retain: each owned partition's events up to what its snapshot's bases
        # hold are purged from the events stream (a purge filtered on the partition).
        f"{_JS}.STREAM.PURGE.{EVENTS_STREAM}",
        # shoal backup and shoal restore: each stream copied (its snapshot, sent in chunks
        # that are acknowledged) and made again on an empty broker from the copy.
        *_backup_and_restore(),
    ]
    return _Role(
        summary="shoal serve, rebuild, migrate, backup and restore: the streams, the engine's "
        f"consumers of {EVENTS_STREAM} and its definitions markers there, the transitions, "
        "the rejected events, the query service, the definitions in force (KV bucket "
        f"{DEFINITIONS_BUCKET}, the engine's alone), an earlier shoal's events "
        "republished by a migration, the erasure of forgotten customers (shoal forget), "
        f"the cut of {EVENTS_STREAM} behind a retention (serve --retain), and the streams' "
        "copies of a backup and a restore",
        publish=(
            SEGMENTS_WILDCARD,
            # Each partition's claims, and the progress record closing each atomic batch.
            FENCE_WILDCARD,
            PROGRESS_WILDCARD,
            REJECTED_SUBJECT,
            # shoal migrate: an earlier shoal's events on their stored subjects, and the
            # import markers; the engine: where it switched to new definitions, in each
            # partition's history (the definitions markers, which this covers).
            STORED_EVENTS,
            CONTROL_WILDCARD,
            *js,
            # The service asks itself whether it listens yet.
            f"$SRV.PING.{API_SERVICE}.*",
            # A request on the subject of earlier versions, forwarded to the partition's.
            *(customer_api_wildcard(endpoint) for endpoint in CUSTOMER_ENDPOINTS),
        ),
        subscribe=(inbox_prefix("engine") + ".>", *_api_requests(), *_SERVICE_DISCOVERY),
        # The query service answers requests on the requesters' inboxes.
        allow_responses=True,
    )


def _backup_and_restore() -> list[str]:
    """What ``shoal backup`` and ``shoal restore`` take beyond the engine's other subjects:
    each copied stream's snapshot and restore, and the subjects their chunks travel on."""
    subjects: list[str] = []
    for stream in BACKUP_STREAMS:
        subjects += [
            f"{_JS}.STREAM.INFO.{stream}",
            f"{_JS}.STREAM.SNAPSHOT.{stream}",
            f"$JS.SNAPSHOT.ACK.{stream}.>",
            f"{_JS}.STREAM.RESTORE.{stream}",
            f"$JS.SNAPSHOT.RESTORE.{stream}.>",
        ]
    return subjects


def _producer() -> _Role:
    return _Role(
        summary="shoal publish: publishes events, and gets JetStream's acknowledgements; "
        "creates no stream",
        # One customer token: SHOAL_EVENTS takes no other event subject, and the control
        # messages (import markers, more tokens) are not a producer's.
        publish=(EVENTS_PUBLISHED,),
        subscribe=(inbox_prefix("producer") + ".>",),
    )


def _subscriber() -> _Role:
    return _Role(
        summary="shoal tail, shoal segments list: reads transitions (live, or through "
        f"consumers of its own on {SEGMENTS_STREAM}) and the list of segments",
        publish=(api_subject("segments"), *_read_stream(SEGMENTS_STREAM)),
        subscribe=(inbox_prefix("subscriber") + ".>", SEGMENTS_WILDCARD),
    )


def _operator() -> _Role:
    return _Role(
        summary="shoal status, customer, explain, members, segments list|apply|validate, "
        "unpark, forget, rejected, import: every query and request, and definitions "
        f"through the API only (no access to the KV bucket {DEFINITIONS_BUCKET}); reads "
        f"the rejected events ({REJECTED_STREAM}) and republishes them (rejected "
        f"--republish); imports history into {EVENTS_STREAM} (its events and the import "
        "markers, which only the engine also may publish, for shoal migrate)",
        publish=(
            # Every request; $SRV.INFO.shoal (below) tells the number of partitions.
            *_api_requests(),
            # shoal import: the imported events, and the markers that frame them (one per
            # partition: the stream's configuration says how many).
            EVENTS_PUBLISHED,
            IMPORT_MARKERS,
            f"{_JS}.STREAM.INFO.{EVENTS_STREAM}",
            *_SERVICE_DISCOVERY[1:],
            *_read_stream(REJECTED_STREAM),
            f"{_JS}.STREAM.MSG.GET.{REJECTED_STREAM}",
            # rejected --republish: the events again, on their own subjects (the events'
            # subjects above), then their rejections out of quarantine (one message at a
            # time; never the stream).
            f"{_JS}.STREAM.MSG.DELETE.{REJECTED_STREAM}",
        ),
        subscribe=(inbox_prefix("operator") + ".>", REJECTED_SUBJECT),
    )


_ROLES = {
    "engine": _engine,
    "producer": _producer,
    "subscriber": _subscriber,
    "operator": _operator,
}


def known_tokens() -> frozenset[str]:
    """Every upper-case token of the roles' subjects (``$JS``, ``API``, ``SHOAL_EVENTS``...):
    nats-py hands the broker's errors over lower-cased, and these put a subject back."""
    return frozenset(
        token
        for build in _ROLES.values()
        for subject in (*build().publish, *build().subscribe)
        for token in subject.split(".")
        if token.isupper()
    )


def role_summary(role: str) -> str:
    """One line on who uses ``role`` and what it may do.

    Raises:
        ValueError: ``role`` is not one of :data:`ROLES`.
    """
    return _ROLES[_known(role)]().summary


def _quoted(subjects: Iterable[str], indent: str) -> str:
    # Quoted: nats-server reads an unquoted $NAME as a variable.
    return ",\n".join(f'{indent}"{s}"' for s in subjects)


def permissions_block(role: str) -> str:
    """The nats-server permissions of ``role``, as the ``permissions: {...}`` entry of a user
    in a server configuration (``authorization { users = [ {..., permissions: {...}} ] }``,
    or an account's ``users``). Multi-line, without a trailing newline.

    Raises:
        ValueError: ``role`` is not one of :data:`ROLES`.
    """
    r = _ROLES[_known(role)]()
    lines = [
        "permissions: {",
        "  publish: {",
        "    allow: [",
        _quoted(r.publish, "      "),
        "    ]",
        "  }",
        "  subscribe: {",
        "    allow: [",
        _quoted(r.subscribe, "      "),
        "    ]",
        "  }",
    ]
    if r.allow_responses:
        lines.append("  allow_responses: true")
    lines.append("}")
    return "\n".join(lines)


def _indented(text: str, indent: str) -> str:
    return "\n".join(indent + line if line else line for line in text.splitlines())


def nkey_users_config(public_keys: Mapping[str, str]) -> str:
    """A nats-server ``authorization`` block with one NKey user per role: ``public_keys``
    maps a role to its public user key (``U...``). A client that is none of them is refused.

    Raises:
        ValueError: a role is unknown, or a key is not a public user NKey.
    """
    entries: list[str] = []
    for role, key in public_keys.items():
        _known(role)
        if not (key.startswith("U") and key.isalnum() and key.isupper()):
            raise ValueError(f"the key of role {role!r} is not a public user NKey (U...)")
        entries.append(
            f"    # {role}\n    {{\n      nkey: {key}\n"
            f"{_indented(permissions_block(role), '      ')}\n    }}"
        )
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"
