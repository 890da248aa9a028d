"""Dataset-level concept reports (docs/report.md): what a classifier uses for each class, and why it errs.

:func:`build_report` explains every image of a :class:`~cefam_lightning.data.report_data.ReportData` with a trained
explainer (:meth:`~cefam_lightning.methods.base.ExplainerModule.evidence`, any method that has it) and
aggregates, with :class:`ConceptTally`:

- per **predicted** class (the images the model calls ``y``): each concept's mean contribution per image (an image
  where the concept was not explained counts 0), its 95 % interval (normal, from the per-image standard error), its
  share of the class's positive contribution, how often it was explained and how often it is present (ground truth
  where the data have it; the method's own presence call where it has one), and the images where it contributed
  most;
- per **misclassified** image (where labels are known): the concepts that pushed toward the wrong class and those
  that spoke for the true class (contributions to the true class), and the true class's usual top concepts this
  image lacked;
- a concept x class matrix and plain-language findings (:func:`findings`).

Class-map methods (no concepts) report class accuracy and the class maps of their errors only.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cefam_lightning.data.report_data import UNLABELED, ReportBatch, ReportData
from cefam_lightning.errors import CefamError

Z95 = 1.959963984540054  # the normal 97.5 % quantile
RANKS = ("mean", "specific")  # how a class's positive concepts are ranked (ConceptTally.class_rows)


class ReportError(CefamError):
    """A report that cannot be made: the message says which option or input is at fault."""


@dataclass
class ReportSettings:
    """How a report is made (the ``report`` command's options)."""

    top_n: int = 8  # concepts explained per image, where the method chooses them
    top: int = 5  # concepts listed per class and sign
    typical: int = 4  # example images per listed concept
    figure_concepts: int = 3  # positive concepts per class drawn in its example grid
    error_figures: int = 24  # misclassified images drawn at most
    error_concepts: int = 3  # concepts listed per misclassified image and side
    batch_size: int = 32
    rank: str = "specific"  # how a class's positive concepts are ranked: "specific" or "mean" (see RANKS)
    options: dict[str, Any] = field(default_factory=dict)  # the method's explanation options (CE-FAM's rules)

    def check(self) -> None:
        if self.rank not in RANKS:
            raise ReportError(f"rank must be one of {list(RANKS)}, got {self.rank!r}")
        for name, value in vars(self).items():
            if name in ("rank", "options"):
                continue
            if not isinstance(value, int) or value < (0 if name in ("error_figures", "figure_concepts") else 1):
                raise ReportError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")


class ConceptTally:
    """The running sums behind a report (see the module docstring).

    Args:
        class_names: the classifier's classes.
        concept_names: the names :attr:`Evidence.concepts` index (``None``: a class-map method).
        data_concepts: the names of the data's ground-truth presence columns (``None``: the data have none).
        typical: images kept per (class, concept), those where it contributed most.
        error_concepts: concepts kept per misclassified image and side.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        concept_names: Sequence[str] | None,
        data_concepts: Sequence[str] | None = None,
        typical: int = 4,
        error_concepts: int = 3,
    ):
        self.class_names = list(class_names)
        self.concept_names = None if concept_names is None else list(concept_names)
        k, c = len(self.class_names), len(self.concept_names or [])
        self.images = np.zeros(k, dtype=np.int64)  # predicted as the class
        self.labeled = np.zeros(k, dtype=np.int64)  # of the class, by label
        self.correct = np.zeros(k, dtype=np.int64)
        self.sum = np.zeros((k, c))
        self.sumsq = np.zeros((k, c))
        self.positive = np.zeros((k, c))
        self.explained = np.zeros((k, c), dtype=np.int64)
        self.detected = np.zeros((k, c), dtype=np.int64)
        self.has_detected = False
        # Ground-truth presence, mapped onto the explained concepts by name (-1: the data do not have it).
        self.present = np.zeros((k, c), dtype=np.int64)
        self.data_column = None
        if data_concepts is not None and self.concept_names is not None:
            where = {name: i for i, name in enumerate(data_concepts)}
            self.data_column = np.array([where.get(name, -1) for name in self.concept_names])
        self.typical = typical
        self.heaps: dict[tuple[int, int], list[tuple[float, int, str]]] = {}
        self.error_concepts = error_concepts
        self.errors: list[dict[str, Any]] = []
        self.unlabeled = 0

    # ------------------------------------------------------------------ accumulating
    def update(self, batch: ReportBatch, evidence: Any, true_evidence: Any = None) -> None:
        """Add a batch: ``evidence`` toward each image's predicted class; ``true_evidence`` toward the true class
        of its misclassified images only (in their order), where the method has concepts."""
        pred = evidence.logits.argmax(dim=1).cpu().numpy()
        labels = batch.labels.cpu().numpy()
        np.add.at(self.images, pred, 1)
        known = labels != UNLABELED
        self.unlabeled += int((~known).sum())
        np.add.at(self.labeled, labels[known], 1)
        np.add.at(self.correct, labels[known & (labels == pred)], 1)
        if self.concept_names is not None:
            self._add_contributions(batch, pred, evidence)
        wrong = np.flatnonzero(known & (labels != pred))
        for row, i in enumerate(wrong):
            entry: dict[str, Any] = {
                "position": int(batch.positions[i]),
                "id": batch.ids[i],
                "true": self.class_names[labels[i]],
                "predicted": self.class_names[pred[i]],
            }
            if self.concept_names is not None:
                entry["toward_predicted"] = self._strongest(evidence, i)
                entry["explained"] = [self.concept_names[int(c)] for c in evidence.concepts[i].tolist()]
                if true_evidence is not None:
                    entry["toward_true"] = self._strongest(true_evidence, row)
            self.errors.append(entry)

    def _add_contributions(self, batch: ReportBatch, pred: np.ndarray, evidence: Any) -> None:
        concepts = evidence.concepts.cpu().numpy()
        values = evidence.contributions.float().cpu().numpy().astype(np.float64)
        rows = np.broadcast_to(pred[:, None], concepts.shape)
        # A concept listed twice for an image (padding) counts once.
        first = np.ones_like(concepts, dtype=bool)
        for j in range(1, concepts.shape[1]):
            first[:, j] = ~(concepts[:, :j] == concepts[:, j : j + 1]).any(axis=1)
        r, c, v = rows[first], concepts[first], values[first]
        np.add.at(self.sum, (r, c), v)
        np.add.at(self.sumsq, (r, c), v * v)
        np.add.at(self.positive, (r, c), np.clip(v, 0.0, None))
        np.add.at(self.explained, (r, c), 1)
        if evidence.detected is not None:
            self.has_detected = True
            np.add.at(self.detected, pred, evidence.detected.cpu().numpy().astype(np.int64))
        if batch.present is not None and self.data_column is not None:
            have = self.data_column >= 0
            cols = np.where(have, self.data_column, 0)
            present = batch.present.cpu().numpy()[:, cols] & have[None]
            np.add.at(self.present, pred, present.astype(np.int64))
        for b, j in zip(*np.nonzero(first & (values > 0)), strict=True):
            key = (int(pred[b]), int(concepts[b, j]))
            item = (float(values[b, j]), int(batch.positions[b]), batch.ids[b])
            heap = self.heaps.setdefault(key, [])
            if len(heap) < self.typical:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def _strongest(self, evidence: Any, row: int) -> list[dict[str, Any]]:
        """The ``error_concepts`` concepts with the largest positive contributions in ``row``."""
        values = evidence.contributions[row].float().cpu()
        concepts = evidence.concepts[row].cpu()
        out, seen = [], set()
        for j in values.argsort(descending=True).tolist():
            c = int(concepts[j])
            if values[j] <= 0 or len(out) == self.error_concepts:
                break
            if c not in seen:
                seen.add(c)
                out.append({"concept": self.concept_names[c], "contribution": float(values[j])})
        return out

    # ------------------------------------------------------------------ results
    def specificity(self) -> np.ndarray:
        """``(classes, concepts)``: a concept's share of a class's positive contribution (signed: its sum over the
        class's images / the class's total positive contribution) minus its mean share over the other classes that
        have images. A concept that drives every class alike (an object's texture, "objectness") scores about 0;
        one that drives this class more than the others scores high."""
        total = self.positive.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, self.sum / total, np.nan)
        have = (total[:, 0] > 0)[:, None]
        share = np.where(have, share, 0.0)
        n_others = have.sum() - have  # (classes, 1): the other classes with a positive contribution
        others = np.divide(
            share.sum(axis=0, keepdims=True) - share, n_others, out=np.zeros_like(share), where=n_others > 0
        )
        return np.where(have, share - others, 0.0)

    def class_rows(self, k: int, top: int, rank: str = "mean", specificity: np.ndarray | None = None) -> dict[str, Any]:
        """Class ``k``'s positive and negative concepts (``top`` each), with their statistics; positive ones ranked
        by ``rank``: ``"mean"`` (mean contribution per image) or ``"specific"`` (:meth:`specificity`, among the
        concepts with a positive mean). ``specificity``: :meth:`specificity` when the caller has it (it covers every
        class, so a caller listing all classes computes it once)."""
        if rank not in RANKS:
            raise ReportError(f"rank must be one of {list(RANKS)}, got {rank!r}")
        n = int(self.images[k])
        entry: dict[str, Any] = {
            "class": self.class_names[k],
            "images": n,
            "labeled": int(self.labeled[k]),
            "accuracy": float(self.correct[k] / self.labeled[k]) if self.labeled[k] else None,
            "positive": [],
            "negative": [],
        }
        if self.concept_names is None or n == 0:
            return entry
        mean = self.sum[k] / n
        total_positive = self.positive[k].sum()
        specific = (self.specificity() if specificity is None else specificity)[k]
        by = -specific if rank == "specific" else -mean
        positive = [c for c in np.argsort(by, kind="stable") if mean[c] > 0]
        negative = [c for c in np.argsort(mean, kind="stable") if mean[c] < 0]
        for sign, chosen in (("positive", positive), ("negative", negative)):
            for c in chosen[:top]:
                entry[sign].append({**self._concept_stats(k, int(c), n, total_positive), "specificity": specific[c]})
        return entry

    def _concept_stats(self, k: int, c: int, n: int, total_positive: float) -> dict[str, Any]:
        mean = self.sum[k, c] / n
        var = max(self.sumsq[k, c] / n - mean * mean, 0.0) * n / max(n - 1, 1)
        se = math.sqrt(var / n)
        m = int(self.explained[k, c])
        heap = sorted(self.heaps.get((k, c), []), reverse=True)
        return {
            "concept": self.concept_names[c],
            "mean": mean,
            "ci95": [mean - Z95 * se, mean + Z95 * se],
            "share_of_positive": float(self.positive[k, c] / total_positive) if total_positive > 0 else 0.0,
            "explained": m,
            "explained_rate": m / n,
            "mean_when_explained": float(self.sum[k, c] / m) if m else None,
            "present_rate": self._present_rate(k, c, n),
            "detected_rate": float(self.detected[k, c] / n) if self.has_detected else None,
            "typical": [{"id": i, "position": p, "contribution": v} for v, p, i in heap],
        }

    def _present_rate(self, k: int, c: int, n: int) -> float | None:
        if self.data_column is None or self.data_column[c] < 0:
            return None
        return float(self.present[k, c] / n)

    def matrix(self) -> np.ndarray:
        """``(concepts, classes)`` mean contribution per image of each predicted class (NaN: no images)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sum / self.images[:, None].clip(min=1)).T * np.where(self.images > 0, 1.0, np.nan)[None]


def add_missing(errors: list[dict[str, Any]], classes: list[dict[str, Any]], top: int = 3) -> None:
    """For each misclassified image, the true class's usual top concepts (its ``top`` positive ones) that were not
    among the concepts explained for it: what the true class would have needed."""
    usual = {row["class"]: [c["concept"] for c in row["positive"][:top]] for row in classes}
    for e in errors:
        if "explained" in e:
            e["missing_for_true"] = [c for c in usual.get(e["true"], []) if c not in e["explained"]]


def error_pairs(errors: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) pairs, each with the concepts most often among its errors' top
    concepts toward the wrong class."""
    pairs = Counter((e["true"], e["predicted"]) for e in errors)
    out = []
    for (t, p), count in pairs.most_common(limit):
        pushed = Counter(
            c["concept"] for e in errors if (e["true"], e["predicted"]) == (t, p) for c in e.get("toward_predicted", [])
        )
        out.append(
            {
                "true": t,
                "predicted": p,
                "count": count,
                "concepts": [{"concept": c, "errors": m, "share": m / count} for c, m in pushed.most_common(5)],
            }
        )
    return out


def findings(report: dict[str, Any], definitions: dict[str, list[str]] | None, top: int = 3) -> list[str]:
    """Short sentences on what stands out: per class its leading concepts, a leading concept that is not part of
    the class's definition (where the data define their classes), and concepts behind many errors."""
    lines: list[str] = []
    defined = set() if definitions is None else {c for parts in definitions.values() for c in parts}
    for row in report["classes"]:
        positive = row["positive"][:top]
        if not positive:
            continue
        if definitions is not None and row["class"] in definitions:
            # A concept outside the definition stands out when it sets the class apart (specificity) more than a
            # concept of the definition does; one that drives every class alike sets nothing apart.
            own = [d["specificity"] for d in row.get("defining", [])]
            bar = max(min(own), 0.0) if own else 0.0
            for rank, c in enumerate(positive, start=1):
                if c["concept"] in definitions[row["class"]] or c.get("specificity", 1.0) <= bar:
                    continue
                where = (
                    "is not part of any class definition"
                    if c["concept"] not in defined
                    else "belongs to another class's definition"
                )
                more = (
                    f"; {100 * c['specificity']:.0f} points more of it than in the other classes"
                    if "specificity" in c
                    else ""
                )
                lines.append(
                    f"class {row['class']}: '{c['concept']}' contributes {100 * c['share_of_positive']:.0f} % of the "
                    f"positive contribution (rank {rank}{more}) but is not part of the class's definition "
                    f"({' '.join(definitions[row['class']])}); it {where}"
                )
        else:
            names = ", ".join(f"'{c['concept']}' ({100 * c['share_of_positive']:.0f} %)" for c in positive)
            lines.append(f"class {row['class']}: the concepts carrying most of its positive contribution: {names}")
    for pair in report["errors"]["pairs"]:
        common = [c for c in pair["concepts"] if c["share"] >= 0.5]
        if pair["count"] >= 3 and common:
            names = ", ".join(f"'{c['concept']}' ({100 * c['share']:.0f} %)" for c in common)
            lines.append(
                f"{pair['count']} images of {pair['true']} were predicted as {pair['predicted']}; among the top "
                f"concepts pushing toward {pair['predicted']}: {names}"
            )
    return lines


def _progress(total: int | None, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=False)


def build_report(
    module: Any,
    data: ReportData,
    settings: ReportSettings | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Explain every image of ``data`` with ``module`` and aggregate (see the module docstring).

    Returns:
        ``(report, pictures)``: the JSON-ready report, and what its figures draw (images and maps of the example
        and error images, from a second pass over the images the first one picked; see
        :func:`~cefam_lightning.reporting.report_pages.write_report`).
    """
    settings = settings or ReportSettings()
    settings.check()
    device = torch.device(device) if device is not None else module.device
    concept_names = module.evidence_concepts
    tally = ConceptTally(module.class_names, concept_names, data.concepts, settings.typical, settings.error_concepts)
    seen = 0
    with _progress(data.size, "report", progress) as bar:
        for batch in data.batches(settings.batch_size, None):
            images = batch.images.to(device)
            evidence = module.evidence(images, top_n=settings.top_n, **settings.options)
            true_evidence = None
            pred = evidence.logits.argmax(dim=1).cpu()
            wrong = ((batch.labels != UNLABELED) & (batch.labels != pred)).nonzero()[:, 0]
            if concept_names is not None and len(wrong):
                rows = wrong.to(device)
                true_evidence = module.evidence(
                    images[rows], batch.labels[wrong].to(device), concepts=evidence.concepts[rows], **settings.options
                )
            tally.update(batch, evidence, true_evidence)
            seen += len(batch.ids)
            bar.update(len(batch.ids))
    if seen == 0:
        raise ReportError(f"{data.description}: no image could be read")
    specific = tally.specificity()
    classes = [tally.class_rows(k, settings.top, settings.rank, specific) for k in range(len(tally.class_names))]
    if data.definitions is not None and concept_names is not None:
        for k, row in enumerate(classes):
            row["defining"] = [
                {"concept": c, "specificity": float(specific[k, concept_names.index(c)])}
                for c in data.definitions.get(row["class"], [])
                if c in concept_names
            ]
    add_missing(tally.errors, classes)
    labeled = int(tally.labeled.sum())
    report: dict[str, Any] = {
        "method": module.method,
        "data": data.description,
        "images": seen,
        "skipped": {"count": len(data.skipped), "images": data.skipped[:50]},
        "labeled": labeled,
        "accuracy": float(tally.correct.sum() / labeled) if labeled else None,
        "settings": vars(settings).copy(),
        "concepts": concept_names,
        "contribution": (
            "mean contribution to the predicted class per image of the class (an image where the concept was not "
            "explained counts 0), 95 % normal interval"
        ),
        "presence": "ground truth" if data.concepts is not None else ("method" if tally.has_detected else None),
        "classes": classes,
        "matrix": {
            "concepts": concept_names or [],
            "classes": tally.class_names,
            "values": tally.matrix().tolist() if concept_names is not None else [],
        },
        "errors": {
            "count": len(tally.errors),
            "pairs": error_pairs(tally.errors),
            "items": tally.errors,
        },
    }
    report["findings"] = findings(report, data.definitions)
    pictures = _pictures(module, data, report, tally, settings, device)
    return report, pictures


def _pictures(
    module: Any, data: ReportData, report: dict[str, Any], tally: ConceptTally, settings: ReportSettings, device: Any
) -> dict[str, Any]:
    """The images and maps the figures draw: a second pass over the picked images only."""
    names = tally.concept_names
    index = {n: i for i, n in enumerate(names or [])}
    wanted: dict[int, dict[str, Any]] = {}  # position -> {"concepts": [...], "pred": k, "true": k}
    examples: list[tuple[str, str, int, float]] = []  # (class, concept, position, contribution)
    if names is not None:
        for row in report["classes"]:
            for c in row["positive"][: settings.figure_concepts]:
                for t in c["typical"]:
                    examples.append((row["class"], c["concept"], t["position"], t["contribution"]))
                    w = wanted.setdefault(t["position"], {"concepts": []})
                    w["concepts"].append(index[c["concept"]])
    errors = report["errors"]["items"][: settings.error_figures]
    for e in errors:
        w = wanted.setdefault(e["position"], {"concepts": []})
        for side in ("toward_predicted", "toward_true"):
            if e.get(side):
                w["concepts"].append(index[e[side][0]["concept"]])
        w["pred"], w["true"] = tally.class_names.index(e["predicted"]), tally.class_names.index(e["true"])
    images: dict[int, np.ndarray] = {}
    maps: dict[tuple[int, str], np.ndarray] = {}
    for batch in data.batches(settings.batch_size, set(wanted)):
        x = batch.images.to(device)
        if names is not None:
            concept_lists = [wanted[p]["concepts"] or [0] for p in batch.positions]
            width = max(len(c) for c in concept_lists)
            concepts = torch.tensor([c + [c[0]] * (width - len(c)) for c in concept_lists], device=device)
            ev = module.evidence(x, concepts=concepts, **settings.options)
            for b, p in enumerate(batch.positions):
                for j, c in enumerate(concept_lists[b]):
                    maps[(p, names[c])] = _small(ev.regions[b, j])
        else:
            pred = module.evidence(x, **settings.options)
            true = torch.tensor([wanted[p].get("true", 0) for p in batch.positions], device=device)
            truth = module.evidence(x, true, **settings.options)
            for b, p in enumerate(batch.positions):
                maps[(p, "predicted")] = _small(pred.class_map[b])
                maps[(p, "true")] = _small(truth.class_map[b])
        for b, p in enumerate(batch.positions):
            images[p] = (batch.images[b].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return {"examples": examples, "errors": errors, "images": images, "maps": maps}


def _small(m: Tensor) -> np.ndarray:
    return m.detach().float().cpu().numpy().astype(np.float16)
