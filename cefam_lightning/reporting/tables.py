"""Markdown tables: the one helper every table of the project (evaluations, callbacks) is written with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def _cell(v: Any, fmt: Callable[[float], str] | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return fmt(v) if fmt is not None else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    fmt: Callable[[float], str] | None = None,
) -> str:
    """A Markdown table, with an optional title line above it.

    Cells: ``None`` empty; floats by ``fmt`` (default 4 significant digits); anything else as text with ``|``
    escaped. Strings are written as they are, so a caller formats numbers that need their own precision.

    Example:
        >>> print(markdown_table(["method", "NRA"], [["CE-FAM", 0.52914], ["random", None]]))
        | method | NRA |
        |---|---|
        | CE-FAM | 0.5291 |
        | random |  |
    """
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v, fmt) for v in row) + " |" for row in rows]
    return "\n".join(lines)
