"""Evaluation data with ground-truth concept masks: one dataset interface over three on-disk layouts
(docs/method.md#evaluation-data-with-masks).

:func:`open_mask_dataset` opens a folder in one of these layouts and returns a map-style
:class:`MaskDataset`. Item ``i`` is a dict:

- ``image``: ``(3, crop, crop)`` float32 in ``[0, 1]``, made by :func:`cefam_lightning.data.transforms.image_transform`
  from the classifier's :class:`~cefam_lightning.data.transforms.InputSpec` (shorter side resized, center crop);
- ``masks``: ``(n, crop, crop)`` bool, one mask per concept present in the crop, put through the same resize and
  center crop (nearest neighbour, pixel-centre aligned with the image's bilinear resize);
- ``concepts``: ``(n,)`` int64, the index into :attr:`MaskDataset.concepts` of each mask;
- ``id``: the image's id; ``label``: its class name, or ``None`` where the layout has none.

A concept whose mask lies entirely outside the center crop is not present in the item. :func:`collate_masks` batches
items for a :class:`~torch.utils.data.DataLoader` (masks stay sparse: one row per (image, concept) pair).

**The folder format** (``format="folder"``), for data of your own::

    ROOT/
      concepts.csv          # header "name,type", one row per concept: red,color / sky,object / ...
      images/<id>.<ext>     # .jpg .jpeg .png .bmp .gif .webp .tif .tiff; sub-folders allowed ("a/b" is an id)
      masks/<id>/<name>.png # one binary mask per concept present in image <id>, named by the concept
      images.csv            # optional, header "id[,split][,label]": the images' splits and class names

A mask PNG must have its image's width and height; a pixel belongs to the concept when it is non-zero (in any
colour channel; an alpha channel is ignored). An image without a ``masks/<id>/`` folder shows no concept. When
``images.csv`` exists it lists every image exactly once (ids without extension). Open-time errors name the file
(and line) at fault: a malformed or repeated row in a CSV, a mask of a concept missing from ``concepts.csv``, a mask
folder without an image, an unlisted image. A mask of another size than its image, or an unreadable file, raises
when the item is read.

**Broden** (``format="broden"``; Bau et al., NetDissect, e.g. ``broden1_224``), read as NetDissect's own loader
reads it (``data_loader/loadseg.py`` of CSAILVision/NetDissect-Lite, ``SegmentationData``):

- ``index.csv``: columns ``image, split, ih, iw, sh, sw`` and one column per category (``color, object, part,
  material, scene, texture``), each holding ``;``-separated entries. An entry is a segmentation PNG (a path under
  ``images/``) whose pixel label number is ``R + 256 * G`` (0 = unlabelled), or a bare label number, which labels
  the whole image (how the scene and texture columns are filled). PNGs are ``sh x sw`` (half the image size in
  ``broden1_224``) and are scaled to the image by nearest neighbour, as NetDissect does.
- ``label.csv``: ``number, name, category, ...``; ``category`` is like ``object(123);part(4)``.
- ``category.csv`` and the ``c_<category>.csv`` files (NetDissect's dense per-category codes) are not needed.

Every label of ``label.csv`` is a concept. Its type is the first category its ``category`` field lists. Its name is
the label's ``name`` with Broden's type suffixes removed (``-c`` of colors, ``-s`` of scenes, e.g. ``red-c`` ->
``red``, ``street-s`` -> ``street``) and ``_`` read as a space, so that it reads like the concept lists VLM
prompts are made from; where that would make two names equal, both keep their original names.
``strip_suffixes=False`` keeps every name as written. ``split`` selects rows by the ``split`` column (``train`` or
``val``); ``None`` keeps all rows.

**ImageNet-S** (``format="imagenet-s"``; Gao et al., ``ImageNetS50``, ``ImageNetS300``, ``ImageNetS919``):
``<split>/<wnid>/<name>.JPEG`` with ``<split>-segmentation/<wnid>/<name>.png`` for the annotated splits
``validation`` (the default) and ``train-semi``. A segmentation pixel's class id is ``R + 256 * G``: ``1..N`` are the
classes in sorted-wnid order, 0 is "other", 1000 "ignored" (the ImageNet-S README, LUSSeg/ImageNet-S); other and
ignored pixels are in no mask. Each class is one concept of type ``object``. The wnids are the sorted sub-folders of
``validation/`` (the release creates one per class), or the lines of ``categories`` (the release's
``ImageNetS_categories_im{N}.txt``) when given. Names are the ImageNet-1k class names torchvision's weights carry
(the names ImageNet-S's own evaluator prints, e.g. ``goldfish``; the two cranes are ``crane bird`` and ``crane``),
or those of ``class_names``, a file of ``<wnid> <name>[, synonyms]`` lines (ImageNet's ``LOC_synset_mapping.txt``,
whose first name is taken); a name two classes share there gets its wnid appended (``crane (n02012849)``).
``ROOT`` is an ``ImageNetS{N}`` folder or the folder holding one. An item's ``label`` is the class name of its folder.

Command line: ``python -m cefam_lightning.data.mask_datasets check ROOT`` opens a dataset, reads a few items and prints
what it holds; ``python -m cefam_lightning.data.mask_datasets shapes-broden OUT`` writes shapes-world scenes in Broden's
layout (:func:`write_shapes_broden`), a small dataset to try ``evaluate --data`` on.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cefam_lightning.data.image_io import read_rgb
from cefam_lightning.data.transforms import InputSpec, image_transform
from cefam_lightning.errors import CefamError, error_summary

FORMATS = ("folder", "broden", "imagenet-s")
# The image files explain.py reads, by extension.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BRODEN_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
BRODEN_SUFFIXES = {"color": "-c", "scene": "-s"}
IMAGENET_S_SPLITS = ("validation", "train-semi")
IMAGENET_S_OTHER, IMAGENET_S_IGNORE = 0, 1000
_MAX_LISTED = 20


class MaskDatasetError(CefamError):
    """A missing or malformed file of a mask dataset; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class MaskConcept:
    """A concept of a mask dataset: its name and type (color, object, part, material, scene, texture, ...)."""

    name: str
    type: str


