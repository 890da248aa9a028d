"""One error base class for everything a user's input can get wrong, and one place that turns it into a line.

Every error the framework raises for a bad config, file, checkpoint, store or argument is a :class:`CefamError`
whose message names the file, key or value at fault. The command-line tools run inside :func:`cli_errors`, which
prints such an error (and an ``OSError``: an unwritable folder, a full disk, a missing file) as one
``error: ...`` line and exits with status 2. ``--debug`` or ``CEFAM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "CEFAM_DEBUG"
MAX_LINE = 500  # characters of one error line


class CefamError(ValueError):
    """A bad input (config key, file, checkpoint, store, argument); the message names what is at fault.

    A ``ValueError`` so that code catching bad values keeps catching it.
    """


def one_line(e: BaseException | str, limit: int | None = MAX_LINE) -> str:
    """An error's message on one line, at most ``limit`` characters (``None``: uncut), ``...`` where cut.

    A message relayed from a DataLoader worker (``... Original Traceback ...``) is cut to its last line, the
    worker's own message.
    """
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[-1] if ": " in last else last
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def error_summary(e: BaseException, limit: int | None = 400) -> str:
    """``Type: message`` of an exception on one line, for messages that relay another error."""
    text = one_line(e, limit)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def os_error_line(e: OSError) -> str:
    """An ``OSError`` as ``<file>: <reason>`` (``PermissionError``, disk full, a missing folder, ...)."""
    where = e.filename if e.filename is not None else ""
    reason = e.strerror or one_line(e)
    return f"{where}: {reason}" if where else reason


def debug_enabled(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or ``CEFAM_DEBUG`` set to anything but ``0`` / empty."""
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")


@contextlib.contextmanager
def cli_errors(debug: bool = False, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a command-line tool's body: a user error ends it with one ``error: ...`` line and exit status 2.

    Args:
        debug: re-raise instead (the traceback); also on with ``CEFAM_DEBUG=1``.
        extra: further exception types that are user errors for this tool (e.g. Lightning's
            ``MisconfigurationException`` for ``train.py``'s ``trainer.*`` keys).
    """
    try:
        yield
    except (CefamError, OSError, *extra) as e:
        if debug_enabled(debug):
            raise
        line = os_error_line(e) if isinstance(e, OSError) else one_line(e)
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
