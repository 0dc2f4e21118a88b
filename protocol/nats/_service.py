"""The query service ``shoal`` on NATS (nats-py's ``nats.micro``), and a client for it.

The service decodes requests, calls a :class:`QueryHandler` (the engine side implements
it; ``protocol`` knows nothing of actors or SQLite) and encodes its replies. Errors go out
in the micro error headers, ``Nats-Service-Error`` (the message) and
``Nats-Service-Error-Code``, so any NATS tooling shows them, and ``$SRV.STATS`` counts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
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
    GatheredStatus,
    MembersReply,
    MembersRequest,
    SearchReply,
    SearchRequest,
    SegmentsReply,
    StatusReply,
    UnparkReply,
    UnparkRequest,
    client_of,
    customer_request_decoder,
    definitions_request_decoder,
    explain_request_decoder,
    members_request_decoder,
    search_request_decoder,
    segments_request_decoder,
    status_request_decoder,
    unpark_request_decoder,
)
from protocol._errors import (
    ApiError,
    EngineUnavailable,
    InvalidRequest,
    SubjectError,
)
from protocol._forget import FORGET_REQUEST_DECODER, ForgetReply, ForgetRequest
from protocol._gather import (
    Gathering,
    merge_members,
    merge_search,
    merge_segments,
    merge_status,
    merge_unpark,
    partition_ranges,
)
from protocol._partitions import DEFAULT_PARTITIONS, partition
from protocol._query import API_VERSION, QueryHandler
from protocol._subjects import (
    API_SERVICE,
    GATHERED_ENDPOINTS,
    api_subject,
    customer_api_subject,
    customer_of_api_subject,
    legacy_customer_api_filter,
    partition_api_filter,
    partitioned_customer_of_api_subject,
)
from protocol._types import REJECTION_HEADROOM, shown_subject
from protocol.nats._forget_api import place_forget_orders
from protocol.nats._refusals import permission_guard
from protocol.nats._replies import answer_inboxes_only, answers_an_inbox
from protocol.nats._undecodable import tolerate_undecodable_subjects

_STOP_TIMEOUT = 2.0
_FORWARD_TIMEOUT = 5.0
"""Seconds a forwarded request waits for the owner's reply."""
_READY_TIMEOUT = 5.0
_logger = structlog.get_logger("shoal.api")
_encoder = msgspec.json.Encoder()
_R = TypeVar("_R")
_S = TypeVar("_S", bound=msgspec.Struct)
_C = TypeVar("_C", SegmentsReply, MembersReply, SearchReply, StatusReply, UnparkReply)


def _header_text(message: str) -> str:
    # A header value is one line.
    return " ".join(message.splitlines())


def _decode(decoder: msgspec.json.Decoder[_R], data: bytes) -> _R:
    try:
        return decoder.decode(data or b"{}")
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise InvalidRequest(f"invalid request: {e}") from e


def _utf8(subject: str) -> None:
    if subject != shown_subject(subject):
        raise InvalidRequest(
            f"invalid request: subject '{shown_subject(subject)}' is not valid UTF-8"
        )


def _customer(endpoint: str, subject: str) -> str:
    """The customer of a request on a subject of earlier versions (without a partition)."""
    _utf8(subject)
    try:
        return customer_of_api_subject(endpoint, subject)
    except SubjectError as e:
        raise InvalidRequest(f"invalid request: {e}") from e


