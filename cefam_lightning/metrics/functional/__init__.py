"""Metrics as pure tensor functions."""

from cefam_lightning.metrics.functional.region import auc_high, auc_low, epg, iou_auc, nra

__all__ = ["auc_high", "auc_low", "epg", "iou_auc", "nra"]

from cefam_lightning.metrics.functional.faithfulness import (  # noqa: E402 - appended export
    average_drop,
    faithfulness_probabilities,
    increase_in_confidence,
    masked_inputs,
)

__all__ += ["average_drop", "faithfulness_probabilities", "increase_in_confidence", "masked_inputs"]