@dataclass(frozen=True)
class _Record:
    id: str
    image: Path
    split: str | None
    label: str | None
    source: Any  # what the layout's reader needs to read the image's masks


@dataclass
class MaskBatch:
    """A batch of mask-dataset items with sparse masks: one row of ``masks`` per (image, concept) pair."""

    images: Tensor  # (B, 3, H, W) in [0, 1]
    masks: Tensor  # (P, H, W) bool
    image_index: Tensor  # (P,) the image of each pair
    concepts: Tensor  # (P,) the concept of each pair (index into the dataset's concepts)
    ids: list[str]
    labels: list[str | None]


def collate_masks(items: Sequence[dict[str, Any]]) -> MaskBatch:
    """Batch :class:`MaskDataset` items (the ``collate_fn`` of a DataLoader)."""
    images = torch.stack([it["image"] for it in items])
    crop = images.shape[-2:]
    masks = [it["masks"] for it in items]
    return MaskBatch(
        images=images,
        masks=torch.cat(masks) if masks else torch.zeros(0, *crop, dtype=torch.bool),
        image_index=torch.cat([torch.full((len(m),), i, dtype=torch.long) for i, m in enumerate(masks)]),
        concepts=torch.cat([it["concepts"] for it in items]),
        ids=[it["id"] for it in items],
        labels=[it["label"] for it in items],
    )


