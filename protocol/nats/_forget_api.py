"""The ``forget`` request on the engine's side: one order per customer into its partition of
``SHOAL_EVENTS``, then, for up to the request's wait, until each order is erased (the owner
erases it last, once the customer's erasure is done)."""

from __future__ import annotations

import uuid

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from protocol._errors import BrokerError
from protocol._forget import (
    ForgetOrder,
    ForgetReply,
    ForgetRequest,
    ForgottenCustomer,
    forget_hash,
)
from protocol._partitions import partition
from protocol._subjects import EVENTS_STREAM, forget_order_subject

_POLL = 0.2
"""Seconds between two looks at whether the orders are erased yet."""
_encoder = msgspec.json.Encoder()


async def place_forget_orders(nc: Client, partitions: int, request: ForgetRequest) -> ForgetReply:
    """Publish the orders of ``request`` (checked already) and wait as it asks.

    Raises:
        BrokerError: an order was not stored (those before it were: asking again is safe,
            the broker drops a repeat within its duplicate window, and the owner acts on a
            second order for a forgotten customer by erasing what came since).
    """
    js = nc.jetstream()
    request_id = uuid.uuid4().hex[:16]
    placed: list[ForgottenCustomer] = []
    seen: set[str] = set()
    for customer_id in request.customer_ids:
        if customer_id in seen:
            continue
        seen.add(customer_id)
        p = partition(customer_id, partitions)
        digest = forget_hash(customer_id)
        order = ForgetOrder(
            customer_id=customer_id,
            request=request_id,
            by=request.by,
            suppress_seconds=request.suppress_seconds,
        )
        try:
            ack = await js.publish(
                forget_order_subject(p),
                _encoder.encode(order),
                headers={"Nats-Msg-Id": f"forget:{request_id}:{digest}"},
            )
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(
                f"the order to forget customer {len(placed) + 1} of {len(seen)} was not "
                f"stored ({len(placed)} were, request {request_id}): {e}"
            ) from e
        placed.append(ForgottenCustomer(hash=digest, partition=p, order=ack.seq, done=False))
    if request.wait_seconds > 0:
        with anyio.move_on_after(request.wait_seconds):
            while not all(c.done for c in placed):
                placed = [await _look(js, c) for c in placed]
                if not all(c.done for c in placed):
                    await anyio.sleep(_POLL)
    return ForgetReply(request=request_id, customers=placed)


async def _look(js: nats.js.JetStreamContext, c: ForgottenCustomer) -> ForgottenCustomer:
    if c.done:
        return c
    try:
        await js.get_msg(EVENTS_STREAM, c.order)
    except nats.js.errors.NotFoundError:
        return msgspec.structs.replace(c, done=True)
    except (TimeoutError, nats.errors.Error):
        return c
    return c
