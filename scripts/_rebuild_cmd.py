"""``shoal rebuild --from-stream``: bring a store that is behind its events stream (a lost or
emptied ``shoal.db``) level with the stream again, while the engine is stopped.

The work is :func:`actors.rebuild_from_stream`; the stream is read by
:func:`protocol.nats.read_stream`, from the embedded broker's store in the data directory
or from ``--nats``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from actors import EngineConfig, rebuild_from_stream
from protocol import (
    EVENTS_STREAM,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    from_instant,
)
from protocol.nats import (
    connect,
    jetstream_ports,
    last_claims,
    read_stream,
    rejected_positions,
)
from store import Store

from ._connection import add_data_dir_options, credentials_of, engine_servers
from ._errors import NotFound
from ._logging import log_store_upgrade


def register(sub: Any) -> None:
    """Add the ``rebuild`` command to the ``shoal`` subparsers ``sub``."""
    p = sub.add_parser(
        "rebuild",
        help="rebuild the store from the events stream, while the engine is stopped",
        description="Add to the event log every event the engine's consumer acknowledged "
        f"in {EVENTS_STREAM} that the log lacks (decoded as the engine decodes them), and "
        f"to the outbox the transitions {SEGMENTS_STREAM} holds, as published, so that the "
        "engine starts from them and goes on with the next transition versions.",
    )
    p.add_argument(
        "--from-stream",
        action="store_true",
        required=True,
        help=f"rebuild from {EVENTS_STREAM} (and {SEGMENTS_STREAM}): the only source so far",
    )
    add_data_dir_options(p)
    p.add_argument(
        "--consumer",
        default="shoal-engine",
        help="the prefix of the engine's durable consumers (serve --consumer)",
    )
    p.set_defaults(run=_rebuild)


async def _rebuild(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    if not args.nats and not (data_dir / "nats").is_dir():
        raise NotFound(
            f"{data_dir / 'nats'} holds no broker store to rebuild from; "
            "give the engine's server with --nats URL"
        )
    async with contextlib.AsyncExitStack() as stack:
        # Taken first: it fails at once if the engine is running.
        store = await Store.open(data_dir / "shoal.db")
        stack.push_async_callback(store.close)
        log_store_upgrade(store)
        servers = await engine_servers(stack, args, data_dir)
        credentials = credentials_of(args).for_role("engine")
        nc = await connect(servers, name="shoal-rebuild", credentials=credentials)
        stack.push_async_callback(nc.close)
        source, _ = await jetstream_ports(nc, consumer=args.consumer)
        # How far the engines committed: each partition's floor is its last claim's
        # consumer's (serve names one per claim), or the one before claims.
        claims = await last_claims(nc.jetstream(), args.consumer, source.partitions)
        source, _ = await jetstream_ports(nc, consumer=args.consumer, claims=claims)
        state = await source.stream_state()
        if state.ack_floor is None and not state.published:
            print(
                f"no consumer {args.consumer}-<partition> exists and no transition was "
                f"published: nothing to rebuild (the engine reads {state.stream} from its "
                "start)"
            )
            return 0
        # What the engine rejected stays rejected: an event quarantined because it raised
        # when applied decodes fine, and would raise again.
        rejected = await rejected_positions(nc)
        report = await rebuild_from_stream(
            store,
            read_stream(nc, EVENTS_STREAM, source.filter_subject, through=state.ack_floor),
            read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD),
            through=state.ack_floor,
            max_event_bytes=EngineConfig().max_event_bytes,
            rejected=rejected,
        )
        print(
            f"{store.path}: {report.logged} events logged and {report.transitions} published "
            f"transitions restored from {report.read} messages of {state.stream} through "
            f"position {report.through} ({report.rejected} rejected as the engine does)"
        )
        cut = store.retention.cut
        if cut is not None:
            print(
                f"the log is cut (retention) at {from_instant(cut.at).isoformat()}: "
                f"{report.cut} events received before it were left out, their customers' "
                "state holds them"
            )
    return 0
