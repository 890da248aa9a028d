"""Seen vs unseen concepts of a checkpoint trained with ``cefam.holdout_concepts`` (docs/method.md#zero-shot-concepts).

A held-out concept took no part in training; it is explained and scored from its text embedding alone. The
evaluation (:func:`~cefam_lightning.methods.cefam.evaluation.evaluate_on_world`) then reports, for the seen and the
unseen concepts apart, the top-1-layer region metrics (NRA, hit rate, EPG; every compared method) and the
concept-presence AUROC of CE-FAM's scores. Nothing here is new metric code: each group is one more
:class:`~cefam_lightning.metrics.RegionMetrics` and one torchmetrics AUROC, fed the group's pairs and columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cefam_lightning.metrics import RegionMetrics, presence_auroc
from cefam_lightning.reporting.tables import markdown_table

GROUPS = ("seen", "unseen")
_REGION_METRICS = (("nra", "NRA"), ("hit_rate", "hit rate"), ("epg", "EPG"))


def holdout_of(module: Any) -> list[str]:
    """The concepts a CE-FAM checkpoint held out of training (``[]`` for one written before holdouts existed)."""
    return [str(n) for n in (module.hparams.get("holdout_concepts") or [])]


class GroupedRegionMetrics(RegionMetrics):
    """:class:`RegionMetrics` over every pair (its ``compute`` unchanged) that also accumulates each concept
    group's pairs in a ``RegionMetrics`` of its own (:meth:`compute_groups`).

    Args:
        concept_types: the type of each concept, as for ``RegionMetrics``.
        groups: ``{name: concept indices}``, disjoint.
    """

    def __init__(self, concept_types: Sequence[str], groups: dict[str, Sequence[int]], **kwargs: Any) -> None:
        super().__init__(concept_types, **kwargs)
        self.groups = nn.ModuleDict({g: RegionMetrics(concept_types, **kwargs) for g in groups})
        group_of = torch.full((len(concept_types),), -1, dtype=torch.long)
        for gi, ids in enumerate(groups.values()):
            group_of[torch.as_tensor(list(ids), dtype=torch.long)] = gi
        self.register_buffer("group_of", group_of, persistent=False)

    def update(self, maps: Tensor, masks: Tensor, concept_ids: Tensor) -> None:
        super().update(maps, masks, concept_ids)
        group = self.group_of.to(concept_ids.device)[concept_ids]
        for gi, metric in enumerate(self.groups.values()):
            rows = group == gi
            if rows.any():
                metric.update(maps[rows], masks[rows], concept_ids[rows])

    def reset(self) -> None:
        super().reset()
        for metric in self.groups.values():
            metric.reset()

    def compute_groups(self) -> dict[str, dict[str, float]]:
        return {g: {k: float(v) for k, v in metric.compute().items()} for g, metric in self.groups.items()}


class ZeroShotSplit(nn.Module):
    """Seen vs unseen concepts: grouped top-1 region metrics and the concept-presence AUROC of each group.

    Args:
        concept_names, concept_types: the checkpoint's concepts, in scorer order.
        holdout: the held-out (unseen) concept names.
        auroc_thresholds: ``None`` exact AUROC, an int binned.
        sync_on_compute: as for the evaluation's metrics.
    """

    def __init__(
        self,
        concept_names: Sequence[str],
        concept_types: Sequence[str],
        holdout: Sequence[str],
        auroc_thresholds: int | None = None,
        sync_on_compute: bool = False,
    ) -> None:
        super().__init__()
        names = [str(n) for n in concept_names]
        held = set(holdout)
        ids = {
            "seen": [i for i, n in enumerate(names) if n not in held],
            "unseen": [i for i, n in enumerate(names) if n in held],
        }
        if not ids["seen"] or not ids["unseen"]:
            raise ValueError(f"a zero-shot split needs seen and unseen concepts; held out {sorted(held)} of {names}")
        self.names, self.types, self.ids = names, list(concept_types), ids
        self.sync_on_compute = sync_on_compute
        for group in GROUPS:
            self.register_buffer(f"{group}_index", torch.tensor(ids[group], dtype=torch.long), persistent=False)
        self.auroc = nn.ModuleDict(
            {
                g: presence_auroc(len(ids[g]), auroc_thresholds, per_concept=True, sync_on_compute=sync_on_compute)
                for g in GROUPS
            }
        )
        self._grouped: list[GroupedRegionMetrics] = []  # not submodules: the evaluation owns them
        self._methods: list[str] = []

    def attach(self, evaluation: nn.Module) -> None:
        """Make ``evaluation``'s (an ``ExplanationEvaluation``) top-1 region metrics grouped ones: the same numbers
        as before for all concepts, plus each group's."""
        device = next(iter(evaluation.region.values())).type_of_concept.device
        for name in list(evaluation.region):
            method, setting = name.split("/")
            if setting != "top1":
                continue
            grouped = GroupedRegionMetrics(self.types, self.ids, sync_on_compute=self.sync_on_compute).to(device)
            evaluation.region[name] = grouped
            self._grouped.append(grouped)
            self._methods.append(method)

    def update(self, scores: Tensor, presence: Tensor) -> None:
        """Concept scores ``(B, C)`` of a batch and the concepts' presence ``(B, C)``."""
        presence = presence.long()
        for group in GROUPS:
            index = getattr(self, f"{group}_index").to(scores.device)
            self.auroc[group].update(scores[:, index].float(), presence[:, index])

    def compute(self) -> dict[str, Any]:
        """``{"seen": {...}, "unseen": {...}, "concepts": {group: names}, "presence_auroc_by_concept": {...}}``;
        each group: ``regions`` (``{method: RegionMetrics keys}``, top-1 layer), ``pairs`` (scored pairs) and
        ``presence_auroc`` (macro over the group's concepts)."""
        out: dict[str, Any] = {group: {"regions": {}} for group in GROUPS}
        for method, grouped in zip(self._methods, self._grouped, strict=True):
            for group, values in grouped.compute_groups().items():
                out[group]["regions"][method] = values
        by_concept = {}
        for group in GROUPS:
            per_concept = self.auroc[group].compute().reshape(-1).tolist()
            by_concept.update({self.names[i]: float(v) for i, v in zip(self.ids[group], per_concept, strict=True)})
            out[group]["presence_auroc"] = float(torch.tensor(per_concept).nanmean())
            cefam = out[group]["regions"].get("cefam", {})
            out[group]["pairs"] = int(sum(v for k, v in cefam.items() if k.startswith("count/")))
        out["concepts"] = {group: [self.names[i] for i in self.ids[group]] for group in GROUPS}
        out["presence_auroc_by_concept"] = by_concept
        return out


