"""What ``evaluate`` writes: ``evaluation.json`` (every number) and ``evaluation.md`` (the method's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cefam_lightning.errors import CefamError
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json


class EvaluateError(CefamError):
    """A bad input to an evaluation: the message names the file or value at fault."""


def write_results(results: dict[str, Any], out_dir: str | Path, table: str) -> str:
    """Write ``evaluation.json`` (``results``) and ``evaluation.md`` (``table``) to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "evaluation.json", results)
    atomic_write_bytes(out / "evaluation.md", table.encode())
    return table
