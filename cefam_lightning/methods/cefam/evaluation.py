"""Evaluate CE-FAM's explanations against ground-truth masks, beside three baselines (issue 3,
docs/method.md#ce-fam-evaluation).

For every (image, present concept) pair, region maps from:

- ``cefam``: the concept's region at each explained layer, and at its top-1 layer (highest relevance,
  docs/method.md#layer-relevance, among the selectable layers: see
  :func:`~cefam_lightning.methods.cefam.relevance.selectable_layers`);
- ``gradcam``: Grad-CAM of the predicted class at the same layer (at CE-FAM's selected layer for ``top1``);
- ``single_channel``: the concept's best-tracking channel at that layer (at its own best selectable layer for
  ``top1``);
- ``random``: uniform noise (layer-independent, reported once under ``top1``);

scored with EPG, NRA and hit rate per concept type and macro-averaged over types. Also the contribution
accuracy (docs/method.md#contribution-accuracy): on correctly classified images that show at least one concept
outside the key object, how often the top contributor among the present concepts is one of the key object's concepts
(``contribution/top1_key``), and how often all of the key object's concepts rank above every other present
concept (``contribution/all_key_first``). These are reported by the contribution rule with each concept at its
top-1 layer (docs/method.md#contribution); with each concept at its best layer by the mask (``best_layer``: an
upper bound that reads the masks, like the regions' one); and, for comparison, with every concept masked at one
and the same layer.

Optionally (``faithfulness_top_n``) the faithfulness of a CE-FAM class map (docs/method.md#faithfulness): for the
predicted class, the top-N concepts by score (what ``explain`` reports), each region at its selected layer, min-max
normalized and weighted by the concept's positive contribution
(:func:`~cefam_lightning.methods.cefam.pipeline.fused_class_map`),
beside
Grad-CAM at the layer that carries most of that weight, scored with Average Drop and Increase in Confidence at
100/50/15 % of the pixels kept. The top-N concepts share the present concepts' relevance and contribution
passes (one padded batch of concepts), so only the predicted concepts that are not present cost extra.

All states are torchmetrics sums, so the numbers are the same whatever the batching.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from cefam_lightning.data.mask_datasets import MaskBatch, MaskConcept, MaskDataset, MaskDatasetError, collate_masks
from cefam_lightning.data.shapes_world import key_object_concepts
from cefam_lightning.distributed import sum_over_ranks
from cefam_lightning.errors import one_line
from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.baselines import SingleChannelBaseline, image_random_maps
from cefam_lightning.methods.cam_baselines import get_baseline
from cefam_lightning.methods.cefam.concept_sets import resolve_concepts
from cefam_lightning.methods.cefam.pipeline import ExplanationPass, fused_class_map, padded_concepts
from cefam_lightning.methods.cefam.rules import PER_CONCEPT_CONTRIBUTIONS, describe_rules, resolve_rules, rule_settings
from cefam_lightning.methods.cefam.zero_shot import ZeroShotSplit, holdout_of, zero_shot_lines
from cefam_lightning.methods.class_map import CURVE_COLUMNS
from cefam_lightning.metrics import ROAD, DeletionInsertion, Faithfulness, RegionMetrics
from cefam_lightning.metrics.functional.faithfulness import DEFAULT_KEEPS, faithfulness_probabilities, setting_name
from cefam_lightning.metrics.functional.perturbation import (
    deletion_insertion_curves,
    road_available,
    road_probabilities,
)
from cefam_lightning.metrics.functional.region import nra
from cefam_lightning.reporting.evaluations import EvaluateError
from cefam_lightning.reporting.explanations import ExplainError
from cefam_lightning.reporting.tables import markdown_table

METHOD_TITLES = {
    "cefam": "CE-FAM",
    "gradcam": "Grad-CAM (class)",
    "single_channel": "single channel",
    "random": "random map",
}
FAITHFULNESS_TITLES = {"cefam": "CE-FAM class map", "gradcam": "Grad-CAM at that layer"}
DEFAULT_BASELINES = ("gradcam",)


def method_title(method: str) -> str:
    """A compared method's row title: CE-FAM, a baseline's (``Grad-CAM (class)``), single channel, random map."""
    return METHOD_TITLES.get(method) or f"{get_baseline(method).title} (class)"


def faithfulness_title(method: str) -> str:
    return FAITHFULNESS_TITLES.get(method) or f"{get_baseline(method).title} at that layer"


_MAX_NOTED = 20  # skipped concepts named at most in a note


class ContributionAccuracy(Metric):
    """Counts behind the contribution accuracy; see the module docstring."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("top1_key", "all_key_first", "correct", "trivial"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, contributions: Tensor, valid: Tensor, key: Tensor, correct: Tensor) -> None:
        """``(B, N)`` contributions of the present concepts (``valid`` marks real slots, ``key`` the key object's
        concepts), ``correct``: ``(B,)`` whether the classifier was right."""
        self.correct += correct.sum()
        other = valid & ~key
        usable = correct & other.any(dim=1) & (valid & key).any(dim=1)
        self.trivial += (correct & ~other.any(dim=1)).sum()
        if not usable.any():
            return
        # Strict comparisons: a tie between a key-object concept and another one (e.g. all contributions 0 at a
        # layer right before global pooling) is not a hit.
        highest_key = torch.where(valid & key, contributions, -math.inf).amax(dim=1)
        lowest_key = torch.where(valid & key, contributions, math.inf).amin(dim=1)
        highest_other = torch.where(other, contributions, -math.inf).amax(dim=1)
        self.top1_key += (highest_key > highest_other)[usable].sum()
        self.all_key_first += (lowest_key > highest_other)[usable].sum()

    def compute(self) -> dict[str, Tensor]:
        usable = (self.correct - self.trivial).double()
        return {
            "top1_key": self.top1_key / usable,
            "all_key_first": self.all_key_first / usable,
            "images_scored": usable.long(),
            "images_correct": self.correct,
            "images_without_other_concepts": self.trivial,
        }