class MaskDataset(Dataset):
    """Images with per-concept masks, aligned to a classifier's input geometry (see the module docstring).

    Subclasses list the images (:class:`_Record`) and read one image's annotation as label maps.

    Args:
        root: the dataset folder.
        input_spec: the classifier's input geometry; images and masks get its resize and center crop.
        concepts: the dataset's concepts, in index order.
        records: the images of the selected split.
        splits: every split name the dataset has (empty when it has no splits).
        split: the selected split (``None``: all images).
    """

    format = "base"

    def __init__(
        self,
        root: Path,
        input_spec: InputSpec,
        concepts: list[MaskConcept],
        records: list[_Record],
        splits: list[str],
        split: str | None,
    ):
        self.root, self.input_spec = root, input_spec
        self.concepts, self.records, self.splits, self.split = concepts, records, splits, split
        self._transform = image_transform(input_spec)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def describe(self) -> dict[str, Any]:
        """What was opened, for result files."""
        return {
            "format": self.format,
            "root": str(self.root),
            "split": self.split,
            "images": len(self),
            "concepts": len(self.concepts),
            "splits": list(self.splits),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = read_image(record.image)
        maps, whole = self._annotation(record, image.size)
        masks, concepts = self._align(maps, whole, image.size)
        return {
            "image": self._transform(image),
            "masks": masks,
            "concepts": concepts,
            "id": record.id,
            "label": record.label,
        }

    def _annotation(self, record: _Record, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        """The annotation of one image (``size``: its ``(width, height)``).

        Returns ``(maps, whole)``: ``maps`` is ``(L, h, w)`` int32 label maps holding ``c + 1`` where concept ``c``
        is (0: none), at the image size or a scaled version of it; ``whole`` lists the concepts labelling the
        whole image.
        """
        raise NotImplementedError

    def _align(self, maps: np.ndarray, whole: list[int], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Label maps -> ``(n, crop, crop)`` masks of the present concepts, after the image's resize and crop."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        spec = self.input_spec
        crop = spec.crop
        nearest = InterpolationMode.NEAREST_EXACT
        present: dict[int, Tensor] = {}
        if len(maps):
            t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.int32))
            width, height = size
            if tuple(t.shape[-2:]) != (height, width):  # e.g. Broden's half-resolution segmentations
                t = TF.resize(t, [height, width], interpolation=nearest, antialias=False)
            t = TF.resize(t, [spec.resize], interpolation=nearest, antialias=False)
            t = TF.center_crop(t, [crop, crop])
            for value in torch.unique(t).tolist():
                if value > 0:
                    present[value - 1] = (t == value).any(dim=0)
        for c in whole:
            present[c] = torch.ones(crop, crop, dtype=torch.bool)
        ids = sorted(present)
        masks = torch.stack([present[c] for c in ids]) if ids else torch.zeros(0, crop, crop, dtype=torch.bool)
        return masks, torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------- shared readers


def read_image(path: Path) -> Image.Image:
    """An image file as 8-bit RGB (:func:`~cefam_lightning.data.image_io.read_rgb`: any mode, 16-bit included), turned
    upright by its EXIF orientation; any failure names the file. Masks are read by their own readers: they are label
    maps, never rescaled."""
    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise MaskDatasetError(f"{path}: image file not found") from None
    except Exception as e:  # PIL raises many kinds for a corrupt file
        raise MaskDatasetError(f"{path}: cannot read the image ({error_summary(e)})") from e


def _read_png(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise MaskDatasetError(f"{path}: mask file not found") from None
    except Exception as e:
        raise MaskDatasetError(f"{path}: cannot read the mask ({error_summary(e)})") from e


def decode_label_png(path: Path) -> np.ndarray:
    """A segmentation PNG whose pixel label is ``R + 256 * G`` (Broden, ImageNet-S), as ``(h, w)`` int32."""
    im = _read_png(path)
    if im.mode not in ("RGB", "RGBA"):
        raise MaskDatasetError(f"{path}: expected an RGB segmentation PNG (label = R + 256 * G), got mode {im.mode}")
    rgb = np.asarray(im, dtype=np.int32)
    return rgb[:, :, 0] + 256 * rgb[:, :, 1]


def _read_binary_mask(path: Path) -> np.ndarray:
    im = _read_png(path)
    a = np.asarray(im)
    if a.ndim == 3:  # colour channels only: an alpha channel says nothing about the concept
        a = a[:, :, : 3 if im.mode.startswith("RGB") else 1].any(axis=2)
    return a != 0


def _csv_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV file's header and ``(line number, row)`` pairs; a missing file or required column is an error."""
    if not path.is_file():
        raise MaskDatasetError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, {k: (v or "").strip() for k, v in r.items() if k is not None}) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MaskDatasetError(f"{path}: cannot read the CSV file ({error_summary(e)})") from e
    missing = [c for c in required if c not in header]
    if missing:
        raise MaskDatasetError(f"{path}: missing column(s) {', '.join(missing)} in the header line {header}")
    return header, rows


def _select_split(records: list[_Record], split: str | None, where: Path) -> tuple[list[_Record], list[str]]:
    splits = sorted({r.split for r in records if r.split is not None})
    if not records:
        raise MaskDatasetError(f"{where.parent}: no images")
    if split is None:
        return records, splits
    if not splits:
        raise MaskDatasetError(f"{where}: split {split!r} requested, but the dataset has no splits")
    if split not in splits:
        raise MaskDatasetError(f"{where}: no split {split!r}; the splits are {', '.join(splits)}")
    return [r for r in records if r.split == split], splits


def _find_images(folder: Path) -> dict[str, Path]:
    """``{id: file}`` for the image files under ``folder`` (id: the relative path without extension)."""
    found: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        key = f.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            raise MaskDatasetError(f"two images share the id {key!r}: {found[key]} and {f}")
        found[key] = f
    return found


# ---------------------------------------------------------------------- folder format


class FolderMaskDataset(MaskDataset):
    """The documented folder format (see the module docstring)."""

    format = "folder"

    @classmethod
    def open(cls, root: Path, input_spec: InputSpec, split: str | None = None) -> FolderMaskDataset:
        concepts = _read_folder_concepts(root / "concepts.csv")
        index = {c.name: i for i, c in enumerate(concepts)}
        if not (root / "images").is_dir():
            raise MaskDatasetError(f"{root / 'images'}: folder not found (the folder format keeps images there)")
        images = _find_images(root / "images")
        info = _read_images_csv(root / "images.csv", images) if (root / "images.csv").is_file() else {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        mask_root = root / "masks"
        for f in sorted(mask_root.rglob("*")) if mask_root.is_dir() else []:
            if not f.is_file():
                continue
            if f.suffix.lower() != ".png":
                raise MaskDatasetError(f"{f}: not a .png mask (masks are masks/<id>/<concept name>.png)")
            image_id = f.parent.relative_to(mask_root).as_posix()
            if f.stem not in index:
                raise MaskDatasetError(
                    f"{f}: unknown concept {f.stem!r}; the concepts of {root / 'concepts.csv'} are "
                    f"{_listing([c.name for c in concepts])}"
                )
            if image_id not in images:
                raise MaskDatasetError(f"{f}: no image {image_id!r} in {root / 'images'} for this mask")
            masks.setdefault(image_id, []).append((index[f.stem], f))
        records = [
            _Record(key, path, *info.get(key, (None, None)), source=masks.get(key, [])) for key, path in images.items()
        ]
        records, splits = _select_split(records, split, root / "images.csv")
        return cls(root, input_spec, concepts, records, splits, split)

    def _annotation(self, record: _Record, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        width, height = size
        maps = np.zeros((len(record.source), height, width), dtype=np.int32)
        for layer, (concept, path) in enumerate(record.source):
            mask = _read_binary_mask(path)
            if mask.shape != (height, width):
                raise MaskDatasetError(
                    f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image {record.image} is "
                    f"{width}x{height}; a mask must have its image's size"
                )
            maps[layer][mask] = concept + 1
        return maps, []


def _read_folder_concepts(path: Path) -> list[MaskConcept]:
    _, rows = _csv_rows(path, ("name", "type"))
    concepts, seen = [], {}
    for line, row in rows:
        name, ctype = row.get("name", ""), row.get("type", "")
        if not name or not ctype:
            raise MaskDatasetError(f"{path}:{line}: a concept needs a name and a type, got {row}")
        if "/" in name or "\\" in name:
            raise MaskDatasetError(f"{path}:{line}: concept name {name!r} cannot be a mask file name (has a slash)")
        if name in seen:
            raise MaskDatasetError(f"{path}:{line}: concept {name!r} repeated (first on line {seen[name]})")
        seen[name] = line
        concepts.append(MaskConcept(name, ctype))
    if not concepts:
        raise MaskDatasetError(f"{path}: no concepts")
    return concepts


def _read_images_csv(path: Path, images: dict[str, Path]) -> dict[str, tuple[str | None, str | None]]:
    header, rows = _csv_rows(path, ("id",))
    info: dict[str, tuple[str | None, str | None]] = {}
    for line, row in rows:
        key = row["id"]
        if key not in images:
            raise MaskDatasetError(f"{path}:{line}: no image with id {key!r} in {path.parent / 'images'}")
        if key in info:
            raise MaskDatasetError(f"{path}:{line}: image {key!r} listed twice")
        split = (row.get("split") or None) if "split" in header else None
        label = (row.get("label") or None) if "label" in header else None
        if "split" in header and split is None:
            raise MaskDatasetError(f"{path}:{line}: image {key!r} has an empty split")
        info[key] = (split, label)
    unlisted = [str(p) for k, p in images.items() if k not in info]
    if unlisted:
        raise MaskDatasetError(f"{path}: image(s) not listed: {_listing(unlisted)}; list every image of images/")
    return info


# ---------------------------------------------------------------------- Broden


class BrodenMaskDataset(MaskDataset):
    """Broden's released layout, read as NetDissect's ``SegmentationData`` reads it (see the module docstring)."""

    format = "broden"

    def __init__(self, *args: Any, lookup: np.ndarray, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lookup = lookup  # label number -> concept index + 1 (0: unlabelled, -1: not in label.csv)

    @classmethod
    def open(
        cls, root: Path, input_spec: InputSpec, split: str | None = None, strip_suffixes: bool = True
    ) -> BrodenMaskDataset:
        numbers, concepts = _read_broden_labels(root / "label.csv", strip_suffixes)
        lookup = np.full(max(numbers) + 1, -1, dtype=np.int64)
        lookup[0] = 0
        lookup[numbers] = np.arange(1, len(numbers) + 1)
        index_csv = root / "index.csv"
        header, rows = _csv_rows(index_csv, BRODEN_META_COLUMNS)
        categories = [h for h in header if h not in BRODEN_META_COLUMNS]
        records = []
        for line, row in rows:
            try:
                sh, sw = int(row["sh"]), int(row["sw"])
            except ValueError:
                raise MaskDatasetError(f"{index_csv}:{line}: sh and sw must be integers, got {row}") from None
            entries: list[str | int] = []
            for cat in categories:
                for entry in (e.strip() for e in row.get(cat, "").split(";")):
                    if not entry:
                        continue
                    if entry.isdigit():
                        number = int(entry)
                        if number >= len(lookup) or lookup[number] < 0:
                            raise MaskDatasetError(
                                f"{index_csv}:{line}: label number {number} (column {cat}) is not in label.csv"
                            )
                        entries.append(number)
                    else:
                        entries.append(entry)
            if not row["image"]:
                raise MaskDatasetError(f"{index_csv}:{line}: empty image column")
            records.append(_Record(row["image"], root / "images" / row["image"], row["split"] or None, None,
                                   source=(line, (sh, sw), tuple(entries))))  # fmt: skip
        records, splits = _select_split(records, split, index_csv)
        return cls(root, input_spec, concepts, records, splits, split, lookup=lookup)

    def _annotation(self, record: _Record, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        _, (sh, sw), entries = record.source
        maps, whole = [], []
        for entry in entries:
            if isinstance(entry, int):
                whole.append(int(self._lookup[entry]) - 1)
                continue
            path = self.root / "images" / entry
            labels = decode_label_png(path)
            if labels.shape != (sh, sw):
                raise MaskDatasetError(
                    f"{path}: segmentation is {labels.shape[1]}x{labels.shape[0]} pixels, but index.csv gives "
                    f"sw={sw}, sh={sh} for image {record.id}"
                )
            unknown = labels >= len(self._lookup)
            mapped = self._lookup[np.where(unknown, 0, labels)]
            if unknown.any() or (mapped < 0).any():
                bad = np.unique(labels[unknown | (mapped < 0)])
                raise MaskDatasetError(f"{path}: label number(s) {_listing(bad.tolist())} are not in label.csv")
            maps.append(mapped.astype(np.int32))
        return (np.stack(maps) if maps else np.zeros((0, sh, sw), dtype=np.int32)), whole


def _read_broden_labels(path: Path, strip_suffixes: bool) -> tuple[list[int], list[MaskConcept]]:
    _, rows = _csv_rows(path, ("number", "name", "category"))
    numbers, raw, types = [], [], []
    for line, row in rows:
        try:
            number = int(row["number"])
        except ValueError:
            raise MaskDatasetError(f"{path}:{line}: label number must be an integer, got {row['number']!r}") from None
        match = re.match(r"^\s*([^(;]+)", row["category"])
        if number <= 0 or not row["name"] or not match:
            raise MaskDatasetError(f"{path}:{line}: expected a number > 0, a name and a category, got {row}")
        if number in numbers:
            raise MaskDatasetError(f"{path}:{line}: label number {number} repeated")
        numbers.append(number)
        raw.append(row["name"])
        types.append(match.group(1).strip())
    if not numbers:
        raise MaskDatasetError(f"{path}: no labels")
    names = [broden_concept_name(n, t) if strip_suffixes else n for n, t in zip(raw, types, strict=True)]
    counts = Counter(names)
    names = [n if counts[n] == 1 else r for n, r in zip(names, raw, strict=True)]
    dups = sorted(n for n, c in Counter(names).items() if c > 1)
    if dups:
        raise MaskDatasetError(f"{path}: label name(s) {_listing(dups)} repeated")
    order = np.argsort(numbers, kind="stable")
    return [numbers[i] for i in order], [MaskConcept(names[i], types[i]) for i in order]


def broden_concepts(root: str | os.PathLike, strip_suffixes: bool = True) -> list[MaskConcept]:
    """The labels of a Broden release as concepts, named and typed as :class:`BrodenMaskDataset` names them, from
    its ``label.csv`` alone (in label-number order)."""
    return _read_broden_labels(_dataset_root(root) / "label.csv", strip_suffixes)[1]


def _dataset_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MaskDatasetError(f"{path}: dataset folder not found")
    return path


def broden_concept_name(name: str, category: str) -> str:
    """Broden's label name as a concept name: ``red-c`` -> ``red``, ``living_room-s`` -> ``living room``."""
    suffix = BRODEN_SUFFIXES.get(category)
    if suffix and name.endswith(suffix) and len(name) > len(suffix):
        name = name[: -len(suffix)]
    return name.replace("_", " ")


# ---------------------------------------------------------------------- ImageNet-S


class ImageNetSMaskDataset(MaskDataset):
    """ImageNet-S's released layout (see the module docstring)."""

    format = "imagenet-s"

    @classmethod
    def open(
        cls,
        root: Path,
        input_spec: InputSpec,
        split: str | None = None,
        categories: str | os.PathLike | None = None,
        class_names: str | os.PathLike | None = None,
    ) -> ImageNetSMaskDataset:
        root = _imagenet_s_root(root)
        splits = [s for s in IMAGENET_S_SPLITS if (root / f"{s}-segmentation").is_dir()]
        split = split or "validation"
        if split not in splits:
            raise MaskDatasetError(
                f"{root}: no annotated split {split!r} (no folder {root / (split + '-segmentation')}); "
                f"annotated splits here: {', '.join(splits) or 'none'}"
            )
        wnids, concepts = _imagenet_s_classes(root, split, categories, class_names)
        name_of = {w: c.name for w, c in zip(wnids, concepts, strict=True)}
        seg_root, image_root = root / f"{split}-segmentation", root / split
        images: dict[tuple[str, str], Path] = {}
        for f in sorted(image_root.rglob("*")) if image_root.is_dir() else []:
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                images[(f.parent.relative_to(image_root).as_posix(), f.stem)] = f
        records = []
        for png in sorted(seg_root.rglob("*.png")):
            folder = png.parent.relative_to(seg_root).as_posix()
            image = images.get((folder, png.stem))
            if image is None:
                raise MaskDatasetError(f"{png}: no image {folder}/{png.stem}.* in {image_root} for this segmentation")
            if folder not in name_of:
                raise MaskDatasetError(f"{png}: folder {folder!r} is not one of the {len(wnids)} ImageNet-S classes")
            records.append(_Record(f"{folder}/{png.stem}", image, split, name_of[folder], source=png))
        if not records:
            raise MaskDatasetError(f"{seg_root}: no segmentation PNGs")
        return cls(root, input_spec, concepts, records, splits, split)

    def _annotation(self, record: _Record, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        ids = decode_label_png(record.source)
        width, height = size
        if ids.shape != (height, width):
            raise MaskDatasetError(
                f"{record.source}: segmentation is {ids.shape[1]}x{ids.shape[0]} pixels but its image "
                f"{record.image} is {width}x{height}"
            )
        n = len(self.concepts)
        bad = (ids > n) & (ids != IMAGENET_S_IGNORE)
        if bad.any():
            raise MaskDatasetError(
                f"{record.source}: class id(s) {_listing(np.unique(ids[bad]).tolist())} are neither 1..{n}, "
                f"{IMAGENET_S_OTHER} (other) nor {IMAGENET_S_IGNORE} (ignored)"
            )
        # Class id k is concept k - 1, i.e. already "concept + 1"; ignored pixels belong to no mask.
        return np.where(ids == IMAGENET_S_IGNORE, 0, ids)[None].astype(np.int32), []


def imagenet_s_concepts(
    root: str | os.PathLike,
    categories: str | os.PathLike | None = None,
    class_names: str | os.PathLike | None = None,
    split: str = "validation",
) -> list[MaskConcept]:
    """The classes of an ImageNet-S release as concepts (type ``object``), named as :class:`ImageNetSMaskDataset`
    names them, from its class list alone (the class folders or ``categories``; ``class_names``)."""
    return _imagenet_s_classes(_imagenet_s_root(_dataset_root(root)), split, categories, class_names)[1]


def _imagenet_s_classes(
    root: Path, split: str, categories: str | os.PathLike | None, class_names: str | os.PathLike | None
) -> tuple[list[str], list[MaskConcept]]:
    """The sorted wnids and their concepts."""
    wnids = _imagenet_s_wnids(root, split, categories)
    return wnids, [MaskConcept(n, "object") for n in _imagenet_s_names(wnids, class_names)]


def _imagenet_s_root(root: Path) -> Path:
    if any((root / f"{s}-segmentation").is_dir() for s in IMAGENET_S_SPLITS):
        return root
    inner = sorted(p for p in root.glob("ImageNetS*") if p.is_dir())
    if len(inner) == 1:
        return inner[0]
    if inner:
        raise MaskDatasetError(f"{root}: holds {', '.join(p.name for p in inner)}; point at one of them")
    raise MaskDatasetError(f"{root}: no ImageNet-S layout (no validation-segmentation folder, no ImageNetS* folder)")


def _imagenet_s_wnids(root: Path, split: str, categories: str | os.PathLike | None) -> list[str]:
    match = re.fullmatch(r"ImageNetS(\d+)", root.name)
    expected = int(match.group(1)) if match else None
    if categories is not None:
        path = Path(categories)
        try:
            wnids = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise MaskDatasetError(f"{path}: cannot read the ImageNet-S category list ({error_summary(e)})") from e
        source = str(path)
    else:
        folder = root / "validation" if (root / "validation").is_dir() else root / split
        wnids = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        source = f"the sub-folders of {folder}"
    bad = [w for w in wnids if not re.fullmatch(r"n\d{8}", w)]
    if bad:
        raise MaskDatasetError(f"{source}: not WordNet ids (nXXXXXXXX): {_listing(bad)}")
    if len(set(wnids)) != len(wnids):
        raise MaskDatasetError(f"{source}: repeated wnids")
    if expected is not None and len(wnids) != expected:
        raise MaskDatasetError(
            f"{source}: {len(wnids)} classes, but {root.name} has {expected}; give the release's category list "
            f"(ImageNetS_categories_im{expected}.txt) as categories"
        )
    if not wnids:
        raise MaskDatasetError(f"{source}: no classes")
    return sorted(wnids)  # the ImageNet-S class id is the 1-based position in sorted wnid order


def _imagenet_s_names(wnids: list[str], class_names: str | os.PathLike | None) -> list[str]:
    if class_names is not None:
        path = Path(class_names)
        table: dict[str, str] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MaskDatasetError(f"{path}: cannot read the class names ({error_summary(e)})") from e
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2 or not parts[1].split(",")[0].strip():
                raise MaskDatasetError(f"{path}:{line_no}: expected '<wnid> <name>[, synonyms]', got {line!r}")
            table[parts[0]] = parts[1].split(",")[0].strip()
        missing = [w for w in wnids if w not in table]
        if missing:
            raise MaskDatasetError(f"{path}: no name for {_listing(missing)}")
    else:
        table = imagenet_class_names()
    names = [table.get(w, w) for w in wnids]
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{n} ({w})" for n, w in zip(names, wnids, strict=True)]


def imagenet_class_names() -> dict[str, str]:
    """``{wnid: name}`` of ImageNet-1k: timm's synset list (sorted wnids) with torchvision's category names."""
    from timm.data import ImageNetInfo
    from torchvision.models import ResNet50_Weights

    wnids = ImageNetInfo().label_names()
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return dict(zip(wnids, names, strict=True))


# ---------------------------------------------------------------------- opening


def detect_format(root: str | os.PathLike) -> str:
    """Which layout ``root`` holds: ``folder`` (concepts.csv), ``broden`` (index.csv + label.csv), ``imagenet-s``."""
    root = Path(root)
    if (root / "concepts.csv").is_file():
        return "folder"
    if (root / "index.csv").is_file() and (root / "label.csv").is_file():
        return "broden"
    if any((root / f"{s}-segmentation").is_dir() for s in IMAGENET_S_SPLITS) or any(
        p.is_dir() for p in root.glob("ImageNetS*")
    ):
        return "imagenet-s"
    raise MaskDatasetError(
        f"{root}: cannot tell the dataset layout: no concepts.csv (folder format), no index.csv + label.csv "
        "(Broden), no validation-segmentation or ImageNetS* folder (ImageNet-S)"
    )


def open_mask_dataset(
    root: str | os.PathLike,
    input_spec: InputSpec,
    format: str = "auto",
    split: str | None = None,
    **options: Any,
) -> MaskDataset:
    """Open a mask dataset.

    Args:
        root: the dataset folder.
        input_spec: the classifier's input geometry (images and masks are resized and center-cropped to it).
        format: ``auto`` (detect), ``folder``, ``broden`` or ``imagenet-s``.
        split: the split to read (Broden ``train``/``val``, the folder format's ``split`` values, ImageNet-S
            ``validation``/``train-semi``); ``None`` reads every image (ImageNet-S: ``validation``).
        **options: ``strip_suffixes`` (Broden); ``categories``, ``class_names`` (ImageNet-S).

    Raises:
        MaskDatasetError: a missing folder, an unknown layout or option, a malformed file (named).
    """
    root = _dataset_root(root)
    fmt = detect_format(root) if format == "auto" else format
    readers = {"folder": FolderMaskDataset, "broden": BrodenMaskDataset, "imagenet-s": ImageNetSMaskDataset}
    if fmt not in readers:
        raise MaskDatasetError(f"unknown dataset format {format!r}; choose auto, {', '.join(FORMATS)}")
    allowed = {"folder": (), "broden": ("strip_suffixes",), "imagenet-s": ("categories", "class_names")}[fmt]
    unused = [k for k, v in options.items() if k not in allowed and v is not None]
    if unused:
        raise MaskDatasetError(f"option(s) {', '.join(unused)} do not apply to the {fmt} format")
    kwargs = {k: v for k, v in options.items() if k in allowed and v is not None}
    return readers[fmt].open(root, input_spec, split=split, **kwargs)


# ---------------------------------------------------------------------- a Broden-layout folder to try things on

SHAPES_BRODEN_EXTRA = (("background", "object"), ("studio-s", "scene"))  # labels no shapes-world checkpoint knows


def write_shapes_broden(
    root: str | os.PathLike, spec: Any = None, n_val: int = 100, n_train: int = 200, seed: int = 0
) -> Path:
    """Render shapes-world scenes into a folder with Broden's released layout (to try ``evaluate --data`` on).

    Colours become ``<color>-c`` labels (category ``color``) and shapes ``object`` labels, drawn into half-resolution
    segmentation PNGs as in ``broden1_224``; each image's textures are image-level ``texture`` numbers. Two labels
    no shapes-world checkpoint knows are added: ``background`` (object, the pixels outside every shape) and
    ``studio-s`` (scene, every image). Rows ``0..n_val-1`` are the ``val`` split, the rest ``train``. Written
    atomically (a failure leaves no folder).

    Args:
        root: the folder to write (replaced if it exists).
        spec: a :class:`~cefam_lightning.data.shapes_world.WorldSpec` (default: the demo world's colours, shapes and
            textures at 128 px; the image size should be even).
        n_val, n_train: images per split; seed: the scenes' seed.
    """
    from cefam_lightning.data.shapes_world import WorldSpec, render_image
    from cefam_lightning.io_utils import atomic_dir

    spec = spec or WorldSpec(image_size=128)
    labels = (
        [(f"{c}-c", "color") for c in spec.colors]
        + [(s, "object") for s in spec.shapes]
        + [(t, "texture") for t in spec.textures]
        + list(SHAPES_BRODEN_EXTRA)
    )
    number = {name.removesuffix("-c"): i for i, (name, _) in enumerate(labels, start=1)}
    size, half = spec.image_size, spec.image_size // 2
    concept_names = [c.name for c in spec.concepts]
    rows = []
    with atomic_dir(Path(root)) as tmp:
        for i in range(n_val + n_train):
            split = "val" if i < n_val else "train"
            image, masks, _ = render_image(spec, (seed, 17, i))
            name = f"shapes/{split}_{i:06d}"
            color = np.zeros((size, size), dtype=np.int64)
            obj = np.full((size, size), number["background"], dtype=np.int64)
            textures = []
            for concept, mask in zip(concept_names, masks, strict=True):
                if concept in spec.colors:
                    color[mask] = number[concept]
                elif concept in spec.shapes:
                    obj[mask] = number[concept]
                elif mask.any():
                    textures.append(str(number[concept]))
            (tmp / "images" / "shapes").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp / "images" / f"{name}.jpg", quality=95)
            for part, labels_map in (("color", color), ("object", obj)):
                small = labels_map[::2, ::2][:half, :half]  # Broden's segmentations are at half resolution
                rgb = np.stack([small % 256, small // 256, np.zeros_like(small)], axis=-1).astype(np.uint8)
                Image.fromarray(rgb).save(tmp / "images" / f"{name}_{part}.png")
            rows.append([f"{name}.jpg", split, size, size, half, half, f"{name}_color.png", f"{name}_object.png",
                         "", "", str(number["studio-s"]), ";".join(textures)])  # fmt: skip
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*BRODEN_META_COLUMNS, "color", "object", "part", "material", "scene", "texture"])
            writer.writerows(rows)
        with open(tmp / "label.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
            writer.writerows([[i, n, f"{t}(1)", 0, 0.0, ""] for i, (n, t) in enumerate(labels, start=1)])
    return Path(root)


def main(argv: list[str] | None = None) -> None:
    """``python -m cefam_lightning.data.mask_datasets check ROOT`` | ``shapes-broden OUT``; see ``--help``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m cefam_lightning.data.mask_datasets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="open a mask dataset, read some items and print what it holds")
    check.add_argument("root")
    check.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    check.add_argument("--split", default=None)
    check.add_argument("--items", type=int, default=8, help="items to read (default 8; 0: all)")
    check.add_argument("--size", type=int, default=224, help="crop the items are read at (default 224)")
    check.add_argument("--categories", default=None, help="ImageNet-S: the release's category list")
    check.add_argument("--class-names", default=None, help="ImageNet-S: '<wnid> <name>' lines")
    demo = sub.add_parser("shapes-broden", help="write shapes-world scenes in Broden's layout")
    demo.add_argument("out")
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--n-val", type=int, default=100)
    demo.add_argument("--n-train", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "shapes-broden":
            from cefam_lightning.data.shapes_world import WorldSpec

            root = write_shapes_broden(
                args.out, WorldSpec(image_size=args.image_size), args.n_val, args.n_train, args.seed
            )
            print(f"wrote {args.n_val} val + {args.n_train} train images in Broden's layout to {root}")
            return
        ds = open_mask_dataset(
            args.root,
            InputSpec(crop=args.size, resize=args.size),
            args.format,
            args.split,
            categories=args.categories,
            class_names=args.class_names,
        )
        n = len(ds) if args.items == 0 else min(args.items, len(ds))
        pairs = sum(len(ds[i]["concepts"]) for i in range(n))
    except (MaskDatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    types = Counter(c.type for c in ds.concepts)
    print(f"{ds.format} dataset at {ds.root}: {len(ds)} images in split {ds.split!r} (splits: {ds.splits or 'none'})")
    print(f"{len(ds.concepts)} concepts: " + ", ".join(f"{t} {k}" for t, k in types.items()))
    print(f"read {n} items: {pairs} (image, concept) masks")


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


EVAL_SPLITS = ("val", "validation")  # a mask dataset's default evaluation split, where it has one
FIT_SPLITS = ("train", "train-semi")  # the split the single-channel baseline is fitted on, where it has one


def open_evaluation_splits(
    root: str | Path,
    input_spec: InputSpec,
    format: str = "auto",
    split: str | None = None,
    fit_split: str | None = None,
    **options: Any,
) -> tuple[MaskDataset, MaskDataset | None]:
    """The evaluation split of a mask dataset and the split to fit the single-channel baseline on.

    Args:
        root, input_spec, format, options: see :func:`~cefam_lightning.data.mask_datasets.open_mask_dataset`.
        split: the evaluation split; ``None``: ``val`` (ImageNet-S ``validation``) where the dataset has it, else
            every image.
        fit_split: ``None``: ``train`` (ImageNet-S ``train-semi``) where the dataset has it and a held-out split
            is evaluated; ``"none"``: no fit split.
    """
    dataset = open_mask_dataset(root, input_spec, format, split=split, **options)
    fmt = dataset.format
    if split is None:
        default = next((s for s in EVAL_SPLITS if s in dataset.splits), None)
        if default != dataset.split:
            dataset = open_mask_dataset(root, input_spec, fmt, split=default, **options)
    if fit_split == "none":
        return dataset, None
    if fit_split is None:
        # Only beside a held-out evaluation split: "every image" would include the training images.
        candidates = [s for s in FIT_SPLITS if s in dataset.splits and s != dataset.split]
        if dataset.split is None or not candidates:
            return dataset, None
        fit_split = candidates[0]
    return dataset, open_mask_dataset(root, input_spec, fmt, split=fit_split, **options)


if __name__ == "__main__":
    main()
