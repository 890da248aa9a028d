"""Which layer shows concept ``c`` (docs/method.md#layer-relevance), by one of two rules (``RELEVANCES``):

- ``paper`` (the CE-FAM authors'): a deletion curve over each layer's most important channels. Channel importance
  at layer ``l`` is ``beta^c_k * mean_ij A^l_k``. For ``i = 0..K`` the pooled values of the ``i`` most important
  channels are replaced by the layer's mean over channels in the translator's input, and the concept probability
  ``p_{c,i}`` is recomputed. Relevance ``= (1/K) sum_{i=1..K} (p_c - p_{c,i}) / p_c``. Every deletion step of every
  layer and concept goes through the translator as one batch (:func:`layer_relevance`).
- ``map``: how faithfully the layer's region map keeps the concept: the concept's score on the image multiplied by
  the min-max normalized map, minus its score on the image multiplied by the map's complement
  (:func:`map_relevance`). It reads each concept's own score, so concepts do not compete through a softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.models.components import ConceptScorer

SELECT_MODES = ("auto", "all")
RELEVANCES = ("paper", "map")


def selectable_layers(classifier, select: str | Sequence[str] = "auto") -> list[str]:
    """The explained layers a concept's top-1 layer (docs/method.md#layer-relevance) may be chosen from.

    Args:
        classifier: the :class:`~cefam_lightning.models.classifier.FrozenClassifier` (its ``layers``, in ``z``'s order).
        select: ``"auto"``: every layer but those the classifier reads only through global average pooling
            (:meth:`~cefam_lightning.models.classifier.FrozenClassifier.mean_invariant_layers`), where the spatial-mean
            masking of docs/method.md#contribution cannot move the logits, so every concept's contribution would be 0
            (all layers if that leaves none); ``"all"``: every layer; or a list of layer names (regions exist at every
            layer: docs/method.md#concept-regions), a subset of ``classifier.layers``.

    Returns:
        The layer names, in ``classifier.layers`` order.

    Raises:
        ValueError: an unknown mode, a name that is not an explained layer, or an empty list.
    """
    layers = list(classifier.layers)
    if isinstance(select, str):
        if select == "all":
            return layers
        if select != "auto":
            raise ValueError(f"select_layers must be 'auto', 'all' or a list of layer names, got {select!r}")
        invariant = set(classifier.mean_invariant_layers())
        return [layer for layer in layers if layer not in invariant] or layers
    names = [str(x) for x in select]
    unknown = [x for x in names if x not in layers]
    if unknown or not names:
        raise ValueError(
            f"select_layers {names} must be a non-empty subset of the explained layers {layers}"
            + (f" ({', '.join(map(repr, unknown))} is not one)" if unknown else "")
        )
    return [layer for layer in layers if layer in names]


def parse_select_layers(value: str | None) -> str | list[str] | None:
    """``--select-layers`` as given: ``auto``, ``all`` or comma-separated layer names (``None``: the run's)."""
    if value is None or value in ("auto", "all"):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def top_layer(relevance: Tensor, layers: Sequence[str], selectable: Sequence[str]) -> Tensor:
    """``(..., L)`` relevance over ``layers`` -> ``(...)`` index of the most relevant layer among ``selectable``."""
    allowed = torch.tensor([layer in selectable for layer in layers], device=relevance.device)
    return relevance.masked_fill(~allowed, -torch.inf).argmax(dim=-1)


def top_channels(jacobian: Tensor, z: Tensor, sl: slice, concepts: Tensor, k: int) -> Tensor:
    """Indices (within the layer) of each concept's ``k`` most important channels, most important first.

    Args:
        jacobian: ``dS/dz``, ``(B, C, D)``; z: ``(B, D)``; sl: the layer's slice of ``z``;
        concepts: ``(B, N)`` concept indices; k: how many (at most the layer's channels).

    Returns:
        ``(B, N, min(k, K_l))``.
    """
    jac = torch.gather(jacobian[:, :, sl], 1, concepts[:, :, None].expand(-1, -1, sl.stop - sl.start))
    importance = jac * z[:, None, sl]
    return importance.topk(min(k, sl.stop - sl.start), dim=-1).indices


@torch.no_grad()
def layer_relevance(
    z: Tensor,
    jacobian: Tensor,
    slices: Mapping[str, slice],
    translator: nn.Module,
    scorer: ConceptScorer,
    concepts: Tensor,
    k: int = 20,
) -> Tensor:
    """Relevance of each layer for each given concept.

    Args:
        z: pooled activations, ``(B, D)``.
        jacobian: ``dS/dz``, ``(B, C, D)`` (its ``1/(H W)`` scale does not change the channel ranking).
        slices: ``{layer: slice of z}``, in ``z``'s order.
        translator, scorer: the CE-FAM branch (the translator is evaluated in eval mode).
        concepts: ``(B, N)`` concept indices per sample (e.g. the top-N predicted concepts).
        k: channels deleted at most (``min(k, K_l)`` at a layer with fewer channels).

    Returns:
        ``(B, N, L)`` relevance, layers in ``slices`` order.
    """
    b, n = concepts.shape
    d = z.shape[1]
    layers = list(slices)
    n_layers = len(layers)
    variants = z[:, None, None, None, :].expand(b, n, n_layers, k + 1, d).clone()  # (B, N, L, K+1, D)
    steps = torch.arange(k + 1, device=z.device)
    valid = torch.zeros(n_layers, k + 1, dtype=torch.bool, device=z.device)  # steps that delete a new channel
    for li, layer in enumerate(layers):
        sl = slices[layer]
        k_l = min(k, sl.stop - sl.start)
        valid[li, 1 : k_l + 1] = True
        top = top_channels(jacobian, z, sl, concepts, k)  # (B, N, k_l), most important first
        # Step i deletes the first min(i, k_l) channels of the ranking.
        rank_pos = torch.arange(k_l, device=z.device)
        deleted = rank_pos[None, :] < steps[:, None]  # (K+1, k_l)
        mask = torch.zeros(b, n, k + 1, sl.stop - sl.start, dtype=torch.bool, device=z.device)
        mask.scatter_(3, top[:, :, None, :].expand(-1, -1, k + 1, -1), deleted[None, None].expand(b, n, -1, -1))
        layer_mean = z[:, sl].mean(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
        block = variants[:, :, li, :, sl]
        variants[:, :, li, :, sl] = torch.where(mask, layer_mean, block)
    was_training = translator.training
    translator.eval()
    try:
        probs = scorer.probabilities(scorer(translator(variants.reshape(-1, d))))
    finally:
        translator.train(was_training)
    c_idx = concepts[:, :, None, None].expand(b, n, n_layers, k + 1).reshape(-1, 1)
    p = probs.gather(1, c_idx).reshape(b, n, n_layers, k + 1)
    p0 = p[..., :1]
    drop = (p0 - p) / p0.clamp_min(torch.finfo(p.dtype).tiny)
    weights = valid.to(p.dtype)
    return (drop * weights).sum(-1) / weights.sum(-1).clamp_min(1)


@torch.no_grad()
def map_relevance(
    score_images: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Mapping[str, Tensor],
    concepts: Tensor,
    chunk: int = 64,
    valid: Tensor | None = None,
) -> Tensor:
    """Relevance of each layer by its map: ``S_c(x * m) - S_c(x * (1 - m))`` (docs/method.md#layer-relevance).

    ``m`` is the concept's region map at the layer, upsampled to the image (bilinear) and min-max normalized to
    ``[0, 1]`` (a constant map is 0 everywhere). A map on the concept keeps its score when the rest of the image is
    blacked out and removes it when the map's own pixels are; a map covering everything or nothing scores about 0.

    Args:
        score_images: images ``(n, 3, H, W)`` -> concept scores ``(n, C)`` (classifier, pooling, translator,
            scorer).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps: ``{layer: (B, N, h, w)}`` the concepts' region maps at each layer's resolution, in layer order.
        concepts: ``(B, N)`` concept indices.
        chunk: concepts per pass through ``score_images`` (each is two masked images; bounds memory).
        valid: ``(B, N)`` the slots to score (default all); the others stay 0 and cost nothing.

    Returns:
        ``(B, N, L)`` relevance, layers in ``maps`` order.
    """
    b, n = concepts.shape
    size = tuple(images.shape[-2:])
    out = torch.zeros(b, n, len(maps), device=images.device)
    image_of, slot_of = (torch.ones(b, n, dtype=torch.bool, device=images.device) if valid is None else valid).nonzero(
        as_tuple=True
    )
    concept_of = concepts[image_of, slot_of]
    for li, low in enumerate(maps.values()):
        with torch.autocast(device_type=images.device.type, enabled=False):
            up = nn.functional.interpolate(
                low[image_of, slot_of][:, None].float(), size=size, mode="bilinear", align_corners=False
            )
        m = minmax_normalize(up, dims=2)  # (P, 1, H, W)
        diffs = []
        for start in range(0, len(image_of), chunk):
            idx = slice(start, start + chunk)
            x = images[image_of[idx]].float()
            s = score_images(torch.cat([x * m[idx], x * (1 - m[idx])])).float()
            s = s.gather(1, concept_of[idx].repeat(2)[:, None])[:, 0]
            half = s.shape[0] // 2
            diffs.append(s[:half] - s[half:])
        if diffs:
            out[image_of, slot_of, li] = torch.cat(diffs)
    return out
