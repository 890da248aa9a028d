"""Explain images with a trained CE-FAM checkpoint: what the classifier saw, where, at which layer, how much.

Usage::

    python explain.py --checkpoint CKPT [--concepts NAMES|FILE] [--store STORE_DIR] [--top-n 8] [--k 20]
                      [--fill spatial_mean|zero] [--target CLASS] [--out DIR] [--batch-size 16]
                      [--device auto|cpu|cuda] [--no-figures] INPUT [INPUT ...]

``INPUT`` is an image file or a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff,
in sorted order). Each image goes through the classifier's own input transform (shorter side resized, center
crop: ``classifier.input_spec``, recorded in the checkpoint) and is explained (SPEC §2.7). For each image
``<out>/<name>/`` receives:

- ``report.json``: the predicted class and its probability, the explained class (``--target`` or the
  predicted one), and for each reported concept (decreasing score) its score ``S``, probability, selected
  layer, relevance at every layer, contribution to the explained class (signed) and the key of its region map;
- ``regions.npz``: one float16 region map per reported concept, at the classifier's input resolution (the
  resized, center-cropped image);
- ``figure.png``: the image, each concept's region overlaid, and a bar chart of the contributions.

``<out>/summary.json`` lists the explained images (with their folders), the images that could not be read
(with the reason) and the settings. An unreadable image is reported and skipped; the others are explained.

Concepts: by default the checkpoint's own concept set, top ``--top-n`` by score. ``--concepts`` gives a set
instead, either comma-separated names (``red,circle``) or a text file with one concept per line, ``name`` or
``name,type`` (or tab-separated; blank lines and ``#`` comments are ignored). Every given concept is scored and
ranked; ``--top-n`` limits how many are reported. Names in the checkpoint's concept set use its text
embeddings; other names need the VLM's text encoder, i.e. an embedding store that holds them (``--store``),
made with the same VLM. With CLIP-style scoring, concept probabilities (and so layer relevance) are a softmax
over the concept set being explained: they change when the set changes. SigLIP-style probabilities are
per-concept sigmoids and do not.

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
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cefam_lightning import devices
from cefam_lightning.cefam_module import CEFAMModule
from cefam_lightning.components import ConceptScorer
from cefam_lightning.concepts import ConceptFileError, read_concept_file
from cefam_lightning.contributions import FILLS
from cefam_lightning.embedding_store import EmbeddingStore, EmbeddingStoreError
from cefam_lightning.explainer import BatchExplanation, explain_batch
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.transforms import load_image

log = logging.getLogger("cefam_lightning")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CONCEPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_MAX_LISTED = 40  # names listed at most in an error message


class ExplainError(ValueError):
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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CEFAMModule:
    """Load a CE-FAM module; a missing file or a checkpoint of another kind raises :class:`ExplainError`."""
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"checkpoint not found: {path}")
    try:
        return CEFAMModule.from_checkpoint(path, map_location=map_location)
    except ValueError as e:
        if "not a CE-FAM checkpoint" in str(e):
            raise ExplainError(_one_line(e)) from e
        raise ExplainError(f"{path}: not a CE-FAM checkpoint, or one this version cannot load ({_reason(e)})") from e
    except Exception as e:  # unpickling, a foreign layout, a state dict that does not fit: all "not ours"
        raise ExplainError(f"{path}: not a CE-FAM checkpoint, or one this version cannot load ({_reason(e)})") from e


def input_size(module: CEFAMModule) -> int:
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
            raise ExplainError(f"cannot use the embedding store: {_one_line(e)}") from e
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
    module_or_ckpt: CEFAMModule | str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    concepts: str | os.PathLike | Sequence[str | tuple[str, str | None]] | None = None,
    store: str | os.PathLike | EmbeddingStore | None = None,
    top_n: int = 8,
    k: int = 20,
    fill: str = "spatial_mean",
    target: str | None = None,
    out_dir: str | os.PathLike = "explanations",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Explain image files (or folders of them) and write reports, region maps and figures under ``out_dir``.

    Args:
        module_or_ckpt: a trained :class:`CEFAMModule`, or the path of its checkpoint.
        paths: image files and folders (see :func:`find_images`).
        concepts: the concept set to explain (see :func:`read_concepts`); default the checkpoint's.
        store: an embedding store (folder or opened) holding concepts the checkpoint does not know.
        top_n: how many concepts to report per image, by decreasing score.
        k: channels deleted / masked at most for relevance and contribution (SPEC's ``K``).
        fill: how a masked channel is filled for contributions (``"spatial_mean"`` or ``"zero"``).
        target: the class to explain, by name; default each image's predicted class.
        out_dir: where ``<name>/report.json``, ``regions.npz``, ``figure.png`` and ``summary.json`` go.
        batch_size: images explained together.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; default ``"auto"`` for a checkpoint, the module's own device
            for a module (a module given with a device is moved there).
        figures: write ``figure.png`` (the slowest output).

    Returns:
        The summary also written to ``out_dir/summary.json``: ``checkpoint``, ``settings``, ``explained``
        (``[{"image", "folder"}]``) and ``failed`` (``[{"image", "error"}]``, unreadable images).

    Raises:
        ExplainError: a missing or foreign checkpoint, unknown concept or class, missing input, bad setting.
    """
    if top_n < 1 or k < 1 or batch_size < 1:
        raise ExplainError(f"top_n, k and batch_size must be >= 1, got {top_n}, {k}, {batch_size}")
    if fill not in FILLS:
        raise ExplainError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    images = find_images(paths)  # first: a mistyped path is reported before any model is loaded
    names = output_names(images)
    if isinstance(module_or_ckpt, CEFAMModule):
        module, checkpoint = module_or_ckpt, None
        dev = select_device(device) if device is not None else module.device
    else:
        dev = select_device(device if device is not None else "auto")
        module, checkpoint = load_checkpoint(module_or_ckpt), str(module_or_ckpt)
    module = module.to(dev)
    spec = module.classifier.input_spec
    class_names = [str(c) for c in module.hparams["class_names"]]
    target_index = None
    if target is not None:
        if target not in class_names:
            raise ExplainError(f"unknown class {target!r}; the checkpoint's classes are: {_listing(class_names)}")
        target_index = class_names.index(target)

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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_report = min(top_n, len(cset.names))
    settings = {
        "top_n": top_n,
        "k": k,
        "fill": fill,
        "target": target,
        "concept_set": cset.source,
        "concepts": cset.names,
        "store": str(opened_store.path) if opened_store is not None else None,
        "image_size": spec.crop,
        "input_spec": spec.to_dict(),
        "batch_size": batch_size,
        "device": str(dev),
    }
    explained: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for start in range(0, len(images), batch_size):
        chunk, tensors = [], []
        for path, name in zip(images[start : start + batch_size], names[start : start + batch_size], strict=True):
            try:
                tensors.append(load_image(path, spec))
            except Exception as e:  # PIL raises many kinds for corrupt files; each is reported, the rest go on
                reason = _reason(e)
                log.warning(f"skipped {path}: cannot read the image ({reason})")
                failed.append({"image": str(path), "error": reason})
                continue
            chunk.append((path, name))
        if not chunk:
            continue
        batch = torch.stack(tensors).to(dev)
        tgt = None if target_index is None else torch.full((len(chunk),), target_index, dtype=torch.long, device=dev)
        with torch.no_grad():
            expl = explain_batch(parts, batch, top_n=n_report, k=k, target=tgt, fill=fill)
        expl = _to_cpu(expl)  # one transfer per batch, not one per reported number
        for i, (path, name) in enumerate(chunk):
            folder = out / name
            report, maps = _image_report(expl, i, cset, class_names, str(path), checkpoint, settings)
            _write_outputs(folder, report, maps, batch[i].cpu() if figures else None)
            explained.append({"image": str(path), "folder": str(folder)})
            log.info(f"{path} -> {folder}  predicted {report['predicted_class']}")
    summary = {"checkpoint": checkpoint, "settings": settings, "explained": explained, "failed": failed}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _write_outputs(folder: Path, report: dict[str, Any], maps: dict[str, np.ndarray], image: Tensor | None) -> None:
    """``report.json``, ``regions.npz`` and (with ``image``) ``figure.png``, each written atomically."""
    atomic_write_json(folder / "report.json", report)
    buf = io.BytesIO()
    np.savez_compressed(buf, **maps)
    atomic_write_bytes(folder / "regions.npz", buf.getvalue())
    if image is not None:
        atomic_write_bytes(folder / "figure.png", render_figure(image, report, maps))


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
            "concept_set": settings["concept_set"],
        },
        "concepts": entries,
    }
    return report, maps


