"""Evaluate L-CAM's class maps on the shapes world, beside Grad-CAM and a random map (issue 6, SPEC §3-§5).

On the same images, for the predicted class:

- ``lcam``: the module's class maps (:meth:`LCAMModule.class_maps`);
- ``gradcam``: Grad-CAM of the same classifier at the same layer, upsampled bilinearly;
- ``random``: uniform noise at the image size;

scored with NRA, EPG and hit rate against the **key object's** mask (its pixels are ``mask[color] &
mask[shape]`` of the image's class pair, see :func:`~cefam_lightning.data.shapes_world.key_object_concepts`), and with
Average Drop / Increase in Confidence at 100 %, 50 % and 15 % of the map's pixels kept. All states are
torchmetrics sums, so the numbers do not depend on the batching.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec
from cefam_lightning.methods.baselines import gradcam_maps, random_maps
from cefam_lightning.methods.lcam.module import LCAMModule, normalize_maps
from cefam_lightning.metrics import Faithfulness, RegionMetrics
from cefam_lightning.metrics.functional.faithfulness import DEFAULT_KEEPS, faithfulness_probabilities, setting_name

METHODS = ("lcam", "gradcam", "random")
METHOD_TITLES = {"lcam": "L-CAM", "gradcam": "Grad-CAM", "random": "random map"}
KEY_OBJECT = "key object"


def key_object_masks(spec: WorldSpec, masks: Tensor, labels: Tensor) -> Tensor:
    """The key object's pixels, ``(B, H, W)`` bool: ``mask[color] & mask[shape]`` of each image's class pair.

    Args:
        spec: the world (its concept order and classes).
        masks: ``(B, C, H, W)`` concept masks.
        labels: ``(B,)`` class indices.
    """
    masks = masks.bool()
    index = {c.name: i for i, c in enumerate(spec.concepts)}
    pairs = torch.tensor([[index[n] for n in cls.split()] for cls in spec.classes], device=masks.device)
    labels = labels.to(masks.device).long()
    rows = torch.arange(len(labels), device=masks.device)
    return masks[rows, pairs[labels, 0]] & masks[rows, pairs[labels, 1]]


class LCAMEvaluation(nn.Module):
    """Accumulate region and faithfulness metrics of L-CAM, Grad-CAM and random maps over batches.

    Args:
        keeps: kept pixel fractions of the faithfulness metrics.
        seed: seed of the random maps.
        sync_on_compute: sum the states over DDP ranks in :meth:`compute` (every rank must then call it).
    """

    def __init__(self, keeps: Sequence[float] = DEFAULT_KEEPS, seed: int = 0, sync_on_compute: bool = True):
        super().__init__()
        self.keeps = list(keeps)
        self.region = nn.ModuleDict({m: RegionMetrics([KEY_OBJECT], sync_on_compute=sync_on_compute) for m in METHODS})
        self.faithfulness = nn.ModuleDict(
            {m: Faithfulness(self.keeps, sync_on_compute=sync_on_compute) for m in METHODS}
        )
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, module: LCAMModule, images: Tensor, key_masks: Tensor) -> None:
        """Score one batch.

        Args:
            module: a trained :class:`LCAMModule`.
            images: ``(B, 3, H, W)`` in ``[0, 1]``.
            key_masks: ``(B, H, W)`` the key object's pixels.
        """
        size = images.shape[-2:]
        out, c = module.attend(images)
        pred = out.logits.argmax(dim=1)
        maps = {
            "lcam": normalize_maps(c[torch.arange(len(pred), device=c.device), pred], size),
            "gradcam": normalize_maps(
                gradcam_maps(module.classifier, out.activations, pred, [module.layer])[module.layer], size
            ),
            "random": random_maps((len(images), *size), self.generator, images.device),
        }
        concept_ids = torch.zeros(len(images), dtype=torch.long, device=images.device)
        for method, m in maps.items():
            self.region[method].update(m, key_masks, concept_ids)
            y, o = faithfulness_probabilities(module.classifier, images, m, pred, self.keeps, logits=out.logits)
            self.faithfulness[method].update(y, o)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{method: {"nra", "epg", "hit_rate", "ad/100%", "ic/100%", ...}}`` as plain floats."""
        results = {}
        for method in METHODS:
            region = self.region[method].compute()
            row = {name: float(region[f"{name}/mean"]) for name in ("nra", "epg", "hit_rate")}
            row["scored"] = int(region[f"count/{KEY_OBJECT}"])  # images with a non-empty key-object mask
            row.update({k: float(v) for k, v in self.faithfulness[method].compute().items()})
            results[method] = row
        return results