def _longest_fitting(count: int, fits: Callable[[int], bool]) -> int:
    """The largest ``k`` in ``0..count`` for which ``fits(k)``, given that ``fits`` holds
    for every ``k`` below one for which it holds (0 when none but 0 does)."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_reply(reply: msgspec.Struct, max_bytes: int) -> bytes:
    """The JSON of ``reply``, cut to at most ``max_bytes`` when it is a list that pages on
    (the members of a :class:`MembersReply`, the ids of a :class:`SearchReply`): the
    longest beginning that fits is kept, and the reply says that more follow (a
    ``next_cursor`` after the last id kept, ``more``). Other replies cannot be cut.

    Raises:
        ApiError: another reply does not fit (the requester gets this error, rather than
            no answer at all), or not even one item fits (a tiny ``max_payload``).
    """
    body = _encoder.encode(reply)
    if len(body) <= max_bytes:
        return body
    cut: Callable[[int], msgspec.Struct]
    if isinstance(reply, MembersReply):
        members, since = reply.members, reply.true_since
        count = len(members)

        def cut(k: int) -> msgspec.Struct:
            return msgspec.structs.replace(
                reply,
                members=members[:k],
                true_since=since[:k],
                next_cursor=members[k - 1] if 0 < k < count else reply.next_cursor,
            )

    elif isinstance(reply, SearchReply):
        ids = reply.customers
        count = len(ids)

        def cut(k: int) -> msgspec.Struct:
            return msgspec.structs.replace(reply, customers=ids[:k], more=reply.more or k < count)

    else:
        raise ApiError(
            f"the reply is {len(body):,} bytes, more than the broker takes in one message "
            f"({max_bytes:,} bytes with its headers' share of max_payload)"
        )
    k = _longest_fitting(count, lambda k: len(_encoder.encode(cut(k))) <= max_bytes)
    if k == 0:
        raise ApiError(f"the reply does not fit in {max_bytes} bytes (the broker's max_payload)")
    return _encoder.encode(cut(k))


def _endpoint(
    name: str, answer: Callable[[Request], Awaitable[msgspec.Struct]], max_bytes: int
) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        if not answers_an_inbox(request._msg):
            return
        try:
            reply = fit_reply(await answer(request), max_bytes)
        except ApiError as e:
            # Raised as micro's own error, so $SRV.STATS counts it as one.
            raise ServiceError(e.code, _header_text(e.message)) from e
        except Exception as e:
            _logger.exception("request failed", endpoint=name, subject=request.subject)
            raise ServiceError("500", _header_text(f"internal error: {e!r}")) from e
        await request.respond(reply)

    return handle


async def serve_api(
    nc: Client,
    handler: QueryHandler,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    owned: Iterable[int] | None = None,
    metadata: dict[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service ``shoal`` on ``nc`` until cancelled, for an engine that owns the
    partitions ``owned`` (every one of ``range(partitions)`` when None) of ``partitions``.

    Requests about one customer (``customer``, ``explain``) are listened for on the subjects
    of the owned partitions only, ``shoal.api.<endpoint>.<partition>.<customer>``, in the
    queue group ``shoal``; one whose partition is not the customer's is refused
    (:class:`~protocol.InvalidRequest`), so it never answers with another customer's data.
    The subjects of earlier versions, ``shoal.api.<endpoint>.<customer>``, are answered by
    forwarding: the engine that gets one (in the queue group) asks the owner on the
    customer's partitioned subject and relays its reply.

    The gathered endpoints (``segments``, ``members``, ``search``, ``status``) reach every
    engine: each listens in a queue group of its own (nats-py's ``nats.micro`` always
    subscribes in one), and each reply says the partitions it covers and how many there
    are. So does ``unpark``: each engine tries the ids of its own partitions. ``definitions``
    is in the queue group ``shoal`` (one engine applies; the others follow the shared copy).
    ``task_status.started()`` is called once every endpoint listens.

    A request whose reply subject is not an inbox (under ``_INBOX.``) is not answered (see
    :mod:`protocol.nats._replies`).

    Raises:
        ValueError: ``partitions`` is below 1, or ``owned`` holds a partition outside
            ``range(partitions)`` or none at all.
    """
    mine = sorted(set(range(partitions) if owned is None else owned))
    if partitions < 1 or not mine or not 0 <= mine[0] <= mine[-1] < partitions:
        raise ValueError(
            f"an engine must own some of partitions 0-{partitions - 1} (owned: {mine})"
        )
    tolerate_undecodable_subjects(nc)
    answer_inboxes_only(nc)
    about = {"partitions": str(partitions), "owned": partition_ranges(mine)}
    async with permission_guard(nc):
        service = await _listen(nc, handler, _Owned(partitions, mine), (metadata or {}) | about)
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
            with contextlib.suppress(nats.errors.Error):
                await service.stop()


class _Owned:
    """The partitions an engine owns, of how many."""

    def __init__(self, count: int, owned: list[int]) -> None:
        self.count = count
        self.owned = owned

    def customer(self, endpoint: str, subject: str) -> str:
        """The customer of a request on a partitioned subject, checked against its partition.

        Raises:
            InvalidRequest: the subject is malformed, or the customer is in another partition.
        """
        _utf8(subject)
        try:
            number, customer_id = partitioned_customer_of_api_subject(endpoint, subject)
        except SubjectError as e:
            raise InvalidRequest(f"invalid request: {e}") from e
        actual = partition(customer_id, self.count)
        if number != actual:
            right = customer_api_subject(endpoint, customer_id, actual)
            raise InvalidRequest(
                f"invalid request: customer {customer_id!r} is in partition {actual} of "
                f"{self.count}, not {number}: ask on {right}"
            )
        return customer_id

    def stamped(self, reply: _S) -> _S:
        """``reply`` saying which partitions it covers."""
        return msgspec.structs.replace(
            reply, partition_count=self.count, partitions=list(self.owned)
        )


