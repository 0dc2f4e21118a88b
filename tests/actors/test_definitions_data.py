"""Definitions from the network are data: a definition applied over the API reads no file
(its lists carry their ids by value), and the files of a served segments file are read only
from the lists directory.

That nothing is read is observed with an audit hook (``sys.addaudithook``): Python raises
the ``open`` audit event for every file it opens, ``os.open`` included, in any thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from actors import (
    DefinitionError,
    SegmentSet,
    file_stamp,
    load_segments,
    load_segments_by_value,
    parse_segments,
    watch_segments,
)
from actors.rules._limits import MAX_SEGMENTS_FILE_BYTES
from actors.rules._lists import NO_FILES_OVER_THE_NETWORK, toml_text
from protocol import ApiError
from protocol.nats import ApiClient, connect
from tests.actors.test_api import ask, error, serving
from tests.helpers import NatsServer, segments

VIP = "[segments.vip]\nrule = \"in_list('vip')\"\n"
REFUSED = "new.toml: [lists.vip] " + NO_FILES_OVER_THE_NETWORK


def listed(file: str, customers: str = "") -> str:
    extra = f"customers = {customers}\n" if customers else ""
    return f"[lists.vip]\n{extra}file = {file!r}\n\n{VIP}"


# --- what is opened --------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | Path):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # for good: a hook cannot be removed; it records only when asked


@contextlib.contextmanager
def opening() -> Iterator[list[str]]:
    """The paths of the files opened in the block, by any thread."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def test_the_audit_hook_sees_a_list_file_read(tmp_path: Path) -> None:
    # The control: without it, "nothing was opened" would prove nothing.
    (tmp_path / "ids").write_text("alice\n")
    with opening() as opened:
        s = parse_segments(listed("ids"), source="new.toml", base_dir=tmp_path)
    assert s.lists["vip"] == {"alice"}
    assert str(tmp_path / "ids") in opened


# --- over the API: refused, and nothing read ------------------------------------------------


def _files(tmp_path: Path) -> dict[str, str]:
    """Files a request might name: readable ids, a FIFO, a directory, missing ones, and
    files outside anything the engine serves."""
    (tmp_path / "ids").write_text("alice\n")
    os.mkfifo(tmp_path / "fifo")  # never written: opening it to read would block
    return {
        "relative": "ids",
        "absolute": str(tmp_path / "ids"),
        "fifo": str(tmp_path / "fifo"),
        "directory": str(tmp_path),
        "missing": str(tmp_path / "missing"),
        "shadow": "/etc/shadow",
        "dotdot": "../../../../etc/passwd",
        "device": "/dev/zero",
        "empty": "",
    }


