"""How much a classifier leans on a shapes world's planted shortcut (``world.shortcut``, docs/method.md#shortcut).

The train split ties a texture to a class; val and test are drawn without the tie, so there it is broken in most
images. A classifier that learned the class's own concepts (its key object's color and shape) is as accurate
where the tie is broken as where it holds; one that uses the texture is not, and it makes *shortcut errors*:
images of other classes that carry the texture, taken for the shortcut class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cefam_lightning.data.shapes_world import WorldSpec, shortcut_tie


def _long(x) -> torch.Tensor:
    return torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).long().cpu()


def _accuracy(correct: torch.Tensor, where: torch.Tensor) -> float | None:
    n = int(where.sum())
    return float(correct[where].float().mean()) if n else None


def shortcut_reliance(spec: WorldSpec, masks, labels, predictions) -> dict[str, Any]:
    """The classifier's accuracy where ``spec.shortcut``'s tie holds and where it is broken, on one split.

    Args:
        spec: a world with a shortcut.
        masks: ``(N, C, H, W)`` concept masks of the split's images.
        labels: ``(N,)`` their classes.
        predictions: ``(N,)`` the classifier's predicted classes.

    Returns:
        ``acc_tie_holds`` / ``acc_tie_broken`` (``None`` over no image) and their counts ``n_tie_holds`` /
        ``n_tie_broken``; ``acc_drop``, holds minus broken (``None`` if either is); ``shortcut_errors``, images
        not of the shortcut class that carry the concept (on any object) and are predicted as the shortcut
        class, out of ``n_other_with_concept`` such images; ``shortcut_misses``, images of the shortcut class
        whose key object lacks the concept and that are misclassified, out of ``n_class_without_concept``.
        The last two sets are exactly the images where the tie is broken.
    """
    rule = spec.shortcut_rule
    if rule is None:
        raise ValueError("shortcut_reliance: the world has no shortcut (world.shortcut is null)")
    tie = shortcut_tie(spec, masks, labels).cpu()
    labels, predictions = _long(labels), _long(predictions)
    if not labels.shape == predictions.shape == tie.shape:
        raise ValueError(
            f"shortcut_reliance: {len(tie)} images, {len(labels)} labels and {len(predictions)} predictions"
        )
    k = spec.classes.index(rule.class_name)
    correct = predictions == labels
    of_class = labels == k
    other_with, class_without = ~of_class & ~tie, of_class & ~tie
    holds, broken = _accuracy(correct, tie), _accuracy(correct, ~tie)
    return {
        "class": rule.class_name,
        "concept": rule.concept,
        "acc_tie_holds": holds,
        "acc_tie_broken": broken,
        "n_tie_holds": int(tie.sum()),
        "n_tie_broken": int((~tie).sum()),
        "acc_drop": holds - broken if holds is not None and broken is not None else None,
        "shortcut_errors": int((other_with & (predictions == k)).sum()),
        "n_other_with_concept": int(other_with.sum()),
        "shortcut_misses": int((class_without & ~correct).sum()),
        "n_class_without_concept": int(class_without.sum()),
    }


@torch.no_grad()
def classifier_shortcut_reliance(classifier, world, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    """:func:`shortcut_reliance` of ``classifier``'s predictions on a split of a built ``ShapesWorld``.

    ``classifier`` maps images in ``[0, 1]`` to logits, or to an output with ``.logits`` (``FrozenClassifier``).
    """
    data = world.split(split)
    device = next(classifier.parameters()).device
    predictions = []
    for images, _, _ in data.batches(batch_size, device=device):
        out = classifier(images)
        predictions.append(getattr(out, "logits", out).argmax(dim=1).cpu())
    return {"split": split, **shortcut_reliance(world.spec, data.masks, data.labels, torch.cat(predictions))}
