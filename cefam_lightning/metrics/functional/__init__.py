"""Metrics as pure tensor functions."""

from cefam_lightning.metrics.functional.region import auc_high, auc_low, epg, iou_auc, nra

__all__ = ["auc_high", "auc_low", "epg", "iou_auc", "nra"]
