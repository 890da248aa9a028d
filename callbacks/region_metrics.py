"""NRA, EPG and hit rate of CE-FAM's top-1-layer concept regions on the validation masks, during training."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.logging_utils import ValidationLookup, check_positive, is_due, stack_items
from cefam_lightning.data.feature_cache import IMAGE_INDEX
from cefam_lightning.methods.cefam.pipeline import padded_concepts
from cefam_lightning.metrics import RegionMetrics


class RegionMetricsCallback(L.Callback):
    """Score CE-FAM's concept regions against the validation masks and log the results.

    For every validation image and every concept present in it (a non-empty mask), the concept's region map at its
    selected layer (the most relevant one, with the run's ``k`` and ``select_layers``) is scored with
    :class:`~cefam_lightning.metrics.RegionMetrics`: NRA, EPG and hit rate per concept type and their mean over
    types, logged at the end of validation as ``<prefix>nra_mean``, ``<prefix>epg_mean``, ``<prefix>hit_rate_mean``
    and ``<prefix>nra_<type>`` etc.

    Under DDP each rank scores the images of its own validation shard; the metric's states are sums, synced when
    every rank computes it at the end of the epoch, so all ranks log the same numbers.

    Batches served from the pooled-feature cache carry neither images nor masks; their items are then read from
    the validation dataset by sample id (a map-style dataset is needed, as the cache provides). Data without masks
    (plain image folders) are skipped, with one info message.

    Args:
        every_n_epochs: score every this many epochs (after epochs ``n, 2n, ...``); sanity checks are skipped.
        max_images: score at most this many validation images per epoch over all ranks (``ceil(max/world)`` per
            rank, the first ones of each shard); ``None``: all.
        hit_threshold: a pair is a hit when its NRA is above this.
        prefix: prefix of the logged keys.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_images: int | None = None,
        hit_threshold: float = 0.5,
        prefix: str = "val/",
    ):
        super().__init__()
        check_positive(every_n_epochs=every_n_epochs, max_images=max_images)
        if not 0.0 <= hit_threshold <= 1.0:
            raise ValueError(f"hit_threshold must lie in [0, 1], got {hit_threshold!r}")
        self.every_n_epochs, self.max_images = every_n_epochs, max_images
        self.hit_threshold, self.prefix = hit_threshold, prefix
        self.metric: RegionMetrics | None = None
        self._lookup: ValidationLookup | None = None
        self._has_masks: bool | None = None  # decided once, from the dataset (the same on every rank)
        self._active = False
        self._seen = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metric is None:
            self.metric = RegionMetrics(list(pl_module.hparams["concept_types"]), hit_threshold=self.hit_threshold)

    def _data_has_masks(self, trainer: L.Trainer, batch: dict) -> bool:
        if self._has_masks is None:
            self._lookup = ValidationLookup(trainer)
            if self._lookup.available and len(self._lookup.dataset) > 0:
                self._has_masks = "masks" in self._lookup.dataset[0]
            else:  # a stream: it carries its images, and masks if it has any
                self._has_masks = "masks" in batch
            if not self._has_masks:
                rank_zero_info(f"{type(self).__name__}: the validation data have no concept masks; region metrics off")
        return self._has_masks

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = is_due(trainer, self.every_n_epochs) and self._has_masks is not False
        self._seen = 0
        self.metric.reset()
        self.metric.to(pl_module.device)

    def _images_and_masks(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        if "image" in batch and "masks" in batch and IMAGE_INDEX not in batch:
            return batch["image"], batch["masks"]
        if not self._lookup.available:
            raise RuntimeError(
                f"{type(self).__name__}: a validation batch without images or masks, and no map-style validation "
                f"dataset to read them from by sample id"
            )
        items = stack_items(self._lookup.items(batch["id"]))
        return items["image"].to(device), items["masks"].to(device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._active or not self._data_has_masks(trainer, batch):
            return
        cap = None if self.max_images is None else math.ceil(self.max_images / trainer.world_size)
        if cap is not None and self._seen >= cap:
            return
        images, masks = self._images_and_masks(batch, pl_module.device)
        if cap is not None:
            images, masks = images[: cap - self._seen], masks[: cap - self._seen]
        self._seen += images.shape[0]
        # Validation runs under inference mode; the Jacobian (torch.func) needs ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            images, masks = images.clone(), masks.clone().bool()
            concepts, valid = padded_concepts(masks.flatten(2).any(dim=2))
            if not valid.any():
                return
            # The one CE-FAM pipeline, with the run's settings; contributions are not needed here.
            maps = pl_module.explain(images, concepts=concepts, contributions=False).regions
            rows = valid.nonzero(as_tuple=True)
            ids = concepts[rows]
            self.metric.update(maps[rows], masks[rows[0], ids], ids)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active or not self._has_masks:
            return
        # compute() syncs the sums over ranks: every rank calls it and gets the same values. Averaging those equal
        # values again (sync_dist) changes nothing and keeps Lightning from warning about unsynced epoch logs.
        for name, value in self.metric.compute().items():
            metric, _, part = name.partition("/")
            if metric in ("nra", "epg", "hit_rate"):
                key = f"{self.prefix}{metric}_{part}"
                pl_module.log(key, value.float(), on_step=False, on_epoch=True, sync_dist=True)
        self.metric.reset()
