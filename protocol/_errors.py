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
