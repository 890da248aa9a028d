"""Stop training at the first NaN or infinite loss or weight, before such weights can reach a checkpoint.

Lightning keeps training on a NaN loss, and ``ModelCheckpoint`` counts a NaN ``val/loss`` as ``inf`` but still
saves it as the best checkpoint when it has none yet; ``EarlyStopping`` only ends the run quietly. So a run whose
loss went NaN in its first epoch used to exit 0 with NaN weights in ``best.ckpt``. This callback raises instead:
an exception during ``fit`` writes no further checkpoint, so every checkpoint on disk holds finite weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cefam_lightning.errors import CefamError

_SHOWN = 5  # non-finite tensors named in an error
_HINT = "lower optimizer.lr, or check the data and trainer.precision"


class NonFiniteLossError(CefamError):
    """A loss, or the weights it trained, became NaN or infinite during training."""


class StopOnNonFiniteLoss(L.Callback):
    """Raise :class:`NonFiniteLossError` as soon as training produces a NaN or infinite loss or weight.

    Checked, for any LightningModule whose ``training_step`` returns its loss (CE-FAM, L-CAM, SIAM):

    * after every training batch, its loss and the trainable weights its step updated (a finite loss can still
      give an infinite gradient or update), with one host sync, agreed across processes so every rank stops;
    * the trainable weights and floating buffers when training or a validation starts (a resumed checkpoint,
      and before validation callbacks render anything with them);
    * every logged ``<val_prefix>*`` value when a validation ends: Lightning runs ``ModelCheckpoint`` after all
      other callbacks, so this comes before it saves;
    * the trainable weights and floating buffers whenever a checkpoint is about to be written.

    Args:
        train_key: the name the training loss is logged under, for the error.
        val_prefix: logged validation values checked at the end of each validation (``val/loss``,
            ``val/loss_emb``, ...).
    """

    def __init__(self, train_key: str = "train/loss", val_prefix: str = "val/loss"):
        super().__init__()
        self.train_key, self.val_prefix = train_key, val_prefix

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        losses = [(self.train_key, loss.detach())] if isinstance(loss, Tensor) else []
        named = losses + [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        bad = non_finite(named)
        if not trainer.strategy.reduce_boolean_decision(not bad, all=True):
            where = f"at epoch {trainer.current_epoch}, training batch {batch_idx}"
            if losses and bad[:1] == [self.train_key]:
                raise NonFiniteLossError(
                    f"{self.train_key} is {_value(losses[0][1])} {where}: training stopped, no checkpoint written from "
                    f"here on; {_HINT}"
                )
            if bad:
                raise NonFiniteLossError(
                    f"{_tensors(bad)} hold NaN or infinite values after the step {where} ({self.train_key} was "
                    f"finite): training stopped, no checkpoint written from here on; {_HINT}"
                )
            raise NonFiniteLossError(f"another process's {self.train_key} or weights became NaN or infinite {where}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_weights(trainer, pl_module, "before training")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_weights(trainer, pl_module, "before validating")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(self.val_prefix)}
        bad = sorted(non_finite(logged.items()))
        if bad:
            values = ", ".join(f"{k} is {_value(logged[k])}" for k in bad)
            raise NonFiniteLossError(f"{values} {_when(trainer)}: training stopped before checkpointing it; {_HINT}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check_weights(trainer, pl_module, "instead of writing a checkpoint")

    @staticmethod
    def _check_weights(trainer: L.Trainer, pl_module: L.LightningModule, doing: str) -> None:
        bad = non_finite(weights_and_buffers(pl_module))
        if bad:
            raise NonFiniteLossError(
                f"{_tensors(bad)} hold NaN or infinite values {_when(trainer)}: training stopped {doing}; {_HINT}"
            )


def weights_and_buffers(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``module``'s trainable parameters and floating buffers (BatchNorm statistics), by name.

    Frozen parameters (the classifier's) cannot change in training and are not read.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return named + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]


def non_finite(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the tensors that hold a NaN or an infinite value, in the given order (one host sync).

    Each tensor's minimum and maximum tell: both are NaN if one entry is, and infinite if one entry is. On a CPU
    that is 20-40x faster than ``isfinite(t).all()``, which matters when it runs after every training step.
    """
    named = [(n, t.detach()) for n, t in named if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    extremes = torch.stack([torch.stack(torch.aminmax(t)).float() for _, t in named])
    finite = torch.isfinite(extremes).all(dim=1).tolist()
    return [n for (n, _), ok in zip(named, finite, strict=True) if not ok]


def _tensors(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} weight tensor(s) ({shown})"


def _value(t: Tensor) -> str:
    """``nan`` / ``inf`` / ``-inf`` of a scalar, or how many entries of a tensor are not finite."""
    if t.numel() == 1:
        return str(float(t))
    return f"non-finite in {int((~torch.isfinite(t)).sum())} of {t.numel()} entries"


def _when(trainer: L.Trainer) -> str:
    if trainer.sanity_checking:
        return "in the sanity check before training"
    return f"at epoch {trainer.current_epoch} (global step {trainer.global_step})"
