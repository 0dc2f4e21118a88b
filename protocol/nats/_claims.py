"""An engine's claims on partitions: each a lease in ``SHOAL_LEASES`` kept alive, and a
record on the partition's fence (``shoal.fence.<partition>`` in ``SHOAL_SEGMENTS``) that
fences out whoever claimed before.

The lease says who may own a partition now, and expires when its owner stops renewing it
(a crash, a pause, a partition of the network); the fence makes sure that an owner who
lost its lease without noticing cannot publish: its transitions expect its own claim to be
the fence's last record, and the next owner's claim replaced it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from protocol._errors import (
    BrokerError,
    EngineIdInUse,
    Fenced,
    LeaseLost,
    Unconfirmed,
)
from protocol._ownership import EngineInfo, FenceClaim
from protocol._partitions import partition_consumer
from protocol._subjects import SEGMENTS_STREAM
from protocol.nats._fences import claim_at, claim_fence, last_claim
from protocol.nats._leases import Holder, Lease, LeaseBucket
from protocol.nats._partitioned import STRAYS, FeedClaim

DEFAULT_LEASE_TTL = 4
"""Seconds a lease lives unless renewed: how long a dead owner's partitions wait for
another engine."""
_CLAIM_TRIES = 5
_EARLIER = 4
"""How many claims before the previous one a new claim looks back at, for consumers to
retire."""
_RETRY = 0.25
"""Seconds between two tries of a partition held by another engine, or a write the broker
did not confirm."""
_logger = structlog.get_logger("shoal.claims")


@dataclass(frozen=True, slots=True)
class Claim:
    """This engine's claim on one partition."""

    partition: int
    engine: str
    """This engine's id."""
    seq: int
    """The claim record's stream sequence: what the partition's transitions are fenced on."""
    consumers: str
    """The prefix of this engine's consumers."""
    previous: FenceClaim | None
    """The claim it replaced (None: the partition's first)."""
    previous_seq: int
    earlier: tuple[tuple[int, str], ...] = ()
    """The claims before that one, latest first (a few): each one's sequence and consumers'
    prefix, so that a consumer an owner made and no later owner retired is retired too."""

    @property
    def consumer(self) -> str:
        """The partition's consumer under this claim."""
        return partition_consumer(self.consumers, self.partition, self.seq)

    def _previous(self, part: int | str) -> tuple[str, ...]:
        # The claim before's, and the one a shoal before claims read (``<prefix>-<p>``,
        # also what a migration makes): whichever exists.
        legacy = partition_consumer(self.consumers, part)
        if self.previous is None:
            return (legacy,)
        return (partition_consumer(self.previous.consumers, part, self.previous_seq), legacy)

    def _older(self, part: int | str) -> tuple[str, ...]:
        # The claims before the previous one: retired, their floors never trusted (another
        # engine's may have read past what this engine's store holds).
        return tuple(partition_consumer(prefix, part, seq) for seq, prefix in self.earlier)

    @property
    def taken_over(self) -> bool:
        """Whether another engine claimed the partition last: this engine's store of it is
        stale (or empty), and it starts from the partition's snapshot."""
        return self.previous is not None and self.previous.engine != self.engine

    def feed(self, start_after: int, *, taken_over: bool | None = None) -> FeedClaim:
        """The partition's consumer, to start after stream position ``start_after`` (a
        partition taken over: after its snapshot, whatever its previous owner read).
        ``taken_over``: whether the store starts the partition afresh (default: whether
        another engine claimed it last)."""
        fresh = self.taken_over if taken_over is None else taken_over
        return FeedClaim(
            self.consumer,
            self._previous(self.partition),
            start_after,
            trust_previous=not fresh,
            retire=self._older(self.partition),
        )

    def strays(self) -> FeedClaim:
        """The consumer of the messages stored without a partition, read with partition 0
        (its position is its own: its previous consumer's floor)."""
        return FeedClaim(
            partition_consumer(self.consumers, STRAYS, self.seq),
            self._previous(STRAYS),
            retire=self._older(STRAYS),
        )


