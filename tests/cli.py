"""Checks shared by the tests of the command-line tools."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


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
