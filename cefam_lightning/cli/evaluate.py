"""Evaluate a trained checkpoint (CE-FAM, L-CAM or SIAM) against ground-truth masks, beside baselines.

Usage::

    python evaluate.py --checkpoint RUN/checkpoints/best.ckpt [--split test] [--max-images N] [--out DIR]
    python evaluate.py --checkpoint CKPT --data ROOT [--format auto|folder|broden|imagenet-s] [--split SPLIT]
                       [--store STORE_DIR] [--fit-split SPLIT|none] [--max-images N] [--max-fit-images N]

The checkpoint's kind is read from it (:func:`cefam_lightning.methods.checkpoints.checkpoint_kind`). Without
``--data`` it
evaluates on the shapes world the checkpoint was trained on (rebuilt from the run's config), on the held-out split:

- **CE-FAM**: region metrics per concept type and layer beside Grad-CAM, the single-channel baseline and a random
  map, the contribution accuracy, and the faithfulness (Average Drop / Increase in Confidence) of the class map
  fused from the top concepts by contribution beside Grad-CAM's (:mod:`cefam_lightning.methods.cefam.evaluation`);
- **L-CAM-Fm / L-CAM-Img**: the class map's NRA, hit rate and EPG against the key object's mask and its AD/IC,
  beside Grad-CAM at the same layer and a random map (:mod:`cefam_lightning.methods.lcam.evaluation`);
- **SIAM**: attribute-presence AUROC, class accuracy beside the frozen classifier's, how often the top
  contribution is a key-object concept, and the attribute maps' region metrics
  (:mod:`cefam_lightning.methods.siam.evaluation`).

With ``--data`` (CE-FAM checkpoints) it evaluates on a mask dataset (:mod:`cefam_lightning.data.mask_datasets`: the
documented folder format, Broden's or ImageNet-S's released layout), on ``--split`` (default ``val`` /
``validation`` where the dataset has it, else every image). The dataset's concepts the checkpoint knows by name are
evaluated; others take their text embeddings from ``--store`` (an embedding store made with the checkpoint's VLM)
and otherwise are skipped, counted and listed in the results. The single-channel baseline is fitted on the
dataset's training split (``train``, ImageNet-S ``train-semi``; ``--fit-split``) and left out, with a note, where
there is none. The contribution accuracy needs the shapes world's key object and is left out for these datasets.

Writes ``evaluation.json`` (every number, per concept type) and ``evaluation.md`` (the readable table) to
``--out`` (default: ``evaluation/`` in the checkpoint's run folder, ``evaluation-<dataset>-<split>/`` with
``--data``) and prints the table. What is measured is described in :mod:`cefam_lightning.methods.cefam.evaluation`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from cefam_lightning.data.mask_datasets import (
    FORMATS,
    MaskBatch,
    MaskConcept,
    MaskDataset,
    MaskDatasetError,
    collate_masks,
    open_mask_dataset,
)
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSplit, key_object_concepts
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.errors import CefamError, cli_errors, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.methods.baselines import SingleChannelBaseline
from cefam_lightning.methods.cefam.contributions import FILLS
from cefam_lightning.methods.cefam.evaluation import ExplanationEvaluation, format_table
from cefam_lightning.methods.cefam.relevance import parse_select_layers, selectable_layers
from cefam_lightning.methods.checkpoints import KIND_ARTICLES, method_name, module_kind
from cefam_lightning.methods.lcam.evaluation import evaluate_lcam_on_world, format_lcam_table
from cefam_lightning.methods.siam.evaluation import evaluate_siam_on_world, format_siam_table
from cefam_lightning.training.config import world_spec

WORLD_SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "validation")  # a mask dataset's default evaluation split, where it has one
FIT_SPLITS = ("train", "train-semi")  # the split the single-channel baseline is fitted on, where it has one
_MAX_NOTED = 20


class EvaluateError(CefamError):
    """A bad input to ``evaluate``: the message names the file or value at fault."""


def _selectable(module, select_layers: str | Sequence[str]) -> list[str]:
    """The layers a top-1 layer may be chosen from, or an error naming the setting."""
    try:
        return selectable_layers(module.classifier, select_layers)
    except ValueError as e:
        raise EvaluateError(f"select_layers: {e}") from None


def _batches(split: WorldSplit, batch_size: int, limit: int | None, with_masks: bool, device: torch.device):
    n = len(split) if limit is None else min(limit, len(split))
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        images = torch.from_numpy(np.array(split.images[sl])).permute(0, 3, 1, 2).float().div_(255).to(device)
        masks = torch.from_numpy(np.array(split.masks[sl])).to(device)
        labels = torch.from_numpy(np.asarray(split.labels[sl])).to(device)
        yield images, (masks if with_masks else masks.flatten(2).any(dim=2)), labels


@torch.no_grad()
def evaluate_on_world(
    module,
    world: ShapesWorld,
    split: str = "test",
    k: int = 20,
    fill: str = "spatial_mean",
    batch_size: int = 64,
    max_images: int | None = None,
    seed: int = 0,
    per_layer_contributions: bool = False,
    faithfulness_top_n: int | None = 8,
    select_layers: str | Sequence[str] = "auto",
) -> dict[str, Any]:
    """Evaluate ``module`` (a trained CEFAMModule) on a shapes-world split; returns the results dict.

    The single-channel baseline is fitted on the world's training split first. This process evaluates the
    whole split by itself (under DDP, call it on one rank), so the metrics do not sync across ranks.
    ``faithfulness_top_n``: the class map whose Average Drop / Increase in Confidence is scored fuses this many
    top concepts (``explain``'s default 8); ``None`` leaves the faithfulness out. ``select_layers``: the layers
    a top-1 layer is chosen from (:func:`~cefam_lightning.methods.cefam.relevance.selectable_layers`).
    """
    if fill not in FILLS:
        raise EvaluateError(f"fill must be one of {FILLS}, got {fill!r}")
    if k < 1:
        raise EvaluateError(f"k must be >= 1, got {k}")
    names = [c.name for c in world.concepts]
    if list(module.hparams.concept_names) != names:
        raise EvaluateError(
            f"the checkpoint's concepts {list(module.hparams.concept_names)} are not the world's concepts {names}"
        )
    device = next(module.translator.parameters()).device
    module.eval()
    t0 = time.time()
    train = world.split("train")
    baseline = SingleChannelBaseline.fit(
        module.classifier, ((x, p) for x, p, _ in _batches(train, batch_size, None, False, device))
    )
    evaluation = ExplanationEvaluation(
        module.classifier.layers,
        [c.type for c in world.concepts],
        baseline,
        k=k,
        fill=fill,
        seed=seed,
        sync_on_compute=False,
        per_layer_contributions=per_layer_contributions,
        faithfulness_top_n=faithfulness_top_n,
        select_layers=_selectable(module, select_layers),
    ).to(device)
    data = world.split(split)
    for images, masks, labels in _batches(data, batch_size, max_images, True, device):
        key = key_object_concepts(world.spec, masks, labels)
        evaluation.update(module, images, masks, labels, key)
    results = evaluation.compute()
    results["split"] = split
    results["images"] = len(data) if max_images is None else min(max_images, len(data))
    results["seconds"] = round(time.time() - t0, 1)
    return results


def classifier_input_spec(module) -> InputSpec:
    """The input geometry images and masks are brought to: the classifier's own, else its recorded input size."""
    spec = getattr(module.classifier, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    from cefam_lightning.cli.explain import ExplainError, input_size

    try:
        size = input_size(module)
    except ExplainError as e:
        raise EvaluateError(str(e)) from None
    return InputSpec(crop=size, resize=size)


def resolve_dataset_concepts(module, concepts: list[MaskConcept], store=None):
    """Which of a dataset's concepts can be evaluated, with which text embeddings.

    A concept the checkpoint knows by name uses its text embedding, one the embedding store (already opened and
    checked, see :func:`cefam_lightning.cli.explain.open_store`) holds uses the store's; the dataset's type is kept.

    Returns:
        ``(concept_set, mapping, skipped)``: the :class:`~cefam_lightning.cli.explain.ConceptSet` to score, a
        ``(len(concepts),)`` tensor mapping each dataset concept to its index in that set (``-1``: skipped), and
        the skipped concepts' names.
    """
    from cefam_lightning.cli.explain import ExplainError, resolve_concepts

    known = {str(n) for n in module.hparams["concept_names"]}
    if store is not None:
        known |= set(store.concept_names)
    usable = [i for i, c in enumerate(concepts) if c.name in known]
    skipped = [c.name for c in concepts if c.name not in known]
    if not usable:
        where = "the checkpoint's concept set" + (f" or the embedding store {store.path}" if store is not None else "")
        raise EvaluateError(
            f"none of the dataset's {len(concepts)} concepts (e.g. {', '.join(skipped[:5])}) is in {where}; give an "
            "embedding store that holds them (--store, made with the checkpoint's VLM)"
        )
    try:
        cset = resolve_concepts(module, [(concepts[i].name, concepts[i].type) for i in usable], store)
    except ExplainError as e:
        raise EvaluateError(str(e)) from None
    mapping = torch.full((len(concepts),), -1, dtype=torch.long)
    mapping[usable] = torch.arange(len(usable))
    return cset, mapping, skipped


def _mask_batches(dataset: MaskDataset, limit: int | None, batch_size: int, num_workers: int):
    from torch.utils.data import DataLoader, Subset

    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(
        Subset(dataset, range(n)), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_masks
    )
    try:
        yield from loader
    except MaskDatasetError as e:  # re-raised from a worker with its traceback: keep the original message
        raise MaskDatasetError(one_line(e)) from None


def _mapped_pairs(batch: MaskBatch, mapping: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch's pairs of evaluated concepts: ``(image_index, concept (scored set's index), masks, keep)``."""
    mapped = mapping[batch.concepts]
    keep = mapped >= 0
    return batch.image_index[keep], mapped[keep], batch.masks[keep], keep


@torch.no_grad()
def evaluate_on_masks(
    module,
    dataset: MaskDataset,
    store=None,
    fit_dataset: MaskDataset | None = None,
    k: int = 20,
    fill: str = "spatial_mean",
    batch_size: int = 16,
    max_images: int | None = None,
    max_fit_images: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    select_layers: str | Sequence[str] = "auto",
) -> dict[str, Any]:
    """Evaluate ``module`` (a trained CEFAMModule) on a mask dataset; returns the results dict.

    Args:
        module: the CE-FAM module (on its device).
        dataset: the evaluation split, opened with the classifier's input geometry (:func:`classifier_input_spec`).
        store: an opened embedding store holding text embeddings of concepts the checkpoint lacks.
        fit_dataset: the split to fit the single-channel baseline on; ``None`` leaves that baseline out.
        k: channels deleted at most for layer relevance; fill: recorded for reference (no contributions here).
        batch_size, num_workers: of the DataLoader; max_images, max_fit_images: use only the first N images.
        seed: seed of the random maps.
        select_layers: the layers a top-1 layer is chosen from
            (:func:`~cefam_lightning.methods.cefam.relevance.selectable_layers`).
    """
    from cefam_lightning.models.components import ConceptScorer

    if k < 1:
        raise EvaluateError(f"k must be >= 1, got {k}")
    device = next(module.translator.parameters()).device
    module.eval()
    t0 = time.time()
    cset, mapping, skipped = resolve_dataset_concepts(module, dataset.concepts, store)
    s = module.scorer
    scorer = ConceptScorer(cset.text, s.kind, s.logit_scale, s.logit_bias).to(device)
    # What ExplanationEvaluation reads from a module, with the dataset's concept set as the scorer.
    parts = SimpleNamespace(classifier=module.classifier, translator=module.translator, scorer=scorer)
    notes = [
        "contribution accuracy left out: it needs each image's key object, which only the shapes world defines",
    ]
    baseline, fit_info = None, None
    if fit_dataset is not None:
        baseline, fit_info = _fit_single_channel(
            module.classifier, fit_dataset, mapping, len(cset.names), batch_size, max_fit_images, num_workers, device
        )
        notes.append(
            f"single-channel baseline fitted on split {fit_dataset.split!r} ({fit_info['images']} images, "
            f"{fit_info['concepts_present']} of {len(cset.names)} evaluated concepts present there)"
        )
    else:
        notes.append(
            "single-channel baseline left out: it is fitted on a training split, and there was none (the dataset "
            "has no train/train-semi split besides the evaluated one, or --fit-split none)"
        )
    evaluation = ExplanationEvaluation(
        module.classifier.layers,
        cset.types,
        baseline,
        k=k,
        fill=fill,
        seed=seed,
        sync_on_compute=False,
        contributions=False,
        select_layers=_selectable(module, select_layers),
    ).to(device)
    skipped_pairs = torch.zeros(len(dataset.concepts), dtype=torch.long)
    n_images = 0
    for batch in _mask_batches(dataset, max_images, batch_size, num_workers):
        image_index, concepts, masks, keep = _mapped_pairs(batch, mapping)
        skipped_pairs += torch.bincount(batch.concepts[~keep], minlength=len(dataset.concepts))
        evaluation.update_pairs(
            parts, batch.images.to(device), image_index.to(device), concepts.to(device), masks.to(device)
        )
        n_images += len(batch.ids)
    results = evaluation.compute()
    skipped_set = set(skipped)
    skipped_by_name = {
        c.name: int(n) for c, n in zip(dataset.concepts, skipped_pairs, strict=True) if c.name in skipped_set
    }
    n_skipped_pairs = sum(skipped_by_name.values())
    if skipped:
        unknown_to = (
            "neither the checkpoint nor the embedding store knows"
            if store is not None
            else "the checkpoint does not know"
        )
        store_hint = "" if store is not None else "; an embedding store that holds them (--store) would add them"
        notes.append(
            f"{len(skipped)} of the dataset's {len(dataset.concepts)} concepts skipped: {unknown_to} them "
            f"({', '.join(skipped[:_MAX_NOTED])}"
            f"{', ...' if len(skipped) > _MAX_NOTED else ''}); their {n_skipped_pairs} (image, concept) pairs are "
            f"not scored{store_hint}"
        )
    checkpoint_names = {str(n) for n in module.hparams["concept_names"]}
    from_store = [n for n in cset.names if n not in checkpoint_names]
    results["dataset"] = {**dataset.describe(), "images_evaluated": n_images}
    results["concepts"] = {
        "evaluated": len(cset.names),
        "from_store": len(from_store),
        "store": str(store.path) if store is not None else None,
        "skipped": {"count": len(skipped), "pairs": n_skipped_pairs, "pairs_by_concept": skipped_by_name},
    }
    if fit_info is not None:
        results["single_channel_fit"] = fit_info
    results["notes"] = notes
    results["split"] = dataset.split
    results["images"] = n_images
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _fit_single_channel(classifier, dataset, mapping, num_concepts, batch_size, limit, num_workers, device):
    presence_total = torch.zeros(num_concepts, dtype=torch.long)
    n_images = 0

    def batches():
        nonlocal presence_total, n_images
        for batch in _mask_batches(dataset, limit, batch_size, num_workers):
            image_index, concepts, _, _ = _mapped_pairs(batch, mapping)
            presence = torch.zeros(len(batch.ids), num_concepts)
            presence[image_index, concepts] = 1.0
            presence_total += presence.sum(0).long()
            n_images += len(batch.ids)
            yield batch.images.to(device), presence

    try:
        baseline = SingleChannelBaseline.fit(classifier, batches())
    except ValueError as e:
        if isinstance(e, MaskDatasetError):
            raise
        raise EvaluateError(f"cannot fit the single-channel baseline on split {dataset.split!r}: {e}") from None
    return baseline, {"split": dataset.split, "images": n_images, "concepts_present": int((presence_total > 0).sum())}


def open_evaluation_data(
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


def evaluate_explainer_on_world(
    module,
    world: ShapesWorld,
    split: str = "test",
    *,
    k: int = 20,
    fill: str = "spatial_mean",
    batch_size: int = 64,
    max_images: int | None = None,
    seed: int = 0,
    per_layer_contributions: bool = False,
    select_layers: str | Sequence[str] = "auto",
) -> tuple[dict[str, Any], str]:
    """Evaluate any trained explainer (CE-FAM, L-CAM, SIAM) on a shapes-world split: its results and table.

    ``k``, ``fill``, ``per_layer_contributions`` and ``select_layers`` are CE-FAM's; ``seed`` seeds the random-map
    baselines. The results carry ``method`` (``cefam``, ``lcam_fm``, ``lcam_img``, ``siam``).
    """
    kind = module_kind(module)
    if kind == "cefam":
        results = evaluate_on_world(
            module,
            world,
            split=split,
            k=k,
            fill=fill,
            batch_size=batch_size,
            max_images=max_images,
            seed=seed,
            per_layer_contributions=per_layer_contributions,
            select_layers=select_layers,
        )
        table = format_table(results)
    elif kind == "siam":
        try:
            results = evaluate_siam_on_world(module, world, split, batch_size=batch_size, max_images=max_images)
        except ValueError as e:
            raise EvaluateError(f"SIAM evaluation: {e}") from None
        table = format_siam_table(results)
    else:
        try:
            results = evaluate_lcam_on_world(
                module, world, split, batch_size=batch_size, max_images=max_images, seed=seed
            )
        except ValueError as e:
            raise EvaluateError(f"L-CAM evaluation: {e}") from None
        table = format_lcam_table(results)
    return {"method": method_name(module), **results}, table


def write_results(results: dict[str, Any], out_dir: str | Path, table: str | None = None) -> str:
    """Write ``evaluation.json`` and ``evaluation.md`` (``table``, default CE-FAM's :func:`format_table` of the
    results) to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results) if table is None else table
    atomic_write_json(out / "evaluation.json", results)
    atomic_write_bytes(out / "evaluation.md", table.encode())
    return table


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """The explainer (CE-FAM, L-CAM or SIAM module) of a checkpoint, with a clear error for a missing file or a
    checkpoint of no known kind."""
    from cefam_lightning.cli.explain import ExplainError
    from cefam_lightning.cli.explain import load_checkpoint as load

    try:
        return load(path, map_location=device).to(device)
    except ExplainError as e:
        raise EvaluateError(str(e)) from None


