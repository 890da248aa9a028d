"""What ``explain`` writes for a CE-FAM checkpoint: per image its concepts' scores, layers, regions and
contributions (``report.json`` + ``regions.npz``), and the figure.

The concepts are the checkpoint's own (top ``top_n`` by score) or a given set (``--concepts``; new names from an
embedding store, ``--store``: :mod:`~cefam_lightning.methods.cefam.concept_sets`). Each reported concept has its
score ``S``, probability, selected layer, relevance at every layer, contribution to the explained class (signed)
and the key of its region map; ``docs/method.md`` says how each is computed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from torch import Tensor

from cefam_lightning.methods.base import ExplainSettings, ImageReport
from cefam_lightning.methods.cefam.concept_sets import ConceptSet, open_store, read_concepts, resolve_concepts
from cefam_lightning.methods.cefam.pipeline import BatchExplanation
from cefam_lightning.methods.cefam.rules import RULE_KEYS, describe_rules, rule_settings
from cefam_lightning.models.components import ConceptScorer
from cefam_lightning.reporting import figures
from cefam_lightning.reporting.explanations import (
    ExplainError,
    float16_map,
    image_title,
    json_number,
    npz_key,
    region,
)

log = logging.getLogger("cefam_lightning")

DEFAULT_TOP_N = 8


class CEFAMImageExplainer:
    """Explains batches of image files with a CE-FAM module for ``explain`` (see the module docstring).

    Args:
        module: the trained CE-FAM module (on the device the images come on).
        settings: ``top_n``, ``concepts``, ``store``, ``k``, ``fill``, ``select_layers`` (``None``: the checkpoint's
            own settings, the checkpoint's concepts, top 8).
        checkpoint: the checkpoint's path, recorded in the reports.
    """

    def __init__(self, module: Any, settings: ExplainSettings, checkpoint: str | None = None):
        self.module, self.checkpoint = module, checkpoint
        try:
            rules = module.explain_rules(settings.preset, **rule_settings(settings))
        except ValueError as e:
            raise ExplainError(str(e)) from None
        try:
            selectable = module.selectable(rules["select_layers"])
        except ValueError as e:
            raise ExplainError(f"--select-layers: {str(e).removeprefix('select_layers: ')}") from None
        rules["select_layers"] = selectable
        store = None
        if settings.store is not None:
            store = open_store(settings.store, module.translator.out_dim)
            if settings.concepts is None:
                log.warning("warning: --store is only used with --concepts; explaining the checkpoint's concepts")
        requested = read_concepts(settings.concepts) if settings.concepts is not None else None
        self.concept_set: ConceptSet = resolve_concepts(module, requested, store)
        if self.concept_set.source == "checkpoint":
            self.scorer = module.scorer
        else:
            s = module.scorer
            self.scorer = ConceptScorer(self.concept_set.text, s.kind, s.logit_scale, s.logit_bias).to(module.device)
        top_n = DEFAULT_TOP_N if settings.top_n is None else settings.top_n
        self.rules = rules
        self.n_report = min(top_n, len(self.concept_set.names))
        self.settings = {
            "top_n": top_n,
            **rules,
            "rules": describe_rules(rules),
            "concept_set": self.concept_set.source,
            "concepts": self.concept_set.names,
            "store": str(store.path) if store is not None else None,
        }

    def __call__(self, images: Tensor, target: Tensor | None, paths: Sequence[str]) -> list[ImageReport]:
        expl = self.module.explain(
            images,
            target,
            top_n=self.n_report,
            scorer=self.scorer,
            **self.rules,
        )
        expl = _to_cpu(expl)  # one transfer per batch, not one per reported number
        return [self._report(expl, i, path) for i, path in enumerate(paths)]

    def _report(self, expl: BatchExplanation, i: int, image: str) -> ImageReport:
        cset, class_names = self.concept_set, self.module.class_names
        probs = expl.logits[i].float().softmax(dim=0)
        predicted = int(probs.argmax())
        target = int(expl.target[i])
        layers = list(expl.layers)
        maps: dict[str, Any] = {}
        entries = []
        for j, c in enumerate(expl.concepts[i].tolist()):
            key = npz_key(cset.names[c], maps)
            maps[key] = float16_map(expl.regions[i, j].clamp_min(0.0))
            li, at = int(expl.layer_index[i, j]), int(expl.contribution_layer_index[i, j])
            entries.append(
                {
                    "name": cset.names[c],
                    "type": cset.types[c],
                    "score": json_number(expl.scores[i, c]),
                    "probability": json_number(expl.concept_probs[i, c]),
                    "layer": layers[li],
                    "relevance": {layer: json_number(expl.relevance[i, j, m]) for m, layer in enumerate(layers)},
                    "selected_relevance": json_number(expl.relevance[i, j, li]),
                    "contribution": json_number(expl.contributions[i, j]),
                    "contribution_layer": layers[at] if at >= 0 else "image",
                    "region": f"regions.npz:{key}",
                }
            )
        entries.sort(key=lambda e: -math.inf if e["score"] is None else e["score"], reverse=True)
        report = {
            "image": image,
            "checkpoint": self.checkpoint,
            "method": self.module.method,
            "predicted_class": class_names[predicted],
            "predicted_probability": json_number(probs[predicted]),
            "explained_class": class_names[target],
            "explained_probability": json_number(expl.class_prob[i]),
            "layers": layers,
            "settings": {key: self.settings[key] for key in ("top_n", *RULE_KEYS, "concept_set")},
            "concepts": entries,
        }
        return ImageReport(report, maps)

    @staticmethod
    def render(image: Tensor, result: ImageReport, dpi: int = 110) -> bytes:
        """The image with its prediction, one overlay per reported concept titled ``name (layer, S=score)``, and a
        bar chart of the concepts' contributions to the explained class (negative bars in red)."""
        report, maps = result.report, result.maps
        concepts = report["concepts"]
        fig, axes = figures.new_figure(len(concepts) + 2)
        img = figures.tensor_image(image)
        figures.image_panel(axes[0], img, image_title(report))
        for ax, c in zip(axes[1:], concepts, strict=False):
            score = "nan" if c["score"] is None else f"{c['score']:.2f}"
            figures.overlay(ax, img, region(maps, c["region"]), f"{c['name']} ({c['layer']}, S={score})")
        figures.bars(
            axes[len(concepts) + 1],
            [c["name"] for c in concepts],
            [c["contribution"] for c in concepts],
            f"contribution to {report['explained_class']}",
        )
        return figures.to_png(fig, dpi)


def _to_cpu(expl: BatchExplanation) -> BatchExplanation:
    return replace(
        expl, **{f.name: getattr(expl, f.name).cpu() for f in fields(expl) if f.name not in ("layers", "selectable")}
    )
