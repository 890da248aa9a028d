"""How much each concept moves the class score (docs/method.md#contribution).

For a concept at its selected layer ``l``, its ``K`` most important channels there (importance
``beta^c_k * mean_ij A^l_k``, as in docs/method.md#layer-relevance) are masked *inside the classifier*, cumulatively:
for ``i = 1..K`` the first ``i`` channel maps are replaced by their spatial means, the rest of the classifier runs from
``l`` on, and the softmax probability ``p_{y,i}`` of the explained class is recorded.
Contribution ``= (1/K) sum_i (p_y - p_{y,i}) / p_y``; negative values (the concept pushes against ``y``) are
kept. All masked variants of all concepts selecting a layer go through the layers after it as one batch.

The ``image`` rule (:func:`region_contributions`) deletes the concept's region from the image instead: the classifier
runs on ``x * (1 - m)``, ``m`` the concept's min-max normalized region at its selected layer, and the contribution
is ``(p_y - p_y(x * (1 - m))) / p_y``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from torch import Tensor

from cefam_lightning.methods.cefam.relevance import top_channels
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.models.classifier import FrozenClassifier

FILLS = ("spatial_mean", "zero")


@torch.no_grad()
def concept_contributions(
    classifier: FrozenClassifier,
    activations: Mapping[str, Tensor],
    logits: Tensor,
    jacobian: Tensor,
    z: Tensor,
    slices: Mapping[str, slice],
    concepts: Tensor,
    concept_layers: Tensor,
    target: Tensor | None = None,
    k: int = 20,
    chunk: int = 256,
    fill: str = "spatial_mean",
    pooled_only: Collection[str] = (),
) -> Tensor:
    """Contribution of each given concept to the explained class.

    Args:
        classifier: the frozen classifier (its :meth:`~FrozenClassifier.tail` runs the masked variants).
        activations, logits: its outputs for the images (``activations`` as the classifier returns them: for a
            token layer its ``prefix_tokens`` go through the tail too).
        jacobian, z, slices: ``dS/dz`` ``(B, C, D)``, pooled activations ``(B, D)``, ``{layer: slice of z}``.
        concepts: ``(B, N)`` concept indices.
        concept_layers: ``(B, N)`` index into ``slices`` of each concept's selected layer.
        target: ``(B,)`` explained class; default the predicted class.
        k: channels masked at most.
        chunk: masked variants per pass through a tail (bounds memory).
        fill: what replaces a masked channel map: ``"spatial_mean"`` (docs/method.md#contribution) or ``"zero"``.
        pooled_only: the layers the classifier reads only through global average pooling (a ResNet's ``layer4``,
            :meth:`~FrozenClassifier.mean_invariant_layers`). There a channel's spatial mean changes nothing, so
            ``"spatial_mean"`` fills with the mean of the whole layer tensor (every channel and pixel of the image)
            instead, as the CE-FAM authors' code does at its last block.

    Returns:
        ``(B, N)`` contributions (negative: the concept pushes against the class).
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    b, n = concepts.shape
    target = logits.argmax(dim=1) if target is None else target
    p_y = logits.float().softmax(dim=1).gather(1, target[:, None])[:, 0]  # (B,)
    out = torch.zeros(b, n, device=logits.device)
    for li, (layer, sl) in enumerate(slices.items()):
        rows = (concept_layers == li).nonzero()  # (R, 2): (sample, slot) pairs that selected this layer
        if rows.numel() == 0:
            continue
        a = activations[layer]
        top = top_channels(jacobian, z, sl, concepts, k)[rows[:, 0], rows[:, 1]]  # (R, k_l)
        k_l = top.shape[1]
        base = a[rows[:, 0]]  # (R, K_l, h, w)
        means = base.mean(dim=(2, 3), keepdim=True)
        if fill == "zero":
            means = torch.zeros_like(means)
        elif layer in pooled_only:  # the spatial mean would leave the logits as they are
            means = base.mean(dim=(1, 2, 3), keepdim=True).expand_as(means)
        # Variant i (1..k_l) masks the first i channels of the ranking: a (R, k_l, K_l) channel mask.
        deleted = torch.arange(k_l, device=a.device)[None, :] <= torch.arange(k_l, device=a.device)[:, None]
        mask = torch.zeros(top.shape[0], k_l, a.shape[1], dtype=torch.bool, device=a.device)
        mask.scatter_(2, top[:, None, :].expand(-1, k_l, -1), deleted[None].expand(top.shape[0], -1, -1))
        tail = classifier.tail(layer)
        # A token layer's tail also reads the prefix (class/register) tokens its map leaves out.
        prefix = getattr(activations, "prefix_tokens", {}).get(layer)
        probs = []
        flat_mask = mask.reshape(-1, a.shape[1])  # (R*k_l, K_l)
        sample_of = torch.arange(top.shape[0], device=a.device).repeat_interleave(k_l)
        for start in range(0, flat_mask.shape[0], chunk):
            idx = sample_of[start : start + chunk]
            m = flat_mask[start : start + chunk, :, None, None]
            variants = torch.where(m, means[idx], base[idx])
            tgt = target[rows[idx, 0]]
            pre = None if prefix is None else prefix[rows[idx, 0]]
            probs.append(tail(variants, pre).float().softmax(dim=1).gather(1, tgt[:, None])[:, 0])
        p_i = torch.cat(probs).reshape(-1, k_l)  # (R, k_l)
        p0 = p_y[rows[:, 0]][:, None]
        out[rows[:, 0], rows[:, 1]] = ((p0 - p_i) / p0).mean(dim=1)
    return out


@torch.no_grad()
def region_contributions(
    classify: Callable[[Tensor], Tensor],
    images: Tensor,
    regions: Tensor,
    logits: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    chunk: int = 64,
) -> Tensor:
    """Contribution of each concept by deleting its region from the image (the ``image`` contribution rule,
    docs/method.md#contribution): ``(p_y - p_y(x * (1 - m))) / p_y``, ``m`` the concept's region min-max normalized
    to ``[0, 1]`` (a constant region deletes nothing: 0). The deletion is the one the ``map`` layer relevance uses.

    Args:
        classify: images ``(n, 3, H, W)`` -> logits ``(n, num_classes)`` (the frozen classifier).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        regions: ``(B, N, H, W)`` each concept's region at the image size.
        logits: ``(B, num_classes)`` the classifier's logits on ``images``.
        target: ``(B,)`` the explained class.
        valid: ``(B, N)`` the slots to compute (default all); the others stay 0 and cost no classifier pass.
        chunk: deleted images per pass through ``classify`` (bounds memory).

    Returns:
        ``(B, N)`` float32 contributions (negative: deleting the region raises the class's probability).
    """
    b, n = regions.shape[:2]
    out = torch.zeros(b, n, device=logits.device)
    valid = torch.ones(b, n, dtype=torch.bool, device=regions.device) if valid is None else valid
    image_of, slot_of = valid.nonzero(as_tuple=True)
    p_y = logits.float().softmax(dim=1).gather(1, target[:, None])[:, 0]  # (B,)
    deleted = []
    for start in range(0, len(image_of), chunk):
        rows, slots = image_of[start : start + chunk], slot_of[start : start + chunk]
        m = minmax_normalize(regions[rows, slots][:, None].float(), dims=2)  # (n, 1, H, W)
        probs = classify(images[rows].float() * (1 - m)).float().softmax(dim=1)
        deleted.append(probs.gather(1, target[rows][:, None])[:, 0])
    if deleted:
        p0 = p_y[image_of]
        out[image_of, slot_of] = (p0 - torch.cat(deleted)) / p0
    return out
