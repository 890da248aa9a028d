"""What ``evaluate --data`` reads: a mask dataset (:mod:`cefam_lightning.data.mask_datasets`), or any image source
(:mod:`cefam_lightning.data.image_sources`: a class-per-folder tree, a ``.csv``/``.jsonl`` manifest, tar shards),
which has images and labels but no masks.

Both give the same items (``image``, ``masks``, ``concepts``, ``id``, ``label``: the class name or ``None``) and
batch with :func:`~cefam_lightning.data.mask_datasets.collate_masks`, so a method's evaluation reads either; an
image source's items have no masks (``concepts`` is empty), and a method that needs masks says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cefam_lightning.data.image_sources import ImageSourceError, is_shard_spec, open_image, open_source
from cefam_lightning.data.mask_datasets import MaskDataset, MaskDatasetError, detect_format, open_evaluation_splits
from cefam_lightning.data.transforms import InputSpec

IMAGES_FORMAT = "images"  # --format of a plain image source


class ImageSourceDataset(MaskDataset):
    """The images of an image source as mask-dataset items without masks (see the module docstring): no concepts,
    no splits.

    Its records are listed once when opened (tar shards: their bytes are held in memory).

    Args:
        spec: the source (folder, manifest, shards).
        input_spec: the classifier's input geometry.
        class_names: the checkpoint's classes, for integer labels the source names no class for.
    """

    format = IMAGES_FORMAT

    def __init__(self, spec: str | os.PathLike, input_spec: InputSpec, class_names: Sequence[str] | None = None):
        self.source = open_source(spec)  # its own class names: a label is read as the name its source gives it
        super().__init__(Path(spec), input_spec, concepts=[], records=list(self.source), splits=[], split=None)
        self.class_names = list(class_names) if class_names is not None else None

    def label_name(self, label: int | None) -> str | None:
        """A record's label as a class name: the source's own name (folder, manifest), else (integer labels of
        tar shards) the checkpoint's class of that index, else the index as text."""
        if label is None:
            return None
        own = self.source.class_names
        if own is not None:
            return own[label]
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        crop = self.input_spec.crop
        return {
            "image": self._transform(open_image(record)),
            "masks": torch.zeros(0, crop, crop, dtype=torch.bool),
            "concepts": torch.zeros(0, dtype=torch.long),
            "id": record.id,
            "label": self.label_name(record.label),
        }


def open_evaluation_data(
    root: str | os.PathLike,
    input_spec: InputSpec,
    format: str = "auto",
    split: str | None = None,
    fit_split: str | None = None,
    class_names: Sequence[str] | None = None,
    imagenet_class_names: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[MaskDataset | ImageSourceDataset, MaskDataset | None]:
    """The data ``evaluate --data`` names, and the split to fit CE-FAM's single-channel baseline on.

    Args:
        root: a mask dataset folder, or an image source.
        input_spec: the classifier's input geometry.
        format: ``auto`` (a mask layout when one is found, else an image source), one of the mask layouts, or
            ``images`` (an image source).
        split, fit_split, options: of a mask dataset
            (:func:`~cefam_lightning.data.mask_datasets.open_evaluation_splits`); an image source has no splits.
        class_names: the checkpoint's classes, which an image source's labels index.
        imagenet_class_names: ImageNet-S's ``class_names`` option (a file of ``<wnid> <name>`` lines).

    Raises:
        MaskDatasetError: a malformed mask dataset, or a split asked of an image source.
        ImageSourceError: a malformed image source, or a path that is neither.
    """
    path = Path(root).expanduser()
    if not path.exists() and not is_shard_spec(str(path)):
        raise MaskDatasetError(f"{root}: dataset folder not found (nor a manifest or tar shards)")
    if format == "auto":
        try:
            format = detect_format(root)
        except MaskDatasetError:
            format = IMAGES_FORMAT  # no mask layout: a folder of class sub-folders, a manifest or shards
    if imagenet_class_names is not None:
        options["class_names"] = imagenet_class_names
    if format != IMAGES_FORMAT:
        return open_evaluation_splits(root, input_spec, format, split=split, fit_split=fit_split, **options)
    if split is not None:
        raise MaskDatasetError(f"{root}: --split {split!r}, but an image source has no splits")
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise MaskDatasetError(f"{root}: option(s) {', '.join(given)} apply to mask datasets, not an image source")
    try:
        return ImageSourceDataset(root, input_spec, class_names), None
    except ImageSourceError as e:
        raise ImageSourceError(f"{e} (evaluate --data takes a mask dataset or an image source)") from None
