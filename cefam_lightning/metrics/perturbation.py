"""Deletion / insertion AUC and ROAD of class maps (docs/method.md#deletion-insertion-and-road), accumulated as
DDP-synced sums; the probabilities come from :mod:`cefam_lightning.metrics.functional.perturbation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cefam_lightning.metrics.functional.perturbation import DEFAULT_PERCENTILES, _check_percentiles, curve_auc


class DeletionInsertion(Metric):
    """Mean deletion AUC (lower is better) and insertion AUC (higher is better) of class maps, and the mean curves.

    :meth:`update` takes the curves of
    :func:`~cefam_lightning.metrics.functional.perturbation.deletion_insertion_curves`, so the metric applies to any
    class map.

    Args:
        steps: the curves' steps (``steps + 1`` points).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = DeletionInsertion(steps=2)
        >>> metric.update(torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items() if not k.startswith("curve")}
        {'deletion': 0.5, 'insertion': 0.75}
    """

    full_state_update = False
    higher_is_better = None  # deletion: lower is better; insertion: higher
    is_differentiable = False

    def __init__(self, steps: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        for name in ("deletion_sum", "insertion_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("deletion_curve", "insertion_curve"):
            self.add_state(name, torch.zeros(self.steps + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, deletion: Tensor, insertion: Tensor) -> None:
        """Add a batch of ``(N, steps + 1)`` deletion and insertion curves."""
        want = (deletion.shape[0], self.steps + 1)
        if tuple(deletion.shape) != want or tuple(insertion.shape) != want:
            raise ValueError(
                f"expected deletion and insertion curves {want}, got {tuple(deletion.shape)} and "
                f"{tuple(insertion.shape)}"
            )
        d, i = deletion.double(), insertion.double()
        self.deletion_sum += curve_auc(d).sum().to(self.deletion_sum.device)
        self.insertion_sum += curve_auc(i).sum().to(self.insertion_sum.device)
        self.deletion_curve += d.sum(0).to(self.deletion_curve.device)
        self.insertion_curve += i.sum(0).to(self.insertion_curve.device)
        self.total += deletion.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``deletion``, ``insertion`` (mean AUCs) and ``curve/deletion``, ``curve/insertion`` (mean curves);
        NaN before any update."""
        total = self.total.to(torch.float64)
        return {
            "deletion": self.deletion_sum / total,
            "insertion": self.insertion_sum / total,
            "curve/deletion": self.deletion_curve / total,
            "curve/insertion": self.insertion_curve / total,
        }


class ROAD(Metric):
    """ROAD of class maps: the explained class's mean probability with the most relevant (MoRF, lower is better)
    and the least relevant (LeRF, higher is better) pixels removed and imputed, averaged over the percentiles, and
    ``combined = (LeRF - MoRF) / 2`` (higher is better).

    :meth:`update` takes the probabilities of
    :func:`~cefam_lightning.metrics.functional.perturbation.road_probabilities` (pytorch-grad-cam's ROAD).

    Args:
        percentiles: the percentiles the probabilities were taken at (one column each).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = ROAD(percentiles=(10, 90))
        >>> metric.update(torch.tensor([[0.2, 0.4]]), torch.tensor([[0.8, 1.0]]))
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'road/morf': 0.3, 'road/lerf': 0.9, 'road/combined': 0.3}
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentiles = _check_percentiles(percentiles)
        n = len(self.percentiles)
        self.add_state("morf_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lerf_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, morf: Tensor, lerf: Tensor) -> None:
        """Add ``(N, len(percentiles))`` MoRF and LeRF probabilities."""
        want = (morf.shape[0], len(self.percentiles))
        if tuple(morf.shape) != want or tuple(lerf.shape) != want:
            raise ValueError(f"expected MoRF and LeRF {want}, got {tuple(morf.shape)} and {tuple(lerf.shape)}")
        self.morf_sum += morf.double().sum(0).to(self.morf_sum.device)
        self.lerf_sum += lerf.double().sum(0).to(self.lerf_sum.device)
        self.total += morf.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``road/morf``, ``road/lerf``, ``road/combined``; NaN before any update."""
        total = self.total.to(torch.float64)
        morf, lerf = (self.morf_sum / total).mean(), (self.lerf_sum / total).mean()
        return {"road/morf": morf, "road/lerf": lerf, "road/combined": (lerf - morf) / 2}
