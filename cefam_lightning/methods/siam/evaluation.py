"""SIAM on the shapes world (docs/method.md#siam-evaluation): are its attributes, outputs and contributions right?

:func:`evaluate_siam_on_world` runs a trained :class:`~cefam_lightning.methods.siam.module.SIAMModule` whose attributes
are the world's concepts over one split and measures:

- attribute presence: macro AUROC of the presence probabilities against the concepts present;
- accuracy of SIAM's class prediction, beside the frozen classifier's on the same images (and how often the
  two agree);
- contributions: on the images SIAM classifies correctly, the share whose largest per-attribute contribution to
  the predicted class is a concept of the key object (:func:`~cefam_lightning.data.shapes_world.key_object_concepts`:
  its color, shape or texture), the ground truth of what must drive the class;
- where: each present concept's attribute map against its mask (:class:`~cefam_lightning.metrics.RegionMetrics`:
  EPG, NRA, hit rate per concept type), and the class map's NRA against the key object's pixels
  (:func:`~cefam_lightning.data.shapes_world.key_object_pixels`, the one ground truth of every class map).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MultilabelAUROC

from cefam_lightning.data.shapes_world import ShapesWorld, key_object_concepts, key_object_pixels
from cefam_lightning.metrics import RegionMetrics
from cefam_lightning.metrics.functional.region import nra
from cefam_lightning.reporting.tables import markdown_table


@torch.no_grad()
def evaluate_siam_on_world(
    module: Any, world: ShapesWorld, split: str = "test", batch_size: int = 64, max_images: int | None = None
) -> dict[str, Any]:
    """Evaluate a SIAM module trained on ``world`` on one of its splits.

    Args:
        module: a classification :class:`~cefam_lightning.methods.siam.module.SIAMModule` whose attributes are the
            world's concepts, in the world's order.
        world: the shapes world.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: images per forward pass.
        max_images: evaluate only the first this many images (``None``: all).

    Returns:
        ``n_images``; ``attr_auroc`` (macro); ``siam_acc``, ``classifier_acc``, ``agreement``; ``n_correct`` and
        ``top_attr_is_key`` (share of SIAM-correct images whose top contribution is a key-object concept);
        ``class_map_nra`` (mean over images, vs the key object's pixels); ``regions``: RegionMetrics of the
        attribute maps vs the masks of present concepts (floats).
    """
    concepts = world.concepts
    names = [c.name for c in concepts]
    if module.hparams.task != "classification":
        raise ValueError("evaluate_siam_on_world needs a classification SIAM (task='classification')")
    if list(module.hparams.attribute_names) != names:
        raise ValueError(
            f"the module's attributes {list(module.hparams.attribute_names)} are not the world's concepts {names}"
        )
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = world.split(split)
    n = len(data) if max_images is None else min(int(max_images), len(data))
    if n <= 0:
        raise ValueError(f"no images to evaluate (split {split!r} has {len(data)}, max_images={max_images})")
    device = module.device
    was_training = module.training
    module.eval()
    auroc = MultilabelAUROC(len(names), average="macro").to(device)
    regions = RegionMetrics([c.type for c in concepts]).to(device)
    counts = dict.fromkeys(("siam_correct", "classifier_correct", "agree", "key_first"), 0)
    class_map_nra: list[torch.Tensor] = []
    for images, masks, labels in data.batches(batch_size, n, device):
        presence = masks.flatten(2).any(2)
        logits, features = module.backbone(images)
        ex = module.explain_features(features, image_size=tuple(images.shape[-2:]))
        pred, classifier_pred = ex.target, logits.argmax(1)
        auroc.update(ex.presence_probs, presence.long())
        correct = pred == labels
        counts["siam_correct"] += int(correct.sum())
        counts["classifier_correct"] += int((classifier_pred == labels).sum())
        counts["agree"] += int((classifier_pred == pred).sum())
        key = key_object_concepts(world.spec, masks, labels)  # (B, C)
        top = ex.contributions.argmax(1)
        rows = torch.arange(len(labels), device=device)
        counts["key_first"] += int((key[rows, top] & correct).sum())
        image_index, concept_ids = presence.nonzero(as_tuple=True)
        regions.update(ex.maps[image_index, concept_ids], masks[image_index, concept_ids], concept_ids)
        class_map_nra.append(nra(ex.class_map, key_object_pixels(world.spec, masks, labels)))
    module.train(was_training)
    nra_values = torch.cat(class_map_nra)
    return {
        "split": split,
        "n_images": n,
        "attr_auroc": float(auroc.compute()),
        "siam_acc": counts["siam_correct"] / n,
        "classifier_acc": counts["classifier_correct"] / n,
        "agreement": counts["agree"] / n,
        "n_correct": counts["siam_correct"],
        "top_attr_is_key": counts["key_first"] / max(counts["siam_correct"], 1),
        "class_map_nra": float(nra_values.nanmean()),
        "regions": {k: float(v) for k, v in regions.compute().items()},
    }


def format_siam_table(results: dict[str, Any]) -> str:
    """A Markdown summary of :func:`evaluate_siam_on_world`'s results."""
    r = results
    regions = r["regions"]
    types = [k.split("/", 1)[1] for k in regions if k.startswith("nra/") and k != "nra/mean"]

    def pct(share: float) -> str:
        return f"{100 * share:.1f} %"

    summary = markdown_table(
        ["metric", "value"],
        [
            ["attribute-presence AUROC (macro)", f"{r['attr_auroc']:.3f}"],
            ["SIAM class accuracy", pct(r["siam_acc"])],
            ["frozen classifier accuracy (same images)", pct(r["classifier_acc"])],
            ["SIAM agrees with the classifier", pct(r["agreement"])],
            [f"top contribution is a key-object concept ({r['n_correct']} correct images)", pct(r["top_attr_is_key"])],
            ["class map NRA vs the key object", f"{r['class_map_nra']:.3f}"],
        ],
        title=f"SIAM on the shapes world ({r['split']} split, {r['n_images']} images)",
    )
    maps = markdown_table(
        ["concept type", *types, "mean"],
        [
            [title, *(f"{regions[f'{metric}/{t}']:.3f}" for t in [*types, "mean"])]
            for metric, title in (("nra", "NRA"), ("hit_rate", "hit rate"), ("epg", "EPG"))
        ],
        title="Attribute maps vs concept masks (present concepts)",
    )
    return f"{summary}\n\n{maps}\n"
