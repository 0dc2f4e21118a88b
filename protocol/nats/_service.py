"""The query service ``shoal`` on NATS (nats-py's ``nats.micro``), and a client for it.

The service decodes requests, calls a :class:`QueryHandler` (the engine side implements
it; ``protocol`` knows nothing of actors or SQLite) and encodes its replies. Errors go out
in the micro error headers, ``Nats-Service-Error`` (the message) and
``Nats-Service-Error-Code``, so any NATS tooling shows them, and ``$SRV.STATS`` counts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.micro
import structlog
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request, ServiceError
from nats.micro.service import Service

from protocol._api import (
    CLIENT_HEADER,
    CustomerReply,
    DefinitionsReply,
    DefinitionsRequest,
    ExplainReply,
    ExplainRequest,
    MembersReply,
    MembersRequest,
    SegmentsReply,
    StatusReply,
    UnparkReply,
    UnparkRequest,
    client_of,
    customer_request_decoder,
    definitions_request_decoder,
    explain_request_decoder,
    members_request_decoder,
    segments_request_decoder,
    status_request_decoder,
    unpark_request_decoder,
)
from protocol._errors import ApiError, EngineUnavailable, InvalidRequest, SubjectError
from protocol._query import API_VERSION, QueryHandler
from protocol._subjects import (
    API_SERVICE,
    EVENTS_WILDCARD,
    api_subject,
    customer_api_filter,
    customer_api_subject,
    customer_of_api_subject,
)
from protocol._types import shown_subject
from protocol.nats._refusals import permission_guard
from protocol.nats._replies import answer_inboxes_only, answers_an_inbox
from protocol.nats._undecodable import tolerate_undecodable_subjects

_STOP_TIMEOUT = 2.0
_READY_TIMEOUT = 5.0
_logger = structlog.get_logger("shoal.api")
_encoder = msgspec.json.Encoder()
_R = TypeVar("_R")


def _header_text(message: str) -> str:
    # A header value is one line.
    return " ".join(message.splitlines())


def _decode(decoder: msgspec.json.Decoder[_R], data: bytes) -> _R:
    try:
        return decoder.decode(data or b"{}")
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise InvalidRequest(f"invalid request: {e}") from e


def _customer(endpoint: str, subject: str) -> str:
    if subject != shown_subject(subject):
        raise InvalidRequest(
            f"invalid request: subject '{shown_subject(subject)}' is not valid UTF-8"
        )
    try:
        return customer_of_api_subject(endpoint, subject)
    except SubjectError as e:
        raise InvalidRequest(f"invalid request: {e}") from e


def _endpoint(
    name: str, answer: Callable[[Request], Awaitable[msgspec.Struct]]
) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        if not answers_an_inbox(request._msg):
            return
        try:
            reply = await answer(request)
        except ApiError as e:
            # Raised as micro's own error, so $SRV.STATS counts it as one.
            raise ServiceError(e.code, _header_text(e.message)) from e
        except Exception as e:
            _logger.exception("request failed", endpoint=name, subject=request.subject)
            raise ServiceError("500", _header_text(f"internal error: {e!r}")) from e
        await request.respond(_encoder.encode(reply))

    return handle


async def serve_api(
    nc: Client,
    handler: QueryHandler,
    *,
    customers: str = EVENTS_WILDCARD,
    metadata: dict[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service ``shoal`` on ``nc`` until cancelled.

    Every endpoint listens in the queue group ``shoal``, so several copies share the
    requests. ``customer`` and ``explain`` listen only for the customers whose events the
    filter subject ``customers`` selects (the engine's ``filter_subject``): a request reaches
    an engine that owns the customer. ``task_status.started()`` is called once every
    endpoint listens.

    A request whose reply subject is not an inbox (under ``_INBOX.``) is not answered (see
    :mod:`protocol.nats._replies`).
    """
    tolerate_undecodable_subjects(nc)
    answer_inboxes_only(nc)
    async with permission_guard(nc):
        service = await _listen(nc, handler, customers, metadata or {})
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
            with contextlib.suppress(nats.errors.Error):
                await service.stop()


async def _listen(
    nc: Client, handler: QueryHandler, customers: str, metadata: dict[str, str]
) -> Service:
    """Start the service's endpoints; return once the server has their subscriptions."""
    service = await nats.micro.add_service(
        nc,
        name=API_SERVICE,
        version=API_VERSION,
        description="shoal query service: customer state, explanations, segments, members, "
        "definitions, status and unparking",
        queue_group=API_SERVICE,
        metadata=metadata,
    )
    try:

        async def customer(request: Request) -> msgspec.Struct:
            customer_id = _customer("customer", request.subject)
            _decode(customer_request_decoder, request.data)
            return await handler.customer(customer_id)

        async def explain(request: Request) -> msgspec.Struct:
            customer_id = _customer("explain", request.subject)
            return await handler.explain(
                customer_id, _decode(explain_request_decoder, request.data)
            )

        async def segments(request: Request) -> msgspec.Struct:
            _decode(segments_request_decoder, request.data)
            return await handler.segments()

        async def members(request: Request) -> msgspec.Struct:
            return await handler.members(_decode(members_request_decoder, request.data))

        async def definitions(request: Request) -> msgspec.Struct:
            client = client_of((request.headers or {}).get(CLIENT_HEADER))
            return await handler.definitions(
                _decode(definitions_request_decoder, request.data), client=client
            )

        async def status(request: Request) -> msgspec.Struct:
            _decode(status_request_decoder, request.data)
            return await handler.status()

        async def unpark(request: Request) -> msgspec.Struct:
            return await handler.unpark(_decode(unpark_request_decoder, request.data))

        await service.add_endpoint(
            name="customer",
            subject=customer_api_filter("customer", customers),
            handler=_endpoint("customer", customer),
        )
        await service.add_endpoint(
            name="explain",
            subject=customer_api_filter("explain", customers),
            handler=_endpoint("explain", explain),
        )
        for name, answer in (
            ("segments", segments),
            ("members", members),
            ("definitions", definitions),
            ("status", status),
            ("unpark", unpark),
        ):
            await service.add_endpoint(
                name=name, subject=api_subject(name), handler=_endpoint(name, answer)
            )
        # Listening only once the server has our subscriptions. nats-py's flush() writes its
        # PING ahead of commands still pending in the client, SUBs included, so instead ask
        # ourselves: the server handles a connection's commands in order, so the answer
        # comes after it has taken every SUB sent before.
        await nc.request(f"$SRV.PING.{API_SERVICE}.{service.id}", b"", timeout=_READY_TIMEOUT)
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
            with contextlib.suppress(nats.errors.Error):
                await service.stop()
        raise
    return service