def _forwarder(nc: Client, endpoint: str, count: int) -> Callable[[Request], Awaitable[None]]:
    """The handler of ``endpoint`` requests on the subjects of earlier versions: ask the
    engine that owns the customer on its partitioned subject, and relay its reply (body and
    headers, errors included) to the requester.

    Relayed rather than republished with the requester's reply subject: under the roles'
    permissions an engine may answer only the requests it receives itself, so the owner
    could not answer a requester whose request another engine passed on."""

    async def forward(request: Request) -> None:
        msg = request._msg
        if not answers_an_inbox(msg):
            return
        try:
            customer_id = _customer(endpoint, request.subject)
            owner = partition(customer_id, count)
            target = customer_api_subject(endpoint, customer_id, owner)
        except ApiError as e:
            raise ServiceError(e.code, _header_text(e.message)) from e
        try:
            reply = await nc.request(
                target, request.data, timeout=_FORWARD_TIMEOUT, headers=msg.headers
            )
        except nats.errors.NoRespondersError:
            raise ServiceError(
                EngineUnavailable.code,
                f"no engine answers for partition {owner} of {count} (asked on {target})",
            ) from None
        except (TimeoutError, nats.errors.Error) as e:
            raise ServiceError(
                EngineUnavailable.code,
                _header_text(f"the engine of partition {owner} did not answer on {target}: {e}"),
            ) from None
        await request.respond(reply.data, headers=reply.headers)

    return forward


