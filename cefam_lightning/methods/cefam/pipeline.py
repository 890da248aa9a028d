"""One CE-FAM explanation of a batch of images: what, where, which layer, how much
(docs/method.md#what-an-explanation-holds).

For each image: the explained class and its probability; the concepts' scores and probabilities; for each
explained concept (the top-N by score unless given) its relevance at every layer (docs/method.md#layer-relevance),
the selected layer (highest relevance), its region map at that layer upsampled to the image
(docs/method.md#concept-regions) and its contribution to the explained class (docs/method.md#contribution). Every
step is batched: one Jacobian for all concepts, one translator pass for every
deletion step, one pass through the classifier's tail per layer for every masked variant.

The steps are :class:`ExplanationPass`'s methods, on one classifier pass over the batch: :func:`explain_batch`
composes them for ``explain`` and the callbacks, and the evaluation
(:class:`~cefam_lightning.methods.cefam.evaluation.ExplanationEvaluation`) for its ground-truth comparisons, so
what is scored is what is explained.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cefam_lightning.methods.cefam.contributions import concept_contributions, region_contributions
from cefam_lightning.methods.cefam.regions import (
    GRADIENTS,
    REGION_WEIGHTS,
    concept_regions,
    full_channel_gradients,
    layer_slices,
    pool_activations,
    score_jacobian,
    upsample_regions,
)
from cefam_lightning.methods.cefam.relevance import (
    RELEVANCES,
    layer_relevance,
    map_relevance,
    selectable_layers,
    top_layer,
)
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.models.classifier import Activations


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
    contributions: Tensor  # (B, N) contribution to the explained class (signed), at contribution_layer_index
    regions: Tensor  # (B, N, H, W) region map at the selected layer, at the image size
    # (B, N) index into ``layers`` where contributions were measured; -1: on the image (``contribution_layer: image``)
    contribution_layer_index: Tensor | None = None


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, in its own mode again after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ExplanationPass:
    """CE-FAM's steps on one batch of images, sharing one classifier pass and one Jacobian.

    Built once per batch: it runs the frozen classifier, pools its activations into ``z``
    (docs/method.md#translator) and computes ``dS/dz`` for every concept (docs/method.md#concept-regions); each
    step is then a method on those. The translator is used in eval mode (its BatchNorm's running statistics, no
    dropout) and left in its own mode.

    Args:
        module: a :class:`~cefam_lightning.methods.cefam.module.CEFAMModule`, or anything with its
            ``classifier``, ``translator`` and ``scorer``.
        images: ``(B, 3, H, W)`` in ``[0, 1]``, on the module's device.
        scorer: another concept set's scorer (its text embeddings) instead of the module's.
        select_layers: the layers a concept's top-1 layer is chosen from (see :func:`selectable_layers`):
            ``"auto"``, ``"all"`` or layer names.
        layers: the explained layers, in ``z``'s order (default the classifier's).
        gradient: how a layer's channel weights are taken (docs/method.md#concept-regions): ``"direct"``, the
            derivative through the layer's own pooled ``z^l`` only (one Jacobian ``dS/dz`` for every concept, no
            backward pass through the classifier), or ``"full"``, the total derivative through the rest of the
            classifier as the CE-FAM authors take it (vector-Jacobian products through the classifier, for the
            concepts asked for: :func:`~cefam_lightning.methods.cefam.regions.full_channel_gradients`). Regions,
            layer relevance and contributions all rank and weight channels by the same weights.
        region_weights: ``"signed"`` (the authors': ``ReLU(sum_k beta_k A_k)``) or ``"positive"`` (only channels whose
            weight is positive draw the map: ``ReLU(sum_k max(beta_k, 0) A_k)``); docs/method.md#concept-regions.
            Relevance and contributions rank channels by the signed weights either way.
        relevance: how a concept's layer is chosen (docs/method.md#layer-relevance): ``"paper"``, the deletion
            curve of the concept's probability in the translator's input, or ``"map"``, how well the layer's
            region map keeps the concept's score (:func:`~cefam_lightning.methods.cefam.relevance.map_relevance`).

    Attributes:
        classifier, translator, scorer: the parts used.
        images: the images; size: their ``(H, W)``.
        layers: the explained layers; selectable: those a top-1 layer may be chosen from.
        activations: the classifier's activations; logits: its float32 logits ``(B, num_classes)``.
        z: pooled activations ``(B, D)``; slices: ``{layer: slice of z}``; jacobian: ``dS/dz`` ``(B, C, D)``.
        gradient: ``"direct"`` or ``"full"``.
    """

    @torch.no_grad()
    def __init__(
        self,
        module,
        images: Tensor,
        scorer: Any = None,
        select_layers: str | Sequence[str] = "auto",
        layers: Sequence[str] | None = None,
        gradient: str = "direct",
        region_weights: str = "signed",
        relevance: str = "paper",
    ) -> None:
        for name, value, allowed in (
            ("gradient", gradient, GRADIENTS),
            ("region_weights", region_weights, REGION_WEIGHTS),
            ("relevance", relevance, RELEVANCES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.region_weights, self.relevance_rule = region_weights, relevance
        self.classifier, self.translator = module.classifier, module.translator
        self.scorer = module.scorer if scorer is None else scorer
        self.images = images
        self.size = tuple(images.shape[-2:])
        self.layers = list(self.classifier.layers if layers is None else layers)
        self.selectable = selectable_layers(self.classifier, select_layers)
        self.gradient = gradient
        self._graph: list[Tensor] | None = None
        if gradient == "full":
            # One float32 pass that keeps its graph: every backward product runs through it.
            with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
                out = self.classifier(images.detach().float().requires_grad_(True))
            self._graph = [out.activations[layer] for layer in self.layers]
            out.activations = Activations(
                {k: v.detach() for k, v in out.activations.items()},
                {k: v.detach() for k, v in out.activations.prefix_tokens.items()},
            )
            out.logits = out.logits.detach()
        else:
            out = self.classifier(images)
        self.activations = out.activations
        self.logits = out.logits.float()
        self.z = pool_activations(self.activations, self.layers)
        self.slices = layer_slices(self.activations, self.layers)
        self._scores: Tensor | None = None
        # The channel weights every step ranks and weights channels by: dS/dz on the direct path (one Jacobian for
        # every concept); on the full path the total derivative's channel sums, computed for the concepts asked for
        # (computed: which rows hold them), so no Jacobian is made there.
        if gradient == "direct":
            self.jacobian = score_jacobian(self.translator, self.scorer, self.z)  # (B, C, D), float32
            self._weights = self.jacobian
        else:
            c, d = self.scorer.num_concepts, self.z.shape[1]
            self._weights = torch.zeros(self.batch_size, c, d, device=self.z.device)
        self._computed = torch.full((self._weights.shape[1],), gradient == "direct", device=self._weights.device)

    def weights(self, concepts: Tensor | None = None) -> Tensor:
        """The channel weights ``(B, C, D)`` (see ``gradient``), with at least the rows of ``concepts`` (any shape
        of concept indices; ``None``: all) computed: on the full path, rows are computed on first use."""
        if self.gradient == "direct":
            return self._weights
        wanted = torch.arange(self._weights.shape[1], device=self._weights.device) if concepts is None else concepts
        missing = torch.unique(wanted.flatten())
        missing = missing[~self._computed[missing]]
        if missing.numel():
            with torch.enable_grad(), _eval_mode(self.translator):
                rows = full_channel_gradients(self._graph, self.translator, self.scorer, missing.tolist())
            self._weights[:, missing] = rows.to(self._weights.dtype)
            self._computed[missing] = True
        return self._weights

    @property
    def batch_size(self) -> int:
        return self.z.shape[0]

    @property
    def predicted(self) -> Tensor:
        """``(B,)`` the classifier's predicted class."""
        return self.logits.argmax(dim=1)

    def target(self, target: Tensor | None = None) -> Tensor:
        """``(B,)`` the explained class: ``target`` as a tensor on the logits' device, else the predicted one."""
        return self.predicted if target is None else torch.as_tensor(target, device=self.logits.device)

    def class_probability(self, target: Tensor) -> Tensor:
        """``(B,)`` the softmax probability of each image's ``target`` class."""
        return self.logits.softmax(dim=1).gather(1, target[:, None])[:, 0]

    @torch.no_grad()
    def scores(self) -> Tensor:
        """``(B, C)`` concept scores ``S`` (pre-softmax/sigmoid), float32; computed once."""
        if self._scores is None:
            with _eval_mode(self.translator):
                self._scores = self.scorer(self.translator(self.z)).float()
        return self._scores

    def concept_probabilities(self) -> Tensor:
        """``(B, C)`` softmax (CLIP-style) or sigmoid (SigLIP-style) of the scores."""
        return self.scorer.probabilities(self.scores())

    def top_concepts(self, n: int) -> Tensor:
        """``(B, min(n, C))`` each image's ``n`` highest-scoring concepts, by decreasing score."""
        scores = self.scores()
        return scores.topk(min(n, scores.shape[1]), dim=1).indices

    def explained_concepts(self, concepts: Tensor | Sequence[int] | None = None, top_n: int = 8) -> Tensor:
        """``(B, N)`` concept indices: ``concepts`` (``(B, N)``, or ``(N,)`` for every image) checked against the
        concept count, else the :meth:`top_concepts`."""
        if concepts is None:
            return self.top_concepts(top_n)
        c = self._weights.shape[1]
        concepts = torch.as_tensor(concepts, dtype=torch.long, device=self.logits.device)
        if concepts.ndim == 1:
            concepts = concepts.expand(self.batch_size, -1)
        if concepts.numel() and (concepts.min() < 0 or concepts.max() >= c):
            raise ValueError(f"concept indices must lie in [0, {c}), got {concepts.min()}..{concepts.max()}")
        return concepts

    @torch.no_grad()
    def relevance(
        self,
        concepts: Tensor,
        k: int = 20,
        rows: Tensor | None = None,
        low: dict[str, Tensor] | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Layer relevance (docs/method.md#layer-relevance) of ``(B, N)`` concepts, ``(B, N, L)``, by the pass's
        ``relevance`` rule.

        With ``rows`` (``(R,)`` image indices), ``concepts`` is ``(R, N)``: the concepts of those images only
        (e.g. a few extra concepts of some images), ``(R, N, L)``. For the ``map`` rule, ``low`` passes the
        concepts' :meth:`layer_regions` when the caller has them already, and ``valid`` (``(B, N)`` bool) marks the
        slots worth scoring (padding slots are left at 0 and cost no classifier pass).
        """
        if self.relevance_rule == "map":
            images = self.images if rows is None else self.images[rows]
            low = self.layer_regions(concepts, rows) if low is None else low
            return map_relevance(self._score_images, images, low, concepts, valid=valid)
        weights = self.weights(concepts)
        z, jac = (self.z, weights) if rows is None else (self.z[rows], weights[rows])
        return layer_relevance(z, jac, self.slices, self.translator, self.scorer, concepts, k=k)

    @torch.no_grad()
    def _score_images(self, images: Tensor) -> Tensor:
        """Concept scores ``(n, C)`` of other images (e.g. masked ones) through the same classifier and branch."""
        activations = self.classifier(images).activations
        with _eval_mode(self.translator):
            return self.scorer(self.translator(pool_activations(activations, self.layers)))

    def selected_layers(self, relevance: Tensor) -> Tensor:
        """``(..., L)`` relevance -> ``(...)`` index into :attr:`layers` of the most relevant selectable layer."""
        return top_layer(relevance, self.layers, self.selectable)

    @torch.no_grad()
    def layer_regions(self, concepts: Tensor, rows: Tensor | None = None) -> dict[str, Tensor]:
        """Region maps (docs/method.md#concept-regions) of ``(B, N)`` concepts at every layer, at its own resolution:
        ``{layer: (B, N, h, w)}`` (the weights of just these concepts, by the pass's ``region_weights``). With
        ``rows`` (``(R,)`` image indices), ``concepts`` is ``(R, N)``, the concepts of those images only."""
        weights = self.weights(concepts)
        activations = self.activations
        if rows is not None:
            weights = weights[rows]
            activations = {layer: activations[layer][rows] for layer in self.layers}
        jac = weights.gather(1, concepts[:, :, None].expand(-1, -1, weights.shape[2]))
        if self.region_weights == "positive":
            jac = jac.clamp_min(0)
        return concept_regions(activations, self.layers, jac)

    def upsample(self, maps: Tensor) -> Tensor:
        """``(B, N, h, w)`` maps -> ``(B, N, H, W)`` at the image size (bilinear)."""
        return upsample_regions(maps, self.size)

    def selected_regions(self, low: dict[str, Tensor], layer_index: Tensor, columns: Tensor | None = None) -> Tensor:
        """Each concept's region at its selected layer, at the image size: ``(B, N, H, W)`` float32.

        Args:
            low: ``{layer: (B, M, h, w)}`` maps at every layer (:meth:`layer_regions`).
            layer_index: ``(B, N)`` index into :attr:`layers` of each concept's layer.
            columns: ``(B, N)`` each concept's column in ``low``; default ``low``'s own columns (``M == N``).
        """
        b, n = layer_index.shape
        regions = torch.zeros(b, n, *self.size, dtype=torch.float32, device=self.images.device)
        for li, layer in enumerate(self.layers):
            chosen = layer_index == li
            if chosen.any():
                maps = low[layer]
                if columns is not None:
                    maps = maps.gather(1, columns[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
                regions = torch.where(chosen[:, :, None, None], self.upsample(maps), regions)
        return regions

    def contribution_layers(self, selected: Tensor, rule: str = "selected") -> Tensor:
        """``(B, N)`` index into :attr:`layers` of the layer each concept's contribution is measured at
        (docs/method.md#contribution): ``"selected"``, its own selected layer ``selected`` (the authors'); ``"last"``,
        the last explained layer the logits read, for every concept (the one closest to the logits, where the concepts'
        contributions are on one scale; a layer the head never reads, like a ViT's last patch tokens, is skipped:
        :meth:`~cefam_lightning.models.classifier.FrozenClassifier.unread_layers`); or a layer name, that layer for
        every concept; or ``"image"``, none: the concept's region is deleted from the image (-1 everywhere,
        :meth:`image_contributions`)."""
        if rule == "selected":
            return selected
        if rule == "image":
            return torch.full_like(selected, -1)
        if rule == "last":
            unread = set(self.classifier.unread_layers())
            read = [i for i, layer in enumerate(self.layers) if layer not in unread]
            if not read:
                warnings.warn(
                    f"contribution_layer 'last': the classifier's logits read none of the explained layers "
                    f"{self.layers}, so every contribution is 0; explain an earlier layer too",
                    stacklevel=2,
                )
                read = [len(self.layers) - 1]
            return torch.full_like(selected, read[-1])
        if rule not in self.layers:
            raise ValueError(
                f"contribution_layer must be 'selected', 'last', 'image' or one of {self.layers}, got {rule!r}"
            )
        return torch.full_like(selected, self.layers.index(rule))

    @torch.no_grad()
    def rule_contributions(
        self,
        concepts: Tensor,
        selected: Tensor,
        target: Tensor,
        rule: str = "selected",
        k: int = 20,
        fill: str = "spatial_mean",
        low: dict[str, Tensor] | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Contributions of ``(B, N)`` concepts to the ``(B,)`` ``target`` class by the ``contribution_layer``
        ``rule`` (docs/method.md#contribution), with ``selected`` their selected layers: ``"image"`` deletes each
        concept's region at its selected layer from the image (:meth:`image_contributions`; ``low``: the concepts'
        :meth:`layer_regions` when the caller has them); the other rules mask the concept's channels at the layer
        :meth:`contribution_layers` gives (:meth:`contributions`). ``valid`` (``(B, N)``) marks the slots to compute
        (the others are 0).

        Returns:
            ``(B, N)`` contributions and ``(B, N)`` the index into :attr:`layers` each was measured at (``-1``: on
            the image, or not computed).
        """
        at = self.contribution_layers(selected, rule)
        if rule == "image":
            regions = self.selected_regions(self.layer_regions(concepts) if low is None else low, selected)
            return self.image_contributions(regions, target, valid), at
        if valid is not None:
            at = torch.where(valid, at, -1)  # a slot at no layer is not computed
        return self.contributions(concepts, at, target, k=k, fill=fill), at

    @torch.no_grad()
    def image_contributions(self, regions: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        """Contributions by deleting each of the ``(B, N, H, W)`` regions from the image
        (:func:`~cefam_lightning.methods.cefam.contributions.region_contributions`)."""
        return region_contributions(
            lambda x: self.classifier(x).logits, self.images, regions, self.logits, target, valid=valid
        )

    @torch.no_grad()
    def contributions(
        self, concepts: Tensor, layer_index: Tensor, target: Tensor, k: int = 20, fill: str = "spatial_mean"
    ) -> Tensor:
        """Contributions (docs/method.md#contribution) of ``(B, N)`` concepts to the ``(B,)`` ``target`` class,
        each masked at its ``layer_index`` (``-1``: not computed, 0); ``k`` channels at most, filled by ``fill``
        (see :func:`concept_contributions`)."""
        return concept_contributions(
            self.classifier,
            self.activations,
            self.logits,
            self.weights(concepts),
            self.z,
            self.slices,
            concepts,
            layer_index,
            target,
            k=k,
            fill=fill,
            pooled_only=self.classifier.mean_invariant_layers() if fill == "spatial_mean" else (),
        )


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
    gradient: str = "direct",
    region_weights: str = "signed",
    relevance: str = "paper",
    contribution_layer: str = "selected",
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
        gradient, region_weights, relevance: the pass's rules (see :class:`ExplanationPass`).
        contribution_layer: where contributions are measured (:meth:`ExplanationPass.contribution_layers`).
    """
    with _eval_mode(module.translator):
        p = ExplanationPass(
            module,
            images,
            scorer=scorer,
            select_layers=select_layers,
            gradient=gradient,
            region_weights=region_weights,
            relevance=relevance,
        )
        concepts = p.explained_concepts(concepts, top_n)
        target = p.target(target)
        low = p.layer_regions(concepts)
        relevance = p.relevance(concepts, k=k, low=low)
        layer_index = p.selected_layers(relevance)
        regions = p.selected_regions(low, layer_index)
        if contributions:
            contrib, at = p.rule_contributions(
                concepts, layer_index, target, contribution_layer, k=k, fill=fill, low=low
            )
        else:
            contrib = torch.zeros(concepts.shape, device=p.logits.device)
            at = p.contribution_layers(layer_index, contribution_layer)
    return BatchExplanation(
        layers=p.layers,
        selectable=p.selectable,
        logits=p.logits,
        target=target,
        class_prob=p.class_probability(target),
        scores=p.scores(),
        concept_probs=p.concept_probabilities(),
        concepts=concepts,
        relevance=relevance,
        layer_index=layer_index,
        contributions=contrib,
        regions=regions,
        contribution_layer_index=at,
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
