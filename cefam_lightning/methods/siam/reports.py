"""What ``explain`` writes for a SIAM checkpoint: every attribute's presence, score and contribution to the
explained class (with the bias they sum to its logit), the ``top_n`` attributes' maps and the class map, and the
figure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from cefam_lightning.methods.base import ExplainSettings, ImageReport
from cefam_lightning.reporting import figures
from cefam_lightning.reporting.explanations import (
    ExplainError,
    class_entry,
    float16_map,
    image_title,
    json_number,
    npz_key,
    region,
)

DEFAULT_TOP_N = 8
BARS_AT_LEAST = 12  # attributes in the bar chart when fewer maps are drawn


class SIAMImageExplainer:
    """Explains batches of image files with a classification SIAM module for ``explain``.

    Every attribute is reported (decreasing absolute contribution) with its presence probability, score and
    contribution ``weight x score`` to the explained output; the ``top_n`` first also get their attribute map
    (``regions.npz``), as does the class map (their contribution maps summed).
    """

    def __init__(self, module: Any, settings: ExplainSettings, checkpoint: str | None = None):
        if module.hparams.task != "classification":
            raise ExplainError(f"explain supports classification SIAM checkpoints, not task={module.hparams.task!r}")
        self.module, self.checkpoint = module, checkpoint
        self.top_n = DEFAULT_TOP_N if settings.top_n is None else settings.top_n
        self.settings: dict[str, Any] = {"top_n": self.top_n}

    def __call__(self, images: Tensor, target: Tensor | None, paths: Sequence[str]) -> list[ImageReport]:
        module = self.module
        ex = module.explain(images, target)
        names = [str(a) for a in module.hparams["attribute_names"]]
        probs = ex.logits.float().softmax(dim=1).cpu()
        contributions, presence, scores = ex.contributions.float().cpu(), ex.presence_probs.cpu(), ex.scores.cpu()
        maps_all, class_maps, bias, tgt = ex.maps.cpu(), ex.class_map.cpu(), ex.bias.cpu(), ex.target.cpu()
        n_maps = min(self.top_n, len(names))
        results = []
        for i, image in enumerate(paths):
            order = contributions[i].abs().argsort(descending=True).tolist()
            drawn = set(order[:n_maps])
            maps = {"class_map": float16_map(class_maps[i])}
            entries = []
            for a in order:
                entry = {
                    "name": names[a],
                    "presence_probability": json_number(presence[i, a]),
                    "score": json_number(scores[i, a]),
                    "contribution": json_number(contributions[i, a]),
                }
                if a in drawn:
                    key = npz_key(names[a], maps)
                    maps[key] = float16_map(maps_all[i, a])
                    entry["region"] = f"regions.npz:{key}"
                entries.append(entry)
            report = {
                "image": image,
                "checkpoint": self.checkpoint,
                "method": module.method,
                **class_entry(probs, i, module.class_names, int(tgt[i])),
                "bias": json_number(bias[i]),
                "class_map": {"region": "regions.npz:class_map", "title": "SIAM class map (contribution maps summed)"},
                "attributes": entries,
            }
            results.append(ImageReport(report, maps))
        return results

    @staticmethod
    def render(image: Tensor, result: ImageReport, dpi: int = 110) -> bytes:
        """The image with its prediction, the class map, the maps of the attributes that contribute most (by
        absolute value), and a bar chart of those attributes' contributions (negative in red)."""
        report, maps = result.report, result.maps
        drawn = [a for a in report["attributes"] if "region" in a]
        barred = report["attributes"][: max(len(drawn), min(BARS_AT_LEAST, len(report["attributes"])))]
        fig, axes = figures.new_figure(len(drawn) + 3)
        img = figures.tensor_image(image)
        figures.image_panel(axes[0], img, image_title(report))
        figures.overlay(axes[1], img, region(maps, report["class_map"]["region"]), "SIAM class map")
        for ax, a in zip(axes[2:], drawn, strict=False):
            p, c = a["presence_probability"] or 0, a["contribution"] or 0
            figures.overlay(ax, img, region(maps, a["region"]), f"{a['name']} (p={p:.2f}, c={c:.2f})")
        figures.bars(
            axes[len(drawn) + 2],
            [a["name"] for a in barred],
            [a["contribution"] for a in barred],
            f"contribution to {report['explained_class']}",
        )
        return figures.to_png(fig, dpi)