DATA_OPTIONS = ("format", "store", "fit_split", "max_fit_images", "categories", "class_names")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a CE-FAM, L-CAM or SIAM checkpoint written by train.py")
    p.add_argument(
        "--split",
        default=None,
        help="shapes world: train, val or test (default test); --data: the dataset's split (default val/validation)",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split")
    data = p.add_argument_group("mask datasets (--data)")
    data.add_argument("--data", default=None, metavar="ROOT", help="evaluate on this mask dataset folder instead")
    data.add_argument("--format", default=None, choices=("auto", *FORMATS), help="its layout (default auto)")
    data.add_argument(
        "--store", default=None, metavar="STORE_DIR", help="embedding store for concepts the checkpoint lacks"
    )
    data.add_argument(
        "--fit-split", default=None, help="split to fit the single-channel baseline on (default train/train-semi; none)"
    )
    data.add_argument("--max-fit-images", type=int, default=None, help="fit the baseline on the first N images only")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the dataset (default 0)")
    data.add_argument("--categories", default=None, help="ImageNet-S: the release's ImageNetS_categories_im{N}.txt")
    data.add_argument("--class-names", default=None, help="ImageNet-S: '<wnid> <name>' lines (LOC_synset_mapping.txt)")
    p.add_argument("--k", type=int, default=None, help="channels deleted/masked at most (default: the run's)")
    p.add_argument("--fill", choices=FILLS, default=None, help="masked-channel fill (default: the run's)")
    p.add_argument(
        "--select-layers",
        default=None,
        metavar="auto|all|L1,L2",
        help="layers a concept's top-1 layer is chosen from: auto (not a layer read only through global pooling), "
        "all, or comma-separated names (default: the run's evaluation.select_layers, else auto)",
    )
    p.add_argument(
        "--per-layer-contributions",
        action="store_true",
        help="also score contributions with every concept masked at each single layer (slower)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64; 16 with --data)")
    p.add_argument("--cache-dir", default=None, help="where the shapes world is cached (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/evaluation[-<data>-<split>])")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--debug", action="store_true", help="show a traceback instead of a one-line error")
    args = p.parse_args(argv)
    if args.data is None:
        given = [f"--{o.replace('_', '-')}" for o in DATA_OPTIONS if getattr(args, o) is not None]
        if given:
            p.error(f"{', '.join(given)} only apply with --data")
        args.split = args.split or "test"
        if args.split not in WORLD_SPLITS:
            p.error(f"argument --split: invalid choice: {args.split!r} (choose from {', '.join(WORLD_SPLITS)})")
        args.batch_size = args.batch_size or 64
    else:
        for flag, value in (
            ("--per-layer-contributions", args.per_layer_contributions),
            ("--cache-dir", args.cache_dir),
        ):
            if value:
                p.error(f"{flag} applies to the shapes world only, not with --data")
        args.batch_size = args.batch_size or 16
        for flag in ("batch_size", "num_workers", "max_images", "max_fit_images"):
            value = getattr(args, flag)
            if value is not None and value < (0 if flag == "num_workers" else 1):
                p.error(
                    f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'num_workers' else '>= 1'}, got {value}"
                )
    return args


