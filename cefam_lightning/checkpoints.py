"""Which explainer wrote a checkpoint (CE-FAM, L-CAM, SIAM): the one place that decides, for ``evaluate`` and
``explain``.

Each LightningModule records its architecture in ``hyper_parameters["arch"]``, and its ``from_checkpoint``
recognises its own by it: CE-FAM's has a ``translator``, L-CAM's says ``kind: "lcam"``, SIAM's says
``method: "siam"``. :func:`checkpoint_kind` reads that record (memory-mapped, so a large checkpoint is not read
twice); :func:`load_explainer` then rebuilds the module with its own class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cefam_lightning.errors import CefamError, error_summary

KINDS = ("cefam", "lcam", "siam")
KIND_ARTICLES = {"cefam": "a CE-FAM", "lcam": "an L-CAM", "siam": "a SIAM"}  # for messages


class CheckpointError(CefamError):
    """A checkpoint that is missing, unreadable or of no known explainer kind; the message names the file."""


def kind_of_hparams(hparams: Any) -> str | None:
    """The explainer kind a checkpoint's ``hyper_parameters`` record (``"cefam"``, ``"lcam"``, ``"siam"``), or
    ``None`` when they record none of them."""
    from cefam_lightning.lcam_module import ARCH_KIND as LCAM_KIND

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


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip-format file (mmap needs one), or not a checkpoint at all: try a plain load
        return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The kind of explainer that wrote the checkpoint at ``path``: ``"cefam"``, ``"lcam"`` or ``"siam"``.

    Raises:
        CheckpointError: the file is missing, cannot be read as a checkpoint, or records no known architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = _read(path)
    except Exception as e:  # unpickling errors of many kinds: all "not a checkpoint of ours"
        raise CheckpointError(
            f"{path}: not a CE-FAM checkpoint (nor an L-CAM or SIAM one), or one this version cannot load "
            f"({error_summary(e)})"
        ) from e
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
    from cefam_lightning.cefam_module import CEFAMModule
    from cefam_lightning.lcam_module import LCAMModule
    from cefam_lightning.siam_module import SIAMModule

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
    from cefam_lightning.cefam_module import CEFAMModule
    from cefam_lightning.lcam_module import LCAMModule
    from cefam_lightning.siam_module import SIAMModule

    kind = checkpoint_kind(path)
    cls = {"cefam": CEFAMModule, "lcam": LCAMModule, "siam": SIAMModule}[kind]
    try:
        return cls.from_checkpoint(path, map_location=map_location)
    except Exception as e:
        raise CheckpointError(
            f"{path}: {KIND_ARTICLES[kind]} checkpoint this version cannot load ({error_summary(e)})"
        ) from e
