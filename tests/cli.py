"""Checks shared by the tests of the command-line tools."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_error(main: Callable[[list[str]], object], argv: Sequence[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command-line ``main`` that must stop on a user error: exit status 2, no traceback, and a last
    stderr line ``error: ...``. Returns that line without the ``error: `` prefix."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last.removeprefix("error: ")


def run_ok(cmd: Sequence[str], timeout: int = 300) -> str:
    """Run a command from the repository root (one thread per process: the tests run several at once on few cores)
    that must succeed; returns its output (stdout and stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
    )
    log = proc.stdout.decode()
    assert proc.returncode == 0, log
    return log


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON value's leaves by path (``a/b/0/``: dict keys and list positions)."""
    if isinstance(obj, list | dict):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        return {k: v for key, val in items for k, v in flat(val, f"{prefix}{key}/").items()}
    return {prefix: obj}
