"""Explain image files with any trained explainer and write what each image's explanation holds.

:func:`explain_images` is what ``python explain.py`` runs. It finds the images, loads the checkpoint (of whichever
method wrote it: :meth:`~cefam_lightning.methods.base.ExplainerModule.from_checkpoint`), brings each image to the
classifier's input (its own resize and center crop), and hands batches to the method's
:meth:`~cefam_lightning.methods.base.ExplainerModule.image_explainer`. For each image ``<out>/<name>/`` gets
``report.json``, ``regions.npz`` (float16 maps at the classifier's input resolution) and ``figure.png``, each
written atomically; ``<out>/summary.json`` lists the explained images, the unreadable ones (reported and skipped)
and the settings. What a report holds is the method's (``docs/method.md``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cefam_lightning import devices
from cefam_lightning.data.transforms import load_image
from cefam_lightning.distributed import Workers, part_range
from cefam_lightning.errors import CefamError, error_summary, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger("cefam_lightning")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_LISTED = 40  # names listed at most in an error message


class ExplainError(CefamError):
    """A bad input to ``explain`` (checkpoint, concept, class, path, device, option); the message names it."""


# ---------------------------------------------------------------------- small helpers of every method's report


def json_number(x: Tensor | float) -> float | None:
    """A plain float for JSON; ``None`` for NaN or infinity (e.g. a relative drop of a zero probability)."""
    v = float(x)
    return v if math.isfinite(v) else None


def npz_key(name: str, taken: dict[str, Any]) -> str:
    """A ``regions.npz`` key for ``name``: word characters only, ``_2``, ``_3``... when taken."""
    base = re.sub(r"\W+", "_", name).strip("_") or "concept"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    return key


def float16_map(m: Tensor) -> np.ndarray:
    """A map as float16 for ``regions.npz``: NaN as 0, clamped to float16's range."""
    return m.float().nan_to_num(0.0).clamp(-FLOAT16_MAX, FLOAT16_MAX).cpu().numpy().astype(np.float16)


def listing(names: Sequence[str]) -> str:
    """Names for an error message, the first :data:`MAX_LISTED` of them."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def class_entry(probs: Tensor, i: int, class_names: Sequence[str], target: int) -> dict[str, Any]:
    """The predicted and the explained class of image ``i``, with their probabilities (``probs``: ``(B, K)``)."""
    predicted = int(probs[i].argmax())
    return {
        "predicted_class": class_names[predicted],
        "predicted_probability": json_number(probs[i, predicted]),
        "explained_class": class_names[target],
        "explained_probability": json_number(probs[i, target]),
    }


def region(maps: dict[str, np.ndarray], ref: str) -> np.ndarray:
    """The map a report refers to as ``regions.npz:<key>``."""
    return maps[ref.split(":", 1)[1]]


def image_title(report: dict[str, Any]) -> str:
    """The title of a figure's image panel: the prediction, and the explained class when it differs."""
    title = f"predicted: {report['predicted_class']} (p={report['predicted_probability'] or 0:.2f})"
    if report["explained_class"] != report["predicted_class"]:
        title += f"\nexplaining: {report['explained_class']} (p={report['explained_probability'] or 0:.2f})"
    return title


def select_device(device: str | torch.device) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device; a bad one is an :class:`ExplainError`."""
    return devices.select_device(device, ExplainError)


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


def load_explainer_for(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The module of a checkpoint, any method; a missing, unreadable or foreign file is an :class:`ExplainError`."""
    from cefam_lightning.methods.base import ExplainerModule
    from cefam_lightning.methods.checkpoints import CheckpointError

    try:
        return ExplainerModule.from_checkpoint(path, map_location=map_location)
    except CheckpointError as e:
        raise ExplainError(one_line(e)) from e


def check_options(module: Any, given: dict[str, Any], accepted: frozenset[str]) -> None:
    """Refuse the options in ``given`` that were set (not ``None``/``False``) but that the module's method does
    not take (``accepted``), naming them as flags and the method."""
    refused = [name for name, value in given.items() if value not in (None, False) and name not in accepted]
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        takes = ", ".join("--" + n.replace("_", "-") for n in sorted(accepted & set(given)))
        what = "not an option" if len(refused) == 1 else "not options"
        raise ExplainError(
            f"{flags}: {what} of {module.title} checkpoints ({module.method})"
            + (f"; of these options it takes {takes}" if takes else "")
        )


