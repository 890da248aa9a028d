"""Optimizer and LR schedule of every trainable explainer, from the run's ``optimizer`` and ``scheduler`` sections.

One place builds them for CE-FAM, L-CAM and SIAM, so that every method accepts the same keys (SGD/Adam/AdamW,
plateau/cosine/none, the optional linear warm-up of docs/method.md#training-loss) and says the same things about
bad values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("plateau", "cosine", "none")


def configure_optimization(
    groups: Sequence[Mapping[str, Any]] | Sequence[nn.Parameter],
    optimizer: Mapping[str, Any] | None,
    scheduler: Mapping[str, Any] | None,
    max_epochs: int | None,
    where: str = "optimizer",
) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer alone, or ``([opt], schedulers)``.

    Args:
        groups: the trainable parameters, or parameter groups (dicts with ``params`` and an optional
            ``lr_factor``, a multiple of the base LR, e.g. L-CAM's biases at 2x).
        optimizer: ``{"name": "sgd"|"adam"|"adamw", "lr", "weight_decay", "momentum", "nesterov"}`` (SGD's
            momentum and Nesterov flag); other keys are ignored.
        scheduler: ``{"name": "plateau"|"cosine"|"none", "factor", "patience", "monitor", "warmup_epochs",
            "warmup_factor"}``. A warm-up raises the LR linearly from ``lr`` to ``warmup_factor x lr`` over
            ``warmup_epochs`` epochs (the CE-FAM authors' 0.1 -> 0.2); plateau decay multiplies on top of it.
        max_epochs: the trainer's, the cosine schedule's length.
        where: the config key named in errors (``lcam.optimizer`` ...).

    Raises:
        ValueError: an unknown optimizer or scheduler, or a warm-up factor below 1, naming the key.
    """
    ocfg, scfg = dict(optimizer or {}), dict(scheduler or {})
    name = str(ocfg.get("name", "sgd")).lower()
    lr, wd = float(ocfg.get("lr", 0.1)), float(ocfg.get("weight_decay", 0.0))
    groups = list(groups)
    if groups and isinstance(groups[0], Mapping):
        param_groups = [{"params": list(g["params"]), "lr": lr * float(g.get("lr_factor", 1.0))} for g in groups]
    else:
        param_groups = [{"params": groups, "lr": lr}]
    if name == "sgd":
        momentum, nesterov = float(ocfg.get("momentum", 0.0)), bool(ocfg.get("nesterov", False))
        opt: torch.optim.Optimizer = torch.optim.SGD(
            param_groups, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov
        )
    elif name == "adam":
        opt = torch.optim.Adam(param_groups, lr=lr, weight_decay=wd)
    elif name == "adamw":
        opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=wd)
    else:
        raise ValueError(f"{where}.name: unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)}")

    schedulers: list[Any] = []
    warmup = int(scfg.get("warmup_epochs", 0))
    if warmup > 0:
        # LinearLR only scales down, so the optimizer's LR becomes the peak and warm-up starts at 1/factor of it.
        factor = float(scfg.get("warmup_factor", 2.0))
        if factor < 1:
            raise ValueError(f"scheduler.warmup_factor must be >= 1, got {factor}")
        for group in opt.param_groups:
            group["lr"] *= factor
        schedulers.append(torch.optim.lr_scheduler.LinearLR(opt, 1.0 / factor, 1.0, total_iters=warmup))
    sname = str(scfg.get("name", "none")).lower()
    if sname == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=float(scfg.get("factor", 0.1)), patience=int(scfg.get("patience", 5))
        )
        schedulers.append({"scheduler": sched, "monitor": scfg.get("monitor", "val/loss")})
    elif sname == "cosine":
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_epochs or 1)))
    elif sname != "none":
        raise ValueError(f"scheduler.name: unknown scheduler {sname!r}; choose {', '.join(SCHEDULERS)}")
    return ([opt], schedulers) if schedulers else opt
