"""Evaluation metrics (docs/method.md#metrics): torchmetrics classes here, pure functions in :mod:`.functional`."""

from cefam_lightning.metrics.faithfulness import Faithfulness
from cefam_lightning.metrics.perturbation import ROAD, DeletionInsertion
from cefam_lightning.metrics.presence import presence_auroc
from cefam_lightning.metrics.region import RegionMetrics
from cefam_lightning.metrics.shortcut import classifier_shortcut_reliance, shortcut_reliance

__all__ = [
    "ROAD",
    "DeletionInsertion",
    "Faithfulness",
    "RegionMetrics",
    "classifier_shortcut_reliance",
    "presence_auroc",
    "shortcut_reliance",
]