def _padded_pairs(image_index: Tensor, concept_ids: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse (image, concept) pairs -> ``(B, N)`` concept indices (padded with 0), their validity, and the order
    of the pairs that lists them as ``valid.nonzero()`` does (image by image, in the given order within one)."""
    order = torch.sort(image_index, stable=True).indices
    image = image_index[order]
    counts = torch.bincount(image, minlength=batch_size)
    position = torch.arange(len(image), device=image.device) - (counts.cumsum(0) - counts)[image]
    n = max(int(counts.max()), 1) if len(image) else 1
    concepts = torch.zeros(batch_size, n, dtype=torch.long, device=image.device)
    valid = torch.zeros(batch_size, n, dtype=torch.bool, device=image.device)
    concepts[image, position] = concept_ids[order]
    valid[image, position] = True
    return concepts, valid, order


def _with_concepts(concepts: Tensor, valid: Tensor, wanted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Append to the ``(B, N)`` padded concepts the ``wanted`` ``(B, T)`` ones they lack.

    Returns:
        ``(union, union_valid, slot)``: ``(B, N + E)`` concept indices (the first ``N`` columns unchanged, then each
        image's missing wanted concepts, padded with concept 0), their validity, and ``(B, T)`` the column of each
        wanted concept in ``union``.
    """
    match = (wanted[:, :, None] == concepts[:, None, :]) & valid[:, None, :]  # (B, T, N)
    found = match.any(dim=2)
    missing = ~found
    position = missing.long().cumsum(dim=1) - 1  # each missing concept's column among the extras
    e = int(missing.sum(dim=1).max()) if missing.numel() else 0
    extra = torch.zeros(len(wanted), e, dtype=concepts.dtype, device=concepts.device)
    extra_valid = torch.zeros(len(wanted), e, dtype=torch.bool, device=concepts.device)
    rows, cols = missing.nonzero(as_tuple=True)
    extra[rows, position[rows, cols]] = wanted[rows, cols]
    extra_valid[rows, position[rows, cols]] = True
    slot = torch.where(found, match.to(torch.uint8).argmax(dim=2), concepts.shape[1] + position.clamp_min(0))
    return torch.cat([concepts, extra], dim=1), torch.cat([valid, extra_valid], dim=1), slot


class ExplanationEvaluation(nn.Module):
    """Accumulate region metrics (CE-FAM and baselines) and contribution accuracy over batches.

    Args:
        layers: the classifier's explained layers.
        concept_types: type of each concept, in concept order.
        single_channel: the fitted single-channel baseline (``None`` leaves it out).
        rules: the explanation rules (:mod:`~cefam_lightning.methods.cefam.rules`: ``k``, ``fill``,
            ``select_layers``, ``gradient``, ``region_weights``, ``relevance``, ``contribution_layer``); a rule left
            out is the legacy one. ``select_layers`` is resolved against the classifier at the first batch.
        seed: seed of the random maps (each image's from this seed and its index in the split:
            :func:`~cefam_lightning.methods.baselines.image_random_maps`).
        sync_on_compute: sum the states over DDP ranks in :meth:`compute` (every rank must then call it);
            ``False`` when one process evaluates the whole split. When the ranks split a split, each sets
            :attr:`images_seen` to the index of its first image first, so every image gets its own random maps.
        per_layer_contributions: also score contributions with every concept masked at each single layer
            (a diagnostic; it runs the masked variants through every layer's tail, several times the cost).
        contributions: score the contribution accuracy at all; ``False`` for data without a key object (the
            results then have an empty ``contribution``).
        faithfulness_top_n: score the faithfulness of CE-FAM's class map built from the top this many concepts
            (and of Grad-CAM at its main layer); ``None`` leaves it out.
        keeps: kept pixel fractions of the faithfulness metrics.
        baselines: the class-map baselines compared (:mod:`~cefam_lightning.methods.cam_baselines`), each at every
            layer like Grad-CAM, the default.
        curves: also the deletion / insertion AUC and ROAD of the class maps of the faithfulness comparison.

    Besides each layer and the top-1 layer, every map method is scored at its **best layer by the mask**
    (``best_layer``: per pair, the layer whose map has the highest NRA against the pair's own mask, among all
    explained layers): the CE-FAM authors' "Top-4" setting. It reads the ground truth, so it is an upper bound
    on any layer choice, not an explanation.
    """

    def __init__(
        self,
        layers: Sequence[str],
        concept_types: Sequence[str],
        single_channel: SingleChannelBaseline | None = None,
        rules: Mapping[str, Any] | None = None,
        seed: int = 0,
        sync_on_compute: bool = True,
        per_layer_contributions: bool = False,
        contributions: bool = True,
        faithfulness_top_n: int | None = None,
        keeps: Sequence[float] = DEFAULT_KEEPS,
        baselines: Sequence[str] = DEFAULT_BASELINES,
        curves: bool = False,
    ):
        super().__init__()
        self.baselines = list(baselines)
        self.rules = resolve_rules({}, rules, layers=list(layers))
        k, fill, select_layers = self.rules["k"], self.rules["fill"], self.rules["select_layers"]
        if faithfulness_top_n is not None and faithfulness_top_n < 1:
            raise ValueError(f"faithfulness_top_n must be >= 1 or None, got {faithfulness_top_n}")
        self.layers = list(layers)
        self.select_layers = select_layers if isinstance(select_layers, str) else list(select_layers)
        self.selectable: list[str] | None = None  # resolved against the classifier at the first batch
        self.settings = [*self.layers, "top1", "best_layer"]
        self.single_channel, self.k, self.fill = single_channel, k, fill
        self.methods = ["cefam", *self.baselines, *(["single_channel"] if single_channel is not None else []), "random"]
        self.region = nn.ModuleDict(
            {
                f"{m}/{s}": RegionMetrics(concept_types, sync_on_compute=sync_on_compute)
                for m in self.methods
                for s in self.settings
                if m != "random" or s == "top1"
            }
        )
        # Contributions at CE-FAM's top-1 layer (docs/method.md#contribution); with each concept's region at the
        # layer whose map fits its mask best (an upper bound, like the regions' best_layer); and, for comparison,
        # with every concept at one layer.
        contribution_settings = (
            ([*self.layers, "top1", "best_layer"] if per_layer_contributions else ["top1", "best_layer"])
            if contributions
            else []
        )
        self.contribution = nn.ModuleDict(
            {s: ContributionAccuracy(sync_on_compute=sync_on_compute) for s in contribution_settings}
        )
        self.register_buffer("selected", torch.zeros(len(self.layers), dtype=torch.long), persistent=False)
        self.faithfulness_top_n, self.keeps = faithfulness_top_n, list(keeps)
        compared = ["cefam", *self.baselines] if faithfulness_top_n is not None else []
        self.faithfulness = nn.ModuleDict(
            {m: Faithfulness(self.keeps, sync_on_compute=sync_on_compute) for m in compared}
        )
        self.curves = nn.ModuleDict(
            {m: DeletionInsertion(sync_on_compute=sync_on_compute) for m in compared} if curves else {}
        )
        self.road = nn.ModuleDict(
            {m: ROAD(sync_on_compute=sync_on_compute) for m in compared} if curves and road_available() else {}
        )
        self.seed = seed
        # Per image: the layer Grad-CAM is scored at, and whether any top concept contributed positively.
        self.register_buffer("class_map_layer", torch.zeros(len(self.layers), dtype=torch.long), persistent=False)
        self.register_buffer("class_map_empty", torch.zeros((), dtype=torch.long), persistent=False)
        self.seed, self.sync_on_compute = seed, sync_on_compute
        self.images_seen = 0  # index in the split of the next batch's first image

    @torch.no_grad()
    def update(self, module, images: Tensor, masks: Tensor, labels: Tensor, key: Tensor | None = None) -> Tensor:
        """Score one batch.

        Args:
            module: a trained :class:`~cefam_lightning.methods.cefam.module.CEFAMModule`.
            images: ``(B, 3, H, W)`` in ``[0, 1]``; masks: ``(B, C, H, W)`` concept masks; labels: ``(B,)``.
            key: ``(B, C)`` the key object's concepts; ``None`` skips the contribution accuracy.

        Returns:
            The batch's concept scores ``(B, C)``, from the same pass (no second classifier run for a caller that
            needs them too).
        """
        masks = masks.bool()
        concepts, valid = padded_concepts(masks.flatten(2).any(dim=2))  # (B, N)
        rows = valid.nonzero(as_tuple=True)
        return self._update(module, images, concepts, valid, masks[rows[0], concepts[rows]], labels, key)

    @torch.no_grad()
    def update_pairs(self, module, images: Tensor, image_index: Tensor, concept_ids: Tensor, masks: Tensor) -> None:
        """Score one batch given sparse masks: one row per (image, concept) pair (no contribution accuracy).

        Args:
            module: a trained CE-FAM module, or anything with its ``classifier``, ``translator`` and ``scorer``.
            images: ``(B, 3, H, W)`` in ``[0, 1]``.
            image_index: ``(P,)`` the image of each pair; concept_ids: ``(P,)`` its concept (scorer index);
            masks: ``(P, H, W)`` its mask. An (image, concept) pair may occur once.
        """
        if len(concept_ids) == 0:
            return
        if len(torch.unique(image_index * (int(concept_ids.max()) + 1) + concept_ids)) != len(concept_ids):
            raise ValueError("update_pairs: an (image, concept) pair occurs more than once in the batch")
        concepts, valid, order = _padded_pairs(image_index, concept_ids, len(images))
        self._update(module, images, concepts, valid, masks.bool()[order], None, None)

    def _update(
        self,
        module,
        images: Tensor,
        concepts: Tensor,
        valid: Tensor,
        pair_masks: Tensor,
        labels: Tensor | None,
        key: Tensor | None,
    ) -> Tensor:
        """Score the ``(B, N)`` padded concepts (``valid`` marks real ones) whose masks, in ``valid.nonzero()``
        order, are ``pair_masks`` ``(P, H, W)``. Returns the batch's concept scores ``(B, C)`` (the pass's own)."""
        # The one CE-FAM pass explain_batch composes too: the same relevance, layers, regions and contributions.
        p = ExplanationPass(
            module,
            images,
            select_layers=self.selectable or self.select_layers,
            layers=self.layers,
            gradient=self.rules["gradient"],
            region_weights=self.rules["region_weights"],
            relevance=self.rules["relevance"],
        )
        self.selectable = p.selectable  # resolved against the classifier at the first batch
        pred = p.predicted
        rows = valid.nonzero(as_tuple=True)
        ids = concepts[rows]
        n = concepts.shape[1]
        faithfulness = bool(self.faithfulness)
        union, union_valid, slot = concepts, valid, None
        if faithfulness:
            # The class map's top-N predicted concepts join the present ones; only those not present cost extra
            # (their relevance as sparse pairs, their contributions in the same pass as the present ones').
            wanted = p.top_concepts(self.faithfulness_top_n)  # (B, T)
            union, union_valid, slot = _with_concepts(concepts, valid, wanted)
        union_low = p.layer_regions(union)  # {layer: (B, N + E, h, w)}, computed once for every step below
        cefam_low = {layer: maps[:, :n] for layer, maps in union_low.items()}  # the present concepts
        top = p.selected_layers(p.relevance(concepts, k=self.k, low=cefam_low, valid=valid))  # (B, N)
        self.selected += torch.bincount(top[rows], minlength=len(self.layers)).to(self.selected.device)
        union_top = top
        if faithfulness:
            extra = union_valid[:, n:].nonzero(as_tuple=True)
            union_top = torch.cat([top, torch.zeros_like(union[:, n:])], dim=1)
            if len(extra[0]):
                pi, ids_extra = extra[0], union[:, n:][extra]
                extra_low = {layer: maps[pi, n + extra[1]][:, None] for layer, maps in union_low.items()}
                rel = p.relevance(ids_extra[:, None], k=self.k, rows=pi, low=extra_low)
                union_top[pi, n + extra[1]] = p.selected_layers(rel[:, 0])
        output = SimpleNamespace(logits=p.logits, activations=p.activations)
        baseline_low = {  # {baseline: {layer: (B, h, w)}}
            name: get_baseline(name)(p.classifier, p.images, output, pred, self.layers) for name in self.baselines
        }

        # Per method, the pair maps at every layer, stacked: (L, P, H, W).
        per_layer = {
            "cefam": torch.stack([p.upsample(cefam_low[layer])[rows] for layer in self.layers]),
            **{
                name: torch.stack([p.upsample(low[layer][:, None].float())[:, 0][rows[0]] for layer in self.layers])
                for name, low in baseline_low.items()
            },
        }
        # The top-1 layer: CE-FAM's selection for CE-FAM and the class-map baselines, the single channel's own best.
        top_layer_of = {"cefam": top[rows], **{name: top[rows] for name in baseline_low}}
        if self.single_channel is not None:
            sc = self.single_channel
            per_layer["single_channel"] = torch.stack(
                [p.upsample(sc.maps(p.activations, concepts, layer))[rows] for layer in self.layers]
            )
            top_layer_of["single_channel"] = sc.best_layer_among(self.selectable).to(ids.device)[ids]
        pair = torch.arange(len(ids), device=ids.device)
        best_of: dict[str, Tensor] = {}
        for method, maps in per_layer.items():
            for li, layer in enumerate(self.layers):
                self.region[f"{method}/{layer}"].update(maps[li], pair_masks, ids)
            self.region[f"{method}/top1"].update(maps[top_layer_of[method], pair], pair_masks, ids)
            # The authors' "Top-4": each pair at the layer whose map fits its mask best (an upper bound).
            fit = torch.stack([nra(maps[li], pair_masks) for li in range(len(self.layers))]).nan_to_num(-1.0)
            best_of[method] = fit.argmax(dim=0)
            self.region[f"{method}/best_layer"].update(maps[best_of[method], pair], pair_masks, ids)
        noise = image_random_maps(rows[0] + self.images_seen, pair_masks.shape[1:], self.seed, images.device)
        self.region["random/top1"].update(noise, pair_masks, ids)
        self.images_seen += len(images)

        def contributions_at(at: Tensor, which: Tensor, which_valid: Tensor) -> Tensor:
            at = torch.where(which_valid, at, -1)  # padding slots select no layer: not computed (0)
            return p.contributions(which, at, pred, k=self.k, fill=self.fill)

        scored = key is not None and bool(self.contribution)
        union_contributions = None
        if faithfulness or (scored and "top1" in self.contribution):
            # Each concept at the layer the contribution rule gives (its selected layer, by the authors' rule).
            union_contributions, _ = p.rule_contributions(
                union,
                union_top,
                pred,
                self.rules["contribution_layer"],
                k=self.k,
                fill=self.fill,
                low=union_low,
                valid=union_valid,
            )
        if scored:
            key_present = key.bool().gather(1, concepts) & valid
            correct = pred == labels
            for setting in self.contribution:
                if setting == "top1":
                    contributions = union_contributions[:, :n]
                elif setting == "best_layer":
                    # The contribution rule with each concept at its best layer by the mask (reads the masks). Only
                    # the concepts whose best layer is not their selected one are measured again: each concept's
                    # contribution is its own, and a rule that measures every concept at one layer whatever its
                    # selected one gives the top-1's for all.
                    rule = self.rules["contribution_layer"]
                    contributions = union_contributions[:, :n].clone()
                    best = top.clone()
                    best[rows] = best_of["cefam"]
                    moved = valid & (best != top)
                    if rule in PER_CONCEPT_CONTRIBUTIONS and moved.any():
                        again, _ = p.rule_contributions(
                            concepts, best, pred, rule, k=self.k, fill=self.fill, low=cefam_low, valid=moved
                        )
                        contributions[moved] = again[moved]
                else:
                    contributions = contributions_at(torch.full_like(top, self.layers.index(setting)), concepts, valid)
                self.contribution[setting].update(contributions, valid, key_present, correct)
        if faithfulness:
            self._update_faithfulness(
                p, union_low, baseline_low, union_top.gather(1, slot), union_contributions.gather(1, slot), slot
            )
        return p.scores()

    def _update_faithfulness(
        self,
        p: ExplanationPass,
        union_low: dict[str, Tensor],
        baseline_low: dict[str, dict[str, Tensor]],
        chosen: Tensor,
        contributions: Tensor,
        slot: Tensor,
    ) -> None:
        """AD / IC of CE-FAM's class map of the top-N concepts (``slot``: their columns in ``union_low``, ``chosen``
        their selected layers, ``contributions`` theirs) and of Grad-CAM at the layer carrying most of its weight."""
        b = slot.shape[0]
        pred = p.predicted
        class_map = fused_class_map(p.selected_regions(union_low, chosen, columns=slot), contributions)
        weight = contributions.float().nan_to_num(0.0).clamp_min(0.0)
        per_layer = weight.new_zeros(b, len(self.layers)).scatter_add_(1, chosen, weight)
        empty = per_layer.sum(dim=1) <= 0
        # Grad-CAM's layer: the one carrying most of the class map's weight (the top concept's when it is empty).
        main = torch.where(empty, chosen[:, 0], per_layer.argmax(dim=1))
        maps_of = {"cefam": class_map}
        for name, low in baseline_low.items():
            at_main = p.selected_regions({layer: maps[:, None].float() for layer, maps in low.items()}, main[:, None])
            maps_of[name] = at_main[:, 0]
        self.class_map_layer += torch.bincount(main, minlength=len(self.layers)).to(self.class_map_layer.device)
        self.class_map_empty += empty.sum().to(self.class_map_empty.device)
        for method, maps in maps_of.items():
            y, o = faithfulness_probabilities(p.classifier, p.images, maps, pred, self.keeps, logits=p.logits)
            self.faithfulness[method].update(y, o)
            if method in self.curves:
                self.curves[method].update(*deletion_insertion_curves(p.classifier, p.images, maps, pred))
            if method in self.road:
                index = torch.arange(b) + self.images_seen - b  # the batch's images (images_seen counts them already)
                self.road[method].update(
                    *road_probabilities(p.classifier, p.images, maps, pred, seed=self.seed, image_index=index)
                )

    def compute(self) -> dict[str, Any]:
        """Plain-number results: ``regions[method][setting]`` (metric dicts), ``contribution``, ``layer_selection``."""
        selected, class_map_layer, class_map_empty = (
            t.clone() for t in (self.selected, self.class_map_layer, self.class_map_empty)
        )
        if self.sync_on_compute and torch.distributed.is_available() and torch.distributed.is_initialized():
            # plain counts: summed over the ranks here
            world = torch.distributed.get_world_size()
            selected, class_map_layer, class_map_empty = (
                sum_over_ranks(t, world) for t in (selected, class_map_layer, class_map_empty)
            )
        regions: dict[str, dict[str, dict[str, float]]] = {}
        for name, metric in self.region.items():
            method, setting = name.split("/")
            regions.setdefault(method, {})[setting] = {k: float(v) for k, v in metric.compute().items()}
        total = max(int(selected.sum()), 1)
        return {
            "regions": regions,
            "contribution": {
                setting: {k: float(v) for k, v in metric.compute().items()}
                for setting, metric in self.contribution.items()
            },
            "layer_selection": {layer: int(n) / total for layer, n in zip(self.layers, selected, strict=True)},
            "settings": {
                **self.rules,
                "select_layers": self.selectable or [],
                "rules": describe_rules({**self.rules, "select_layers": self.selectable or []}),
            },
            **(
                {"faithfulness": self._faithfulness_results(class_map_layer, class_map_empty)}
                if self.faithfulness
                else {}
            ),
        }

    def _faithfulness_results(self, class_map_layer: Tensor, class_map_empty: Tensor) -> dict[str, Any]:
        methods = {
            m: {k: float(v) for k, v in metric.compute().items()}
            | {k: float(v) for k, v in (self.curves[m].compute() if m in self.curves else {}).items() if "/" not in k}
            | {k: float(v) for k, v in (self.road[m].compute() if m in self.road else {}).items()}
            for m, metric in self.faithfulness.items()
        }
        images = int(class_map_layer.sum())  # one Grad-CAM layer per image
        return {
            "top_n": self.faithfulness_top_n,
            "keeps": self.keeps,
            "images": images,
            "methods": methods,
            # Share of images whose Grad-CAM was taken at each layer (CE-FAM's main layer).
            "gradcam_layer": {
                layer: int(c) / max(images, 1) for layer, c in zip(self.layers, class_map_layer, strict=True)
            },
            # Images none of whose top concepts contributed positively: their class map is all zeros.
            "images_without_positive_contribution": int(class_map_empty),
        }


@torch.no_grad()
def evaluate_on_world(
    module,
    world: Any,
    split: str = "test",
    settings: EvaluationSettings | None = None,
    *,
    faithfulness_top_n: int | None = 8,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate ``module`` (a trained CEFAMModule) on a shapes-world split; returns the results dict.

    The single-channel baseline is fitted on the world's training split first. This process evaluates the
    whole split by itself (under DDP, call it on one rank), so the metrics do not sync across ranks, unless
    ``settings`` gives it a part (``rank``, ``world_size`` of a process group that every rank calls this in): then it
    scores its own range of images and the metrics are summed over the ranks, so every rank returns the numbers
    one process would.

    Args:
        module: the CE-FAM module (on its device), trained on ``world``'s concepts.
        world: the shapes world.
        split: ``train``, ``val`` or ``test``.
        settings: ``k``, ``fill``, ``select_layers`` (``None``: the checkpoint's), ``per_layer_contributions``,
            ``batch_size``, ``max_images``, ``seed`` (of the random maps).
        faithfulness_top_n: the class map whose Average Drop / Increase in Confidence is scored fuses this many
            top concepts (``explain``'s default 8); ``None`` leaves the faithfulness out.
        **overrides: fields of ``settings`` to replace (``k=5``, ``max_images=16``, ...).
    """
    settings = replace(settings or EvaluationSettings(), **overrides)
    rules = _explain_rules(module, settings)
    names = [c.name for c in world.concepts]
    if list(module.hparams.concept_names) != names:
        raise EvaluateError(
            f"the checkpoint's concepts {list(module.hparams.concept_names)} are not the world's concepts {names}"
        )
    device = module.device
    module.eval()
    t0 = time.time()
    train = world.split("train")
    baseline = SingleChannelBaseline.fit(
        module.classifier,
        ((x, m.flatten(2).any(dim=2)) for x, m, _ in train.batches(settings.batch_size, None, device)),
    )
    evaluation = ExplanationEvaluation(
        module.classifier.layers,
        [c.type for c in world.concepts],
        baseline,
        rules=rules,
        seed=settings.seed,
        sync_on_compute=settings.world_size > 1,
        per_layer_contributions=settings.per_layer_contributions,
        faithfulness_top_n=faithfulness_top_n,
        baselines=settings.baselines or DEFAULT_BASELINES,
        curves=settings.curves,
    ).to(device)
    zero_shot = _zero_shot_split(module, evaluation, device)  # None unless the checkpoint held concepts out
    data = world.split(split)
    n = len(data) if settings.max_images is None else min(settings.max_images, len(data))
    mine = settings.part(n)
    evaluation.images_seen = mine.start
    for images, masks, labels in data.batches(settings.batch_size, n, device, images=mine):
        scores = evaluation.update(module, images, masks, labels, key_object_concepts(world.spec, masks, labels))
        if zero_shot is not None:
            zero_shot.update(scores, masks.flatten(2).any(dim=2))
    results = evaluation.compute()
    if zero_shot is not None:
        results["zero_shot"] = zero_shot.compute()
    results["split"] = split
    results["images"] = len(data) if settings.max_images is None else min(settings.max_images, len(data))
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _zero_shot_split(module, evaluation: ExplanationEvaluation, device):
    """Seen vs unseen concepts (docs/method.md#zero-shot-concepts) for a checkpoint trained with a holdout, tapping
    ``evaluation``'s top-1 region metrics; ``None`` for one without."""
    holdout = holdout_of(module)
    if not holdout:
        return None
    hp = module.hparams
    split = ZeroShotSplit(
        hp.concept_names,
        hp.concept_types,
        holdout,
        hp.get("auroc_thresholds"),
        sync_on_compute=evaluation.sync_on_compute,
    ).to(device)
    split.attach(evaluation)
    return split


def _explain_rules(module, settings: EvaluationSettings) -> dict[str, Any]:
    """The rules in effect (:meth:`CEFAMModule.explain_rules`: the evaluation's, its preset's, else the
    checkpoint's), with ``select_layers`` resolved against the classifier; checked."""
    try:
        rules = module.explain_rules(settings.preset, **rule_settings(settings))
        rules["select_layers"] = module.selectable(rules["select_layers"])
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    return rules


def resolve_dataset_concepts(module, concepts: list[MaskConcept], store=None):
    """Which of a dataset's concepts can be evaluated, with which text embeddings.

    A concept the checkpoint knows by name uses its text embedding, one the embedding store (already opened and
    checked, see :func:`~cefam_lightning.methods.cefam.concept_sets.open_store`) holds uses the store's; the
    dataset's type is kept.

    Returns:
        ``(concept_set, mapping, skipped)``: the concept set to score, a ``(len(concepts),)`` tensor mapping each
        dataset concept to its index in that set (``-1``: skipped), and the skipped concepts' names.
    """
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


def _mask_batches(
    dataset: MaskDataset, limit: int | None, batch_size: int, num_workers: int, images: range | None = None
):
    """The first ``limit`` images of ``dataset`` in batches, or of those the ``images`` range only (a part)."""
    from torch.utils.data import DataLoader, Subset

    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = range(n) if images is None else range(max(images.start, 0), min(images.stop, n))
    loader = DataLoader(
        Subset(dataset, items), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_masks
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
    settings: EvaluationSettings | None = None,
    store=None,
    fit_dataset: MaskDataset | None = None,
    max_fit_images: int | None = None,
    num_workers: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate ``module`` (a trained CEFAMModule) on a mask dataset; returns the results dict.

    Args:
        module: the CE-FAM module (on its device).
        dataset: the evaluation split, opened with the classifier's input geometry (``classifier.input_spec``).
        settings: ``k`` (channels deleted at most for layer relevance), ``fill`` (recorded; no contributions
            here), ``select_layers``, ``batch_size``, ``max_images``, ``seed`` (of the random maps); ``None``: the
            checkpoint's.
        store: an opened embedding store holding text embeddings of concepts the checkpoint lacks.
        fit_dataset: the split to fit the single-channel baseline on; ``None`` leaves that baseline out.
        max_fit_images: fit the baseline on the first N images only.
        num_workers: DataLoader workers.
        **overrides: fields of ``settings`` to replace (``k=5``, ``batch_size=8``, ...).
    """
    from cefam_lightning.models.components import ConceptScorer

    settings = replace(settings or EvaluationSettings(batch_size=16), **overrides)
    rules = _explain_rules(module, settings)
    batch_size, max_images, seed = settings.batch_size, settings.max_images, settings.seed
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
        rules=rules,
        seed=seed,
        sync_on_compute=settings.world_size > 1,
        contributions=False,
        baselines=settings.baselines or DEFAULT_BASELINES,
    ).to(device)
    skipped_pairs = torch.zeros(len(dataset.concepts), dtype=torch.long)
    n_images = 0
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    mine = settings.part(n)
    evaluation.images_seen = mine.start
    for batch in _mask_batches(dataset, max_images, batch_size, num_workers, images=mine):
        image_index, concepts, masks, keep = _mapped_pairs(batch, mapping)
        skipped_pairs += torch.bincount(batch.concepts[~keep], minlength=len(dataset.concepts))
        evaluation.update_pairs(
            parts, batch.images.to(device), image_index.to(device), concepts.to(device), masks.to(device)
        )
        n_images += len(batch.ids)
    results = evaluation.compute()
    # the counts of every rank's part
    counts = sum_over_ranks(torch.cat([skipped_pairs, torch.tensor([n_images])]).to(device), settings.world_size)
    skipped_pairs, n_images = counts[:-1].cpu(), int(counts[-1])
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


def _title(setting: str) -> str:
    return {"top1": "top-1 layer", "best_layer": "best layer by mask (upper bound)"}.get(setting, setting)


def _faithfulness_lines(faith: dict[str, Any]) -> list[str]:
    names = [setting_name(k) for k in faith["keeps"]]
    curves = [c for c in CURVE_COLUMNS if c[0] in next(iter(faith["methods"].values()))]
    head = ["method", *[f"AD {n} ↓" for n in names], *[f"IC {n} ↑" for n in names], *[c[1] for c in curves]]
    layers = ", ".join(f"{k} {v:.2f}" for k, v in faith["gradcam_layer"].items())
    compared = ", ".join(get_baseline(m).title for m in faith["methods"] if m != "cefam")
    whose = "Grad-CAM's" if compared == "Grad-CAM" else "The baselines'"
    title = (
        f"Faithfulness of the class map (predicted class, {faith['images']} images): CE-FAM's top-{faith['top_n']} "
        f"concepts' regions weighted by their positive contributions, beside {compared} at the layer carrying most "
        "of that weight"
    )
    rows = [
        [faithfulness_title(method)]
        + [f"{row[f'ad/{n}']:.2f}" for n in names]
        + [f"{row[f'ic/{n}']:.1f}" for n in names]
        + [fmt.format(row[key]) for key, _, fmt in curves]
        for method, row in faith["methods"].items()
    ]
    return [
        markdown_table(head, rows, title=title),
        "",
        f"{whose} layer (share of images): {layers}; "
        "images whose top concepts contribute nothing positive "
        f"(an all-zero class map): {faith['images_without_positive_contribution']}",
        "",
    ]


def format_table(results: dict[str, Any]) -> str:
    """A readable Markdown summary: NRA, hit rate and EPG (macro over concept types) per method and layer."""
    regions = results["regions"]
    settings = list(next(iter(regions.values())))
    settings = [s for s in settings if s not in ("top1", "best_layer")] + ["top1"]
    settings += ["best_layer"] if any("best_layer" in per for per in regions.values()) else []
    rules = results.get("settings", {}).get("rules")
    lines = [f"Rules: {rules}", ""] if rules else []
    for metric, title in (("nra", "NRA"), ("hit_rate", "hit rate"), ("epg", "EPG")):
        # The random map does not depend on the layer: one value, shown in every column.
        rows = [
            [method_title(method)]
            + [f"{per_setting.get(s, per_setting.get('top1'))[f'{metric}/mean']:.3f}" for s in settings]
            for method, per_setting in regions.items()
        ]
        columns = ["method", *map(_title, settings)]
        lines += [markdown_table(columns, rows, title=f"{title} (mean over concept types)"), ""]
    contribution = results.get("contribution", {})
    top1 = contribution.get("top1", {})
    if top1.get("images_scored", 0):
        masked_at = [s for s in settings if s in contribution]
        rows = [
            [title, *[f"{contribution[s][name]:.3f}" for s in masked_at]]
            for name, title in (
                ("top1_key", "top contributor is a key-object concept"),
                ("all_key_first", "all key-object concepts first"),
            )
        ]
        rule = results["settings"].get("contribution_layer", "selected")
        title = (
            f"Contribution accuracy of CE-FAM (contribution layer={rule}, "
            f"fill={results['settings']['fill']}, K={results['settings']['k']}), "
            f"on {int(top1['images_scored'])} correctly classified images with concepts outside the key object:"
        )
        heads = [f"contribution rule ({rule})" if s == "top1" else _title(s) for s in masked_at]
        lines += [markdown_table(["concepts masked at", *heads], rows, title=title), ""]
    faith = results.get("faithfulness")
    if faith and faith.get("images"):
        lines.extend(_faithfulness_lines(faith))
    sel = results.get("layer_selection", {})
    if sel:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in sel.items())
        chosen_from = results.get("settings", {}).get("select_layers") or list(sel)
        lines.append(
            f"Top-1 layer chosen by CE-FAM (share of present concepts): {shares}; chosen among "
            + ", ".join(chosen_from)
        )
    if "best_layer" in settings:
        lines.append(
            "Best layer by the mask: each pair at the layer whose map fits its own mask best (the authors' Top-4); "
            "it reads the ground truth, so it is an upper bound on any layer choice, not an explanation."
        )
    lines.extend(
        zero_shot_lines(results, {m: method_title(m) for m in regions})
    )  # a checkpoint trained with a holdout: seen vs unseen
    notes = results.get("notes", [])
    if notes:
        lines.append("")
        lines.extend(f"Note: {note}" for note in notes)
    return "\n".join(lines) + "\n"