class PartitionsLost(BrokerError):
    """Leases this engine held passed to another engine, or expired: it owns those
    partitions no longer."""

    def __init__(self, partitions: Iterable[int], why: str) -> None:
        ps = sorted(partitions)
        super().__init__(f"lost {_partitions(ps)}: {why}")
        self.partitions = ps


async def last_claims(
    js: JetStreamContext, prefix: str, partitions: int
) -> dict[int | None, FeedClaim]:
    """Each partition's consumer under its last claim (``<consumers>-<p>-<claim>``, the
    prefix the claim names), and the consumer of the messages stored without a partition
    (key None) under partition 0's; a partition never claimed (or no ``SHOAL_SEGMENTS``):
    the consumer before claims (``<prefix>-<p>``). How far each partition was committed
    is its consumer's acknowledgement floor: an owner acknowledges only what its store
    committed.

    Each names as its previous ones the consumers of a few claims before (latest first)
    and the one before claims: their floors count when the claim's consumer does not exist
    (its engine stopped before starting it, such as a start refused by the startup check,
    or a migration made the consumers anew). For reading floors with the engines stopped
    (``shoal rebuild``, ``shoal migrate``), not for starting consumers.

    Raises:
        UnreadableRecord: a fence's last message is not a claim.
        BrokerError: the broker does not answer.
    """
    chains: dict[int, list[tuple[int, FenceClaim]]] = {p: [] for p in range(partitions)}
    try:
        await js.stream_info(SEGMENTS_STREAM)
    except nats.js.errors.NotFoundError:
        pass  # no engine ever claimed a partition here
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {SEGMENTS_STREAM}: {e}") from e
    else:
        for p, chain in chains.items():
            found = await last_claim(js, SEGMENTS_STREAM, p)
            while found is not None and len(chain) <= _EARLIER:
                chain.append(found)
                seq = found[1].previous
                older = await claim_at(js, SEGMENTS_STREAM, p, seq) if seq else None
                found = None if older is None else (seq, older)

    def under(part: int | str, chain: list[tuple[int, FenceClaim]]) -> FeedClaim:
        names = [partition_consumer(c.consumers, part, seq) for seq, c in chain]
        names.append(partition_consumer(prefix, part))
        return FeedClaim(names[0], tuple(names[1:]))

    out: dict[int | None, FeedClaim] = {p: under(p, chain) for p, chain in chains.items()}
    if partitions:
        out[None] = under(STRAYS, chains[0])
    return out


def _partitions(ps: list[int]) -> str:
    return f"partition{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps))}"


