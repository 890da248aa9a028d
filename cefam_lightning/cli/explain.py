"""Explain images with a trained checkpoint: what the classifier saw, where, at which layer, how much.

Usage::

    python explain.py --checkpoint CKPT [--concepts NAMES|FILE] [--store STORE_DIR] [--top-n 8] [--k 20]
                      [--fill spatial_mean|zero] [--select-layers auto|all|L1,L2] [--target CLASS] [--out DIR]
                      [--batch-size 16]
                      [--device auto|cpu|cuda] [--no-figures] INPUT [INPUT ...]

The checkpoint is CE-FAM's, L-CAM's (Fm or Img) or SIAM's, whichever ``train.py method=...`` wrote; its kind is
read from the checkpoint (:func:`cefam_lightning.methods.checkpoints.checkpoint_kind`). ``INPUT`` is an image file or a
folder (searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff, in sorted order). Each image goes
through the classifier's own input transform (shorter side resized, center crop: ``classifier.input_spec``,
recorded in the checkpoint) and is explained. For each image ``<out>/<name>/`` receives ``report.json``,
``regions.npz`` (float16 maps at the classifier's input resolution: the resized, center-cropped image) and
``figure.png``:

- **CE-FAM** (SPEC §2.7): the predicted class and its probability, the explained class (``--target`` or the
  predicted one), and for each reported concept (decreasing score) its score ``S``, probability, selected
  layer, relevance at every layer, contribution to the explained class (signed) and the key of its region map;
  the figure shows the image, each concept's region overlaid, and a bar chart of the contributions.
- **L-CAM** (SPEC §5): the predicted and explained class, the class map of the explained class (one forward
  pass) and how much it holds: the explained class's probability on the image kept where the map is high (the
  whole map, its top 50 % and top 15 % of pixels, SPEC §4) and the relative drop from the whole image; the
  figure shows the map and those probabilities.
- **SIAM** (SPEC §6): the predicted and explained class, every attribute (decreasing absolute contribution)
  with its presence probability, score and contribution ``weight x score`` (with the ``bias`` they sum to the
  class logit), the ``--top-n`` attributes' maps and the class map; the figure shows those maps and a bar chart
  of the contributions.

``<out>/summary.json`` lists the explained images (with their folders), the images that could not be read
(with the reason) and the settings. An unreadable image is reported and skipped; the others are explained.

CE-FAM concepts: by default the checkpoint's own concept set, top ``--top-n`` by score. ``--concepts`` gives a
set instead, either comma-separated names (``red,circle``) or a text file with one concept per line, ``name`` or
``name,type`` (or tab-separated; blank lines and ``#`` comments are ignored). Every given concept is scored and
ranked; ``--top-n`` limits how many are reported. Names in the checkpoint's concept set use its text
embeddings; other names need the VLM's text encoder, i.e. an embedding store that holds them (``--store``),
made with the same VLM. With CLIP-style scoring, concept probabilities (and so layer relevance) are a softmax
over the concept set being explained: they change when the set changes. SigLIP-style probabilities are
per-concept sigmoids and do not. A concept's selected layer is its most relevant one among ``--select-layers``
(default ``auto``: every explained layer but one read only through global average pooling, where masking a
channel with its spatial mean cannot move the class score, so every contribution there would be 0).
``--concepts``, ``--store``, ``--k``, ``--fill`` and ``--select-layers`` are CE-FAM's; L-CAM and SIAM explain their
own class map and attributes (``--concepts``/``--store`` with them is an error).

Exit status: 0 when at least one image was explained, 1 when none could be read, 2 for a bad argument
(missing or foreign checkpoint, unknown concept or class, missing input), reported on one ``error:`` line.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cefam_lightning import devices
from cefam_lightning.data.concepts import ConceptFileError, read_concept_file
from cefam_lightning.data.embedding_store import EmbeddingStore, EmbeddingStoreError
from cefam_lightning.data.transforms import load_image
from cefam_lightning.errors import CefamError, cli_errors, error_summary, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.methods.cefam.contributions import FILLS
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.methods.cefam.pipeline import BatchExplanation, explain_batch
from cefam_lightning.methods.cefam.relevance import parse_select_layers, selectable_layers
from cefam_lightning.methods.checkpoints import (
    KIND_ARTICLES,
    CheckpointError,
    load_explainer,
    method_name,
    module_kind,
)
from cefam_lightning.methods.lcam.module import LCAMModule, normalize_maps, select_class
from cefam_lightning.methods.siam.module import SIAMModule
from cefam_lightning.metrics.functional.faithfulness import DEFAULT_KEEPS, faithfulness_probabilities, setting_name
from cefam_lightning.models.components import ConceptScorer

log = logging.getLogger("cefam_lightning")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CONCEPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_MAX_LISTED = 40  # names listed at most in an error message
EXPLAINERS = (CEFAMModule, LCAMModule, SIAMModule)
Explainer = CEFAMModule | LCAMModule | SIAMModule


class ExplainError(CefamError):
    """A bad input to the explainer (checkpoint, concept, class, path, device), with a message for the user."""


@dataclass(frozen=True)
class ConceptSet:
    """The concepts an explanation scores: names, types and (normalized) text embeddings, in one order."""

    names: list[str]
    types: list[str]
    text: Tensor  # (num_concepts, embed_dim)
    source: str  # "checkpoint" (the checkpoint's own set) or "given"


@dataclass
class _Parts:
    """What :func:`explain_batch` reads from a module: the classifier, translator and (possibly new) scorer."""

    classifier: nn.Module
    translator: nn.Module
    scorer: ConceptScorer


# ---------------------------------------------------------------------- checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Explainer:
    """Load the explainer of a checkpoint: a CE-FAM, L-CAM or SIAM module, told apart by
    :func:`~cefam_lightning.methods.checkpoints.checkpoint_kind`. A missing file or a checkpoint of another kind raises
    :class:`ExplainError`."""
    try:
        return load_explainer(path, map_location=map_location)
    except CheckpointError as e:
        raise ExplainError(one_line(e)) from e


def input_size(module: Explainer) -> int:
    """The classifier's input crop size (``classifier.input_spec.crop``)."""
    return module.classifier.input_spec.crop


