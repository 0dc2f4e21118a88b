"""``shoal cluster``: a three-node nats-server cluster with JetStream on this machine, for
trying shoal on replicated (R3) streams and testing it there; run until Ctrl-C or SIGTERM.

The nodes take clients on ``--port`` and the two ports after it, routes on ``--cluster-port``
and the two after (default: the client ports + 2000, 6222 for 4222) and serve monitoring on
``--http-port`` and the two after (default: the client ports + 4000, 8222 for 4222), the
ports nats-server uses by default. Their stores are ``DIR/cluster/n1`` to ``n3``; as
``shoal serve``'s embedded broker, they admit only the role keys of ``DIR/auth`` (made on
the first start), or anyone with ``--no-auth``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import anyio
import structlog

from protocol import KEYS_DIR, embedded_cluster, is_loopback

from ._connection import DEFAULT_DATA_DIR
from ._errors import UsageError
from ._signals import stop_on_signal

_CLUSTER_OFFSET = 2000
_HTTP_OFFSET = 4000
_NODES = 3


def register(sub: Any) -> None:
    """Add ``cluster`` to the ``shoal`` subcommands ``sub``."""
    p = sub.add_parser(
        "cluster",
        help="run a 3-node nats-server cluster on this machine (for trying and testing)",
        description="Run a cluster of three nats-server nodes with JetStream on this "
        "machine, until Ctrl-C or SIGTERM: streams made there may have three replicas. "
        "Prints the three client URLs, one a line, once the cluster has elected its "
        "JetStream leader; give them all to `shoal serve --nats URL --nats URL --nats URL`. "
        "The nodes' stores are DIR/cluster/n1 to n3. They admit only the role keys in "
        "DIR/auth (made on the first start, the same keys as `shoal serve`'s embedded "
        "broker), so `shoal serve --data-dir DIR --nats ...` connects with DIR's engine key.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"the stores go in DIR/cluster, the role keys in DIR/auth "
        f"(default: ./{DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address clients connect to (default %(default)s); routes and monitoring "
        "listen on a loopback address whatever it is",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=4222,
        help="the client port of n1; n2 and n3 take the next two (default %(default)s)",
    )
    p.add_argument(
        "--cluster-port",
        type=_port,
        default=None,
        metavar="PORT",
        help=f"the route port of n1, then the next two (default: --port + {_CLUSTER_OFFSET})",
    )
    p.add_argument(
        "--http-port",
        type=_port,
        default=None,
        metavar="PORT",
        help=f"the monitoring port of n1 (/jsz, /healthz), then the next two (default: "
        f"--port + {_HTTP_OFFSET})",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="admit anyone who reaches the cluster, to do anything (only with a loopback --host)",
    )
    p.set_defaults(run=_cluster)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return value


def cluster_ports(
    port: int, cluster_port: int | None, http_port: int | None
) -> tuple[list[int], list[int], list[int]]:
    """The client, route and monitoring ports of the three nodes, as ``shoal cluster`` takes
    them from its options: each first port and the two after it, the route and monitoring
    ports by default the client ports + 2000 and + 4000.

    Raises:
        UsageError: a port would be beyond 65535, or one port has two uses.
    """
    kinds = {
        "--port": port,
        "--cluster-port": port + _CLUSTER_OFFSET if cluster_port is None else cluster_port,
        "--http-port": port + _HTTP_OFFSET if http_port is None else http_port,
    }
    for option, first in kinds.items():
        if first + _NODES - 1 > 65535:
            raise UsageError(
                f"the ports of {option} would be {first} to {first + _NODES - 1}, beyond "
                f"65535: choose a lower {option}"
            )
    ports = [list(range(first, first + _NODES)) for first in kinds.values()]
    every = [p for triple in ports for p in triple]
    if len(set(every)) != len(every):
        ranges = ", ".join(
            f"{option} {first}-{first + _NODES - 1}" for option, first in kinds.items()
        )
        raise UsageError(f"the ports overlap ({ranges}): each option takes three ports")
    return ports[0], ports[1], ports[2]


async def _cluster(args: argparse.Namespace) -> int:
    logger = structlog.get_logger("shoal")
    clients, routes, monitoring = cluster_ports(args.port, args.cluster_port, args.http_port)
    if args.no_auth and not is_loopback(args.host):
        raise UsageError(
            f"--no-auth listens on {args.host}, which is not a loopback address: anyone who "
            "reaches it could forge transitions and read every customer. Drop --no-auth "
            "(clients then use the keys in the data directory), or listen on --host 127.0.0.1"
        )
    data_dir: Path = args.data_dir
    keys = None if args.no_auth else data_dir / KEYS_DIR
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        async with embedded_cluster(
            data_dir / "cluster",
            host=args.host,
            ports=clients,
            cluster_ports=routes,
            http_ports=monitoring,
            keys=keys,
        ) as urls:
            for url in urls:
                print(url, flush=True)
            logger.info(
                "nats-server cluster ready",
                urls=urls,
                stores=str(data_dir / "cluster"),
                auth="none (--no-auth)" if keys is None else f"role keys in {keys}",
                monitoring_ports=monitoring,
                serve=serve_command(data_dir, urls),
            )
            await anyio.sleep_forever()
    logger.info("nats-server cluster stopped")
    return 0


def serve_command(data_dir: Path, urls: list[str]) -> str:
    """The ``shoal serve`` command that runs the engine on the cluster of ``urls``, with the
    engine key of ``data_dir``."""
    words = ["shoal serve"]
    if data_dir != DEFAULT_DATA_DIR:
        words.append(f"--data-dir {data_dir}")
    words += [f"--nats {url}" for url in urls]
    return " ".join(words)
