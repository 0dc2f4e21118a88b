"""Forgetting a customer (``shoal forget``): the wire types of the request and of the order
an engine acts on, and the hash that stands for a forgotten id.

A request (``shoal.api.forget``, an operator's) names customers. The engine that takes it
publishes one :class:`ForgetOrder` per customer into the customer's partition
(``shoal.events.<partition>.ctl.forget``), so that the partition's owner acts on it in
stream order with the customer's events: it publishes an ``exited`` transition (cause
``forgotten``) for each segment the customer is in, erases the customer's data from its
store and from the broker's streams, and keeps only :func:`forget_hash` of the id, with the
customer's last version (so that an id that comes back continues its versions), when and
by whom it was forgotten, and how long its events are refused (``--suppress``). The order
itself holds the id, so it is erased too once acted on.
"""

from __future__ import annotations

import hashlib

import msgspec

from ._errors import InvalidRequest
from ._limits import MAX_ID_CHARS

MAX_FORGET = 1_000
"""The most customers one ``forget`` request names."""
MAX_REQUESTER_CHARS = 128
"""The longest ``by`` (who asked) a request may give."""
MAX_SUPPRESS_SECONDS = 100 * 366 * 86_400
"""The longest suppression a request may ask for: a century."""
_HASH_DOMAIN = b"shoal-forget\x00"


def forget_hash(customer_id: str) -> str:
    """What stands for a forgotten customer id: the hex SHA-256 of the id's UTF-8 bytes
    after a fixed prefix.

    It is not a secret: whoever can guess an id can confirm it was forgotten (and so can
    anyone holding the id who asks the suppression list). It keeps the id itself out of
    every record shoal keeps after erasure.
    """
    return hashlib.sha256(_HASH_DOMAIN + customer_id.encode("utf-8", "surrogatepass")).hexdigest()


class ForgetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``shoal.api.forget``: erase these customers everywhere shoal keeps data (an
    operator's request)."""

    customer_ids: list[str]
    by: str
    """Who asks (for the record of the erasure): a name the operator gives, not checked
    against the credentials."""
    suppress_seconds: int | None = None
    """Refuse the customers' later events for this long (None: an id that comes back is a
    customer again, continuing its versions)."""
    wait_seconds: float = 30.0
    """How long the engine waits for the erasures to finish before replying (0: reply once
    the orders are stored)."""

    def check(self) -> None:
        """Refuse what is out of bounds.

        Raises:
            InvalidRequest: no ids or too many, an empty or too long id, a ``by`` empty or too
                long, a suppression not positive or over a century, a wait out of 0-300 s.
        """
        if not self.customer_ids:
            raise InvalidRequest("invalid request: no customer to forget")
        if len(self.customer_ids) > MAX_FORGET:
            raise InvalidRequest(
                f"invalid request: {len(self.customer_ids)} customers, over the limit of "
                f"{MAX_FORGET} per request"
            )
        for customer_id in self.customer_ids:
            if not customer_id or len(customer_id) > MAX_ID_CHARS:
                raise InvalidRequest(
                    f"invalid request: a customer id must have 1 to {MAX_ID_CHARS} characters"
                )
        if not self.by.strip() or len(self.by) > MAX_REQUESTER_CHARS:
            raise InvalidRequest(
                f"invalid request: 'by' (who asks) must have 1 to {MAX_REQUESTER_CHARS} characters"
            )
        if self.suppress_seconds is not None and not (
            0 < self.suppress_seconds <= MAX_SUPPRESS_SECONDS
        ):
            raise InvalidRequest(
                "invalid request: a suppression must last more than 0 s and at most a century"
            )
        if not 0 <= self.wait_seconds <= 300:
            raise InvalidRequest("invalid request: wait_seconds must be within 0-300")


class ForgottenCustomer(msgspec.Struct, frozen=True, kw_only=True):
    """One customer of a :class:`ForgetReply`: its hash (never its id), its partition, the
    stream position of its order, and whether its erasure finished within the wait."""

    hash: str
    partition: int
    order: int
    done: bool


class ForgetReply(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``forget``: each customer's order, in the order asked."""

    request: str
    """The request's id, in every order and every record of the erasure."""
    customers: list[ForgottenCustomer]


class ForgetOrder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The order to forget one customer, in its partition of ``SHOAL_EVENTS``
    (``shoal.events.<partition>.ctl.forget``), published by the engine that took the
    request; its owner acts on it at the order's receive instant, in stream order."""

    customer_id: str
    request: str
    by: str
    suppress_seconds: int | None = None


FORGET_REQUEST_DECODER = msgspec.json.Decoder(ForgetRequest)
FORGET_ORDER_DECODER = msgspec.json.Decoder(ForgetOrder)


def decode_forget_order(data: bytes) -> ForgetOrder:
    """The order in a message on ``shoal.events.<partition>.ctl.forget``.

    Raises:
        InvalidRequest: it is not one, or its fields are out of bounds.
    """
    try:
        order = FORGET_ORDER_DECODER.decode(data)
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"not an order to forget a customer: {e}") from e
    if not order.customer_id or len(order.customer_id) > MAX_ID_CHARS:
        raise InvalidRequest(
            f"an order to forget names a customer id of {len(order.customer_id)} characters"
        )
    if len(order.by) > MAX_REQUESTER_CHARS or len(order.request) > 64:
        raise InvalidRequest("an order to forget has a 'by' or request id too long")
    seconds = order.suppress_seconds
    if seconds is not None and not 0 < seconds <= MAX_SUPPRESS_SECONDS:
        raise InvalidRequest("an order to forget has a suppression out of bounds")
    return order