def select_device(device: str | torch.device) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device; a bad one is a :class:`ExplainError`."""
    return devices.select_device(device, ExplainError)


# ---------------------------------------------------------------------- concepts


def read_concepts(spec: str | os.PathLike | Sequence[str | tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Parse a concept list into ``(name, type or None)`` pairs.

    ``spec`` is a path to a concept file (one concept per line, ``name`` or ``name,type``, also tab-separated;
    blank lines and ``#`` comments ignored), a comma-separated string of names, or a sequence of names or
    ``(name, type)`` pairs. A string is read as a file when such a file exists (or it ends like one).
    """
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and (Path(spec).is_file() or spec.lower().endswith(CONCEPT_FILE_SUFFIXES))
    ):
        return _read_concept_file(Path(spec))
    if isinstance(spec, str):
        items: list[tuple[str, str | None]] = [(name.strip(), None) for name in spec.split(",")]
    else:
        items = [(s.strip(), None) if isinstance(s, str) else (s[0].strip(), s[1]) for s in spec]
    items = [(n, t) for n, t in items if n]
    _check_unique([n for n, _ in items], "the concept list")
    if not items:
        raise ExplainError(f"no concept names in {spec!r}")
    return items


def _read_concept_file(path: Path) -> list[tuple[str, str | None]]:
    try:
        return read_concept_file(path)
    except ConceptFileError as e:
        raise ExplainError(str(e)) from e


def _check_unique(names: list[str], where: str) -> None:
    dups = sorted(n for n, count in Counter(names).items() if count > 1)
    if dups:
        raise ExplainError(f"duplicate concept name(s) in {where}: {', '.join(map(repr, dups))}")


def open_store(path: str | os.PathLike | EmbeddingStore, embed_dim: int) -> EmbeddingStore:
    """Open (or check) an embedding store whose text embeddings must have the translator's output size."""
    if isinstance(path, EmbeddingStore):
        store = path
    else:
        try:
            store = EmbeddingStore.open(path)
        except EmbeddingStoreError as e:
            raise ExplainError(f"cannot use the embedding store: {one_line(e)}") from e
    if store.embed_dim != embed_dim:
        raise ExplainError(
            f"embedding store {store.path}: text embedding size {store.embed_dim} differs from the checkpoint's "
            f"translator output size {embed_dim}; the store must come from the VLM the checkpoint was trained for"
        )
    return store


