"""Every stream and bucket shoal declares records its format in its metadata
(``shoal_format``): a new one is made with it, one made by shoal 484eaec (without) gets it
at the next declaration, which is logged once, and one of a newer shoal is refused before
anything is changed. Real nats-server."""

from __future__ import annotations

import pytest
import structlog
from nats.aio.client import Client
from nats.js.api import StreamConfig

from protocol import (
    EVENTS_STREAM,
    REJECTED_STREAM,
    SEGMENTS_STREAM,
    STREAM_FORMAT,
    FormatTooNewError,
)
from protocol.nats import DefinitionsKV, LeaseBucket, ensure_streams

ALL = (EVENTS_STREAM, SEGMENTS_STREAM, REJECTED_STREAM)


async def metadata(client: Client, stream: str) -> dict[str, str]:
    return dict((await client.jetstream().stream_info(stream)).config.metadata or {})


async def set_metadata(client: Client, stream: str, meta: dict[str, str] | None) -> None:
    js = client.jetstream()
    config: StreamConfig = (await js.stream_info(stream)).config
    config.metadata = meta
    await js.update_stream(config)


async def test_streams_are_made_with_their_format(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        await ensure_streams(client.jetstream())
    for stream in ALL:
        assert (await metadata(client, stream)).get("shoal_format") == str(STREAM_FORMAT)
    assert logs == []  # new: nothing upgraded


async def test_streams_of_484eaec_are_upgraded_once_keeping_other_metadata(
    client: Client,
) -> None:
    await ensure_streams(client.jetstream())
    for stream in ALL:
        await set_metadata(client, stream, {"team": "growth"} if stream == EVENTS_STREAM else None)
    with structlog.testing.capture_logs() as logs:
        await ensure_streams(client.jetstream())
    assert logs == [
        {
            "event": "upgraded in place",
            "log_level": "info",
            "what": f"stream {stream}",
            "from_format": 0,
            "to_format": STREAM_FORMAT,
        }
        for stream in ALL
    ]
    events = await metadata(client, EVENTS_STREAM)
    assert (events["shoal_format"], events["team"]) == (str(STREAM_FORMAT), "growth")
    with structlog.testing.capture_logs() as logs:
        await ensure_streams(client.jetstream())
    assert logs == []


@pytest.mark.parametrize("stream", ALL)
@pytest.mark.parametrize("found", ["99", "x"])
async def test_a_newer_stream_is_refused_as_it_is(client: Client, stream: str, found: str) -> None:
    await ensure_streams(client.jetstream())
    await set_metadata(client, stream, {"shoal_format": found})
    before = (await client.jetstream().stream_info(stream)).config
    with pytest.raises(FormatTooNewError) as e:
        await ensure_streams(client.jetstream())
    shown = found if found.isdigit() else repr(found)
    assert str(e.value) == (
        f"stream {stream} has format {shown}, and this shoal knows formats up to "
        f"{STREAM_FORMAT}: it was written by a newer shoal. Run that shoal (or a later one) "
        "on this data; this one stops rather than misread it"
    )
    assert (await client.jetstream().stream_info(stream)).config == before


async def test_the_buckets_record_their_format(client: Client) -> None:
    js = client.jetstream()
    # As shoal 484eaec made them: the leases bucket by hand, the definitions by nats-py.
    leases = LeaseBucket(client)
    await leases.ensure()
    await set_metadata(client, "KV_SHOAL_LEASES", None)
    await js.create_key_value(bucket="SHOAL_DEFINITIONS", history=1)
    with structlog.testing.capture_logs() as logs:
        await leases.ensure()
        await DefinitionsKV.open(client)
    assert [(e["what"], e["from_format"]) for e in logs] == [
        ("KV bucket SHOAL_LEASES", 0),
        ("KV bucket SHOAL_DEFINITIONS", 0),
    ]
    for stream in ("KV_SHOAL_LEASES", "KV_SHOAL_DEFINITIONS"):
        assert (await metadata(client, stream))["shoal_format"] == str(STREAM_FORMAT)
        await set_metadata(client, stream, {"shoal_format": "99"})
    with pytest.raises(FormatTooNewError, match="^KV bucket SHOAL_LEASES has format 99, "):
        await leases.ensure()
    with pytest.raises(FormatTooNewError, match="^KV bucket SHOAL_DEFINITIONS has format 99, "):
        await DefinitionsKV.open(client)