def _evaluate_data(args: argparse.Namespace, module) -> tuple[dict[str, Any], Path]:
    from cefam_lightning.cli.explain import ExplainError, open_store

    config = module.hparams.get("config") or {}
    evaluation = config.get("evaluation", {}) if isinstance(config, dict) else {}
    try:
        store = open_store(args.store, module.translator.out_dim) if args.store else None
    except ExplainError as e:
        raise EvaluateError(str(e)) from None
    dataset, fit = open_evaluation_data(
        args.data,
        classifier_input_spec(module),
        args.format or "auto",
        split=args.split,
        fit_split=args.fit_split,
        categories=args.categories,
        class_names=args.class_names,
    )
    results = evaluate_on_masks(
        module,
        dataset,
        store=store,
        fit_dataset=fit,
        k=args.k or evaluation.get("k", 20),
        fill=args.fill or evaluation.get("fill", "spatial_mean"),
        batch_size=args.batch_size,
        max_images=args.max_images,
        max_fit_images=args.max_fit_images,
        seed=evaluation.get("seed", 0),
        num_workers=args.num_workers,
        select_layers=_run_select_layers(args, evaluation),
    )
    name = re.sub(r"[^\w.\-]+", "_", Path(args.data).resolve().name) or "data"
    default_out = Path(args.checkpoint).resolve().parent.parent / f"evaluation-{name}-{dataset.split or 'all'}"
    return results, default_out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cefam_lightning.cli.explain import ExplainError, select_device

    with cli_errors(args.debug):
        try:
            device = select_device(args.device)
        except ExplainError as e:
            raise EvaluateError(str(e)) from None
        module = load_checkpoint(args.checkpoint, device)
        kind = module_kind(module)
        if kind != "cefam":
            given = [flag for flag, on in _cefam_only_options(args) if on]
            if given:
                raise EvaluateError(
                    f"{', '.join(given)}: CE-FAM options, but {args.checkpoint} is {KIND_ARTICLES[kind]} checkpoint "
                    "(evaluated on its shapes world)"
                )
        if args.data is not None:
            results, default_out = _evaluate_data(args, module)
            table = None
        else:
            results, table = _evaluate_world(args, module)
            default_out = Path(args.checkpoint).resolve().parent.parent / "evaluation"
        results["checkpoint"] = str(args.checkpoint)
        out = Path(args.out) if args.out else default_out
        print(write_results(results, out, table))
        print(f"written: {out / 'evaluation.json'}, {out / 'evaluation.md'}")
    return results


