"""Per-image tables joined by sample id: SIAM's attribute labels and regression targets (docs/method.md#siam-data).

An **attribute table** is a CSV file with a header line: an ``id`` column (the images' sample ids, as their source
names them: :mod:`cefam_lightning.data.image_sources`) and one column per attribute, each value a number in
``[0, 1]`` (a presence label, or a soft one such as the share of annotators who saw the attribute)::

    id,red,green,striped
    train/000000,1,0,0.5

A **target table** has the same layout with any finite numbers: one column per regression target.

Every problem is a :class:`TableError`, one line naming the file, the line and column, and the value at fault. A
table is joined to the images of a source by :meth:`IdTable.rows_for`: images without a row are an error that
counts them and names the first; rows that match no image are counted by the caller
(:meth:`IdTable.unmatched`), and reported, never dropped in silence.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cefam_lightning.errors import CefamError, error_summary

ID_COLUMN = "id"
_SHOWN = 5  # ids named in a message


class TableError(CefamError):
    """A missing or malformed attribute / target table, or images it has no row for; the message names the file."""


@dataclass(frozen=True)
class IdTable:
    """A CSV table of numbers, one row per sample id (see the module docstring).

    Attributes:
        path: the file.
        names: the value columns, in file order.
        ids: the row ids, in file order.
        values: ``(rows, columns)`` float32.
        kind: what the values are (``attribute`` or ``target``), for messages.
    """

    path: Path
    names: list[str]
    ids: list[str]
    values: np.ndarray
    kind: str = "attribute"

    @property
    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.ids)}

    def rows_for(self, ids: Sequence[str], where: str) -> np.ndarray:
        """The table row of each of ``ids`` (the images of ``where``, a source's description).

        Raises:
            TableError: some images have no row (how many, and the first ids).
        """
        index = self.index
        missing = [i for i in ids if i not in index]
        if missing:
            first = ", ".join(repr(m) for m in missing[:_SHOWN])
            raise TableError(
                f"{self.path}: no row for {len(missing)} of {len(ids)} images of {where} (first: {first}); the "
                f"{ID_COLUMN!r} column must hold the images' sample ids"
            )
        return np.array([index[i] for i in ids], dtype=np.int64)

    def unmatched(self, ids: Iterable[str]) -> list[str]:
        """The table's ids that are not among ``ids`` (the images of every split), in file order."""
        seen = set(ids)
        return [i for i in self.ids if i not in seen]


def read_table(path: str | os.PathLike, kind: str = "attribute") -> IdTable:
    """Read an attribute table (``kind="attribute"``: values in ``[0, 1]``) or a target table (``"target"``:
    any finite numbers).

    Raises:
        TableError: a missing file, no ``id`` column, no value column, a repeated id or column, an empty id, or a
            value that is empty, not a number or (attributes) outside ``[0, 1]``: one line naming the file, line,
            column and value.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TableError(f"{path}: {kind} table not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TableError(f"{path}: cannot read the {kind} table ({error_summary(e)})") from e
    if ID_COLUMN not in header:
        raise TableError(
            f"{path}:1: no {ID_COLUMN!r} column in the header {header} (a table of {kind}s is id + one column each)"
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise TableError(f"{path}:1: column(s) {repeated} repeated in the header")
    id_col = header.index(ID_COLUMN)
    names = [h for h in header if h != ID_COLUMN]
    if not names or any(not n for n in names):
        raise TableError(f"{path}:1: the header {header} needs named {kind} columns beside {ID_COLUMN!r}")
    ids: list[str] = []
    values = np.empty((len(rows), len(names)), dtype=np.float32)
    first_line: dict[str, int] = {}
    for r, (line, row) in enumerate(rows):
        if len(row) != len(header):
            raise TableError(f"{path}:{line}: {len(row)} values for the {len(header)} columns of the header")
        sample = row[id_col].strip()
        if not sample:
            raise TableError(f"{path}:{line}: empty {ID_COLUMN!r}")
        if sample in first_line:
            raise TableError(f"{path}:{line}: id {sample!r} repeated (first on line {first_line[sample]})")
        first_line[sample] = line
        ids.append(sample)
        cells = [c for j, c in enumerate(row) if j != id_col]
        for j, (name, cell) in enumerate(zip(names, cells, strict=True)):
            values[r, j] = _number(cell, path, line, sample, name, kind)
    if not ids:
        raise TableError(f"{path}: no rows")
    return IdTable(path, names, ids, values, kind)


def _number(cell: str, path: Path, line: int, sample: str, column: str, kind: str) -> float:
    where = f"{path}:{line} (id {sample!r}), column {column!r}"
    try:
        value = float(cell)
    except ValueError:
        raise TableError(f"{where}: {cell.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise TableError(f"{where}: {cell.strip()} is not a finite number")
    if kind == "attribute" and not 0 <= value <= 1:
        raise TableError(f"{where}: {cell.strip()} is not in [0, 1] (attribute values are presence labels)")
    return value
