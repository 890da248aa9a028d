"""Evaluate a trained CE-FAM checkpoint on the shapes world's held-out masks, beside three baselines.

Usage: ``python evaluate.py --checkpoint RUN/checkpoints/best.ckpt [--split test] [--max-images N] [--out DIR]``

Writes ``evaluation.json`` (every number, per concept type) and ``evaluation.md`` (the readable table) to
``--out`` (default: ``evaluation/`` in the checkpoint's run folder) and prints the table. What is measured is
described in :mod:`cefam_lightning.evaluation`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from cefam_lightning.baselines import SingleChannelBaseline
from cefam_lightning.config import world_spec
from cefam_lightning.contributions import FILLS
from cefam_lightning.evaluation import ExplanationEvaluation, format_table
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.shapes_world import ShapesWorld, WorldSplit, key_object_concepts


class EvaluateError(ValueError):
    """A bad input to ``evaluate``: the message names the file or value at fault."""


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
) -> dict[str, Any]:
    """Evaluate ``module`` (a trained CEFAMModule) on a shapes-world split; returns the results dict.

    The single-channel baseline is fitted on the world's training split first. This process evaluates the
    whole split by itself (under DDP, call it on one rank), so the metrics do not sync across ranks.
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


def write_results(results: dict[str, Any], out_dir: str | Path) -> str:
    """Write ``evaluation.json`` and ``evaluation.md`` to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    atomic_write_json(out / "evaluation.json", results)
    atomic_write_bytes(out / "evaluation.md", table.encode())
    return table


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """The CE-FAM module of a checkpoint, with a clear error for a missing file or another kind of checkpoint."""
    from cefam_lightning.explain import ExplainError
    from cefam_lightning.explain import load_checkpoint as load

    try:
        return load(path, map_location=device).to(device)
    except ExplainError as e:
        raise EvaluateError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a CE-FAM checkpoint written by train.py")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--k", type=int, default=None, help="channels deleted/masked at most (default: the run's)")
    p.add_argument("--fill", choices=FILLS, default=None, help="masked-channel fill (default: the run's)")
    p.add_argument(
        "--per-layer-contributions",
        action="store_true",
        help="also score contributions with every concept masked at each single layer (slower)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="where the shapes world is cached (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/evaluation)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cefam_lightning.explain import ExplainError, select_device

    try:
        try:
            device = select_device(args.device)
        except ExplainError as e:
            raise EvaluateError(str(e)) from None
        module = load_checkpoint(args.checkpoint, device)
        config = module.hparams.get("config") or {}
        if "world" not in config:
            raise EvaluateError(f"{args.checkpoint}: the checkpoint records no shapes-world config to evaluate on")
        cfg = OmegaConf.create(config)
        evaluation = config.get("evaluation", {})
        world = ShapesWorld.build(world_spec(cfg), args.cache_dir or cfg.cache_dir)
        results = evaluate_on_world(
            module,
            world,
            split=args.split,
            k=args.k or evaluation.get("k", 20),
            fill=args.fill or evaluation.get("fill", "spatial_mean"),
            batch_size=args.batch_size,
            max_images=args.max_images,
            seed=evaluation.get("seed", 0),
            per_layer_contributions=args.per_layer_contributions,
        )
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    results["checkpoint"] = str(args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "evaluation"
    print(write_results(results, out))
    print(f"written: {out / 'evaluation.json'}, {out / 'evaluation.md'}")
    return results


if __name__ == "__main__":
    main()
