"""Evaluation metrics (docs/method.md#metrics): torchmetrics classes here, pure functions in :mod:`.functional`."""

from cefam_lightning.metrics.region import RegionMetrics

__all__ = ["RegionMetrics"]

from cefam_lightning.metrics.faithfulness import Faithfulness  # noqa: E402 - appended export

__all__ += ["Faithfulness"]

from cefam_lightning.metrics.presence import presence_auroc  # noqa: E402 - appended export

__all__ += ["presence_auroc"]
