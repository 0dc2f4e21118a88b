"""A stream's exact copy, out and back in: JetStream's own stream snapshot and restore.

nats-py has no client for them, so this is one, after the server's side
(``jsStreamSnapshotRequest``, ``streamSnapshot``, ``jsStreamRestoreRequest`` and
``processStreamRestore`` in nats-server's ``server/jetstream_api.go``):

- *Snapshot.* A request on ``$JS.API.STREAM.SNAPSHOT.<stream>`` names a subject to deliver
  to; the reply holds the stream's configuration and state at the snapshot. The server then
  sends the snapshot (a tar archive compressed with S2) there in chunks. Each chunk but the
  last carries a reply subject (``$JS.SNAPSHOT.ACK.<stream>.<id>.<size>.<index>``): answering
  it is the flow control that lets the server send more (it waits 5 s for one at most). An
  empty message ends it: without a status, or status 204, it is complete; 408 or 500 mean
  the server gave up (the description says why).
- *Restore.* A request on ``$JS.API.STREAM.RESTORE.<stream>`` with the configuration and
  state; the reply names the subject to send the chunks to, each as a request answered
  (empty) once written. An empty request ends it, and its answer is the stream's info, or
  the error. The stream must not exist. The server gives up after 5 s without a chunk.

The copy keeps every message as stored: its sequence, subject, headers and timestamp, the
deleted sequences, and the configuration. So positions recorded elsewhere (a store's
``stream_through``, a claim's sequence) still name the same messages once restored. The
duplicate window is not: seen on nats-server 2.15.1, a restored stream stores a message
whose ``Nats-Msg-Id`` it holds (the server rebuilds the window, from the messages stored
within it, only when it starts again).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from protocol._errors import BrokerError

from ._refusals import permission_guard

CHUNK_BYTES = 128 * 1024
"""The size of a snapshot's chunks, both ways (the server's default)."""
_API_TIMEOUT = 10.0
"""Seconds to wait for the JetStream API's answer to a request."""
_CHUNK_TIMEOUT = 30.0
"""Seconds to wait for the next chunk of a snapshot, or for a chunk's acknowledgement."""
_FINISH_TIMEOUT = 300.0
"""Seconds to wait for a restore to finish once every chunk is sent (the server rebuilds the
stream's indexes then)."""


class StreamNotFound(BrokerError):
    """The stream does not exist on the broker."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} does not exist on the broker")
        self.stream = stream


class StreamExists(BrokerError):
    """A stream that a restore would create exists already."""

    def __init__(self, stream: str, messages: int) -> None:
        super().__init__(
            f"stream {stream} exists already on the broker ({messages} messages): a restore "
            "needs a broker without it"
        )
        self.stream = stream
        self.messages = messages


@dataclass(frozen=True, slots=True)
class StreamCopy:
    """A stream's snapshot written to a file: what the broker said of the stream when it
    took it, and what was written."""

    stream: str
    config: dict[str, Any]
    """The stream's configuration (the broker's JSON), as a restore needs it."""
    state: dict[str, Any]
    """The stream's state at the snapshot (``messages``, ``first_seq``, ``last_seq``...)."""
    bytes: int
    """The size of the file written."""
    sha256: str
    """The file's SHA-256, hex."""


def _api_error(reply: dict[str, Any]) -> dict[str, Any] | None:
    error = reply.get("error")
    return error if isinstance(error, dict) else None


async def _api(nc: Client, subject: str, request: dict[str, Any], doing: str) -> dict[str, Any]:
    """The JetStream API's JSON answer to ``request`` on ``subject``.

    Raises:
        BrokerError: no answer, or not JSON.
        PermissionDenied: the broker refuses the subject to this client.
    """
    try:
        async with permission_guard(nc, subject):
            msg = await nc.request(subject, json.dumps(request).encode(), timeout=_API_TIMEOUT)
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"{doing}: the broker did not answer ({e or type(e).__name__})") from e
    try:
        reply = json.loads(msg.data)
    except ValueError as e:
        raise BrokerError(f"{doing}: the broker's answer is not JSON") from e
    if not isinstance(reply, dict):
        raise BrokerError(f"{doing}: the broker's answer is not a JSON object")
    return reply


async def stream_info(nc: Client, stream: str) -> dict[str, Any] | None:
    """``stream``'s info as the broker gives it (JSON: ``config``, ``state``...), or None
    when it does not exist.

    Raises:
        BrokerError: the broker does not answer, or refuses.
    """
    doing = f"cannot read stream {stream}'s info"
    reply = await _api(nc, f"$JS.API.STREAM.INFO.{stream}", {}, doing)
    error = _api_error(reply)
    if error is not None:
        if error.get("err_code") == 10059 or error.get("code") == 404:
            return None
        raise BrokerError(f"{doing}: {error.get('description', error)}")
    return reply


