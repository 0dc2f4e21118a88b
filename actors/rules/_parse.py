"""Parsing a rule's text into a syntax tree: SQL habits rewritten, columns mapped back."""

from __future__ import annotations

import ast
import io
import tokenize
import warnings
from collections.abc import Callable

from actors._errors import DefinitionError

from ._limits import MAX_RULE_CHARS, MAX_RULE_DEPTH, MAX_RULE_NODES


def parse_syntax(
    text: str, fail: Callable[[str], DefinitionError]
) -> tuple[Rewrite, ast.Expression]:
    """The syntax tree of rule ``text`` (as rewritten), not yet checked.

    Raises:
        DefinitionError: from ``fail``: the rule is empty, not valid syntax, or larger or
            more deeply nested than the limits allow.
    """
    if not text.strip():
        raise fail("the rule is empty")
    if (problem := too_long(text)) is not None:
        raise fail(problem)
    rewrite = Rewrite(text)
    try:
        with warnings.catch_warnings():
            # Such as "invalid decimal literal" for `1and`: printed on stderr, beside the
            # one error a bad rule gets.
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(rewrite.text, mode="eval")
    except (RecursionError, MemoryError):
        # Python's parser gives up on deep nesting this way, before any limit of ours.
        raise fail(_too_deep()) from None
    except SyntaxError as e:
        words = text.split()
        if not e.offset or e.offset > len(rewrite.text.rstrip()):
            # Python points at nothing when the rule stops short, e.g. after `and`.
            raise fail(
                f"rule `{text}` is incomplete: something is missing after `{words[-1]}`"
            ) from None
        col = rewrite.column(e.lineno or 1, e.offset - 1) + 1
        raise fail(f"rule `{text}` is not valid syntax at column {col}: {e.msg}") from None
    _check_size(tree, fail)
    return rewrite, tree


def too_long(text: str) -> str | None:
    """What is wrong with rule ``text`` when it is over the length limit."""
    if len(text) <= MAX_RULE_CHARS:
        return None
    return (
        f"the rule has {len(text):,} characters; the limit is {MAX_RULE_CHARS:,} "
        "(split it into segments that refer to each other with in_segment)"
    )


def _too_deep() -> str:
    return f"the rule is nested too deeply: the limit is {MAX_RULE_DEPTH} levels"


def _check_size(tree: ast.Expression, fail: Callable[[str], DefinitionError]) -> None:
    """Refuse a tree over the node or depth limit, walking it without recursion: checking
    (and compiling, and explaining) recurse along it, and their time grows with its size."""
    nodes = 0
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_RULE_NODES:
            raise fail(
                f"the rule has more than {MAX_RULE_NODES:,} parts (names, values, operators); "
                f"the limit is {MAX_RULE_NODES:,}"
            )
        if depth > MAX_RULE_DEPTH:
            raise fail(_too_deep())
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


class Rewrite:
    """A rule as Python can parse it, with columns mapped back to the text as written.

    SQL and spreadsheet habits are accepted: ``=`` for ``==`` (not a keyword argument's
    ``=``) and upper-case ``AND``/``OR``/``NOT``. The rewrite splices into the original text,
    so spacing is kept and messages can quote exactly what the user wrote.
    """

    def __init__(self, text: str) -> None:
        self.original = text
        lines = text.splitlines(keepends=True) or [""]
        inserted: dict[int, list[int]] = {}  # row -> rewritten columns of added '=' signs
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, SyntaxError):
            tokens = []  # ast.parse reports the problem with its position
        edits: list[tuple[int, int, str, str]] = []
        for i, tok in enumerate(tokens):
            if tok.type == tokenize.OP and tok.string == "=":
                before = tokens[i - 2].string if i >= 2 else ""
                if not (tokens[i - 1].type == tokenize.NAME and before in ("(", ",")):
                    edits.append((tok.start[0], tok.start[1], "=", "=="))
            elif tok.type == tokenize.NAME and tok.string in ("AND", "OR", "NOT"):
                edits.append((tok.start[0], tok.start[1], tok.string, tok.string.lower()))
        for row, col, old, new in sorted(edits, reverse=True):
            line = lines[row - 1]
            lines[row - 1] = line[:col] + new + line[col + len(old) :]
        shifts: dict[int, int] = {}
        for row, col, old, new in sorted(edits):
            if len(new) > len(old):
                at = col + shifts.get(row, 0) + len(old)
                inserted.setdefault(row, []).append(at)
                shifts[row] = shifts.get(row, 0) + len(new) - len(old)
        self.text = "".join(lines)
        self._inserted = inserted
        self._lines: list[str] = text.splitlines(keepends=True) or [""]

    def column(self, row: int, col: int) -> int:
        """The original column of rewritten column ``col`` (0-based) on line ``row``."""
        return col - sum(1 for c in self._inserted.get(row, ()) if c < col)

    def snippet(self, node: ast.AST, through: ast.AST | None = None) -> str:
        """The text of ``node`` (on to the end of ``through``) as the user wrote it."""
        keys = ("lineno", "end_lineno", "col_offset", "end_col_offset")
        last = through or node
        pos: list[int] = [
            p
            for k in keys
            if isinstance(p := getattr(last if k.startswith("end") else node, k, None), int)
        ]
        if len(pos) != len(keys):
            return ast.unparse(node)
        r0, r1, c0, c1 = pos
        start, end = self.column(r0, c0), self.column(r1, c1)
        if r0 == r1:
            return self._lines[r0 - 1][start:end]
        parts = [self._lines[r0 - 1][start:], *self._lines[r0 : r1 - 1], self._lines[r1 - 1][:end]]
        return "".join(parts)
