"""One CE-FAM explanation of a batch of images: what, where, which layer, how much
(docs/method.md#what-an-explanation-holds).

For each image: the explained class and its probability; the concepts' scores and probabilities; for each
explained concept (the top-N by score unless given) its relevance at every layer (docs/method.md#layer-relevance),
the selected layer (highest relevance), its region map at that layer upsampled to the image
(docs/method.md#concept-regions) and its contribution to the explained class (docs/method.md#contribution). Every
step is batched: one Jacobian for all concepts, one translator pass for every
deletion step, one pass through the classifier's tail per layer for every masked variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cefam_lightning.methods.cefam.contributions import concept_contributions
from cefam_lightning.methods.cefam.regions import (
    concept_regions,
    layer_slices,
    pool_activations,
    score_jacobian,
    upsample_regions,
)
from cefam_lightning.methods.cefam.relevance import layer_relevance, selectable_layers, top_layer
from cefam_lightning.metrics.functional.maps import minmax_normalize


@dataclass
class BatchExplanation:
    """Explanations of ``B`` images, ``N`` concepts each, over the explained layers ``layers``."""

    layers: list[str]
    selectable: list[str]  # the layers the top-1 choice could pick (see :func:`selectable_layers`)
    logits: Tensor  # (B, num_classes)
    target: Tensor  # (B,) the explained class (the predicted one unless given)
    class_prob: Tensor  # (B,) its softmax probability
    scores: Tensor  # (B, C) concept scores S (pre-softmax/sigmoid)
    concept_probs: Tensor  # (B, C) softmax (CLIP-style) or sigmoid (SigLIP-style) of S
    concepts: Tensor  # (B, N) explained concept indices, by decreasing score when chosen here
    relevance: Tensor  # (B, N, L) layer relevance
    layer_index: Tensor  # (B, N) index into ``layers`` of the selected layer (the most relevant selectable one)
    contributions: Tensor  # (B, N) contribution to the explained class at the selected layer (signed)
    regions: Tensor  # (B, N, H, W) region map at the selected layer, at the image size


@torch.no_grad()
def explain_batch(
    module,
    images: Tensor,
    concepts: Tensor | None = None,
    top_n: int = 8,
    k: int = 20,
    target: Tensor | None = None,
    fill: str = "spatial_mean",
    select_layers: str | Sequence[str] = "auto",
    scorer: Any = None,
    contributions: bool = True,
) -> BatchExplanation:
    """Explain ``images`` (``B x 3 x H x W`` in ``[0, 1]``) with a trained CE-FAM module.

    Args:
        module: a :class:`~cefam_lightning.methods.cefam.module.CEFAMModule` (its classifier, translator and scorer).
        images: the images, on the module's device.
        concepts: ``(B, N)`` or ``(N,)`` concept indices to explain; default the ``top_n`` by score per image.
        top_n: how many concepts when ``concepts`` is not given (at most the number of concepts).
        k: channels deleted (relevance) and masked (contribution) at most, ``K`` of docs/method.md#layer-relevance.
        target: ``(B,)`` class to explain; default the predicted class.
        fill: how a masked channel is filled for contributions (see :func:`concept_contributions`).
        select_layers: the layers a concept's top-1 layer is chosen from (see :func:`selectable_layers`):
            ``"auto"`` (default) leaves out a layer read only through global average pooling, where every
            contribution is 0; ``"all"``; or a list of layer names.
        scorer: another concept set's scorer (its text embeddings) instead of the module's.
        contributions: compute the contributions (``False``: zeros, for uses that draw or score regions only).
    """
    classifier, translator = module.classifier, module.translator
    scorer = module.scorer if scorer is None else scorer
    layers = list(classifier.layers)
    selectable = selectable_layers(classifier, select_layers)
    was_training = translator.training
    translator.eval()
    try:
        out = classifier(images)
        z = pool_activations(out.activations, layers)
        scores = scorer(translator(z)).float()
        b, c = scores.shape
        if concepts is None:
            concepts = scores.topk(min(top_n, c), dim=1).indices
        else:
            concepts = torch.as_tensor(concepts, dtype=torch.long, device=scores.device)
            if concepts.ndim == 1:
                concepts = concepts.expand(b, -1)
            if concepts.numel() and (concepts.min() < 0 or concepts.max() >= c):
                raise ValueError(f"concept indices must lie in [0, {c}), got {concepts.min()}..{concepts.max()}")
        logits = out.logits.float()
        target = logits.argmax(dim=1) if target is None else torch.as_tensor(target, device=logits.device)
        jac = score_jacobian(translator, scorer, z)  # (B, C, D), float32
        slices = layer_slices(out.activations, layers)
        relevance = layer_relevance(z, jac, slices, translator, scorer, concepts, k=k)
        layer_index = top_layer(relevance, layers, selectable)
        if contributions:
            contrib = concept_contributions(
                classifier, out.activations, logits, jac, z, slices, concepts, layer_index, target, k=k, fill=fill
            )
        else:
            contrib = torch.zeros(concepts.shape, device=logits.device)
        # Region maps only for the explained concepts: gather their Jacobian rows first.
        jac_sel = jac.gather(1, concepts[:, :, None].expand(-1, -1, jac.shape[2]))
        per_layer = concept_regions(out.activations, layers, jac_sel)
        regions = images.new_zeros(b, concepts.shape[1], *images.shape[-2:], dtype=torch.float32)
        for li, layer in enumerate(layers):
            chosen = layer_index == li
            if chosen.any():
                up = upsample_regions(per_layer[layer], images.shape[-2:])
                regions = torch.where(chosen[:, :, None, None], up, regions)
    finally:
        translator.train(was_training)
    return BatchExplanation(
        layers=layers,
        selectable=selectable,
        logits=logits,
        target=target,
        class_prob=logits.softmax(dim=1).gather(1, target[:, None])[:, 0],
        scores=scores,
        concept_probs=scorer.probabilities(scores),
        concepts=concepts,
        relevance=relevance,
        layer_index=layer_index,
        contributions=contrib,
        regions=regions,
    )


def fused_class_map(regions: Tensor, contributions: Tensor) -> Tensor:
    """CE-FAM's class map: the explained concepts' regions weighted by their positive contributions.

    ``M = Σ_n max(contribution_n, 0) · R̂_n``, with ``R̂_n`` concept ``n``'s region at its selected layer min-max
    normalized to ``[0, 1]`` (a constant region counts as 0). Concepts that push against the class, or do not move
    it (every concept at a layer right before global average pooling, with the spatial-mean fill), add nothing;
    when no concept contributes positively the map is all zeros. This is the map the faithfulness metrics
    (docs/method.md#faithfulness) score beside L-CAM's and Grad-CAM's.

    Args:
        regions: ``(B, N, H, W)`` region maps (:attr:`BatchExplanation.regions`).
        contributions: ``(B, N)`` their contributions to the explained class (NaN counts as 0).

    Returns:
        ``(B, H, W)`` float32 maps.

    Example:
        >>> regions = torch.tensor([[[[0.0, 2.0]], [[1.0, 3.0]], [[4.0, 0.0]]]])  # 3 concepts of a 1x2 image
        >>> fused_class_map(regions, torch.tensor([[0.5, 0.25, -1.0]]))
        tensor([[[0.0000, 0.7500]]])
    """
    if regions.ndim != 4 or contributions.shape != regions.shape[:2]:
        raise ValueError(
            f"expected regions (B, N, H, W) and contributions (B, N), got {tuple(regions.shape)} and "
            f"{tuple(contributions.shape)}"
        )
    normalized = minmax_normalize(regions.float(), dims=2)
    weights = contributions.float().nan_to_num(0.0).clamp_min(0.0)
    return (weights[:, :, None, None] * normalized).sum(1)


def padded_concepts(present: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, C)`` presence -> ``(B, N)`` indices of the present concepts (padded with 0) and their validity."""
    n = max(int(present.sum(dim=1).max()), 1) if present.numel() else 1
    # Present concepts first (stable), so the first n columns hold them.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    valid = present.gather(1, order)
    return torch.where(valid, order, 0), valid