@pytest.mark.timeout(30)
async def test_a_definition_over_the_api_naming_a_file_is_refused_and_nothing_read(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    files = _files(tmp_path)
    ours = segments("[lists.vip]\ncustomers = ['bob']\n\n" + VIP)
    old: dict[str, object] = {"base_dir": str(tmp_path)}  # as older clients send: ignored
    requests = [
        {"toml": toml, "source": "new.toml", "apply": apply, **extra}
        for file in files.values()
        for toml in (listed(file), listed(file, customers="['carol']"))
        for apply in (False, True)
        for extra in ({}, old)
    ]
    async with serving(nats_server.url, tmp_path / "shoal.db", ours) as engine:
        with opening() as opened:
            for body in requests:
                msg = await ask(client, "shoal.api.definitions", body)
                assert error(msg) == ("400", REFUSED), body
        assert engine.segments is ours  # nothing applied
    assert opened == []


async def test_the_python_client_gets_the_same_refusal(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    (tmp_path / "ids").write_text("alice\n")
    async with serving(nats_server.url, tmp_path / "shoal.db", segments(VIP_INLINE)) as engine:
        nc = await connect([nats_server.url])
        try:
            with opening() as opened, pytest.raises(ApiError) as e:
                await ApiClient(nc).definitions(
                    listed(str(tmp_path / "ids")), source="new.toml", apply=True
                )
        finally:
            await nc.close()
        assert (e.value.code, e.value.message) == ("400", REFUSED)
        assert engine.segments.lists["vip"] == {"bob"}
    assert opened == []


VIP_INLINE = "[lists.vip]\ncustomers = ['bob']\n\n" + VIP


async def test_lists_by_value_apply_and_an_old_clients_base_dir_is_ignored(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    async with serving(nats_server.url, tmp_path / "shoal.db", segments(VIP_INLINE)) as engine:
        toml = "[lists.vip]\ncustomers = ['alice', 'carol']\n\n" + VIP
        body = {"toml": toml, "source": "new.toml", "base_dir": str(tmp_path), "apply": True}
        msg = await ask(client, "shoal.api.definitions", body)
        assert error(msg) == ("", "")
        assert engine.segments.lists["vip"] == {"alice", "carol"}
        # Other unknown fields are still refused.
        msg = await ask(client, "shoal.api.definitions", {"toml": toml, "bse_dir": "/"})
        assert error(msg) == (
            "400",
            "invalid request: Object contains unknown field `bse_dir`",
        )


def test_parsed_text_reads_no_file_without_a_base_dir(tmp_path: Path) -> None:
    files = _files(tmp_path)
    with opening() as opened:
        for file in files.values():
            with pytest.raises(DefinitionError) as e:
                parse_segments(listed(file), source="new.toml")
            assert str(e.value) == REFUSED
    assert opened == []


# --- a served file: list files only from the lists directory --------------------------------


@pytest.fixture
def lists(tmp_path: Path) -> Path:
    """``tmp_path/lists`` (the lists directory) with ``ids`` and ``sub/ids``, and a file
    ``tmp_path/secret`` outside it."""
    root = tmp_path / "lists"
    (root / "sub").mkdir(parents=True)
    (root / "ids").write_text("alice\n")
    (root / "sub" / "ids").write_text("bob\n")
    (tmp_path / "secret").write_text("carol\n")
    return root


def load(lists: Path, file: str, lists_dir: Path | None = None) -> SegmentSet:
    path = lists / "segments.toml"
    path.write_text(listed(file))
    return load_segments(path, lists_dir=lists if lists_dir is None else lists_dir)


def test_list_files_within_the_lists_directory_are_read(lists: Path) -> None:
    (lists / "link").symlink_to(lists / "sub" / "ids")  # a link that stays inside
    for file, ids in (
        ("ids", {"alice"}),
        ("sub/ids", {"bob"}),
        ("sub/../ids", {"alice"}),
        (str(lists / "sub" / "ids"), {"bob"}),
        ("link", {"bob"}),
    ):
        assert load(lists, file).lists["vip"] == ids, file


def test_list_files_outside_the_lists_directory_are_refused_unread(
    lists: Path,
) -> None:
    secret = lists.parent / "secret"
    (lists / "escape").symlink_to(secret)
    (lists / "sub" / "up").symlink_to(lists.parent)
    outside = "it is outside the lists directory {lists} (list files are read only from there; "
    outside += "`shoal serve --lists-dir` sets it)"
    for file, shown, link in (
        ("../secret", f"{lists}/../secret", ""),
        (str(secret), str(secret), ""),
        ("/etc/shadow", "/etc/shadow", ""),
        ("escape", f"{lists}/escape", f"; a symbolic link leads to {secret}"),
        ("sub/up/secret", f"{lists}/sub/up/secret", f"; a symbolic link leads to {secret}"),
    ):
        path = lists / "segments.toml"
        path.write_text(listed(file))
        with opening() as opened, pytest.raises(DefinitionError) as e:
            load_segments(path, lists_dir=lists)
        problem = outside.format(lists=lists) + link
        assert str(e.value) == f"{path}: [lists.vip] cannot read {shown}: {problem}", file
        assert opened == [str(path)], file  # the segments file, and nothing else


def test_without_a_lists_directory_a_file_on_disk_reads_its_lists_anywhere(lists: Path) -> None:
    # segments validate and apply, on the user's own machine.
    path = lists / "segments.toml"
    path.write_text(listed("../secret"))
    assert load_segments(path).lists["vip"] == {"carol"}


def test_a_missing_list_file_in_the_lists_directory_cannot_be_read(lists: Path) -> None:
    with pytest.raises(DefinitionError) as e:
        load(lists, "nope")
    assert str(e.value).startswith(f"{lists}/segments.toml: [lists.vip] cannot read {lists}/nope: ")
    assert "No such file or directory" in str(e.value)


async def test_a_reload_naming_a_file_outside_the_lists_directory_changes_nothing(
    lists: Path,
) -> None:
    path = lists / "segments.toml"
    path.write_text(listed("ids"))
    stamp = file_stamp(path)
    applied: list[SegmentSet] = []

    async def apply(s: SegmentSet) -> None:
        applied.append(s)

    send, receive = anyio.create_memory_object_stream[object](1)
    with send, receive, structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: watch_segments(
                    path, apply, stamp=stamp, asked=receive, lists_dir=lists, settle=0.01
                )
            )
            path.write_text(listed("../secret"))
            await send.send("SIGHUP")
            with anyio.fail_after(5):
                while not logs:
                    await anyio.sleep(0.01)
            path.write_text(listed("sub/ids"))
            await send.send("SIGHUP")
            with anyio.fail_after(5):
                while not applied:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert [(x["event"], x["error"]) for x in logs] == [
        (
            "segments not reloaded, the previous ones stay in force",
            f"{path}: [lists.vip] cannot read {lists}/../secret: it is outside the lists "
            f"directory {lists} (list files are read only from there; `shoal serve "
            "--lists-dir` sets it)",
        )
    ]
    assert [s.lists["vip"] for s in applied] == [{"bob"}]


# --- the text shoal segments apply sends ------------------------------------------------------


def test_by_value_text_has_the_ids_and_evaluates_alike(lists: Path) -> None:
    path = lists / "segments.toml"
    text = (
        '[score]\nhalf_life = "7d"\nweights = { "Visit" = 1.5, "A \\"q\\"" = 1e-05 }\n\n'
        "[lists.vip]\ncustomers = ['zed']\nfile = 'ids'\n\n"
        "[lists.staff]\ncustomers = ['bob']\n\n"
        "[segments.vip]\ndescription = 'in\\tthe list \\u007f'\nrule = \"in_list('vip')\"\n"
        "[segments.staff]\nrule = \"in_list('staff') and count('Visit') >= 1\"\n"
    )
    path.write_text(text)
    sent, loaded = load_segments_by_value(path)
    assert "file" not in tomllib.loads(sent)["lists"]["vip"]
    again = parse_segments(sent, source=str(path))  # as the engine parses it: no file read
    assert again.lists == {"vip": {"alice", "zed"}, "staff": {"bob"}}
    assert again.fingerprint == loaded.fingerprint == load_segments(path).fingerprint
    assert [s.description for s in again.segments] == [s.description for s in loaded.segments]


def test_by_value_text_is_the_file_itself_without_list_files(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text("# mine\n" + VIP_INLINE)
    assert load_segments_by_value(path)[0] == "# mine\n" + VIP_INLINE


def test_by_value_text_over_the_engines_limit_names_the_list(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text("[lists.small]\ncustomers = ['a']\n\n[lists.vip]\nfile = 'ids'\n\n" + VIP)
    (tmp_path / "ids").write_text("".join(f"customer-{i:07}\n" for i in range(80_000)))
    with pytest.raises(DefinitionError) as e:
        load_segments_by_value(path)
    assert re.fullmatch(
        re.escape(f"{path}: with the ids of its list files by value it has ")
        + r"1,\d\d\d,\d\d\d"
        + re.escape(
            f" bytes; the engine takes at most {MAX_SEGMENTS_FILE_BYTES:,} over the network "
            "([lists.vip] has 80,000 ids): serve large lists from files instead (`shoal serve "
            "--segments FILE --lists-dir DIR`)"
        ),
        str(e.value),
    )


_scalars = st.text() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.booleans()
_docs = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _docs, max_size=5))
def test_toml_text_reads_back_equal(doc: dict[str, Any]) -> None:
    assert tomllib.loads(toml_text(doc)) == doc
