"""List files and where they are read: ``shoal segments apply|validate`` read them on the
user's machine and send the ids by value; ``shoal serve`` reads them only from its lists
directory (``--lists-dir``, by default the segments file's own)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import anyio
import pytest

from actors.rules._limits import MAX_SEGMENTS_FILE_BYTES
from tests.actors.test_api import serving
from tests.helpers import NatsServer, Proc, run, segments

VIP = "[segments.vip]\nrule = \"in_list('vip')\"\n"
OURS = "[lists.vip]\ncustomers = ['bob']\n\n" + VIP


def listed(file: str) -> str:
    return f"[lists.vip]\nfile = {file!r}\n\n{VIP}"


def outside(shown: Path | str, lists_dir: Path) -> str:
    return (
        f"[lists.vip] cannot read {shown}: it is outside the lists directory {lists_dir} (list "
        "files are read only from there; `shoal serve --lists-dir` sets it)"
    )


async def shoal(*args: str) -> tuple[int, str, str]:
    done = await anyio.to_thread.run_sync(lambda: run(*args))
    return done.returncode, done.stdout, done.stderr


@pytest.mark.timeout(60)
async def test_apply_and_validate_read_list_files_here_and_send_the_ids(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    defs = tmp_path / "defs"
    (defs / "lists").mkdir(parents=True)
    (defs / "lists" / "vip.txt").write_text("# our best\nalice\n\ncarol\n")
    path = defs / "segments.toml"
    path.write_text(listed("lists/vip.txt"))  # relative to the file, not to the cwd
    url = nats_server.url
    async with serving(url, tmp_path / "shoal.db", segments(OURS)) as engine:
        assert await shoal("segments", "validate", str(path), "--nats", url) == (
            0,
            f"{path}: ok, 1 segment (vip)\n"
            f"{path}: on the engine, applying it no change to the definitions in force\n",
            "",
        )
        assert engine.segments.lists["vip"] == {"bob"}
        code, out, err = await shoal("segments", "apply", str(path), "--nats", url, "--json")
        assert (code, err) == (0, "")
        assert json.loads(out)["applied"] is True
        assert engine.segments.lists["vip"] == {"alice", "carol"}
        assert engine.segments.source == str(path)


async def test_a_list_too_big_for_the_engine_is_refused_here(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(listed("ids"))
    (tmp_path / "ids").write_text("".join(f"customer-{i:07}\n" for i in range(80_000)))
    code, out, err = await shoal("segments", "apply", str(path), "--nats", nats_server.url)
    assert (code, out) == (3, "")
    assert err.startswith(f"shoal: error: {path}: with the ids of its list files by value it has ")
    assert err.endswith(
        f" bytes; the engine takes at most {MAX_SEGMENTS_FILE_BYTES:,} over the network "
        "([lists.vip] has 80,000 ids): serve large lists from files instead (`shoal serve "
        "--segments FILE --lists-dir DIR`)\n"
    )


@pytest.mark.timeout(60)
async def test_a_list_too_big_for_the_brokers_max_payload_is_a_clear_error(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 65536\n")
    server = NatsServer(tmp_path / "nats", "-c", str(conf))
    server.start()
    try:
        async with serving(server.url, tmp_path / "shoal.db", segments(OURS)) as engine:
            path = tmp_path / "segments.toml"
            path.write_text(listed("ids"))
            (tmp_path / "ids").write_text("".join(f"c{i:05}\n" for i in range(10_000)))
            for command in ("apply", "validate"):
                code, out, err = await shoal("segments", command, str(path), "--nats", server.url)
                assert code == 3, err
                assert out == ("" if command == "apply" else f"{path}: ok, 1 segment (vip)\n")
                assert err.startswith(f"shoal: error: {path}: the request is ")
                assert err.endswith(
                    " bytes ([lists.vip] has 10,000 ids), more than the NATS server takes in a "
                    "message (max_payload 65,536): serve large lists from files instead "
                    "(`shoal serve --segments FILE --lists-dir DIR`)\n"
                )
            assert engine.segments.lists["vip"] == {"bob"}
    finally:
        server.stop()


# --- serve: list files only from the lists directory ----------------------------------------


def test_serve_refuses_a_list_file_outside_the_segments_files_directory(tmp_path: Path) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    (tmp_path / "secret").write_text("alice\n")
    (defs / "escape").symlink_to(tmp_path / "secret")
    path = defs / "segments.toml"
    data = str(tmp_path / "data")
    for file, shown, link in (
        ("../secret", defs / "../secret", ""),
        (str(tmp_path / "secret"), tmp_path / "secret", ""),
        ("escape", defs / "escape", f"; a symbolic link leads to {tmp_path / 'secret'}"),
    ):
        path.write_text(listed(file))
        done = run("serve", "--segments", str(path), "--data-dir", data)
        assert (done.returncode, done.stdout) == (3, ""), done.stderr
        assert done.stderr.splitlines()[-1] == (
            f"shoal: error: {path}: {outside(shown, defs)}{link}"
        )
        assert "Traceback" not in done.stderr


def test_serve_lists_dir_must_be_a_directory_for_a_segments_file(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(OURS)
    data = str(tmp_path / "data")
    done = run("serve", "--lists-dir", str(tmp_path / "nope"), "--segments", str(path))
    assert (done.returncode, done.stderr) == (
        4,
        f"shoal: error: --lists-dir {tmp_path / 'nope'} does not exist\n",
    )
    done = run("serve", "--lists-dir", str(tmp_path), "--data-dir", data)
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --lists-dir is for the list files of --segments FILE: give both\n",
    )


def test_serve_reads_list_files_from_its_lists_dir_and_refuses_others_on_reload(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "vip.txt").write_text("alice\n")
    (tmp_path / "secret").write_text("carol\n")
    path = tmp_path / "etc" / "segments.toml"
    path.parent.mkdir()
    path.write_text(listed(str(lists / "vip.txt")))
    url = nats_server.url
    args = ("--data-dir", str(tmp_path / "data"), "--nats", url)
    serve = Proc("serve", "--segments", str(path), "--lists-dir", str(lists), *args)
    procs.append(serve)
    serve.wait_err("shoal is serving")

    # The segments file's own directory is not the lists directory here.
    path.write_text(listed("../secret"))
    serve.popen.send_signal(signal.SIGHUP)
    line = json.loads(serve.wait_err("segments not reloaded"))
    assert line["error"] == f"{path}: {outside(path.parent / '../secret', lists)}"
    path.write_text(listed("../lists/vip.txt"))  # inside, by way of ..
    serve.popen.send_signal(signal.SIGHUP)
    serve.wait_err("segments applied")
    assert serve.stop(signal.SIGINT) == 0
