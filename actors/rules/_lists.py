"""Static lists of a segments file: their ids, and which files they may be read from.

A ``[lists.NAME]`` table carries its ids by value (``customers = [...]``), or names a file of
ids (``file = "vip.txt"``, one id per line). Where a file may be read depends on where the
definitions come from:

- over the network (the ``shoal.api.definitions`` endpoint), nowhere: a definition sent to
  the engine is data, and one naming a file is refused before anything is read;
- from a file on disk, relative to that file's directory; ``shoal serve`` also confines the
  files to its lists directory (``--lists-dir``), symbolic links followed.

``shoal segments apply`` reads the list files on the user's machine and sends their ids by
value (:func:`~actors.rules.load_segments_by_value`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors._errors import DefinitionError

from ._limits import MAX_LIST_FILE_BYTES, read_text_file

NO_FILES_OVER_THE_NETWORK = (
    "names a file; definitions sent to the engine over the network read no file: give the "
    "ids by value (customers = [...]), as `shoal segments apply` does with the list files it "
    "reads on your machine"
)
"""Why a ``[lists.NAME] file`` is refused in definitions that came over the network."""


def list_file_ids(
    where: str,
    name: object,
    source: str,
    *,
    base_dir: Path | None,
    lists_dir: Path | None,
) -> set[str]:
    """The ids in the list file ``name`` of the table ``where`` (``[lists.X]``).

    Args:
        base_dir: where a relative ``name`` is taken from; None when the definitions came
            over the network: then the file is refused, whatever it names, and nothing is
            read (not even its metadata).
        lists_dir: when given, the only directory a file may be read from: a path outside it,
            by ``..`` or a symbolic link included, is refused before it is read.

    Raises:
        DefinitionError: the file is refused, cannot be read, or breaks its limit.
    """
    if base_dir is None:
        raise DefinitionError(f"{where} {NO_FILES_OVER_THE_NETWORK}", source=source)
    if not isinstance(name, str) or not name:
        raise DefinitionError(f"{where} file must be a path (text)", source=source)
    path = Path(name)
    if not path.is_absolute():
        path = base_dir / path
    real = path if lists_dir is None else _within(where, path, lists_dir, source)
    try:
        lines = read_text_file(real, MAX_LIST_FILE_BYTES).splitlines()
    except (OSError, ValueError) as e:
        raise DefinitionError(f"{where} cannot read {path}: {e}", source=source) from None
    return {s for line in lines if (s := line.strip()) and not s.startswith("#")}


def _within(where: str, path: Path, lists_dir: Path, source: str) -> Path:
    """``path`` with its symbolic links resolved, when it lies in ``lists_dir``."""
    # First as written (no file looked at), then as the links lead.
    outside = (
        f"{where} cannot read {path}: it is outside the lists directory {lists_dir} (list "
        "files are read only from there; `shoal serve --lists-dir` sets it)"
    )
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(lists_dir)):
        raise DefinitionError(outside, source=source)
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(lists_dir)):
        raise DefinitionError(f"{outside}; a symbolic link leads to {real}", source=source)
    return real


def file_lists(doc: Mapping[str, Any]) -> list[str]:
    """The lists of a parsed segments file that name a file."""
    lists = doc.get("lists")
    if not isinstance(lists, Mapping):
        return []
    return [name for name, body in lists.items() if isinstance(body, Mapping) and "file" in body]


def by_value(doc: Mapping[str, Any], lists: Mapping[str, frozenset[str]]) -> str:
    """The TOML text of the parsed segments file ``doc``, its list tables that name a file
    replaced by the ids of ``lists`` (those the file was read into) by value."""
    out = dict(doc)
    tables = doc.get("lists")
    if isinstance(tables, Mapping):
        out["lists"] = {
            name: (
                {"customers": sorted(lists[name])}
                if isinstance(body, Mapping) and "file" in body
                else body
            )
            for name, body in tables.items()
        }
    return toml_text(out)


def toml_text(doc: Mapping[str, Any]) -> str:
    """``doc`` (text, numbers, booleans, arrays and tables, as ``tomllib`` gives them) as
    TOML text that ``tomllib`` reads back equal."""
    lines: list[str] = []

    def table(path: tuple[str, ...], body: Mapping[str, Any]) -> None:
        values = [(k, v) for k, v in body.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in body.items() if isinstance(v, Mapping)]
        if path and (values or not tables):
            lines.append(f"[{'.'.join(map(_string, path))}]")
        lines.extend(f"{_string(k)} = {_value(v)}" for k, v in values)
        for k, v in tables:
            table((*path, k), v)

    table((), doc)
    return "\n".join(lines) + "\n"


_NOT_LITERAL = re.compile("[\x00-\x08\x0a-\x1f\x7f']")
"""What a TOML literal string cannot hold."""


def _string(s: str) -> str:
    # A literal string when it can be one: sent inside JSON, it needs no escapes.
    if not _NOT_LITERAL.search(s):
        return f"'{s}'"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v: Any) -> str:
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # also TOML's: 1e-05, inf, nan
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_string(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")  # dates: a segments file has none
