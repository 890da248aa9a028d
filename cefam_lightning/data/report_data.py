"""The images a dataset report (``report``, docs/report.md) reads, from any source the framework reads.

:func:`open_report_data` opens one of:

- a **shapes-world split** (the checkpoint's world, rebuilt from its run's config): labels, exact concept presence
  and the class definitions (a class is its key object's color and shape);
- an **image source** (:func:`~cefam_lightning.data.image_sources.open_source`: a class-per-folder tree, a
  ``.csv``/``.jsonl`` manifest, WebDataset shards): labels where the source has them;
- a **mask dataset** (:func:`~cefam_lightning.data.mask_datasets.open_mask_dataset`: the documented folder format,
  Broden, ImageNet-S): labels where it has them and concept presence from its masks;
- a **training run's data** (:func:`dataloader_data`: a map-style dataset or a loader of batches, as a DataModule
  serves them; the ``ContributionLogger``'s report on the validation split at the end of training): labels, and
  concept presence where the items carry masks.

Each is a :class:`ReportData`: batches of :class:`ReportBatch` in a fixed order, which a second pass can read again
keeping only some positions (the report draws its figures from a second pass over the images it picked).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cefam_lightning.data.transforms import InputSpec, image_transform
from cefam_lightning.errors import CefamError, error_summary

UNLABELED = -1  # the label of an image whose class is not known


class ReportDataError(CefamError):
    """Data a report cannot read: the message names the path, split or class at fault."""


@dataclass
class ReportBatch:
    """Some images of a :class:`ReportData`, in its order."""

    positions: list[int]  # each image's position in the data (0-based, in order)
    ids: list[str]
    images: Tensor  # (B, 3, H, W) in [0, 1], at the classifier's input size
    labels: Tensor  # (B,) class index into the report's classes, UNLABELED where unknown
    present: Tensor | None = None  # (B, len(ReportData.concepts)) ground-truth concept presence


@dataclass
class ReportData:
    """A dataset to report on (see the module docstring)."""

    description: str
    batches: Callable[[int, Collection[int] | None], Iterator[ReportBatch]]  # (batch_size, keep) -> batches
    size: int | None  # images, where known before reading
    concepts: list[str] | None = None  # the names of ReportBatch.present's columns
    definitions: dict[str, list[str]] | None = None  # class -> the concepts that define it, where known
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable images: {"id", "error"}, counted


def shapes_world_data(world: Any, split: str, limit: int | None = None) -> ReportData:
    """A split of a built :class:`~cefam_lightning.data.shapes_world.ShapesWorld` (its first ``limit`` images)."""
    from cefam_lightning.data.shapes_world import SPLITS

    if split not in SPLITS:
        raise ReportDataError(f"shapes world split must be one of {list(SPLITS)}, got {split!r}")
    data = world.split(split)
    n = len(data) if limit is None else min(int(limit), len(data))
    names = [c.name for c in world.concepts]

    def batches(batch_size: int, keep: Collection[int] | None = None) -> Iterator[ReportBatch]:
        for start in range(0, n, batch_size):
            positions = [i for i in range(start, min(start + batch_size, n)) if keep is None or i in keep]
            if not positions:
                continue
            images = torch.from_numpy(np.array(data.images[positions])).permute(0, 3, 1, 2).float().div_(255)
            present = torch.from_numpy(np.array(data.masks[positions]).any(axis=(2, 3)))
            labels = torch.from_numpy(np.asarray(data.labels[positions])).long()
            yield ReportBatch(positions, [data.ids[i] for i in positions], images, labels, present)

    return ReportData(f"shapes world, {split} split ({n} images)", batches, n, names, world_definitions(world))


def world_definitions(world: Any) -> dict[str, list[str]]:
    """A shapes world's classes, each defined by its key object's color and shape (``"red square"``)."""
    return {c: c.split() for c in world.class_names}


def _label_index(label: Any, class_names: Sequence[str], where: str) -> int:
    if label is None:
        return UNLABELED
    if isinstance(label, str):
        if label not in class_names:
            raise ReportDataError(
                f"{where}: class {label!r} is not one of the checkpoint's classes ({len(class_names)}: "
                f"{', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''})"
            )
        return class_names.index(label)
    index = int(label)
    if not 0 <= index < len(class_names):
        raise ReportDataError(f"{where}: label {index} is outside the checkpoint's {len(class_names)} classes")
    return index


def image_source_data(
    spec: str | os.PathLike, input_spec: InputSpec, class_names: Sequence[str], limit: int | None = None
) -> ReportData:
    """An image source (folder, manifest, shards), labels indexed by ``class_names`` (the checkpoint's).

    An image that cannot be read is skipped, counted and named in :attr:`ReportData.skipped` (once per pass)."""
    from cefam_lightning.data.image_sources import ImageSourceError, open_image, open_source

    try:
        source = open_source(spec, class_names=list(class_names))
    except ImageSourceError as e:
        raise ReportDataError(str(e)) from e
    transform = image_transform(input_spec)
    size = len(source) if hasattr(source, "__len__") else None
    if size is not None and limit is not None:
        size = min(size, int(limit))
    data = ReportData(source.describe(), lambda b, k=None: iter(()), size)

    def batches(batch_size: int, keep: Collection[int] | None = None) -> Iterator[ReportBatch]:
        first_pass = keep is None
        pending: list[tuple[int, str, Tensor, int]] = []
        for position, record in enumerate(source):
            if limit is not None and position >= limit:
                break
            if keep is not None and position not in keep:
                continue
            try:
                image = transform(open_image(record))
            except Exception as e:  # PIL raises many kinds for a damaged file: count it, name it, go on
                if first_pass:
                    data.skipped.append({"id": record.id, "error": f"{record.where()}: {error_summary(e)}"})
                continue
            pending.append((position, record.id, image, _label_index(record.label, class_names, record.where())))
            if len(pending) == batch_size:
                yield _stack(pending)
                pending = []
        if pending:
            yield _stack(pending)

    data.batches = batches
    return data


def _stack(items: list[tuple[int, str, Tensor, int]]) -> ReportBatch:
    return ReportBatch(
        [p for p, _, _, _ in items],
        [i for _, i, _, _ in items],
        torch.stack([x for _, _, x, _ in items]),
        torch.tensor([y for _, _, _, y in items], dtype=torch.long),
    )


def mask_dataset_data(dataset: Any, class_names: Sequence[str], limit: int | None = None) -> ReportData:
    """A mask dataset (:class:`~cefam_lightning.data.mask_datasets.MaskDataset`): presence from its masks."""
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    names = [c.name for c in dataset.concepts]

    def batches(batch_size: int, keep: Collection[int] | None = None) -> Iterator[ReportBatch]:
        positions = [i for i in range(n) if keep is None or i in keep]
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            items = [dataset[i] for i in chunk]
            present = torch.zeros(len(items), len(names), dtype=torch.bool)
            for row, item in enumerate(items):
                present[row, item["concepts"]] = True
            labels = [_label_index(it["label"], class_names, f"{dataset.root}: image {it['id']}") for it in items]
            yield ReportBatch(
                chunk,
                [it["id"] for it in items],
                torch.stack([it["image"] for it in items]),
                torch.tensor(labels, dtype=torch.long),
                present,
            )

    split = f", {dataset.split} split" if dataset.split else ""
    return ReportData(f"{dataset.root} ({dataset.format}{split}, {n} images)", batches, n, names)


def dataloader_data(
    source: Any,
    class_names: Sequence[str],
    concepts: Sequence[str] | None = None,
    definitions: dict[str, list[str]] | None = None,
    description: str = "validation split",
) -> ReportData:
    """Items as a training run reads them: dicts with ``image`` ``(3, H, W)`` in ``[0, 1]``, and ``label`` (an index
    into ``class_names``, or ``-1``: unlabeled), ``id`` and ``masks`` (``(C, H, W)``) where the data have them.

    ``source`` is a map-style dataset, or a ``DataLoader``. A loader over a map-style dataset is read through its
    dataset (unwrapped from a :class:`~cefam_lightning.data.feature_cache.CachedFeatureDataset`, so that every item
    carries its image): all of it, in index order (that of an unshuffled loader), whatever the loader's sampler
    (a distributed sampler's share) or batch limit. A loader over a stream is read as it serves its batches, one
    pass each time; an image served from the feature cache without its pixels is skipped and counted. An image's
    position is its index in that order.

    ``concepts`` names the masks' channels (the module's :attr:`~cefam_lightning.methods.base.ExplainerModule.
    evidence_concepts` for the data it was trained on): with it, an image's ground-truth presence of concept ``c``
    is ``masks[c].any()``; data whose items have no masks have no presence, whatever ``concepts`` says.
    ``definitions``: each class's defining concepts, where known (:func:`world_definitions`).
    """
    from torch.utils.data import DataLoader, IterableDataset

    from cefam_lightning.data.feature_cache import CachedFeatureDataset, items_with_images

    dataset = source.dataset if isinstance(source, DataLoader) else source
    if isinstance(dataset, CachedFeatureDataset):
        dataset = dataset.dataset
    names = None if concepts is None else [str(c) for c in concepts]
    where = f"{description}: image"
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        if names is not None and (n == 0 or "masks" not in dataset[0]):
            names = None

        def batches(batch_size: int, keep: Collection[int] | None = None) -> Iterator[ReportBatch]:
            positions = [i for i in range(n) if keep is None or i in keep]
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                yield _item_batch(chunk, [dataset[i] for i in chunk], class_names, names, where)

        return ReportData(f"{description} ({n} images)", batches, n, names, definitions)
    if not isinstance(source, DataLoader):
        raise ReportDataError(f"{description}: a stream is read through its DataLoader, got {type(source).__name__}")
    if names is not None:
        first = next(iter(source), None)
        if first is None or "masks" not in first:
            names = None
    data = ReportData(description, lambda b, k=None: iter(()), None, names, definitions)

    def stream(batch_size: int, keep: Collection[int] | None = None) -> Iterator[ReportBatch]:
        position, pending = 0, []
        for batch in source:
            items = items_with_images(batch)
            if keep is None and "id" in batch and len(batch["id"]) > len(items):
                shown = {str(it.get("id")) for it in items}
                data.skipped += [
                    {"id": str(i), "error": "served from the feature cache without its image"}
                    for i in batch["id"]
                    if str(i) not in shown
                ]
            for item in items:
                if keep is None or position in keep:
                    pending.append((position, item))
                position += 1
                if len(pending) == batch_size:
                    yield _item_batch([p for p, _ in pending], [it for _, it in pending], class_names, names, where)
                    pending = []
        if pending:
            yield _item_batch([p for p, _ in pending], [it for _, it in pending], class_names, names, where)

    data.batches = stream
    return data


def _item_batch(
    positions: list[int], items: list[dict], class_names: Sequence[str], concepts: list[str] | None, where: str
) -> ReportBatch:
    ids = [str(it["id"]) if "id" in it else str(p) for p, it in zip(positions, items, strict=True)]
    labels = [
        _label_index(_plain(it.get("label")), class_names, f"{where} {i}") if "label" in it else UNLABELED
        for i, it in zip(ids, items, strict=True)
    ]
    present = None
    if concepts is not None:
        masks = [torch.as_tensor(it["masks"]) for it in items]
        bad = next((m.shape for m in masks if m.ndim != 3 or m.shape[0] != len(concepts)), None)
        if bad is not None:
            raise ReportDataError(f"{where}s: masks of shape {tuple(bad)} for {len(concepts)} concepts")
        present = torch.stack([m.flatten(1).any(dim=1) for m in masks])
    return ReportBatch(
        positions,
        ids,
        torch.stack([torch.as_tensor(it["image"]) for it in items]).float(),
        torch.tensor(labels, dtype=torch.long),
        present,
    )


def _plain(label: Any) -> Any:
    """A label as :func:`_label_index` takes it: ``-1`` (unlabeled) as ``None``, a 0-d tensor as a number."""
    if isinstance(label, (Tensor, np.generic)):
        label = label.item()
    return None if isinstance(label, int) and label == UNLABELED else label


def open_report_data(
    module: Any,
    data: str | os.PathLike | None = None,
    split: str | None = None,
    format: str = "auto",
    limit: int | None = None,
    world: Any = None,
) -> ReportData:
    """The data a report on ``module`` reads: ``data`` (a mask dataset, or else an image source; ``format``:
    ``auto``, ``images`` or a mask-dataset format) or, without it, the split ``split`` (default ``test``) of the
    shapes ``world`` (the one the checkpoint was trained on); the first ``limit`` images."""
    from cefam_lightning.data.mask_datasets import FORMATS, MaskDatasetError, detect_format, open_mask_dataset

    spec = module.classifier.input_spec
    class_names = module.class_names
    if data is None:
        if world is None:
            raise ReportDataError("name the images with --data (no shapes world to read)")
        return shapes_world_data(world, split or "test", limit)
    if format not in ("auto", "images", *FORMATS):
        raise ReportDataError(f"--format must be auto, images or one of {list(FORMATS)}, got {format!r}")
    root = Path(data).expanduser()
    if format == "auto":
        try:
            format = detect_format(root) if root.is_dir() else "images"
        except MaskDatasetError:
            format = "images"
    if format == "images":
        if split is not None:
            raise ReportDataError("--split applies to the shapes world and mask datasets, not to an image source")
        return image_source_data(data, spec, class_names, limit)
    try:
        dataset = open_mask_dataset(root, spec, format, split=split)
    except MaskDatasetError as e:
        raise ReportDataError(str(e)) from e
    return mask_dataset_data(dataset, class_names, limit)