def resolve_concepts(
    module: CEFAMModule,
    requested: Sequence[tuple[str, str | None]] | None = None,
    store: EmbeddingStore | None = None,
) -> ConceptSet:
    """The concept set to explain: the checkpoint's (``requested`` is None) or the requested names.

    A requested name in the checkpoint's concept set takes its text embedding; otherwise ``store`` must hold
    it. An unknown name raises :class:`ExplainError` naming it and the available concepts. A requested type
    replaces the known one.
    """
    ck_names = [str(n) for n in module.hparams["concept_names"]]
    ck_types = [str(t) for t in module.hparams["concept_types"]]
    ck_text = module.scorer.text.detach().cpu().float()
    if requested is None:
        return ConceptSet(ck_names, ck_types, ck_text, "checkpoint")
    ck_index = {n: i for i, n in enumerate(ck_names)}
    st_index = {n: i for i, n in enumerate(store.concept_names)} if store is not None else {}
    unknown = [n for n, _ in requested if n not in ck_index and n not in st_index]
    if unknown:
        listed = ", ".join(map(repr, unknown))
        msg = f"unknown concept{'s' if len(unknown) > 1 else ''} {listed}: not in the checkpoint's concept set "
        msg += f"({_listing(ck_names)})"
        if store is not None:
            msg += f" nor in the embedding store {store.path} ({_listing(store.concept_names)})"
        msg += (
            ". New concepts need the VLM's text encoder or an embedding store that holds them "
            "(--store STORE_DIR, made with the checkpoint's VLM)"
        )
        raise ExplainError(msg)
    names, types, rows = [], [], []
    for name, ctype in requested:
        if name in ck_index:
            i = ck_index[name]
            known_type, row = ck_types[i], ck_text[i]
        else:
            assert store is not None
            i = st_index[name]
            known_type, row = store.concepts[i].type, torch.from_numpy(np.array(store.text_embeddings[i]))
        names.append(name)
        types.append(ctype or known_type)
        rows.append(row.float())
    if store is not None and any(n not in ck_index for n in names):
        s = module.scorer
        if (store.vlm.kind, store.vlm.logit_scale, store.vlm.logit_bias) != (s.kind, s.logit_scale, s.logit_bias):
            log.warning(
                f"warning: embedding store {store.path} was made with VLM {store.vlm.name!r} "
                f"({store.vlm.kind}, scale {store.vlm.logit_scale}, bias {store.vlm.logit_bias}); the checkpoint "
                f"scores with ({s.kind}, scale {s.logit_scale}, bias {s.logit_bias}). Check it is the same VLM."
            )
    return ConceptSet(names, types, torch.stack(rows), "given")


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


