"""Concept-presence AUROC over any number of concepts: torchmetrics' ``MultilabelAUROC``, which needs two labels
at least, or ``BinaryAUROC`` on the one column of a single concept (a zero-shot split may hold out one concept)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, MultilabelAUROC


class _OneConceptAUROC(BinaryAUROC):
    """``BinaryAUROC`` fed ``(n, 1)`` scores and presence, as ``MultilabelAUROC`` is."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds[:, 0], target[:, 0])


def presence_auroc(num_concepts: int, thresholds: int | None = None, per_concept: bool = False, **kwargs) -> Metric:
    """AUROC of concept scores ``(n, num_concepts)`` against presence ``(n, num_concepts)`` (0/1), macro-averaged
    over the concepts (``per_concept``: one value per concept; torchmetrics returns a one-element result as a
    scalar, so read it with ``.reshape(-1)``). ``thresholds``: ``None`` exact, an int binned."""
    if num_concepts < 1:
        raise ValueError(f"presence_auroc needs at least one concept, got {num_concepts}")
    if num_concepts == 1:
        return _OneConceptAUROC(thresholds=thresholds, **kwargs)
    average = None if per_concept else "macro"
    return MultilabelAUROC(num_concepts, average=average, thresholds=thresholds, **kwargs)
