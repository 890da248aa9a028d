"""Fit the shapes world's small CNN, the classifier that CE-FAM then explains frozen
(docs/method.md#shapes-classifier).

The fitted weights are cached beside the world, keyed by the world and the fitting settings, so a second
run reuses them.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json, stable_hash
from cefam_lightning.models.classifier import SHAPES_MEAN, SHAPES_STD
from cefam_lightning.models.components.shapes_cnn import ShapesCNN

log = logging.getLogger(__name__)


@dataclass
class FitSettings:
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    epochs: int = 12
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0


class ClassifierFitModule(L.LightningModule):
    """Plain supervised training of :class:`ShapesCNN` with cross-entropy and AdamW + one-cycle LR."""

    def __init__(self, num_classes: int, widths: list[int], lr: float, weight_decay: float):
        super().__init__()
        self.save_hyperparameters()
        self.model = ShapesCNN(num_classes, widths)
        self.register_buffer("mean", torch.tensor(SHAPES_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SHAPES_STD).view(1, 3, 1, 1), persistent=False)
        self.acc = torch.nn.ModuleDict(
            {f"{s}_": MulticlassAccuracy(num_classes, average="micro") for s in ("val", "test")}
        )

    def forward(self, images):
        return self.model((images - self.mean) / self.std)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str):
        self.acc[f"{stage}_"](self(batch["image"]), batch["label"])
        self.log(f"{stage}/acc", self.acc[f"{stage}_"], prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def classifier_cache_path(spec: WorldSpec, cache_dir: str | Path, settings: FitSettings) -> Path:
    key = stable_hash({"world": spec.cache_key(), "fit": settings.__dict__})
    return ShapesWorld.cache_path(spec, cache_dir) / "classifiers" / f"shapes_cnn-{key}.pt"


def fit_shapes_classifier(
    spec: WorldSpec,
    cache_dir: str | Path,
    settings: FitSettings,
    progress_bar: bool = True,
    accelerator: str = "auto",
) -> tuple[Path, dict]:
    """Return (path of the fitted ``ShapesCNN`` state dict, its metrics), fitting it only if not cached."""
    path = classifier_cache_path(spec, cache_dir, settings)
    metrics_path = path.with_suffix(".json")
    if path.is_file() and metrics_path.is_file():
        log.info("Reusing fitted classifier %s", path)
        return path, json.loads(metrics_path.read_text())
    L.seed_everything(settings.seed, workers=True, verbose=False)
    dm = ShapesWorldDataModule(spec, cache_dir, batch_size=settings.batch_size, with_embeddings=False, flip=True)
    module = ClassifierFitModule(len(spec.classes), list(settings.widths), settings.lr, settings.weight_decay)
    trainer = L.Trainer(
        max_epochs=settings.epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    metrics = {"val_acc": float(val["val/acc"]), "test_acc": float(test["test/acc"]), "settings": settings.__dict__}
    buf = io.BytesIO()
    torch.save(module.model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(metrics_path, metrics)
    return path, metrics
