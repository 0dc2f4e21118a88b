"""The exceptions raised by :mod:`protocol`."""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocol`."""


class SubjectError(ProtocolError, ValueError):
    """A subject, subject token or customer id cannot be used as given."""


class BrokerError(ProtocolError):
    """The NATS server could not be started, reached or configured.

    The message is one line meant for a person: what went wrong and what to do.
    """


class ApiError(ProtocolError):
    """A request to the shoal API could not be answered.

    ``code`` is the micro error code sent in the ``Nats-Service-Error-Code`` header (HTTP-like:
    400 the request is wrong, 404 it names something that does not exist, 503 no engine can
    answer now, 500 the engine failed); the message is the ``Nats-Service-Error`` header.
    """

    code = "500"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(ApiError):
    """The request body, or the segments file it carries, is not valid: fix it and retry."""

    code = "400"


class UnknownCustomer(ApiError):
    """No customer with this id is known to the engine that owns it."""

    code = "404"

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"unknown customer {customer_id!r}")
        self.customer_id = customer_id


class CustomerParked(ApiError):
    """The customer is parked: set aside after an error, until tried again."""

    code = "409"

    def __init__(self, customer_id: str, reason: str, since: str) -> None:
        super().__init__(
            f"customer {customer_id!r} is parked since {since} after an error: {reason} "
            f"(its events are kept; `shoal unpark {customer_id}` tries it again)"
        )
        self.customer_id = customer_id


class UnknownSegment(ApiError):
    """No segment of this name is defined; ``known`` lists those that are."""

    code = "404"

    def __init__(self, segment: str, known: tuple[str, ...]) -> None:
        shown = ", ".join(known[:10]) if known else "none"
        if len(known) > 10:
            shown += f" and {len(known) - 10} more"
        super().__init__(f"unknown segment {segment!r}; the segments defined are: {shown}")
        self.segment = segment
        self.known = known


class EngineUnavailable(ApiError):
    """No engine answered, or the engine cannot answer now (starting or stopping): retry."""

    code = "503"


class DefinitionsSuperseded(ApiError):
    """Definitions sent to be applied were not: another engine sharing the broker stored
    a version of its own first (two changes at once). Every engine follows that one; look
    at it (``shoal status``) and apply again if still wanted."""

    code = "409"


class EnginesDisagree(ApiError):
    """The engines answering a gathered request hold different definitions (an apply
    reaches them one at a time): ask again. ``fingerprints`` maps each fingerprint to the
    partitions whose engines hold it (as runs, ``0-15``)."""

    code = "409"

    def __init__(self, fingerprints: dict[str, str], subject: str) -> None:
        shown = "; ".join(f"partitions {ps} have {f}" for f, ps in fingerprints.items())
        super().__init__(
            f"the engines answering on {subject} hold different definitions ({shown}): "
            "definitions being applied reach them one at a time; ask again"
        )
        self.fingerprints = fingerprints


class PermissionDenied(BrokerError):
    """The broker refused a publish or a subscription: the credentials' role may not use
    ``subject``. ``action`` is ``"publish"`` or ``"subscribe"``; ``role`` is None when the
    credentials' role is not known."""

    def __init__(self, role: str | None, action: str, subject: str, *, hint: str = "") -> None:
        who = f"role {role}" if role else "these credentials"
        super().__init__(
            f"permission denied: {who} may not {action} to {subject}"
            + (f" ({hint})" if hint else "")
        )
        self.role = role
        self.action = action
        self.subject = subject


# Several engines: leases and fences ---------------------------------------------------------


class Unconfirmed(BrokerError):
    """The broker did not confirm a write (no answer in time, the connection dropped, the
    stream had no leader, or another write checking the same key was in flight): it may have
    been stored or not. Retry it, within your own deadline (a lease's, say); a retry tells
    which it was. ``operation`` says what was tried, ``where`` on which key or subject."""

    def __init__(self, operation: str, where: str, reason: str) -> None:
        super().__init__(
            f"the broker did not confirm {operation} on {where} ({reason}): "
            "it may have been stored or not; try again"
        )
        self.operation = operation
        self.where = where
        self.reason = reason


class LeaseLost(BrokerError):
    """A lease (or an engine's heartbeat) is no longer the caller's: it expired, or another
    engine took it. Stop the work it guarded at once. ``key`` is the key in the leases
    bucket, ``partition`` the partition it leases (None for a heartbeat), ``revision`` the
    caller's last revision of it, ``current`` the key's revision now when the broker said
    (None when the key is empty)."""

    def __init__(
        self,
        key: str,
        engine: str,
        revision: int,
        current: int | None,
        *,
        partition: int | None = None,
    ) -> None:
        now = f"the key is now at revision {current}" if current else "the key is empty"
        super().__init__(
            f"engine {engine} lost {key} (its revision {revision}; {now}): it expired or "
            "another engine took it; stop the work it guarded"
        )
        self.key = key
        self.engine = engine
        self.revision = revision
        self.current = current
        self.partition = partition


class EngineIdInUse(BrokerError):
    """An engine's heartbeat could not start: a live heartbeat under the same engine id is
    in the leases bucket. Another engine runs with this id, or this engine restarted before
    its last heartbeat expired (``ttl`` seconds after ``revision`` was written)."""

    def __init__(self, engine: str, revision: int, ttl: int | None) -> None:
        expiry = f" (its TTL is {ttl} s)" if ttl else ""
        super().__init__(
            f"engine id {engine} is in use: its heartbeat is live at revision {revision}"
            f"{expiry}; another engine runs with this id, or this one restarted before its "
            "last heartbeat expired: wait for it to expire, or give another id"
        )
        self.engine = engine
        self.revision = revision
        self.ttl = ttl


class Fenced(BrokerError):
    """Another engine claimed the partition: the last claim on its fence subject is not the
    one the refused write expected. Stop publishing the partition's output (everything
    published under the old claim is refused from now on) and let its lease go.
    ``sequence`` is the last claim's stream sequence as the broker reported it (None if its
    answer did not say)."""

    def __init__(self, partition: int, subject: str, sequence: int | None) -> None:
        last = f"sequence {sequence}" if sequence is not None else "another"
        super().__init__(
            f"partition {partition} is fenced: the last claim on {subject} is {last}, not the "
            "one expected; another engine claimed the partition, so stop publishing its output"
        )
        self.partition = partition
        self.subject = subject
        self.sequence = sequence


class UnreadableRecord(ProtocolError):
    """A lease, heartbeat or fence record in the broker is not one shoal wrote: ``where``
    names the record (its key or subject, and its sequence), ``problem`` what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(
            f"the record {where} cannot be read: {problem} (shoal did not write it: "
            "replace or remove it)"
        )
        self.where = where
        self.problem = problem