# ---------------------------------------------------------------------- images


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (recursively, sorted); a path that does not exist raises.

    A file given by name is taken whatever its extension; a file found twice is kept once.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                log.warning(f"warning: no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise ExplainError(f"input not found: {p}")
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise ExplainError(f"no image files found in {', '.join(str(i) for i in inputs) or 'the inputs'}")
    return unique


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output folder name per image: its file stem, made safe, with ``-2``, ``-3``... on collisions.

    Names are compared case-insensitively (two images must not share a folder on any file system).
    """
    used: set[str] = set()
    names = []
    for p in paths:
        base = re.sub(r"[^\w.\-]+", "_", p.stem).lstrip(".") or "image"
        name, n = base, 1
        while name.lower() in used or name.lower() == "summary.json":
            n += 1
            name = f"{base}-{n}"
        used.add(name.lower())
        names.append(name)
    return names


# ---------------------------------------------------------------------- explaining


def explain_images(
    module_or_ckpt: Explainer | str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    concepts: str | os.PathLike | Sequence[str | tuple[str, str | None]] | None = None,
    store: str | os.PathLike | EmbeddingStore | None = None,
    top_n: int = 8,
    k: int = 20,
    fill: str = "spatial_mean",
    select_layers: str | Sequence[str] = "auto",
    target: str | None = None,
    out_dir: str | os.PathLike = "explanations",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Explain image files (or folders of them) and write reports, maps and figures under ``out_dir``.

    The explainer is CE-FAM, L-CAM or SIAM, whichever wrote the checkpoint (or the module given); see the
    module docstring for what each writes.

    Args:
        module_or_ckpt: a trained :class:`CEFAMModule`, :class:`LCAMModule` or :class:`SIAMModule`, or the path of
            its checkpoint.
        paths: image files and folders (see :func:`find_images`).
        concepts: CE-FAM: the concept set to explain (see :func:`read_concepts`); default the checkpoint's.
        store: CE-FAM: an embedding store (folder or opened) holding concepts the checkpoint does not know.
        top_n: CE-FAM: how many concepts to report per image, by decreasing score; SIAM: how many attributes'
            maps to keep and draw, by decreasing absolute contribution.
        k: CE-FAM: channels deleted / masked at most for relevance and contribution (SPEC's ``K``).
        fill: CE-FAM: how a masked channel is filled for contributions (``"spatial_mean"`` or ``"zero"``).
        target: the class to explain, by name; default each image's predicted class.
        out_dir: where ``<name>/report.json``, ``regions.npz``, ``figure.png`` and ``summary.json`` go.
        batch_size: images explained together.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; default ``"auto"`` for a checkpoint, the module's own device
            for a module (a module given with a device is moved there).
        figures: write ``figure.png`` (the slowest output).

    Returns:
        The summary also written to ``out_dir/summary.json``: ``checkpoint``, ``settings``, ``explained``
        (``[{"image", "folder"}]``) and ``failed`` (``[{"image", "error"}]``, unreadable images); for L-CAM and
        SIAM also ``method``.

    Raises:
        ExplainError: a missing or foreign checkpoint, unknown concept or class, missing input, bad setting.
    """
    if top_n < 1 or k < 1 or batch_size < 1:
        raise ExplainError(f"top_n, k and batch_size must be >= 1, got {top_n}, {k}, {batch_size}")
    if fill not in FILLS:
        raise ExplainError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    images = find_images(paths)  # first: a mistyped path is reported before any model is loaded
    names = output_names(images)
    if isinstance(module_or_ckpt, EXPLAINERS):
        module, checkpoint = module_or_ckpt, None
        dev = select_device(device) if device is not None else module.device
    else:
        dev = select_device(device if device is not None else "auto")
        module, checkpoint = load_checkpoint(module_or_ckpt), str(module_or_ckpt)
    module = module.to(dev)
    kind = module_kind(module)
    spec = module.classifier.input_spec
    class_names = [str(c) for c in module.hparams["class_names"]]
    target_index = None
    if target is not None:
        if target not in class_names:
            raise ExplainError(f"unknown class {target!r}; the checkpoint's classes are: {_listing(class_names)}")
        target_index = class_names.index(target)

    if kind == "cefam":
        explain, render, settings = _cefam_explainer(
            module, concepts, store, top_n, k, fill, select_layers, target, class_names, checkpoint, batch_size, dev
        )
    else:
        if concepts is not None or store is not None:
            raise ExplainError(
                f"--concepts and --store choose CE-FAM's concepts; {checkpoint or 'the module'} is "
                f"{KIND_ARTICLES[kind]} checkpoint, which explains its own "
                f"{'class map' if kind == 'lcam' else 'attributes'}"
            )
        if kind == "siam" and module.hparams.task != "classification":
            raise ExplainError(f"explain supports classification SIAM checkpoints, not task={module.hparams.task!r}")
        settings = {
            "method": method_name(module),
            "target": target,
            **({"top_n": top_n} if kind == "siam" else {}),
            "image_size": spec.crop,
            "input_spec": spec.to_dict(),
            "batch_size": batch_size,
            "device": str(dev),
        }
        reports = _lcam_reports if kind == "lcam" else _siam_reports
        render = render_lcam_figure if kind == "lcam" else render_siam_figure

        def explain(batch: Tensor, tgt: Tensor | None, chunk_paths: list[Path]) -> list[tuple[dict, dict]]:
            return reports(module, batch, tgt, class_names, [str(p) for p in chunk_paths], checkpoint, settings)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explained: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for start in range(0, len(images), batch_size):
        chunk, tensors = [], []
        for path, name in zip(images[start : start + batch_size], names[start : start + batch_size], strict=True):
            try:
                tensors.append(load_image(path, spec))
            except Exception as e:  # PIL raises many kinds for corrupt files; each is reported, the rest go on
                reason = error_summary(e)
                log.warning(f"skipped {path}: cannot read the image ({reason})")
                failed.append({"image": str(path), "error": reason})
                continue
            chunk.append((path, name))
        if not chunk:
            continue
        batch = torch.stack(tensors).to(dev)
        tgt = None if target_index is None else torch.full((len(chunk),), target_index, dtype=torch.long, device=dev)
        with torch.no_grad():
            results = explain(batch, tgt, [path for path, _ in chunk])
        for i, ((path, name), (report, maps)) in enumerate(zip(chunk, results, strict=True)):
            folder = out / name
            _write_outputs(folder, report, maps, batch[i].cpu() if figures else None, render)
            explained.append({"image": str(path), "folder": str(folder)})
            log.info(f"{path} -> {folder}  predicted {report['predicted_class']}")
    summary = {"checkpoint": checkpoint, "settings": settings, "explained": explained, "failed": failed}
    if kind != "cefam":
        summary = {"method": settings["method"], **summary}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _cefam_explainer(
    module: CEFAMModule,
    concepts: str | os.PathLike | Sequence[str | tuple[str, str | None]] | None,
    store: str | os.PathLike | EmbeddingStore | None,
    top_n: int,
    k: int,
    fill: str,
    select_layers: str | Sequence[str],
    target: str | None,
    class_names: list[str],
    checkpoint: str | None,
    batch_size: int,
    dev: torch.device,
):
    """CE-FAM's explanation of a batch (concepts, regions, layers, contributions), its figure and settings."""
    opened_store = None
    if store is not None:
        opened_store = open_store(store, module.translator.out_dim)
        if concepts is None:
            log.warning("warning: --store is only used with --concepts; explaining the checkpoint's concepts")
    cset = resolve_concepts(module, read_concepts(concepts) if concepts is not None else None, opened_store)
    if cset.source == "checkpoint":
        scorer = module.scorer
    else:
        s = module.scorer
        scorer = ConceptScorer(cset.text, s.kind, s.logit_scale, s.logit_bias).to(dev)
    parts = _Parts(module.classifier, module.translator, scorer)
    spec = module.classifier.input_spec
    n_report = min(top_n, len(cset.names))
    try:
        selectable = selectable_layers(module.classifier, select_layers)
    except ValueError as e:
        raise ExplainError(f"--select-layers: {e}") from None
    settings = {
        "top_n": top_n,
        "k": k,
        "fill": fill,
        "select_layers": selectable,
        "target": target,
        "concept_set": cset.source,
        "concepts": cset.names,
        "store": str(opened_store.path) if opened_store is not None else None,
        "image_size": spec.crop,
        "input_spec": spec.to_dict(),
        "batch_size": batch_size,
        "device": str(dev),
    }

    def explain(batch: Tensor, tgt: Tensor | None, paths: list[Path]) -> list[tuple[dict, dict]]:
        expl = explain_batch(parts, batch, top_n=n_report, k=k, target=tgt, fill=fill, select_layers=selectable)
        expl = _to_cpu(expl)  # one transfer per batch, not one per reported number
        return [_image_report(expl, i, cset, class_names, str(p), checkpoint, settings) for i, p in enumerate(paths)]

    return explain, render_figure, settings


def _write_outputs(
    folder: Path,
    report: dict[str, Any],
    maps: dict[str, np.ndarray],
    image: Tensor | None,
    render: Callable[[Tensor, dict[str, Any], dict[str, np.ndarray]], bytes],
) -> None:
    """``report.json``, ``regions.npz`` and (with ``image``) ``figure.png`` (drawn by the method's ``render``), each
    written atomically."""
    atomic_write_json(folder / "report.json", report)
    buf = io.BytesIO()
    np.savez_compressed(buf, **maps)
    atomic_write_bytes(folder / "regions.npz", buf.getvalue())
    if image is not None:
        atomic_write_bytes(folder / "figure.png", render(image, report, maps))


def _image_report(
    expl: BatchExplanation,
    i: int,
    cset: ConceptSet,
    class_names: list[str],
    image: str,
    checkpoint: str | None,
    settings: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON report of image ``i`` of a batch explanation, and its region maps by npz key."""
    probs = expl.logits[i].float().softmax(dim=0)
    predicted = int(probs.argmax())
    target = int(expl.target[i])
    layers = list(expl.layers)
    maps: dict[str, np.ndarray] = {}
    entries = []
    for j, c in enumerate(expl.concepts[i].tolist()):
        key = _npz_key(cset.names[c], maps)
        region = expl.regions[i, j].float().nan_to_num(0.0).clamp(0.0, _FLOAT16_MAX)
        maps[key] = region.cpu().numpy().astype(np.float16)
        li = int(expl.layer_index[i, j])
        entries.append(
            {
                "name": cset.names[c],
                "type": cset.types[c],
                "score": _num(expl.scores[i, c]),
                "probability": _num(expl.concept_probs[i, c]),
                "layer": layers[li],
                "relevance": {layer: _num(expl.relevance[i, j, m]) for m, layer in enumerate(layers)},
                "selected_relevance": _num(expl.relevance[i, j, li]),
                "contribution": _num(expl.contributions[i, j]),
                "region": f"regions.npz:{key}",
            }
        )
    entries.sort(key=lambda e: -math.inf if e["score"] is None else e["score"], reverse=True)
    report = {
        "image": image,
        "checkpoint": checkpoint,
        "predicted_class": class_names[predicted],
        "predicted_probability": _num(probs[predicted]),
        "explained_class": class_names[target],
        "explained_probability": _num(expl.class_prob[i]),
        "layers": layers,
        "settings": {
            "top_n": settings["top_n"],
            "k": settings["k"],
            "fill": settings["fill"],
            "select_layers": settings["select_layers"],
            "concept_set": settings["concept_set"],
        },
        "concepts": entries,
    }
    return report, maps


def _class_entry(probs: Tensor, i: int, class_names: list[str], target: int) -> dict[str, Any]:
    predicted = int(probs[i].argmax())
    return {
        "predicted_class": class_names[predicted],
        "predicted_probability": _num(probs[i, predicted]),
        "explained_class": class_names[target],
        "explained_probability": _num(probs[i, target]),
    }


def _lcam_reports(
    module: LCAMModule,
    images: Tensor,
    target: Tensor | None,
    class_names: list[str],
    paths: list[str],
    checkpoint: str | None,
    settings: dict[str, Any],
) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """L-CAM's explanation of a batch: per image its report and its class map (``regions.npz:class_map``).

    The class map of the explained class comes from one forward pass (SPEC §5). "How much" is the explained
    class's probability on the image kept where the map is high (the faithfulness settings of SPEC §4: the whole
    map, its top 50 % and top 15 % of pixels), beside the probability on the whole image.
    """
    out, c = module.attend(images)
    logits = out.logits.float()
    tgt = logits.argmax(dim=1) if target is None else target
    maps = normalize_maps(select_class(c, tgt), images.shape[-2:])
    y, o = faithfulness_probabilities(module.classifier, images, maps, tgt, DEFAULT_KEEPS, logits=out.logits)
    probs = logits.softmax(dim=1)
    maps, y, o, probs, tgt = maps.cpu(), y.cpu(), o.cpu(), probs.cpu(), tgt.cpu()
    title = f"L-CAM-{module.variant.capitalize()}"
    results = []
    for i, image in enumerate(paths):
        kept = {setting_name(k): _num(o[i, s]) for s, k in enumerate(DEFAULT_KEEPS)}
        report = {
            "image": image,
            "checkpoint": checkpoint,
            "method": settings["method"],
            **_class_entry(probs, i, class_names, int(tgt[i])),
            "layer": module.layer,
            "class_map": {
                "region": "regions.npz:class_map",
                "title": f"{title} class map at {module.layer}",
                "probability_kept": kept,
                "drop_kept": {
                    n: None if v is None or not y[i] else _num(max(0.0, float(y[i]) - v) / float(y[i]))
                    for n, v in kept.items()
                },
            },
        }
        results.append((report, {"class_map": maps[i].numpy().astype(np.float16)}))
    return results


def _siam_reports(
    module: SIAMModule,
    images: Tensor,
    target: Tensor | None,
    class_names: list[str],
    paths: list[str],
    checkpoint: str | None,
    settings: dict[str, Any],
) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """SIAM's explanation of a batch (SPEC §6): per image its report and its maps by npz key.

    Every attribute is reported with its presence probability and its contribution to the explained output
    (``weight x score``; with the bias they sum to that output's logit); the ``top_n`` attributes by absolute
    contribution also get their attribute map (``regions.npz``), as does the class map (their contribution maps
    summed).
    """
    ex = module.explain(images, target)
    ex = {k: v.cpu() for k, v in ex.items()}
    names = [str(a) for a in module.hparams["attribute_names"]]
    probs = ex["logits"].float().softmax(dim=1)
    n_maps = min(settings["top_n"], len(names))
    results = []
    for i, image in enumerate(paths):
        contributions = ex["contributions"][i].float()
        order = contributions.abs().argsort(descending=True).tolist()
        drawn = set(order[:n_maps])
        maps: dict[str, np.ndarray] = {"class_map": ex["class_map"][i].float().numpy().astype(np.float16)}
        entries = []
        for a in order:
            entry = {
                "name": names[a],
                "presence_probability": _num(ex["presence_probs"][i, a]),
                "score": _num(ex["scores"][i, a]),
                "contribution": _num(contributions[a]),
            }
            if a in drawn:
                key = _npz_key(names[a], maps)
                maps[key] = ex["maps"][i, a].float().nan_to_num(0.0).clamp(-_FLOAT16_MAX, _FLOAT16_MAX).numpy()
                maps[key] = maps[key].astype(np.float16)
                entry["region"] = f"regions.npz:{key}"
            entries.append(entry)
        report = {
            "image": image,
            "checkpoint": checkpoint,
            "method": "siam",
            **_class_entry(probs, i, class_names, int(ex["target"][i])),
            "bias": _num(ex["bias"][i]),
            "class_map": {"region": "regions.npz:class_map", "title": "SIAM class map (contribution maps summed)"},
            "attributes": entries,
        }
        results.append((report, maps))
    return results


def _to_cpu(expl: BatchExplanation) -> BatchExplanation:
    return replace(
        expl, **{f.name: getattr(expl, f.name).cpu() for f in fields(expl) if f.name not in ("layers", "selectable")}
    )


def _npz_key(name: str, taken: dict[str, Any]) -> str:
    base = re.sub(r"\W+", "_", name).strip("_") or "concept"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    return key


def _num(x: Tensor | float) -> float | None:
    """A plain float for JSON; ``None`` for NaN or infinity (e.g. a relative drop of a zero probability)."""
    v = float(x)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------- figure


def _figure(panels: int):
    """A standalone Agg figure (no pyplot state, no display) with ``panels`` axes, at most 5 per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(panels / 5)
    ncols = math.ceil(panels / nrows)  # rows as even as they can be
    fig = Figure(figsize=(2.8 * ncols, 2.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


def _image_panel(ax, img: np.ndarray, report: dict[str, Any]) -> None:
    title = f"predicted: {report['predicted_class']} (p={report['predicted_probability'] or 0:.2f})"
    if report["explained_class"] != report["predicted_class"]:
        title += f"\nexplaining: {report['explained_class']} (p={report['explained_probability'] or 0:.2f})"
    ax.imshow(img)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, img: np.ndarray, region: np.ndarray, title: str) -> None:
    """``region`` over the image (``jet``), normalized to its own maximum (negative values shown as 0)."""
    region = np.clip(region.astype(np.float32), 0.0, None)
    peak = float(region.max())
    ax.imshow(img)
    ax.imshow(region / peak if peak > 0 else region, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(ax, labels: list[str], values: list[float | None], title: str, fmt: str = "%.3g") -> None:
    """Horizontal bars, top to bottom, negative ones in red beside a zero line."""
    from matplotlib.ticker import MaxNLocator

    values = [v if v is not None else 0.0 for v in values]
    ypos = np.arange(len(values))
    bars = ax.barh(ypos, values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.bar_label(bars, fmt=fmt, fontsize=6, padding=2)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.invert_yaxis()
    lo, hi = min(0.0, *values), max(0.0, *values)
    pad = 0.25 * (hi - lo) if hi > lo else 0.05  # room for the value labels
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8)


def _png(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


def _region(maps: dict[str, np.ndarray], ref: str) -> np.ndarray:
    return maps[ref.split(":", 1)[1]]


def render_figure(image: Tensor, report: dict[str, Any], maps: dict[str, np.ndarray], dpi: int = 110) -> bytes:
    """CE-FAM's figure, PNG bytes: the image with its prediction, one overlay per reported concept, and the
    contributions.

    Region maps are shown on the image (``jet``, each normalized to its own maximum) titled
    ``name (layer, S=score)``; the bar chart shows each concept's contribution to the explained class, negative
    bars in red beside a zero line.
    """
    concepts = report["concepts"]
    fig, axes = _figure(len(concepts) + 2)
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()
    _image_panel(axes[0], img, report)
    for ax, c in zip(axes[1:], concepts, strict=False):
        score = "nan" if c["score"] is None else f"{c['score']:.2f}"
        _overlay(ax, img, _region(maps, c["region"]), f"{c['name']} ({c['layer']}, S={score})")
    _bars(
        axes[len(concepts) + 1],
        [c["name"] for c in concepts],
        [c["contribution"] for c in concepts],
        f"contribution to {report['explained_class']}",
    )
    return _png(fig, dpi)


def render_lcam_figure(image: Tensor, report: dict[str, Any], maps: dict[str, np.ndarray], dpi: int = 110) -> bytes:
    """L-CAM's figure, PNG bytes: the image with its prediction, the class map overlaid, and the explained
    class's probability on the whole image and on the image kept where the map is high (100/50/15 %)."""
    cm = report["class_map"]
    fig, axes = _figure(3)
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()
    _image_panel(axes[0], img, report)
    _overlay(axes[1], img, _region(maps, cm["region"]), cm["title"].replace(" at ", "\nat "))
    kept = cm["probability_kept"]
    _bars(
        axes[2],
        ["image", *[("image x map" if n == "100%" else f"top {n} of map") for n in kept]],
        [report["explained_probability"], *kept.values()],
        f"p({report['explained_class']})",
        fmt="%.3f",
    )
    return _png(fig, dpi)


def render_siam_figure(image: Tensor, report: dict[str, Any], maps: dict[str, np.ndarray], dpi: int = 110) -> bytes:
    """SIAM's figure, PNG bytes: the image with its prediction, the class map, the maps of the attributes that
    contribute most (by absolute value), and a bar chart of those attributes' contributions (negative in red)."""
    drawn = [a for a in report["attributes"] if "region" in a]
    barred = report["attributes"][: max(len(drawn), min(12, len(report["attributes"])))]
    fig, axes = _figure(len(drawn) + 3)
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()
    _image_panel(axes[0], img, report)
    _overlay(axes[1], img, _region(maps, report["class_map"]["region"]), "SIAM class map")
    for ax, a in zip(axes[2:], drawn, strict=False):
        p = a["presence_probability"]
        _overlay(ax, img, _region(maps, a["region"]), f"{a['name']} (p={p or 0:.2f}, c={a['contribution'] or 0:.2f})")
    _bars(
        axes[len(drawn) + 2],
        [a["name"] for a in barred],
        [a["contribution"] for a in barred],
        f"contribution to {report['explained_class']}",
    )
    return _png(fig, dpi)


# ---------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="a CE-FAM, L-CAM or SIAM checkpoint written by train.py"
    )
    p.add_argument(
        "--concepts",
        default=None,
        metavar="NAMES|FILE",
        help="comma-separated concept names, or a file of 'name[,type]' lines",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="STORE_DIR",
        help="embedding store folder holding concepts the checkpoint lacks",
    )
    p.add_argument(
        "--top-n",
        type=int,
        metavar="N",
        default=8,
        help="CE-FAM: concepts reported per image, by score; SIAM: attribute maps drawn (default 8)",
    )
    p.add_argument("--k", type=int, default=20, help="channels deleted/masked for relevance/contribution (default 20)")
    p.add_argument("--fill", choices=FILLS, default="spatial_mean", help="masked-channel fill for contributions")
    p.add_argument(
        "--select-layers",
        default="auto",
        metavar="auto|all|L1,L2",
        help="layers a concept's selected layer is chosen from: auto (default; not a layer read only through global "
        "pooling, where every contribution is 0), all, or comma-separated names",
    )
    p.add_argument("--target", default=None, metavar="CLASS", help="class to explain (default: the predicted one)")
    p.add_argument("--out", default="explanations", metavar="DIR", help="output folder (default: explanations)")
    p.add_argument("--batch-size", type=int, metavar="N", default=16, help="images explained together (default 16)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (default), cpu or cuda")
    p.add_argument("--no-figures", action="store_true", help="skip figure.png (the slowest output)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--debug", action="store_true", help="show a traceback instead of a one-line error")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: explain the inputs; returns the summary. Exits 2 on a bad argument, 1 if nothing was read."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli_errors(args.debug):
        summary = explain_images(
            args.checkpoint,
            args.inputs,
            concepts=args.concepts,
            store=args.store,
            top_n=args.top_n,
            k=args.k,
            fill=args.fill,
            select_layers=parse_select_layers(args.select_layers),
            target=args.target,
            out_dir=args.out,
            batch_size=args.batch_size,
            device=args.device,
            figures=not args.no_figures,
        )
    n_ok, n_bad = len(summary["explained"]), len(summary["failed"])
    if n_ok == 0:
        print(f"error: none of the {n_bad} input images could be read (see {args.out}/summary.json)", file=sys.stderr)
        raise SystemExit(1)
    print(f"explained {n_ok} image(s) -> {args.out}" + (f"; {n_bad} could not be read" if n_bad else ""))
    return summary


if __name__ == "__main__":
    main()
