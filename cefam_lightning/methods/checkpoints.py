"""Reading and writing checkpoints safely: the one reader every loader goes through, and Lightning's writer made
atomic.

:func:`read_checkpoint` unpickles with ``weights_only=True``: tensors and plain containers only, so a file that
would run code when unpickled is refused before any of it runs. What training writes (state dicts, plain-dict
hyper-parameters, optimizer and callback states) is all of that kind. Which method wrote a checkpoint, and
rebuilding its module, is :meth:`~cefam_lightning.methods.base.ExplainerModule.from_checkpoint`'s.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cefam_lightning.errors import CefamError, error_summary, one_line
from cefam_lightning.io_utils import atomic_write_bytes


class CheckpointError(CefamError):
    """A checkpoint that is missing, unreadable or of no known explainer kind; the message names the file."""


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", mmap: bool = False
) -> Any:
    """Unpickle a checkpoint safely (``weights_only=True``): no code in the file runs.

    Args:
        path: the file.
        map_location: as ``torch.load``'s.
        mmap: memory-map the tensors (a zip-format file only; other files are read whole).

    Raises:
        CheckpointError: the file is missing, is not a torch file, or holds objects other than tensors and plain
            containers (it would run code when unpickled); the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # mmap needs the zip format; an old-format file is read whole.
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "GLOBAL" in detail or detail.startswith("Can only"):
            # torch's own text suggests turning weights_only off: the one thing not to do with a file from elsewhere.
            raise CheckpointError(
                f"{path}: {_NOT_OURS}: unpickling it would call code ({detail.split(' was not')[0]}), which a "
                "checkpoint written by train.py never does; refused, and nothing from it was run"
                + (_AUTHORS_HINT if "converter.MapConverter" in detail else "")
            ) from None
        raise CheckpointError(f"{path}: {_NOT_OURS} ({type(e).__name__}: {detail})") from None
    except Exception as e:  # not a torch file at all: truncated, another format, garbage
        raise CheckpointError(f"{path}: {_NOT_OURS} ({error_summary(e)})") from e


_AUTHORS_HINT = (
    " (it is the CE-FAM authors' translator file: `python interop.py import` turns it into a checkpoint, and "
    "cefam.init_from reads it as it is)"
)
NOT_AN_EXPLAINER = "not an explainer checkpoint written by train.py (CE-FAM, L-CAM, SIAM, ...)"
_NOT_OURS = f"{NOT_AN_EXPLAINER}, or one this version cannot read"


def _unpickler_detail(e: Exception) -> str:
    """The reason inside torch's ``weights_only`` refusal, without its advice to load the file unsafely."""
    text = one_line(e, limit=None)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
    return one_line(text, 300)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, with each local checkpoint written whole or not at all, and read safely.

    Lightning writes through ``fsspec``, which for a local file copies a temporary file from the system's temp
    folder over the target: on a full disk the copy stops half-way and ``last.ckpt`` is left truncated. Here the
    bytes go to a temporary file in the target's own folder, which is fsynced and renamed over the target
    (:func:`~cefam_lightning.io_utils.atomic_write_bytes`), so a failed write leaves the previous checkpoint as it
    was. Reads (resuming, ``trainer.test(ckpt_path=...)``) unpickle with ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # a remote store: fsspec's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