def _cefam_only_options(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """The CE-FAM-only options and whether each was given."""
    return [
        ("--data", args.data is not None),
        ("--k", args.k is not None),
        ("--fill", args.fill is not None),
        ("--select-layers", args.select_layers is not None),
        ("--per-layer-contributions", bool(args.per_layer_contributions)),
    ]


def _evaluate_world(args: argparse.Namespace, module) -> tuple[dict[str, Any], str]:
    config = module.hparams.get("config") or {}
    if "world" not in config:
        raise EvaluateError(f"{args.checkpoint}: the checkpoint records no shapes-world config to evaluate on")
    cfg = OmegaConf.create(config)
    evaluation = config.get("evaluation", {})
    world = ShapesWorld.build(world_spec(cfg), args.cache_dir or cfg.cache_dir)
    return evaluate_explainer_on_world(
        module,
        world,
        args.split,
        k=args.k or evaluation.get("k", 20),
        fill=args.fill or evaluation.get("fill", "spatial_mean"),
        batch_size=args.batch_size,
        max_images=args.max_images,
        seed=evaluation.get("seed", 0),
        per_layer_contributions=args.per_layer_contributions,
        select_layers=_run_select_layers(args, evaluation),
    )


def _run_select_layers(args: argparse.Namespace, evaluation: dict[str, Any]) -> str | list[str]:
    """``--select-layers``, else the run's ``evaluation.select_layers`` (``auto`` for runs that predate it)."""
    given = parse_select_layers(args.select_layers)
    return given if given is not None else evaluation.get("select_layers", "auto")


if __name__ == "__main__":
    main()
