"""Data for training explainers: images joined by sample id with their precomputed VLM image embeddings.

A batch is a dict with ``image`` (``B x 3 x H x W`` in ``[0, 1]``), ``label``, ``id``, ``embedding`` (the VLM's
raw image embedding) and, where the dataset has masks, ``presence`` (``B x C``) and, for val/test, ``masks``
(``B x C x H x W``). Datasets are map-style, so under DDP Lightning's distributed sampler splits them.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.data.feature_cache import CachedFeatureDataset, PooledFeatureCache, collate_cached
from cefam_lightning.data.order import epoch_sampler
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec, WorldSplit


class ShapesWorldDataset(Dataset):
    """One split of the shapes world, joined with its embeddings in ``store`` (if given) by sample id."""

    def __init__(self, split: WorldSplit, store: EmbeddingStore | None = None, with_masks: bool = False):
        self.split, self.store, self.with_masks = split, store, with_masks
        self.rows = store.rows_for(split.ids) if store is not None else None
        # Once per split, not per item: training items then never read their masks.
        self.presence = torch.from_numpy(np.asarray(split.presence)).float()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        item = self.item_without_image(i)
        item["image"] = torch.from_numpy(np.array(self.split.images[i])).permute(2, 0, 1).float().div_(255.0)
        if self.with_masks:
            item["masks"] = torch.from_numpy(np.array(self.split.masks[i]))  # a copy: memory-mapped rows are read-only
        return item

    def item_without_image(self, i: int) -> dict:
        """Item ``i`` without reading its image or masks (what a feature cache needs)."""
        item = {"label": int(self.split.labels[i]), "id": self.split.ids[i], "presence": self.presence[i]}
        if self.rows is not None:
            item["embedding"] = torch.from_numpy(np.array(self.store.image_embeddings[self.rows[i]], dtype=np.float32))
        return item


class ShapesWorldDataModule(L.LightningDataModule):
    """The shapes world as a DataModule: generated (or reused from the cache) once, memory-mapped on every rank.

    Args:
        spec: the world's parameters.
        cache_dir: where generated worlds are kept (a folder per spec hash).
        batch_size: per-device batch size.
        num_workers: DataLoader workers.
        with_embeddings: join the oracle VLM's embeddings (off for fitting the classifier).
        flip: random horizontal flips for training (only valid without precomputed embeddings of the
            un-flipped image; the world's shapes and textures are flip-invariant, so this is used to fit the
            classifier).
        feature_caches: ``{split: PooledFeatureCache}`` for the train/val splits whose pooled activations are
            cached (see :mod:`cefam_lightning.data.feature_cache`); not with ``flip``.
        seed: of the training order, which depends only on it and the epoch, so that a run resumed from a
            checkpoint sees the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        spec: WorldSpec,
        cache_dir: str | Path,
        batch_size: int = 128,
        num_workers: int = 0,
        with_embeddings: bool = True,
        flip: bool = False,
        feature_caches: dict[str, PooledFeatureCache] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if flip and feature_caches:
            raise ValueError("a feature cache needs the same image every epoch: it cannot be used with flip=True")
        self.feature_caches = dict(feature_caches or {})
        self.spec, self.cache_dir = spec, cache_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self.with_embeddings, self.flip, self.seed = with_embeddings, flip, seed
        self.world: ShapesWorld | None = None
        self.datasets: dict[str, ShapesWorldDataset] = {}

    def prepare_data(self) -> None:
        """Runs on local rank 0 of each node only: generate the world if it is not cached."""
        ShapesWorld.build(self.spec, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Runs on every rank: open the cached world (memory-mapped) and build the split datasets."""
        if self.world is None:
            self.world = ShapesWorld.build(self.spec, self.cache_dir)
        store = self.world.store if self.with_embeddings else None
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = ShapesWorldDataset(self.world.split(split), store, with_masks=split != "train")

    @property
    def concepts(self):
        return self.spec.concepts

    def sample_ids(self, split: str) -> list[str]:
        return list(self.datasets[split].split.ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.classes)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, collate = self.datasets[split], None
        cache = self.feature_caches.get(split)
        if cache is not None:
            dataset, collate = CachedFeatureDataset(dataset, cache, self.sample_ids(split)), collate_cached
        # The order is a function of (seed, epoch), so a resumed run sees the batches an uninterrupted one does.
        sampler = epoch_sampler(dataset, self.seed, self.trainer) if shuffle else None
        shuffle = shuffle and sampler is None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.flip and self.trainer is not None and self.trainer.training and "image" in batch:
            flip = torch.rand(batch["image"].shape[0], device=batch["image"].device) < 0.5
            batch["image"] = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
        return batch
