"""The query API's contract on the engine side: what answers the service's requests, and
the API's version. The service itself runs on NATS (``protocol.nats.serve_api``)."""

from __future__ import annotations

from typing import Protocol

from ._api import (
    CustomerReply,
    DefinitionsReply,
    DefinitionsRequest,
    ExplainReply,
    ExplainRequest,
    MembersReply,
    MembersRequest,
    SearchReply,
    SearchRequest,
    SegmentsReply,
    StatusReply,
    UnparkReply,
    UnparkRequest,
)

API_VERSION = "1.3.0"
"""The version ``$SRV.INFO`` reports: the major part changes when a body changes
incompatibly, the minor part when one is added to (1.1: ``search``, members'
``true_since``; 1.2: requests about one customer on the subject of its partition, and the
partitions each gathered reply covers; 1.3: ``unpark`` gathered from every engine, each for
the ids of its partitions)."""


class QueryHandler(Protocol):
    """What answers the service's requests: the engine side of the API.

    Each method raises an :class:`~protocol.ApiError` subclass for a request it cannot
    answer (:class:`~protocol.UnknownCustomer`, :class:`~protocol.UnknownSegment`,
    :class:`~protocol.InvalidRequest`, :class:`~protocol.EngineUnavailable`); its message
    goes to the caller as it is.
    """

    async def customer(self, customer_id: str) -> CustomerReply: ...

    async def explain(self, customer_id: str, request: ExplainRequest) -> ExplainReply: ...

    async def segments(self) -> SegmentsReply: ...

    async def members(self, request: MembersRequest) -> MembersReply: ...

    async def search(self, request: SearchRequest) -> SearchReply: ...

    async def definitions(
        self, request: DefinitionsRequest, *, client: str | None = None
    ) -> DefinitionsReply:
        """``client``: who sent it, when the request said (its ``Shoal-Client`` header)."""
        ...

    async def status(self) -> StatusReply: ...

    async def unpark(self, request: UnparkRequest) -> UnparkReply: ...
