"""Which explainer wrote a checkpoint (CE-FAM, L-CAM, SIAM): the one place that decides, for ``evaluate`` and
``explain``.

Each LightningModule records its architecture in ``hyper_parameters["arch"]``, and its ``from_checkpoint``
recognises its own by it: CE-FAM's has a ``translator``, L-CAM's says ``kind: "lcam"``, SIAM's says
``method: "siam"``. :func:`checkpoint_kind` reads that record (memory-mapped, so a large checkpoint is not read
twice); :func:`load_explainer` then rebuilds the module with its own class.

Every checkpoint the project reads goes through :func:`read_checkpoint`, which unpickles with
``weights_only=True``: tensors and plain containers only, so a file that would run code when unpickled is refused
before any of it runs. What training writes (state dicts, plain-dict hyper-parameters, optimizer and callback
states) is all of that kind.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.io_utils import atomic_write_bytes

KINDS = ("cefam", "lcam", "siam")
KIND_ARTICLES = {"cefam": "a CE-FAM", "lcam": "an L-CAM", "siam": "a SIAM"}  # for messages


class CheckpointError(CefamError):
    """A checkpoint that is missing, unreadable or of no known explainer kind; the message names the file."""


def kind_of_hparams(hparams: Any) -> str | None:
    """The explainer kind a checkpoint's ``hyper_parameters`` record (``"cefam"``, ``"lcam"``, ``"siam"``), or
    ``None`` when they record none of them."""
    from cefam_lightning.methods.lcam.module import ARCH_KIND as LCAM_KIND

    arch = hparams.get("arch") if isinstance(hparams, Mapping) else None
    if not isinstance(arch, Mapping):
        return None
    if "translator" in arch:
        return "cefam"
    if arch.get("kind") == LCAM_KIND:
        return "lcam"
    if arch.get("method") == "siam":
        return "siam"
    return None


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
            # torch's own text suggests weights_only=False: the one thing not to do with a file from elsewhere.
            raise CheckpointError(
                f"{path}: {_NOT_OURS}: unpickling it would call code ({detail.split(' was not')[0]}), which a "
                "checkpoint written by train.py never does; refused, and nothing from it was run"
            ) from None
        raise CheckpointError(f"{path}: {_NOT_OURS} ({type(e).__name__}: {detail})") from None
    except Exception as e:  # not a torch file at all: truncated, another format, garbage
        raise CheckpointError(f"{path}: {_NOT_OURS} ({error_summary(e)})") from e


_NOT_OURS = "not a CE-FAM checkpoint (nor an L-CAM or SIAM one), or one this version cannot read"


def _unpickler_detail(e: Exception) -> str:
    """The reason inside torch's ``weights_only`` refusal, without its advice to load the file unsafely."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
    return text[:300]


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The kind of explainer that wrote the checkpoint at ``path``: ``"cefam"``, ``"lcam"`` or ``"siam"``.

    Raises:
        CheckpointError: the file is missing, cannot be read as a checkpoint, or records no known architecture.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, mmap=True)
    kind = kind_of_hparams(ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None)
    if kind is None:
        raise CheckpointError(
            f"{path}: not a CE-FAM checkpoint (nor an L-CAM or SIAM one): its hyper-parameters record no explainer "
            "architecture; give a checkpoint written by train.py"
        )
    return kind


def module_kind(module: Any) -> str:
    """The kind of a loaded explainer module (``"cefam"``, ``"lcam"``, ``"siam"``).

    Raises:
        CheckpointError: for any other object.
    """
    from cefam_lightning.methods.cefam.module import CEFAMModule
    from cefam_lightning.methods.lcam.module import LCAMModule
    from cefam_lightning.methods.siam.module import SIAMModule

    for kind, cls in (("cefam", CEFAMModule), ("lcam", LCAMModule), ("siam", SIAMModule)):
        if isinstance(module, cls):
            return kind
    raise CheckpointError(f"not a CE-FAM, L-CAM or SIAM module: {type(module).__name__}")


def method_name(module: Any) -> str:
    """The ``method`` config value of a loaded explainer: ``"cefam"``, ``"lcam_fm"``, ``"lcam_img"`` or ``"siam"``.

    Raises:
        CheckpointError: for an object that is none of them.
    """
    kind = module_kind(module)
    return f"lcam_{module.variant}" if kind == "lcam" else kind


def load_explainer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The CE-FAM, L-CAM or SIAM module of a checkpoint, rebuilt by its own class (in eval mode).

    Raises:
        CheckpointError: as :func:`checkpoint_kind`, or a checkpoint of a known kind that does not load (a state
            dict that does not fit its recorded architecture, a missing field).
    """
    from cefam_lightning.methods.cefam.module import CEFAMModule
    from cefam_lightning.methods.lcam.module import LCAMModule
    from cefam_lightning.methods.siam.module import SIAMModule

    kind = checkpoint_kind(path)
    cls = {"cefam": CEFAMModule, "lcam": LCAMModule, "siam": SIAMModule}[kind]
    try:
        return cls.from_checkpoint(path, map_location=map_location)
    except Exception as e:
        raise CheckpointError(
            f"{path}: {KIND_ARTICLES[kind]} checkpoint this version cannot load ({error_summary(e)})"
        ) from e


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