def zero_shot_lines(results: dict[str, Any], method_titles: dict[str, str]) -> list[str]:
    """The Markdown table "Seen vs unseen concepts" of ``results["zero_shot"]`` (none without it)."""
    zs = results.get("zero_shot")
    if not zs:
        return []
    methods = list(zs["seen"]["regions"])
    head = ["method", *[f"{title} {group}" for _, title in _REGION_METRICS for group in GROUPS]]
    rows = [
        [method_titles.get(m, m)]
        + [f"{zs[group]['regions'][m][f'{key}/mean']:.3f}" for key, _ in _REGION_METRICS for group in GROUPS]
        for m in methods
    ]
    unseen = ", ".join(zs["concepts"]["unseen"])
    title = (
        f"Seen vs unseen concepts (held out of training: {unseen}; top-1 layer, mean over concept types; "
        f"{zs['seen']['pairs']} seen and {zs['unseen']['pairs']} unseen (image, concept) pairs)"
    )
    auroc = (
        f"Concept-presence AUROC of CE-FAM's scores: seen {zs['seen']['presence_auroc']:.3f} "
        f"({len(zs['concepts']['seen'])} concepts), unseen {zs['unseen']['presence_auroc']:.3f} ("
        + ", ".join(f"{n} {zs['presence_auroc_by_concept'][n]:.3f}" for n in zs["concepts"]["unseen"])
        + ")"
    )
    return ["", markdown_table(head, rows, title=title), "", auroc, ""]
