"""A NaN or infinite loss stops training with one error, and no checkpoint ever holds non-finite weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from cefam_lightning.cli.train import main
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec
from cefam_lightning.errors import CefamError
from cefam_lightning.methods.checkpoints import read_checkpoint
from cefam_lightning.training.config import load_config
from cefam_lightning.training.run import run
from tests.cli import cli_error
from tests.conftest import TINY_WORLD, tiny_overrides


class _Regression(L.LightningModule):
    """A linear regression whose training (or validation) loss is made NaN at one (epoch, batch)."""

    def __init__(self, nan_train_at: tuple[int, int] | None = None, nan_val_epoch: int | None = None):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_train_at, self.nan_val_epoch = nan_train_at, nan_val_epoch

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        if (self.current_epoch, batch_idx) == self.nan_train_at:
            loss = loss * math.nan
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        if not self.trainer.sanity_checking and self.current_epoch == self.nan_val_epoch:
            loss = loss * math.nan
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(tmp_path, module, guard: bool = True, epochs: int = 3) -> ModelCheckpoint:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/loss", save_last=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[ckpt, *([StopOnNonFiniteLoss()] if guard else [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, _loader(), _loader())
    return ckpt


def _checkpoint(path) -> tuple[int, list[str]]:
    """``(epoch, names of non-finite tensors)`` of a checkpoint file."""
    ckpt = read_checkpoint(path)
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return ckpt["epoch"], bad


def test_without_the_guard_lightning_keeps_a_nan_first_epoch_as_best(tmp_path):
    """Why the guard exists: ModelCheckpoint counts NaN as inf, but with no best yet it saves it all the same."""
    _fit(tmp_path, _Regression(nan_train_at=(0, 1)), guard=False, epochs=1)
    assert _checkpoint(tmp_path / "best.ckpt")[1] == ["net.weight", "net.bias"]


def test_a_nan_training_loss_stops_naming_key_epoch_and_batch_and_keeps_checkpoints_finite(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"^train/loss is nan at epoch 1, training batch 2: training stopped"):
        _fit(tmp_path, _Regression(nan_train_at=(1, 2)))
    assert issubclass(NonFiniteLossError, CefamError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert _checkpoint(tmp_path / name) == (0, [])  # the finite epoch 0; nothing from the NaN epoch


def test_a_nan_first_epoch_writes_no_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at epoch 0, training batch 0"):
        _fit(tmp_path, _Regression(nan_train_at=(0, 0)))
    assert list(tmp_path.iterdir()) == []


def test_a_nan_validation_loss_stops_before_it_is_checkpointed(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"^val/loss is nan at epoch 1 \(global step 8\): training stopped"):
        _fit(tmp_path, _Regression(nan_val_epoch=1))
    assert _checkpoint(tmp_path / "best.ckpt") == (0, []) and _checkpoint(tmp_path / "last.ckpt") == (0, [])


def test_non_finite_weights_are_never_written(tmp_path):
    module = _Regression()
    _fit(tmp_path, module, epochs=1)
    with torch.no_grad():
        module.net.bias.fill_(math.inf)
    with pytest.raises(NonFiniteLossError, match=r"^1 weight tensor\(s\) \(net\.bias\) hold NaN or infinite values"):
        module.trainer.save_checkpoint(tmp_path / "nan.ckpt")
    assert not (tmp_path / "nan.ckpt").exists()
    # A resumed run from such weights stops before validating with them.
    with pytest.raises(NonFiniteLossError, match=r"\(net\.bias\) hold NaN .* in the sanity check before training"):
        _fit(tmp_path / "again", module)


def test_every_process_stops_when_one_process_sees_a_nan():
    """Under DDP the decision is reduced over ranks: a rank whose own loss is finite stops too (else it would wait
    for the others forever in the next all-reduce)."""
    calls = []

    def reduce(decision, all):
        calls.append((decision, all))
        return False  # another rank saw a NaN

    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=reduce), current_epoch=2)
    with pytest.raises(NonFiniteLossError, match=r"another process's train/loss .* at epoch 2, training batch 3"):
        StopOnNonFiniteLoss().on_train_batch_end(trainer, _Regression(), {"loss": torch.tensor(0.5)}, None, 3)
    assert calls == [(True, True)]


class _NaNGradientsAtEpoch(L.Callback):
    """Make every gradient NaN before the first optimizer step of the given epoch (a finite loss whose gradient
    overflowed), whatever the method."""

    def __init__(self, epoch: int):
        self.epoch, self.done = epoch, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.current_epoch == self.epoch and not self.done:
            self.done = True
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)


@pytest.mark.parametrize("method", ["cefam", "lcam_img", "siam"])
def test_every_method_stops_on_nan_weights_and_keeps_best_ckpt_finite(method, cache_dir, tmp_path):
    overrides = [*tiny_overrides(cache_dir, tmp_path, method, method=method), "trainer.max_epochs=3"]
    cfg = load_config(overrides=overrides)
    with pytest.raises(NonFiniteLossError, match=r"infinite values after the step at epoch 1, training batch 0"):
        run(cfg, extra_callbacks=[_NaNGradientsAtEpoch(1)])
    ckpts = tmp_path / method / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert _checkpoint(ckpts / name) == (0, [])  # epoch 0's finite weights; nothing of epoch 1


def test_train_py_with_a_diverging_lr_ends_with_one_error_line(cache_dir, tmp_path, capsys):
    """SGD at lr 1e30 overflows in the first steps: exit 2 and no checkpoint (main wrote NaN weights as best)."""
    argv = [*tiny_overrides(cache_dir, tmp_path, "diverge"), "optimizer.name=sgd", "optimizer.lr=1e30"]
    line = cli_error(main, argv, capsys)
    assert "at epoch 0, training batch" in line and "optimizer.lr" in line
    assert not (tmp_path / "diverge" / "checkpoints").exists()


def test_train_py_refuses_a_world_store_with_nan_embeddings(tmp_path, capsys):
    """A NaN row in the embeddings is refused when the store is opened, before training starts."""
    spec = WorldSpec(**TINY_WORLD)
    cache = tmp_path / "cache"
    store = ShapesWorld.build(spec, cache).store_path
    emb = np.load(store / "image_embeddings.npy")
    emb[[3, 70]] = np.nan
    np.save(store / "image_embeddings.npy", emb)
    line = cli_error(main, tiny_overrides(cache, tmp_path, "nan_store"), capsys)
    assert line.startswith(f"{store / 'image_embeddings.npy'}: 2 of {len(emb)} rows hold NaN or infinite values")
    assert "3 (id 'train/000003'), 70 (id " in line
