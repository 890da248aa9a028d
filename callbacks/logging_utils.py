"""Helpers shared by the callbacks: route images and tables to whatever loggers a run has, and fetch fixed samples.

Images go to W&B (``WandbLogger.log_image``) and TensorBoard (``experiment.add_image``); when the run has neither
(a CSVLogger, or no logger at all) they are written as PNG files under ``<root>/images/<key>/``. Tables go to W&B
(``log_table``) and TensorBoard (a Markdown table through ``add_text``), else to CSV files under
``<root>/tables/<key>/``. ``root`` is the trainer's ``default_root_dir`` unless the caller names another folder.
wandb and tensorboard are imported only by the loggers that use them. Everything here writes on global rank zero
only.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset

from cefam_lightning.data.feature_cache import CachedFeatureDataset, items_with_images
from cefam_lightning.io_utils import atomic_write_bytes
from cefam_lightning.reporting.logged import send_images, send_table

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")


def _safe_key(key: str) -> str:
    """``key`` as a relative folder path: unusual characters become ``_``, and no part may be ``..``."""
    parts = [p for p in _UNSAFE.sub("_", key).split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"key {key!r} names no folder")
    return "/".join(parts)


def _root(trainer: L.Trainer, out_dir: str | Path | None) -> Path:
    return Path(out_dir if out_dir is not None else trainer.default_root_dir).expanduser()


def _check_images(images: Sequence[np.ndarray], captions: Sequence[str] | None) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            got = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
            raise ValueError(f"images[{i}] must be an H x W x 3 uint8 numpy array, got {got}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")


@rank_zero_only
def log_images(
    trainer: L.Trainer,
    key: str,
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    step: int | None = None,
    out_dir: str | Path | None = None,
) -> list[str]:
    """Log images to every image-capable logger of ``trainer``, or write them as PNG files.

    Args:
        trainer: the running trainer (its ``loggers``, ``current_epoch``, ``global_step``, ``default_root_dir``).
        key: the images' name, e.g. ``"val/region_maps"``; a W&B key, a TensorBoard tag prefix, a folder.
        images: ``H x W x 3`` uint8 arrays.
        captions: one per image (W&B captions, TensorBoard text, PNG ``Description`` metadata).
        step: the step to log at (default ``trainer.global_step``).
        out_dir: folder for the PNG files instead of ``trainer.default_root_dir``.

    Returns:
        What was written: PNG paths (``<root>/images/<key>/epoch_XXX_i.png``), ``"wandb:<key>"`` and/or
        ``"tensorboard:<key>/<i>"`` entries. Empty on ranks other than zero (``None`` there, by
        ``rank_zero_only``).
    """
    images = list(images)
    _check_images(images, captions)
    step = trainer.global_step if step is None else step
    written = send_images(trainer.loggers, key, images, captions, step)
    if written:
        return written
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder = _root(trainer, out_dir) / "images" / _safe_key(key)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = folder / f"epoch_{trainer.current_epoch:03d}_{i}.png"
        info = PngInfo()
        if captions is not None:
            info.add_text("Description", captions[i])
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
        atomic_write_bytes(path, buf.getbuffer())
        written.append(str(path))
    return written


@rank_zero_only
def log_table(
    trainer: L.Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int | None = None,
    out_dir: str | Path | None = None,
) -> list[str]:
    """Log a table to every table-capable logger of ``trainer``, or write it as a CSV file.

    Args:
        trainer: the running trainer.
        key: the table's name, e.g. ``"val/contributions"``.
        columns: column names.
        rows: rows of cells (str, int, float or ``None``), each as long as ``columns``.
        step: the step to log at (default ``trainer.global_step``).
        out_dir: folder for the CSV file instead of ``trainer.default_root_dir``.

    Returns:
        What was written: the CSV path (``<root>/tables/<key>/epoch_XXX.csv``), ``"wandb:<key>"`` and/or
        ``"tensorboard:<key>"``.
    """
    rows = [list(r) for r in rows]
    step = trainer.global_step if step is None else step
    written = send_table(trainer.loggers, key, columns, rows, step)
    if written:
        return written
    folder = _root(trainer, out_dir) / "tables" / _safe_key(key)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{trainer.current_epoch:03d}.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    atomic_write_bytes(path, buf.getvalue().encode())
    return [str(path)]


# ---------------------------------------------------------------------- fixed samples


def _val_dataset(trainer: L.Trainer) -> tuple[Dataset | None, DataLoader | None]:
    """The validation data: a map-style dataset when there is one (unwrapped from a feature cache, so its items
    carry images), else the loader to stream from."""
    dm = getattr(trainer, "datamodule", None)
    datasets = getattr(dm, "datasets", None)
    if isinstance(datasets, dict) and datasets.get("val") is not None:
        ds = datasets["val"]
        if not isinstance(ds, IterableDataset):
            return ds, None
    loader = trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None and dm is not None:
        loader = dm.val_dataloader()
    if loader is None:
        raise RuntimeError("no validation data: the callback needs validation images")
    ds = loader.dataset
    if isinstance(ds, CachedFeatureDataset):
        ds = ds.dataset
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return None, loader
    return ds, None


def spaced_indices(length: int, n: int) -> list[int]:
    """``min(n, length)`` distinct indices spread evenly over ``range(length)`` (the first and last included)."""
    if n <= 0 or length <= 0:
        return []
    if n >= length:
        return list(range(length))
    return sorted({int(i) for i in np.linspace(0, length - 1, n).round()})


def fixed_validation_items(trainer: L.Trainer, n: int) -> list[dict]:
    """``n`` validation items with their images, the same ones at every call for the same data.

    A map-style validation dataset (``trainer.datamodule.datasets["val"]``, else the validation loader's dataset,
    unwrapped from a feature cache) gives the items at ``n`` evenly spaced indices. A stream without random
    access gives its first ``n`` items with an image, read from one pass of the validation loader; call this once
    and keep the result.

    Returns:
        Items (dicts) with at least ``image`` ``(3, H, W)``; ``id``, ``label`` and ``masks`` where the data have
        them.
    """
    ds, loader = _val_dataset(trainer)
    if ds is not None:
        return [ds[i] for i in spaced_indices(len(ds), n)]
    items: list[dict] = []
    for batch in loader:
        items.extend(items_with_images(batch))
        if len(items) >= n:
            break
    return items[:n]


class ValidationLookup:
    """Validation items by sample id, for batches that came without images (served from a feature cache).

    Args:
        trainer: the trainer whose validation data to read (a map-style dataset is needed; streams always carry
            their images).
    """

    def __init__(self, trainer: L.Trainer):
        self.dataset, _ = _val_dataset(trainer)
        self.index: dict[str, int] = {}
        if self.dataset is not None:
            dm = getattr(trainer, "datamodule", None)
            ids = dm.sample_ids("val") if hasattr(dm, "sample_ids") else None
            if ids is None or len(ids) != len(self.dataset):
                item = getattr(self.dataset, "item_without_image", self.dataset.__getitem__)
                ids = [str(item(i)["id"]) for i in range(len(self.dataset))]
            self.index = {str(s): i for i, s in enumerate(ids)}

    @property
    def available(self) -> bool:
        return self.dataset is not None

    def items(self, ids: Sequence[str]) -> list[dict]:
        """The items of ``ids`` (with images, and masks where the dataset has them)."""
        try:
            return [self.dataset[self.index[str(s)]] for s in ids]
        except KeyError as e:
            raise KeyError(f"sample id {e.args[0]!r} is not in the validation dataset") from None


def stack_items(items: Sequence[dict]) -> dict[str, Any]:
    """Items -> ``{"image": (n, 3, H, W), "id": [...], "label": (n,) or None, "masks": (n, C, H, W) or None}``."""
    if not items:
        raise ValueError("no validation items with images to show")
    ids = [str(it.get("id", i)) for i, it in enumerate(items)]
    labels = [int(it["label"]) for it in items] if all("label" in it for it in items) else None
    masks = None
    if all("masks" in it for it in items):
        masks = torch.stack([torch.as_tensor(it["masks"]).bool() for it in items])
    return {
        "image": torch.stack([torch.as_tensor(it["image"]) for it in items]).float(),
        "id": ids,
        "label": torch.tensor(labels) if labels is not None else None,
        "masks": masks,
    }


def is_due(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether this validation run is one to act on: not the sanity check, and every ``every_n_epochs`` epochs
    (counted from 1, so ``every_n_epochs=2`` acts after epochs 2, 4, ...)."""
    return not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


def check_positive(**values: int | None) -> None:
    """Raise a ``ValueError`` naming the first argument that is not a positive integer (``None`` is allowed)."""
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
