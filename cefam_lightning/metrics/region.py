"""Region metrics per concept type (docs/method.md#per-type-and-macro-average), accumulated as DDP-synced sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cefam_lightning.metrics.functional.region import epg, nra


class RegionMetrics(Metric):
    """EPG, NRA and hit rate of saliency maps against masks, per concept type and macro-averaged over types.

    Each row given to :meth:`update` is one (image, concept) pair. A pair whose NRA is NaN (an empty mask, or a
    full one) is left out of every average and counted in ``skipped_empty``. The states are per-type sums and
    counts, so DDP sync is one sum per state.

    Args:
        concept_types: ``concept_types[i]`` is the type name (e.g. ``"color"``) of concept ``i``; types are
            reported in order of first appearance.
        hit_threshold: A pair is a hit when its NRA is strictly above this.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = RegionMetrics(["color", "shape", "color"])
        >>> masks = torch.zeros(2, 8, 8, dtype=torch.bool)
        >>> masks[:, 2:5, 2:5] = True
        >>> metric.update(masks.float(), masks, torch.tensor([0, 1]))
        >>> metric.compute()["nra/mean"].round(decimals=6)
        tensor(1., dtype=torch.float64)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, concept_types: Sequence[str], hit_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(concept_types) == 0:
            raise ValueError("concept_types must name the type of at least one concept")
        self.types = list(dict.fromkeys(concept_types))
        if "mean" in self.types:
            raise ValueError("'mean' cannot be a concept type: it would collide with the macro-average keys")
        self.hit_threshold = hit_threshold
        type_index = torch.tensor([self.types.index(t) for t in concept_types])
        self.register_buffer("type_of_concept", type_index, persistent=False)

        num_types = len(self.types)
        self.add_state("epg_sum", torch.zeros(num_types, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nra_sum", torch.zeros(num_types, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(num_types, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("valid", torch.zeros(num_types, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor, concept_ids: Tensor) -> None:
        """Add a batch of (image, concept) pairs.

        Args:
            maps: Saliency maps ``(n, H, W)``.
            masks: Binary masks ``(n, H, W)``.
            concept_ids: ``(n,)`` integer index into ``concept_types`` of each row's concept.

        Raises:
            ValueError: On mismatched shapes or a concept id out of range.
        """
        if maps.ndim != 3 or concept_ids.shape != maps.shape[:1]:
            raise ValueError(
                f"expected maps (n, H, W) and concept_ids (n,), got maps {tuple(maps.shape)} "
                f"and concept_ids {tuple(concept_ids.shape)}"
            )
        num_concepts = len(self.type_of_concept)
        if concept_ids.numel() and (concept_ids.min() < 0 or concept_ids.max() >= num_concepts):
            raise ValueError(
                f"concept_ids must lie in [0, {num_concepts}), got values from {int(concept_ids.min())} "
                f"to {int(concept_ids.max())}"
            )
        types = self.type_of_concept.to(concept_ids.device)[concept_ids]
        epg_values, nra_values = epg(maps, masks), nra(maps, masks)
        valid = ~nra_values.isnan()
        # A NaN would poison a sum even when multiplied by 0, hence where() rather than a mask product.
        self.epg_sum.index_add_(0, types, torch.where(valid, epg_values, 0.0))
        self.nra_sum.index_add_(0, types, torch.where(valid, nra_values, 0.0))
        self.hits.index_add_(0, types, (nra_values > self.hit_threshold).long())
        self.valid.index_add_(0, types, valid.long())
        self.skipped += (~valid).sum()

    def compute(self) -> dict[str, Tensor]:
        """Per-type and macro-mean values.

        Returns:
            ``epg/<type>``, ``nra/<type>``, ``hit_rate/<type>`` and their ``/mean`` over the types with at least
            one valid pair (a type without one is NaN), ``count/<type>`` (valid pairs) and ``skipped_empty``
            (pairs left out for a NaN NRA).
        """
        # 0/0 is NaN for a type without valid pairs, which nanmean then leaves out of the macro average.
        valid = self.valid.to(torch.float64)
        per_type = {"epg": self.epg_sum / valid, "nra": self.nra_sum / valid, "hit_rate": self.hits / valid}
        out = {}
        for name, values in per_type.items():
            out.update({f"{name}/{t}": v for t, v in zip(self.types, values, strict=True)})
            out[f"{name}/mean"] = values.nanmean()
        out.update({f"count/{t}": c for t, c in zip(self.types, self.valid, strict=True)})
        out["skipped_empty"] = self.skipped
        return out