async def _listen(
    nc: Client, handler: QueryHandler, mine: _Owned, metadata: dict[str, str]
) -> Service:
    """Start the service's endpoints; return once the server has their subscriptions."""
    service = await nats.micro.add_service(
        nc,
        name=API_SERVICE,
        version=API_VERSION,
        description="shoal query service: customer state, explanations, segments, members, "
        "customer search, definitions, status, unparking and forgetting",
        queue_group=API_SERVICE,
        metadata=metadata,
    )
    # Replies that page on are cut to what one message of this broker holds (less room for
    # headers); nats-py would refuse a larger one with no word to the requester.
    max_bytes = int(nc.max_payload) - REJECTION_HEADROOM
    # A queue group of this service's own: every engine gets each gathered request.
    everyone = f"{API_SERVICE}-{service.id}"
    try:

        async def customer(request: Request) -> msgspec.Struct:
            customer_id = mine.customer("customer", request.subject)
            _decode(customer_request_decoder, request.data)
            return await handler.customer(customer_id)

        async def explain(request: Request) -> msgspec.Struct:
            customer_id = mine.customer("explain", request.subject)
            return await handler.explain(
                customer_id, _decode(explain_request_decoder, request.data)
            )

        async def segments(request: Request) -> msgspec.Struct:
            _decode(segments_request_decoder, request.data)
            return mine.stamped(await handler.segments())

        async def members(request: Request) -> msgspec.Struct:
            return mine.stamped(
                await handler.members(_decode(members_request_decoder, request.data))
            )

        async def search(request: Request) -> msgspec.Struct:
            return mine.stamped(await handler.search(_decode(search_request_decoder, request.data)))

        async def definitions(request: Request) -> msgspec.Struct:
            client = client_of((request.headers or {}).get(CLIENT_HEADER))
            return await handler.definitions(
                _decode(definitions_request_decoder, request.data), client=client
            )

        async def status(request: Request) -> msgspec.Struct:
            _decode(status_request_decoder, request.data)
            return mine.stamped(await handler.status())

        async def unpark(request: Request) -> msgspec.Struct:
            # Gathered: each engine tries the ids of its own partitions (their customers
            # are parked in the engine that owns them), and the client merges the replies.
            asked = _decode(unpark_request_decoder, request.data)
            owned = set(mine.owned)
            ids = [c for c in asked.customer_ids if partition(c, mine.count) in owned]
            if not ids:
                return mine.stamped(UnparkReply(unparked=[], parked=[], not_parked=[]))
            return mine.stamped(
                await handler.unpark(msgspec.structs.replace(asked, customer_ids=ids))
            )

        async def forget(request: Request) -> msgspec.Struct:
            # One engine takes it (queue group): the orders reach each customer's owner
            # through its partition of the events stream.
            asked = _decode(FORGET_REQUEST_DECODER, request.data)
            asked.check()
            return await place_forget_orders(nc, mine.count, asked)

        for name, answer in (("customer", customer), ("explain", explain)):
            for p in mine.owned:
                await service.add_endpoint(
                    name=f"{name}-{p}",
                    subject=partition_api_filter(name, p),
                    handler=_endpoint(name, answer, max_bytes),
                )
            await service.add_endpoint(
                name=name,
                subject=legacy_customer_api_filter(name),
                handler=_forwarder(nc, name, mine.count),
            )
        for name, answer in (
            ("segments", segments),
            ("members", members),
            ("search", search),
            ("definitions", definitions),
            ("status", status),
            ("unpark", unpark),
            ("forget", forget),
        ):
            await service.add_endpoint(
                name=name,
                subject=api_subject(name),
                handler=_endpoint(name, answer, max_bytes),
                queue_group=everyone if name in GATHERED_ENDPOINTS else None,
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
_search_reply = msgspec.json.Decoder(SearchReply)
_definitions_reply = msgspec.json.Decoder(DefinitionsReply)
_status_reply = msgspec.json.Decoder(StatusReply)
_unpark_reply = msgspec.json.Decoder(UnparkReply)
_forget_reply = msgspec.json.Decoder(ForgetReply)


class _ServiceInfo(msgspec.Struct, kw_only=True):
    """What the client reads of a ``$SRV.INFO`` reply (nats.micro's)."""

    metadata: dict[str, str] | None = None


_service_info = msgspec.json.Decoder(_ServiceInfo)
_NO_RESPONDERS = "503"


class ApiClient:
    """Requests to the service ``shoal`` over a connected client.

    A request about one customer goes on the subject of its partition, which reaches the
    engine that owns it. The number of partitions is ``partitions`` when given, else read
    once from the service's ``$SRV.INFO`` (an engine older than API 1.2 says none: then
    the subject without a partition is used).

    ``segments``, ``members``, ``search`` and ``status`` are gathered: published once, the
    replies of every engine collected until every partition is covered or ``timeout`` passes,
    and merged (:mod:`protocol._gather`). The partitions no engine answered for are in the
    answer's ``missing_partitions``, and the answer is then marked incomplete.

    Every method raises :class:`~protocol.ApiError` with the service's message and code
    when the engine answers with an error, and :class:`~protocol.EngineUnavailable` when no
    engine answers (none running on this NATS, or it took longer than ``timeout``).
    """

    def __init__(self, nc: Client, *, timeout: float = 5.0, partitions: int | None = None) -> None:
        self._nc = nc
        self.timeout = timeout
        self._partitions = partitions

    @property
    def partitions(self) -> int | None:
        """P, the number of partitions, once known: given, or learned from the service."""
        return self._partitions

    async def _customer_subject(self, endpoint: str, customer_id: str) -> str:
        count = self._partitions
        if count is None:
            count = self._partitions = await self._partition_count()
        if count is None:
            return customer_api_subject(endpoint, customer_id)
        return customer_api_subject(endpoint, customer_id, partition(customer_id, count))

    async def _partition_count(self) -> int | None:
        """The number of partitions the service says it has; None when no engine says (none
        answers, or it is older than API 1.2: the request then goes on the subject without a
        partition, which any engine forwards, and fails there when no engine answers)."""
        subject = f"$SRV.INFO.{API_SERVICE}"
        try:
            async with permission_guard(self._nc, subject):
                msg = await self._nc.request(subject, b"", timeout=self.timeout)
            info = _service_info.decode(msg.data)
        except (nats.errors.Error, msgspec.DecodeError):
            return None
        number = (info.metadata or {}).get("partitions", "")
        return int(number) if number.isdigit() and int(number) > 0 else None

    async def customer(self, customer_id: str) -> CustomerReply:
        """The state of one customer."""
        subject = await self._customer_subject("customer", customer_id)
        return await self._request(subject, b"", _customer_reply)

    async def explain(self, customer_id: str, segment: str | None = None) -> ExplainReply:
        """Why the customer is or is not in ``segment`` (every segment when None)."""
        subject = await self._customer_subject("explain", customer_id)
        body = _encoder.encode(ExplainRequest(segment=segment))
        return await self._request(subject, body, _explain_reply)

    async def segments(self) -> SegmentsReply:
        """The definitions in force with their sizes, gathered from every engine.

        Raises:
            EnginesDisagree: engines hold different definitions (an apply under way).
        """
        return merge_segments(await self._gather("segments", b"", _segments_reply))

    async def members(
        self,
        segment: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        count_only: bool = False,
    ) -> MembersReply:
        """A page of the segment's members and its size, gathered from every engine."""
        body = _encoder.encode(
            MembersRequest(segment=segment, limit=limit, cursor=cursor, count_only=count_only)
        )
        return merge_members(await self._gather("members", body, _members_reply), limit)

    async def search(self, prefix: str, *, limit: int = 100) -> SearchReply:
        """The ids of customers that start with ``prefix``, in id order (at most ``limit``),
        gathered from every engine."""
        body = _encoder.encode(SearchRequest(prefix=prefix, limit=limit))
        return merge_search(await self._gather("search", body, _search_reply), limit)

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

    async def status(self) -> GatheredStatus:
        """How the engines are doing: each one's status, and their counts combined."""
        return merge_status(await self._gather("status", b"", _status_reply))

    async def unpark(self, customer_ids: list[str], *, timeout: float | None = None) -> UnparkReply:
        """Try parked customers again, each in the engine that owns it: gathered from every
        engine, the ids of partitions no engine answered for within ``timeout`` (default:
        the client's) listed as ``unanswered``."""
        body = _encoder.encode(UnparkRequest(customer_ids=customer_ids))
        gathering = await self._gather("unpark", body, _unpark_reply, timeout=timeout)
        return merge_unpark(gathering, customer_ids)

    async def forget(
        self,
        customer_ids: list[str],
        *,
        by: str,
        suppress_seconds: int | None = None,
        wait_seconds: float = 30.0,
    ) -> ForgetReply:
        """Forget these customers everywhere shoal keeps data (see ``protocol.ForgetRequest``):
        the reply says, per customer, its hash and whether its erasure finished within
        ``wait_seconds``."""
        body = _encoder.encode(
            ForgetRequest(
                customer_ids=customer_ids,
                by=by,
                suppress_seconds=suppress_seconds,
                wait_seconds=wait_seconds,
            )
        )
        return await self._request(
            api_subject("forget"), body, _forget_reply, timeout=wait_seconds + self.timeout
        )

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

    async def _gather(
        self,
        endpoint: str,
        body: bytes,
        decoder: msgspec.json.Decoder[_C],
        *,
        timeout: float | None = None,
    ) -> Gathering[_C]:
        """Publish one request on ``endpoint`` and collect the engines' replies until every
        partition is covered or the timeout passes."""
        wait = self.timeout if timeout is None else timeout
        subject = api_subject(endpoint)
        gathering: Gathering[_C] = Gathering(subject)
        unavailable: ApiError | None = None
        async with permission_guard(self._nc, subject):
            inbox = self._nc.new_inbox()
            try:
                sub = await self._nc.subscribe(inbox)
                await self._nc.publish(subject, body, reply=inbox)
            except nats.errors.Error as e:
                raise EngineUnavailable(f"request on {subject} failed: {e}") from e
            try:
                with anyio.move_on_after(wait):
                    while not gathering.done:
                        msg = await sub.next_msg(timeout=None)
                        answer: dict[str, Any] = msg.headers or {}
                        if answer.get("Status") == _NO_RESPONDERS and not msg.data:
                            raise EngineUnavailable(
                                f"no shoal engine answers on {subject} (is `shoal serve` "
                                "running, and connected to this NATS server?)"
                            )
                        if ERROR_CODE_HEADER in answer:
                            error = ApiError(
                                str(answer.get(ERROR_HEADER, "")),
                                code=str(answer[ERROR_CODE_HEADER]),
                            )
                            # One engine starting or stopping: its partitions are reported
                            # missing unless another answers for them. Any other error is
                            # the request's, and every engine gives it.
                            if error.code != EngineUnavailable.code:
                                raise error
                            unavailable = error
                            continue
                        try:
                            gathering.add(decoder.decode(msg.data))
                        except msgspec.DecodeError as e:
                            raise ApiError(f"unexpected reply on {subject}: {e}") from e
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        if not gathering.replies:
            if unavailable is not None:
                raise unavailable
            raise EngineUnavailable(f"no answer on {subject} within {wait:g} s")
        if gathering.partition_count is not None:
            self._partitions = gathering.partition_count
        return gathering
