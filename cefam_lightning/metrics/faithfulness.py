"""Average Drop and Increase in Confidence of class maps (docs/method.md#faithfulness), accumulated as DDP-synced
sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cefam_lightning.metrics.functional.faithfulness import (
    DEFAULT_KEEPS,
    _average_drop_compute,
    _check_keep,
    _faithfulness_update,
    _increase_in_confidence_compute,
    setting_name,
)


class Faithfulness(Metric):
    """Average Drop (AD, lower is better) and Increase in Confidence (IC, higher is better) per kept fraction.

    :meth:`update` takes precomputed probabilities, so the metric applies to any class map; get them with
    :func:`~cefam_lightning.metrics.functional.faithfulness.faithfulness_probabilities` (same ``keeps``). The
    states are per-setting sums and a count, so DDP sync is one sum per state.

    Args:
        keeps: kept pixel fractions, one per setting (default 100 %, 50 %, 15 %).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = Faithfulness(keeps=(1.0, 0.5))
        >>> metric.update(torch.tensor([0.8, 0.5]), torch.tensor([[0.4, 0.2], [0.6, 0.5]]))
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'ad/100%': 25.0, 'ic/100%': 50.0, 'ad/50%': 37.5, 'ic/50%': 0.0}
    """

    full_state_update = False
    higher_is_better = None  # AD: lower is better; IC: higher
    is_differentiable = False

    def __init__(self, keeps: Sequence[float] = DEFAULT_KEEPS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keeps = [_check_keep(k) for k in keeps]
        if not self.keeps:
            raise ValueError("keeps must name at least one kept fraction")
        self.names = [setting_name(k) for k in self.keeps]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"keeps has duplicate settings: {list(keeps)}")
        n = len(self.keeps)
        self.add_state("drop_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("increase_count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, y: Tensor, o: Tensor) -> None:
        """Add a batch.

        Args:
            y: ``(N,)`` probabilities of the explained class on the images.
            o: ``(N, S)`` the same class's probabilities on the masked images, one column per setting (``(N,)``
                when there is one setting).

        Raises:
            ValueError: On mismatched shapes or a column count other than the number of settings.
        """
        if o.ndim == 1 and len(self.keeps) == 1:
            o = o[:, None]
        if o.ndim != 2 or o.shape[1] != len(self.keeps):
            raise ValueError(f"o must be (N, {len(self.keeps)}) for the settings {self.names}, got {tuple(o.shape)}")
        drop, increase, n = _faithfulness_update(y, o)
        self.drop_sum += drop.to(self.drop_sum.device)
        self.increase_count += increase.to(self.increase_count.device)
        self.total += n

    def compute(self) -> dict[str, Tensor]:
        """``ad/<setting>`` and ``ic/<setting>`` in percent (NaN before any update), settings like ``"100%"``."""
        total = self.total.to(torch.float64)
        ad = _average_drop_compute(self.drop_sum, total)
        ic = _increase_in_confidence_compute(self.increase_count, total)
        out = {}
        for i, name in enumerate(self.names):
            out[f"ad/{name}"], out[f"ic/{name}"] = ad[i], ic[i]
        return out