# Client -----------------------------------------------------------------------------------

_customer_reply = msgspec.json.Decoder(CustomerReply)
_explain_reply = msgspec.json.Decoder(ExplainReply)
_segments_reply = msgspec.json.Decoder(SegmentsReply)
_members_reply = msgspec.json.Decoder(MembersReply)
_definitions_reply = msgspec.json.Decoder(DefinitionsReply)
_status_reply = msgspec.json.Decoder(StatusReply)
_unpark_reply = msgspec.json.Decoder(UnparkReply)


class ApiClient:
    """Requests to the service ``shoal`` over a connected client.

    Every method raises :class:`~protocol.ApiError` with the service's message and code
    when the engine answers with an error, and :class:`~protocol.EngineUnavailable` when no
    engine answers (none running on this NATS, or it took longer than ``timeout``).
    """

    def __init__(self, nc: Client, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self.timeout = timeout

    async def customer(self, customer_id: str) -> CustomerReply:
        """The state of one customer."""
        subject = customer_api_subject("customer", customer_id)
        return await self._request(subject, b"", _customer_reply)

    async def explain(self, customer_id: str, segment: str | None = None) -> ExplainReply:
        """Why the customer is or is not in ``segment`` (every segment when None)."""
        subject = customer_api_subject("explain", customer_id)
        body = _encoder.encode(ExplainRequest(segment=segment))
        return await self._request(subject, body, _explain_reply)

    async def segments(self) -> SegmentsReply:
        """The definitions in force with their sizes."""
        return await self._request(api_subject("segments"), b"", _segments_reply)

    async def members(
        self,
        segment: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        count_only: bool = False,
    ) -> MembersReply:
        """A page of the segment's members and its size."""
        body = _encoder.encode(
            MembersRequest(segment=segment, limit=limit, cursor=cursor, count_only=count_only)
        )
        return await self._request(api_subject("members"), body, _members_reply)

    async def definitions(
        self,
        toml: str,
        *,
        source: str = "<request>",
        apply: bool = False,
        timeout: float | None = None,
        client: str | None = None,
    ) -> DefinitionsReply:
        """Validate a segments file's text on the engine, and apply it when ``apply``. Its
        lists carry their ids by value: the engine reads no file for it
        (:func:`actors.load_segments_by_value` gives such text for a file). ``client`` says
        who sends it (``user@host``): the engine stores it with definitions it applies."""
        body = _encoder.encode(DefinitionsRequest(toml=toml, source=source, apply=apply))
        headers = None if client is None else {CLIENT_HEADER: client}
        return await self._request(
            api_subject("definitions"), body, _definitions_reply, timeout=timeout, headers=headers
        )

    async def status(self) -> StatusReply:
        """How the engine is doing."""
        return await self._request(api_subject("status"), b"", _status_reply)

    async def unpark(self, customer_ids: list[str], *, timeout: float | None = None) -> UnparkReply:
        """Try parked customers again."""
        body = _encoder.encode(UnparkRequest(customer_ids=customer_ids))
        return await self._request(api_subject("unpark"), body, _unpark_reply, timeout=timeout)

    async def _request(
        self,
        subject: str,
        body: bytes,
        decoder: msgspec.json.Decoder[_R],
        *,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> _R:
        wait = self.timeout if timeout is None else timeout
        async with permission_guard(self._nc, subject):
            try:
                msg = await self._nc.request(subject, body, timeout=wait, headers=headers)
            except nats.errors.NoRespondersError as e:
                raise EngineUnavailable(
                    f"no shoal engine answers on {subject} (is `shoal serve` running, and "
                    "connected to this NATS server?)"
                ) from e
            except nats.errors.TimeoutError as e:
                raise EngineUnavailable(f"no answer on {subject} within {wait:g} s") from e
            except nats.errors.Error as e:
                raise EngineUnavailable(f"request on {subject} failed: {e}") from e
        answer: dict[str, Any] = msg.headers or {}
        if ERROR_CODE_HEADER in answer:
            raise ApiError(str(answer.get(ERROR_HEADER, "")), code=str(answer[ERROR_CODE_HEADER]))
        try:
            return decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            raise ApiError(f"unexpected reply on {subject}: {e}") from e
