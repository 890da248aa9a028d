"""Evaluation metrics (docs/method.md#metrics): torchmetrics classes here, pure functions in :mod:`.functional`."""

from cefam_lightning.metrics.faithfulness import Faithfulness
from cefam_lightning.metrics.presence import presence_auroc
from cefam_lightning.metrics.region import RegionMetrics

__all__ = ["Faithfulness", "RegionMetrics", "presence_auroc"]