class Claims:
    """The partitions this engine claimed: their leases, renewed in :meth:`keep`, and their
    fence records.

    An engine's id names its data directory (only one process may use one): a lease held
    under the engine's own id is an earlier run's, taken over at once, so a restart after a
    crash does not wait for it to expire.
    """

    def __init__(
        self,
        nc: Client,
        leases: LeaseBucket,
        *,
        engine_id: str,
        consumers: str = "shoal-engine",
        ttl: int = DEFAULT_LEASE_TTL,
        now: Callable[[], int],
    ) -> None:
        """``now``: the engine's clock (microseconds since the epoch), to stamp claims and
        heartbeats for people."""
        self._js = nc.jetstream()
        self._leases = leases
        self.engine_id = engine_id
        self._consumers = consumers
        self._ttl = ttl
        self._now = now
        self._started = now()
        self._held: dict[int, Lease] = {}
        self.owned: dict[int, Claim] = {}
        """The partitions claimed, each with its claim."""
        self._beat: int | None = None

    @property
    def ttl(self) -> int:
        """Seconds a lease lives unless renewed."""
        return self._ttl

    def lease_ages(self) -> dict[int, float]:
        """Per partition held, seconds since its lease was last written (sent)."""
        now = time.monotonic()
        return {p: max(0.0, now - lease.sent) for p, lease in self._held.items()}

    # Claiming -------------------------------------------------------------------------

    async def claim(self, partition: int) -> Claim | Holder:
        """Take ``partition``'s lease, then make this engine's claim the last on its fence.

        Returns:
            The claim; or who holds the lease, when another engine does.

        Raises:
            BrokerError: the broker refused, or did not answer within a few tries.
        """
        lease = await self._lease(partition)
        if isinstance(lease, Holder):
            return lease
        self._held[partition] = lease
        try:
            claim = await self._fence(partition)
        except BaseException:
            self._held.pop(partition, None)
            with anyio.CancelScope(shield=True):
                await self._release_lease(lease)
            raise
        self.owned[partition] = claim
        _logger.info(
            "partition claimed",
            partition=partition,
            claim=claim.seq,
            previous_engine=None if claim.previous is None else claim.previous.engine,
        )
        return claim

    async def _lease(self, partition: int) -> Lease | Holder:
        for _ in range(_CLAIM_TRIES):
            try:
                got = await self._leases.claim(partition, self.engine_id, self._ttl)
                if isinstance(got, Lease) or got.engine != self.engine_id:
                    return got
                # An earlier run's (or a claim of ours not confirmed): take it over.
                mine = Lease(
                    partition=partition,
                    engine=self.engine_id,
                    revision=got.revision,
                    ttl=self._ttl,
                    sent=time.monotonic(),
                )
                return await self._leases.renew(mine)
            except (Unconfirmed, LeaseLost) as e:
                last: BrokerError = e
                await anyio.sleep(_RETRY)
        raise BrokerError(f"cannot claim partition {partition}'s lease: {last}")

    async def _fence(self, partition: int) -> Claim:
        """Write this engine's claim over the partition fence's last one."""
        for _ in range(_CLAIM_TRIES):
            found = await last_claim(self._js, SEGMENTS_STREAM, partition)
            previous_seq, previous = found if found is not None else (0, None)
            record = FenceClaim(
                engine=self.engine_id,
                partition=partition,
                at=self._now(),
                previous=previous_seq,
                previous_engine=None if previous is None else previous.engine,
                consumers=self._consumers,
            )
            try:
                seq = await claim_fence(self._js, SEGMENTS_STREAM, partition, record, previous_seq)
            except Fenced:
                continue  # claimed meanwhile (by an owner that lost its lease since): again
            except Unconfirmed:
                # Stored or not: the fence's last record says.
                found = await last_claim(self._js, SEGMENTS_STREAM, partition)
                if found is None or found[1] != record:
                    await anyio.sleep(_RETRY)
                    continue
                seq = found[0]
            earlier = await self._earlier(partition, previous)
            return Claim(
                partition, self.engine_id, seq, self._consumers, previous, previous_seq, earlier
            )
        raise BrokerError(f"cannot claim partition {partition}'s fence: it keeps changing")

    async def _earlier(
        self, partition: int, previous: FenceClaim | None
    ) -> tuple[tuple[int, str], ...]:
        """The few claims before ``previous``: one an owner made and that did not start its
        consumer (it failed, or lost the partition at once) retired nothing."""
        found: list[tuple[int, str]] = []
        seq = 0 if previous is None else previous.previous
        while seq and len(found) < _EARLIER:
            claim = await claim_at(self._js, SEGMENTS_STREAM, partition, seq)
            if claim is None:
                break
            found.append((seq, claim.consumers))
            seq = claim.previous
        return tuple(found)

    # Keeping them ---------------------------------------------------------------------

    async def start_beating(self) -> None:
        """Write this engine's first heartbeat (over an earlier run's).

        Raises:
            BrokerError: the broker refused, or did not answer.
        """
        info = EngineInfo(started=self._started, partitions=len(self.owned))
        for _ in range(_CLAIM_TRIES):
            try:
                try:
                    self._beat = await self._leases.beat(self.engine_id, info, self._ttl)
                except EngineIdInUse as e:
                    # An earlier run of this data directory (one process at a time uses it).
                    self._beat = await self._leases.beat(
                        self.engine_id, info, self._ttl, previous=e.revision
                    )
                return
            except (Unconfirmed, LeaseLost) as e:
                last: BrokerError = e
                await anyio.sleep(_RETRY)
        raise BrokerError(f"cannot write engine {self.engine_id!r}'s heartbeat: {last}")

    async def keep(
        self,
        on_lost: Callable[[dict[int, str]], None] | None = None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew the leases and the heartbeat, three times per TTL, until cancelled.

        A lease that passed to another engine, or was not renewed before it expired (the
        broker did not answer in time), is no longer owned: ``on_lost`` is told which, and
        why; without it, :class:`PartitionsLost` is raised.
        """
        task_status.started()
        period = self._ttl / 3
        while True:
            await anyio.sleep(period)
            lost: dict[int, str] = {}
            async with anyio.create_task_group() as tg:
                for p in list(self._held):
                    tg.start_soon(self._renew, p, lost)
                tg.start_soon(self._renew_beat)
            if lost:
                for p in lost:
                    self._held.pop(p, None)
                    self.owned.pop(p, None)
                _logger.warning(
                    "partitions lost", partitions=sorted(lost), why=next(iter(lost.values()))
                )
                if on_lost is None:
                    raise PartitionsLost(lost, next(iter(lost.values())))
                on_lost(lost)

    async def _renew(self, partition: int, lost: dict[int, str]) -> None:
        lease = self._held[partition]
        while True:
            try:
                renewed = await self._leases.renew(lease)
                if self._held.get(partition) is lease:
                    self._held[partition] = renewed
                else:
                    # Released while this renewal was on its way (its release then failed
                    # on the revision this one moved): give up the renewed lease too, or
                    # nobody would renew it and nobody else could claim it until it expired
                    # - and putting it back would renew it for ever.
                    await self._release_lease(renewed)
                return
            except LeaseLost as e:
                lost[partition] = str(e)
                return
            except BrokerError as e:
                if time.monotonic() + _RETRY >= lease.deadline:
                    lost[partition] = f"its lease was not renewed before it expired: {e}"
                    return
                await anyio.sleep(_RETRY)

    async def _renew_beat(self) -> None:
        info = EngineInfo(started=self._started, partitions=len(self.owned))
        if self._beat is None:
            # Not written since it expired (the broker away): a first one again.
            try:
                await self.start_beating()
            except BrokerError as e:
                _logger.warning("heartbeat not written", error=str(e))
            return
        try:
            self._beat = await self._leases.beat(self.engine_id, info, self._ttl, self._beat)
        except LeaseLost:
            self._beat = None  # expired while the broker was away: begin again
            try:
                await self.start_beating()
            except BrokerError as e:
                _logger.warning("heartbeat not written", error=str(e))
        except BrokerError as e:
            _logger.warning("heartbeat not written", error=str(e))

    # Giving them up -------------------------------------------------------------------

    async def release(self, partition: int) -> None:
        """Give up ``partition`` (handed over at a clean point): another engine may claim it
        at once. Never raises: a lease not released expires."""
        self.owned.pop(partition, None)
        lease = self._held.pop(partition, None)
        if lease is not None:
            await self._release_lease(lease)

    async def release_all(self) -> None:
        """Give up every lease and the heartbeat (a clean stop): another engine may claim
        the partitions at once. Never raises: a lease not released expires."""
        held, self._held = self._held, {}
        self.owned.clear()
        for lease in held.values():
            await self._release_lease(lease)
        if self._beat is not None:
            try:
                await self._leases.stop_beating(self.engine_id, self._beat)
            except BrokerError as e:
                _logger.warning("heartbeat not removed", error=str(e))
            self._beat = None

    async def _release_lease(self, lease: Lease) -> None:
        try:
            await self._leases.release(lease)
        except BrokerError as e:
            _logger.warning(
                "lease not released: it expires by itself", partition=lease.partition, error=str(e)
            )