async def snapshot_stream(nc: Client, stream: str, target: Path) -> StreamCopy:
    """Write an exact copy of ``stream`` (without its consumers) to the file ``target``, as
    the broker's snapshot API gives it (its messages checked first), while it is in use:
    what it holds when the broker starts the snapshot.

    Raises:
        StreamNotFound: the stream does not exist.
        BrokerError: the broker refuses, gives up, or stops sending; or the file cannot be
            written (what was written of it is left).
    """
    doing = f"cannot back up stream {stream}"
    deliver = nc.new_inbox()
    sub = await nc.subscribe(deliver)
    digest = hashlib.sha256()
    written = 0
    try:
        reply = await _api(
            nc,
            f"$JS.API.STREAM.SNAPSHOT.{stream}",
            # No consumers: each reader makes its own again (the engine's from its store's
            # positions, which may be behind the floors its consumers had by now).
            {
                "deliver_subject": deliver,
                "no_consumers": True,
                "chunk_size": CHUNK_BYTES,
                "jsck": True,
            },
            doing,
        )
        error = _api_error(reply)
        if error is not None:
            if error.get("err_code") == 10059 or error.get("code") == 404:
                raise StreamNotFound(stream)
            raise BrokerError(f"{doing}: {error.get('description', error)}")
        config, state = reply.get("config"), reply.get("state")
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise BrokerError(f"{doing}: the broker's answer has no configuration or state")
        try:
            async with await anyio.open_file(target, "wb") as out:
                while True:
                    msg = await _next(sub, doing)
                    if not msg.data:
                        _finished(msg, doing)
                        break
                    await out.write(msg.data)
                    digest.update(msg.data)
                    written += len(msg.data)
                    if msg.reply:
                        # Flow control: the server sends more once this is answered.
                        await nc.publish(msg.reply, b"")
        except OSError as e:
            raise BrokerError(f"{doing}: cannot write {target}: {e.strerror or e}") from e
    finally:
        await sub.unsubscribe()
    return StreamCopy(
        stream=stream, config=config, state=state, bytes=written, sha256=digest.hexdigest()
    )


async def _next(sub: Any, doing: str) -> Msg:
    try:
        msg: Msg = await sub.next_msg(timeout=_CHUNK_TIMEOUT)
    except (TimeoutError, nats.errors.TimeoutError) as e:
        raise BrokerError(f"{doing}: the broker stopped sending the snapshot") from e
    return msg


def _finished(msg: Msg, doing: str) -> None:
    """Check the empty message that ends a snapshot: complete, or the server's reason."""
    headers = msg.headers or {}
    status = headers.get("Status", "")
    if status and status != "204":
        reason = headers.get("Description", "") or status
        raise BrokerError(f"{doing}: the broker gave up the snapshot ({status} {reason})")


async def restore_stream(
    nc: Client, stream: str, config: dict[str, Any], state: dict[str, Any], source: Path
) -> dict[str, Any]:
    """Create ``stream`` from the snapshot in ``source`` (made by :func:`snapshot_stream`),
    with ``config`` and ``state`` as the snapshot recorded them. Returns the restored
    stream's state, as the broker reports it.

    Raises:
        StreamExists: the stream exists already.
        BrokerError: the broker refuses the snapshot (damaged, or over its limits) or stops
            answering; the file cannot be read.
    """
    doing = f"cannot restore stream {stream}"
    held = await stream_info(nc, stream)
    if held is not None:
        raise StreamExists(stream, int(held.get("state", {}).get("messages", 0)))
    reply = await _api(
        nc, f"$JS.API.STREAM.RESTORE.{stream}", {"config": config, "state": state}, doing
    )
    error = _api_error(reply)
    if error is not None:
        raise BrokerError(f"{doing}: {error.get('description', error)}")
    deliver = reply.get("deliver_subject")
    if not isinstance(deliver, str) or not deliver:
        raise BrokerError(f"{doing}: the broker named no subject to send the snapshot to")
    try:
        async with await anyio.open_file(source, "rb") as src, permission_guard(nc, deliver):
            while chunk := await src.read(CHUNK_BYTES):
                _chunk_taken(await _send(nc, deliver, chunk, _CHUNK_TIMEOUT, doing), doing)
            # The empty request ends the transfer; its answer comes once the stream is made.
            done = await _send(nc, deliver, b"", _FINISH_TIMEOUT, doing)
    except OSError as e:
        raise BrokerError(f"{doing}: cannot read {source}: {e.strerror or e}") from e
    try:
        result = json.loads(done.data)
    except ValueError as e:
        raise BrokerError(f"{doing}: the broker's last answer is not JSON") from e
    error = _api_error(result) if isinstance(result, dict) else None
    if error is not None:
        raise BrokerError(f"{doing}: {error.get('description', error)}")
    # The answer is a stream's creation's: the stream's info, inline.
    restored = result.get("state") if isinstance(result, dict) else None
    if not isinstance(restored, dict):
        raise BrokerError(f"{doing}: the broker did not report the restored stream")
    return restored


async def _send(nc: Client, subject: str, data: bytes, timeout: float, doing: str) -> Msg:
    try:
        return await nc.request(subject, data, timeout=timeout)
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"{doing}: the broker did not take the snapshot ({e})") from e


def _chunk_taken(reply: Msg, doing: str) -> None:
    """A chunk's answer: empty when written, else the reason it was refused."""
    if not reply.data:
        return
    try:
        answer = json.loads(reply.data)
    except ValueError:
        answer = {}
    error = _api_error(answer) if isinstance(answer, dict) else None
    reason = (
        error.get("description", error)
        if error is not None
        else reply.data[:200].decode(errors="replace")
    )
    raise BrokerError(f"{doing}: the broker refused the snapshot: {reason}")