def _batches(world: ShapesWorld, split: str, batch_size: int, limit: int | None, device: torch.device) -> Iterator:
    data = world.split(split)
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        images = torch.from_numpy(np.array(data.images[sl])).permute(0, 3, 1, 2).float().div_(255).to(device)
        masks = torch.from_numpy(np.array(data.masks[sl])).to(device)
        labels = torch.from_numpy(np.asarray(data.labels[sl])).to(device)
        yield images, masks, labels


@torch.no_grad()
def evaluate_lcam_on_world(
    module: LCAMModule,
    world: ShapesWorld,
    split: str = "test",
    batch_size: int = 64,
    max_images: int | None = None,
    keeps: Sequence[float] = DEFAULT_KEEPS,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a trained L-CAM module on a shapes-world split, beside Grad-CAM at its layer and a random map.

    This process evaluates the whole split by itself (under DDP, call it on one rank); the metrics do not sync.

    Args:
        module: a trained :class:`LCAMModule` whose classifier was trained on ``world``.
        world: the shapes world.
        split: ``train``, ``val`` or ``test``.
        batch_size: images per batch.
        max_images: evaluate only the first ones (``None``: all).
        keeps: kept pixel fractions of the faithfulness metrics.
        seed: seed of the random maps.

    Returns:
        ``{"methods": {method: metrics}, "split", "images", "variant", "layer", "keeps", "seconds"}``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if list(module.hparams.class_names) != list(world.class_names):
        raise ValueError(
            f"the module's classes {list(module.hparams.class_names)} are not the world's classes {world.class_names}"
        )
    device = next(module.attention.parameters()).device
    module.eval()
    t0 = time.time()
    evaluation = LCAMEvaluation(keeps, seed=seed, sync_on_compute=False).to(device)
    for images, masks, labels in _batches(world, split, batch_size, max_images, device):
        evaluation.update(module, images, key_object_masks(world.spec, masks, labels))
    methods = evaluation.compute()
    return {
        "methods": methods,
        "split": split,
        "images": int(evaluation.faithfulness["lcam"].total),
        "variant": module.variant,
        "layer": module.layer,
        "keeps": list(keeps),
        "seconds": round(time.time() - t0, 1),
    }


def format_lcam_table(results: dict[str, Any]) -> str:
    """A Markdown table: NRA, hit rate, EPG against the key object's mask and AD/IC per kept fraction."""
    names = [setting_name(k) for k in results.get("keeps", DEFAULT_KEEPS)]
    head = ["NRA", "hit rate", "EPG", *[f"AD {n} ↓" for n in names], *[f"IC {n} ↑" for n in names]]
    variant = str(results.get("variant", "")).capitalize()
    lines = [
        f"L-CAM-{variant} at {results.get('layer')} vs Grad-CAM at the same layer, {results.get('images')} "
        f"{results.get('split')} images (regions: the key object's mask)\n",
        "| method | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for method, row in results["methods"].items():
        cells = [f"{row['nra']:.3f}", f"{row['hit_rate']:.3f}", f"{row['epg']:.3f}"]
        cells += [f"{row[f'ad/{n}']:.2f}" for n in names] + [f"{row[f'ic/{n}']:.1f}" for n in names]
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