def explain_images(
    module_or_ckpt: Any,
    paths: Sequence[str | os.PathLike],
    *,
    top_n: int | None = None,
    concepts: Any = None,
    store: Any = None,
    k: int | None = None,
    fill: str | None = None,
    select_layers: str | Sequence[str] | None = None,
    gradient: str | None = None,
    region_weights: str | None = None,
    relevance: str | None = None,
    contribution_layer: str | None = None,
    preset: str | None = None,
    target: str | None = None,
    out_dir: str | os.PathLike = "explanations",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    figures: bool = True,
    workers: Workers | None = None,
) -> dict[str, Any]:
    """Explain image files (or folders of them) and write reports, maps and figures under ``out_dir``.

    In a process group (``workers``, :func:`~cefam_lightning.distributed.launch`) every rank calls this with the
    same arguments: each explains its part of the images (contiguous in the sorted order, balanced by count:
    :func:`~cefam_lightning.distributed.part_range`) into its images' own folders, and rank 0 writes
    ``summary.json`` of all of them once every rank is done, so the folder is the one a single process writes.

    Args:
        module_or_ckpt: a trained explainer module, or the path of its checkpoint (any method).
        paths: image files and folders (see :func:`find_images`).
        top_n, concepts, store, k, fill, select_layers, gradient, region_weights, relevance, contribution_layer,
        preset: the method's explanation options
            (:class:`~cefam_lightning.methods.base.ExplainSettings`); ``None`` is the method's default, and an
            option the method does not take is an error.
        target: the class to explain, by name; default each image's predicted class.
        out_dir: where ``<name>/report.json``, ``regions.npz``, ``figure.png`` and ``summary.json`` go.
        batch_size: images explained together.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; default ``"auto"`` for a checkpoint, the module's own device
            for a module (a module given with a device is moved there).
        figures: write ``figure.png`` (the slowest output).
        workers: this process's place in a group splitting the images; ``None``: one process does all.

    Returns:
        The summary also written to ``out_dir/summary.json``: ``method``, ``checkpoint``, ``settings``,
        ``explained`` (``[{"image", "folder"}]``) and ``failed`` (``[{"image", "error"}]``, unreadable images);
        every rank's, on every rank.

    Raises:
        ExplainError: a missing or foreign checkpoint, an unknown concept or class, a missing input, a bad option;
            in a process group, also on every other rank when one rank fails while explaining its part.
    """
    from cefam_lightning.methods.base import ExplainerModule, ExplainSettings

    settings = ExplainSettings(
        top_n=top_n,
        concepts=concepts,
        store=store,
        k=k,
        fill=fill,
        select_layers=select_layers,
        gradient=gradient,
        region_weights=region_weights,
        relevance=relevance,
        contribution_layer=contribution_layer,
        preset=preset,
    )
    for name, value in (("top_n", top_n), ("k", k), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ExplainError(f"{name} must be >= 1, got {value}")
    images = find_images(paths)  # first: a mistyped path is reported before any model is loaded
    names = output_names(images)
    if isinstance(module_or_ckpt, ExplainerModule):
        module, checkpoint = module_or_ckpt, None
        dev = select_device(device) if device is not None else module.device
    else:
        dev = select_device(device if device is not None else "auto")
        module, checkpoint = load_explainer_for(module_or_ckpt), str(module_or_ckpt)
    module = module.to(dev).eval()
    check_options(module, asdict(settings), module.explain_options)
    spec = module.classifier.input_spec
    class_names = module.class_names
    target_index = None
    if target is not None:
        if target not in class_names:
            raise ExplainError(f"unknown class {target!r}; the checkpoint's classes are: {listing(class_names)}")
        target_index = class_names.index(target)
    try:
        explainer = module.image_explainer(settings, checkpoint)
    except CefamError:
        raise
    except ValueError as e:  # a setting the method finds wrong (a layer name, a fill)
        raise ExplainError(one_line(e)) from e
    run_settings = {
        **explainer.settings,
        "target": target,
        "image_size": spec.crop,
        "input_spec": spec.to_dict(),
        "batch_size": batch_size,
        "device": str(dev),
    }

    workers = workers or Workers(device=dev)
    if workers.distributed:
        run_settings["processes"] = workers.world_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = part_range(len(images), workers.rank, workers.world_size)
    try:
        explained, failed = _explain_part(
            explainer, images, names, mine, spec, target_index, out, batch_size, dev, figures
        )
        error = None
    except Exception as e:
        if not workers.distributed:
            raise
        explained, failed, error = [], [], e
    parts = workers.all_gather_object((explained, failed, None if error is None else error_summary(error)))
    if error is not None:
        raise error
    for rank, (_, _, other) in enumerate(parts):
        if other is not None:
            raise ExplainError(f"rank {rank} failed while explaining its images: {other}")
    explained = [item for part in parts for item in part[0]]
    failed = [item for part in parts for item in part[1]]
    summary = {
        "method": module.method,
        "checkpoint": checkpoint,
        "settings": run_settings,
        "explained": explained,
        "failed": failed,
    }
    if workers.is_main:
        atomic_write_json(out / "summary.json", summary)
    workers.barrier()  # the summary is written when any rank returns
    return summary


def _explain_part(
    explainer: Any,
    images: list[Path],
    names: list[str],
    mine: range,
    spec: Any,
    target_index: int | None,
    out: Path,
    batch_size: int,
    dev: torch.device,
    figures: bool,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Explain ``images[mine]`` in batches into ``out/<name>/``: the explained and the unreadable images."""
    explained: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for start in range(mine.start, mine.stop, batch_size):
        stop = min(start + batch_size, mine.stop)
        chunk, tensors = [], []
        for path, name in zip(images[start:stop], names[start:stop], strict=True):
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
            results = explainer(batch, tgt, [str(path) for path, _ in chunk])
        for i, ((path, name), result) in enumerate(zip(chunk, results, strict=True)):
            folder = out / name
            write_image_report(folder, result, explainer.render if figures else None, batch[i].cpu())
            explained.append({"image": str(path), "folder": str(folder)})
            log.info(f"{path} -> {folder}  predicted {result.report['predicted_class']}")
    return explained, failed


def write_image_report(folder: Path, result: Any, render: Any, image: Tensor) -> None:
    """``report.json``, ``regions.npz`` and (with ``render``) ``figure.png`` of one image, each written atomically."""
    import io

    atomic_write_json(folder / "report.json", result.report)
    buf = io.BytesIO()
    np.savez_compressed(buf, **result.maps)
    atomic_write_bytes(folder / "regions.npz", buf.getvalue())
    if render is not None:
        atomic_write_bytes(folder / "figure.png", render(image, result))
