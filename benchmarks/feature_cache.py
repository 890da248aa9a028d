"""Pooled-feature cache: the time of a training epoch after the first (pooled activations served from the cache,
no image decoded, no classifier pass) next to the first epoch (decode + frozen ResNet-50 + cache writes), in one
run, and their ratio (issue 4 asks for at least 20x).

ResNet-50 (random init, all four layers, 3840 pooled channels), a small set of generated 224 px JPEGs read from a
CSV manifest through ``ImageDataModule``, CE-FAM's translator trained with Adam; validation is off so that only
training epochs are timed. Run: ``python benchmarks/feature_cache.py``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from callbacks import CachePooledFeatures
from cefam_lightning.data.concepts import make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.data.feature_cache import PooledFeatureCache, pooled_identity
from cefam_lightning.data.image_datamodule import ImageDataModule
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator

try:  # the JPEG generator of the data-pipeline benchmark (run as a script or as benchmarks.feature_cache)
    from data_pipeline import natural_jpeg
except ImportError:  # pragma: no cover
    from benchmarks.data_pipeline import natural_jpeg


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t0)


def write_data(folder: Path, n: int, dim: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    rows = []
    for i in range(n):
        path = folder / "img" / f"{i:04d}.jpg"
        path.write_bytes(natural_jpeg(rng, (int(rng.integers(224, 289)), 224)))
        rows.append({"path": f"img/{i:04d}.jpg", "label": i % 10})
    manifest = folder / "train.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    concepts = make_concepts([(f"c{i}", "object") for i in range(20)])
    store = EmbeddingStore.write(
        folder / "store",
        sample_ids=[r["path"] for r in rows],
        image_embeddings=rng.normal(size=(n, dim)).astype(np.float32),
        text_embeddings=rng.normal(size=(len(concepts), dim)),
        concepts=concepts,
        vlm=VLMInfo(name="random"),
    )
    return manifest, store.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="the authors train with 128-256")
    p.add_argument("--epochs", type=int, default=3, help="the first fills the cache; the others are averaged")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(0)
    dim = 512
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, store_path = write_data(tmp, args.images, dim)
        classifier = build_classifier("resnet50", 10)
        store = EmbeddingStore.open(store_path)
        dm = ImageDataModule(
            manifest,
            manifest,
            store=store_path,
            input_spec=classifier.input_spec,
            batch_size=args.batch,
            num_workers=args.workers,
        )
        dm.setup("fit")
        in_dim = sum(c for c, _, _ in classifier.layer_shapes().values())
        ids = dm.sample_ids("train")
        cache = PooledFeatureCache(tmp / "features", ids, in_dim, pooled_identity(classifier, str(manifest)))
        dm.feature_caches = {"train": cache}
        module = CEFAMModule(
            classifier,
            Translator(in_dim, dim),
            ConceptScorer(torch.from_numpy(store.text_embeddings), "clip"),
            concept_names=store.concept_names,
            concept_types=[c.type for c in store.concepts],
            class_names=[str(i) for i in range(10)],
            optimizer={"name": "adam", "lr": 1e-3},
            scheduler={"name": "none"},
        )
        timer = EpochTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[CachePooledFeatures({"train": cache}), timer],
        )
        trainer.fit(module, datamodule=dm)
        assert cache.num_filled == len(ids)
    first, later = timer.seconds[0], sum(timer.seconds[1:]) / len(timer.seconds[1:])
    print(f"Feature cache: ResNet-50 (random init), {args.images} JPEGs of 224 px, batch {args.batch}, ")
    print(f"  {torch.get_num_threads()} threads, {args.workers} DataLoader workers")
    print(f"  first epoch (decode + classifier + cache writes): {first:8.3f} s")
    print(f"  later epochs (cached pooled activations), mean:   {later:8.3f} s")
    print(f"  speed-up:                                         {first / later:8.1f}x")


if __name__ == "__main__":
    main()
