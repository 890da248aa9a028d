"""Min-max normalization of saliency maps: the one implementation the metrics, class maps and figures share."""

from __future__ import annotations

import torch
from torch import Tensor


def minmax_normalize(maps: Tensor, dims: int = 1) -> Tensor:
    """Each map scaled to ``[0, 1]`` by its own minimum and maximum over its last ``dims`` dimensions.

    A constant map becomes all zeros (its span is taken as 1), so it carries no energy and ranks no pixel first.

    Example:
        >>> minmax_normalize(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
        tensor([[0.0000, 1.0000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """
    flat = maps.flatten(-dims) if dims > 1 else maps
    low = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - low
    return ((flat - low) / torch.where(span > 0, span, torch.ones_like(span))).view_as(maps)
