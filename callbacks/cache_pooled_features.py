"""Keep the frozen classifier's pooled activations across epochs, so epochs after the first skip it."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from cefam_lightning.data.feature_cache import PooledFeatureCache


class CachePooledFeatures(L.Callback):
    """Open (creating on one process per node) the feature caches and hand them to the module.

    The same cache objects must also be given to the DataModule (``feature_caches=``), whose loaders then serve a
    cached sample's ``z`` instead of its image. See :mod:`cefam_lightning.data.feature_cache`.

    Args:
        caches: ``{"train": cache, "val": cache}`` (either may be missing).
    """

    def __init__(self, caches: dict[str, PooledFeatureCache]):
        super().__init__()
        unknown = set(caches) - {"train", "val"}
        if unknown:
            raise ValueError(f"feature caches are for the train and val splits only, got {sorted(unknown)}")
        self.caches = caches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):  # testing and predicting need the classifier's logits
            return
        for split, cache in self.caches.items():
            cache.open_or_create(barrier=trainer.strategy.barrier, creator=trainer.local_rank == 0)
            rank_zero_info(
                f"feature cache ({split}): {cache.num_filled}/{len(cache.ids)} samples already cached in {cache.path}"
            )
        pl_module.feature_caches = dict(self.caches)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for cache in self.caches.values():
            cache.flush()