def _to_cpu(expl: BatchExplanation) -> BatchExplanation:
    return replace(expl, **{f.name: getattr(expl, f.name).cpu() for f in fields(expl) if f.name != "layers"})


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


def render_figure(image: Tensor, report: dict[str, Any], maps: dict[str, np.ndarray], dpi: int = 110) -> bytes:
    """PNG bytes: the image with its prediction, one overlay per reported concept, and the contributions.

    Region maps are shown on the image (``jet``, each normalized to its own maximum) titled
    ``name (layer, S=score)``; the bar chart shows each concept's contribution to the explained class, negative
    bars in red beside a zero line. Drawn on a standalone Agg figure (no pyplot state, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    concepts = report["concepts"]
    panels = len(concepts) + 2
    ncols = min(panels, 5)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(2.8 * ncols, 2.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()

    title = f"predicted: {report['predicted_class']} (p={report['predicted_probability'] or 0:.2f})"
    if report["explained_class"] != report["predicted_class"]:
        title += f"\nexplaining: {report['explained_class']} (p={report['explained_probability'] or 0:.2f})"
    axes[0].imshow(img)
    axes[0].set_title(title, fontsize=8)
    for ax, c in zip(axes[1:], concepts, strict=False):
        region = maps[c["region"].split(":", 1)[1]].astype(np.float32)
        peak = float(region.max())
        ax.imshow(img)
        ax.imshow(region / peak if peak > 0 else region, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        score = "nan" if c["score"] is None else f"{c['score']:.2f}"
        ax.set_title(f"{c['name']} ({c['layer']}, S={score})", fontsize=8)
    for ax in axes[: len(concepts) + 1]:
        ax.set_xticks([])
        ax.set_yticks([])

    bar = axes[len(concepts) + 1]
    values = [c["contribution"] if c["contribution"] is not None else 0.0 for c in concepts]
    ypos = np.arange(len(values))
    colors = ["tab:red" if v < 0 else "tab:blue" for v in values]
    bars = bar.barh(ypos, values, color=colors)
    bar.bar_label(bars, fmt="%.3g", fontsize=6, padding=2)
    bar.axvline(0.0, color="black", linewidth=0.8)
    bar.set_yticks(ypos, [c["name"] for c in concepts], fontsize=7)
    bar.invert_yaxis()
    lo, hi = min(0.0, *values), max(0.0, *values)
    pad = 0.25 * (hi - lo) if hi > lo else 0.05  # room for the value labels
    bar.set_xlim(lo - pad, hi + pad)
    bar.xaxis.set_major_locator(MaxNLocator(nbins=3))
    bar.tick_params(axis="x", labelsize=7)
    bar.set_title(f"contribution to {report['explained_class']}", fontsize=8)
    for ax in axes[len(concepts) + 2 :]:
        ax.set_visible(False)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


# ---------------------------------------------------------------------- command line


def _reason(e: BaseException) -> str:
    text = _one_line(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 500 else text[:497] + "..."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a CE-FAM checkpoint written by train.py")
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
        "--top-n", type=int, metavar="N", default=8, help="concepts reported per image, by score (default 8)"
    )
    p.add_argument("--k", type=int, default=20, help="channels deleted/masked for relevance/contribution (default 20)")
    p.add_argument("--fill", choices=FILLS, default="spatial_mean", help="masked-channel fill for contributions")
    p.add_argument("--target", default=None, metavar="CLASS", help="class to explain (default: the predicted one)")
    p.add_argument("--out", default="explanations", metavar="DIR", help="output folder (default: explanations)")
    p.add_argument("--batch-size", type=int, metavar="N", default=16, help="images explained together (default 16)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (default), cpu or cuda")
    p.add_argument("--no-figures", action="store_true", help="skip figure.png (the slowest output)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: explain the inputs; returns the summary. Exits 2 on a bad argument, 1 if nothing was read."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = explain_images(
            args.checkpoint,
            args.inputs,
            concepts=args.concepts,
            store=args.store,
            top_n=args.top_n,
            k=args.k,
            fill=args.fill,
            target=args.target,
            out_dir=args.out,
            batch_size=args.batch_size,
            device=args.device,
            figures=not args.no_figures,
        )
    except ExplainError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    n_ok, n_bad = len(summary["explained"]), len(summary["failed"])
    if n_ok == 0:
        print(f"error: none of the {n_bad} input images could be read (see {args.out}/summary.json)", file=sys.stderr)
        raise SystemExit(1)
    print(f"explained {n_ok} image(s) -> {args.out}" + (f"; {n_bad} could not be read" if n_bad else ""))
    return summary


if __name__ == "__main__":
    main()
