"""Region metrics against ground-truth masks (SPEC §3): EPG, the IoU-curve AUC and NRA.

Every function takes a batch of saliency maps ``(n, H, W)`` and binary masks of the same shape (a single
``(H, W)`` pair counts as ``n = 1``) and returns one float64 value per map, on the maps' device. An empty
mask gives NaN. Maps must be finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Rows go through in chunks of about this many pixels, so that the float64 temporaries of a few hundred
# 224x224 maps stay in the low hundreds of MB.
_CHUNK_PIXELS = 1 << 21


def _flatten_inputs(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes and return ``(n, N)`` maps and boolean masks."""
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and masks must have the same shape, got maps {tuple(maps.shape)} and masks {tuple(masks.shape)}"
        )
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must have shape (n, H, W) or (H, W), got {tuple(maps.shape)}")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    return maps.flatten(1), masks.flatten(1).bool()


def _by_chunks(fn: Callable[[Tensor, Tensor], Tensor], maps: Tensor, masks: Tensor) -> Tensor:
    """Apply ``fn`` to row chunks of ``(n, N)`` maps and masks and concatenate the results."""
    rows = max(1, _CHUNK_PIXELS // max(maps.shape[1], 1))
    out = [fn(r, m) for r, m in zip(maps.split(rows), masks.split(rows), strict=True)]
    return torch.cat(out) if out else maps.new_empty(0, dtype=torch.float64)


def _epg_rows(maps: Tensor, masks: Tensor) -> Tensor:
    maps = maps.to(torch.float64)
    low = maps.amin(1, keepdim=True)
    span = maps.amax(1, keepdim=True) - low
    # A constant map would be 0/0 after min-max normalization; dividing by 1 instead makes it all zeros, and
    # then its energy and its energy inside the mask are both 0, which the spec scores 0.
    maps = (maps - low) / torch.where(span > 0, span, 1.0)
    energy = maps.sum(1)
    return (maps * masks).sum(1) / torch.where(energy > 0, energy, 1.0)


def _auc_rows(maps: Tensor, masks: Tensor) -> Tensor:
    n, num_pixels = maps.shape
    # Only the order and the ties of the values matter, so the sort runs in the input's dtype.
    values, order = maps.sort(dim=1, descending=True)
    hits = masks.new_zeros(n, num_pixels + 1, dtype=torch.float64)
    hits[:, 1:] = masks.gather(1, order).cumsum(1, dtype=torch.float64)  # hits[:, j] = TP of the top j pixels

    # Tied pixels have no order among them, so within a tie group TP grows linearly from the group's first to
    # its last pixel (its expectation under a random order inside the group). Without this, the many exact
    # zeros of a ReLU'd map would be ranked by their position in the image. Without ties, TP_k = hits[:, k].
    pos = torch.arange(num_pixels, device=maps.device, dtype=torch.int32)  # int32 makes cummax/cummin ~4x faster
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(1).values
    stop = torch.where(ends, pos, num_pixels - 1).flip(1).cummin(1).values.flip(1) + 1
    tp_first, tp_stop = hits.gather(1, first.long()), hits.gather(1, stop.long())
    k = pos + 1
    tp = tp_first + (k - first) * (tp_stop - tp_first) / (stop - first)

    size = hits[:, -1:]
    return (tp / (k + size - tp)).mean(1)  # k + |M| - TP >= k >= 1


def epg(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game: the share of a min-max normalized map's energy that falls inside the mask.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 EPG in ``[0, 1]``; 0 for a constant map, NaN for an empty mask.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.
    """
    maps, masks = _flatten_inputs(maps, masks)
    values = _by_chunks(_epg_rows, maps, masks)
    return torch.where(masks.any(1), values, torch.nan)


def iou_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Exact area under the IoU curve of the top-k pixels, ``AUC = (1/N) Σ_{k=1..N} TP_k / (k + |M| - TP_k)``.

    Pixels are ranked by decreasing map value. Within a group of tied values, ``TP_k`` is interpolated
    linearly across the group, so the result does not depend on where tied pixels lie in the image.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 AUC in ``[0, 1]``; NaN for an empty mask.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.
    """
    maps, masks = _flatten_inputs(maps, masks)
    values = _by_chunks(_auc_rows, maps, masks)
    return torch.where(masks.any(1), values, torch.nan)


def auc_high(mask_sizes: Tensor | int, num_pixels: Tensor | int) -> Tensor:
    """AUC of the ideal map, whose curve is ``k/m`` for ``k <= m`` and ``m/k`` after (``m = |M|``).

    Closed form: ``AUC_high = ((m + 1)/2 + m (H_N - H_m)) / N`` with harmonic numbers
    ``H_n = digamma(n + 1) + γ``.

    Args:
        mask_sizes: Mask sizes ``m`` (any shape).
        num_pixels: Number of pixels ``N`` of the image.

    Returns:
        float64 tensor shaped like ``mask_sizes``; NaN where ``m = 0``.
    """
    m = torch.as_tensor(mask_sizes, dtype=torch.float64)
    n = torch.as_tensor(num_pixels, dtype=torch.float64, device=m.device)
    tail = m * (torch.special.digamma(n + 1) - torch.special.digamma(m + 1))
    return torch.where(m > 0, ((m + 1) / 2 + tail) / n, torch.nan)


def auc_low(mask_sizes: Tensor | int, num_pixels: Tensor | int) -> Tensor:
    """AUC of a random map as the spec defines it, ``r/2`` with ``r = m/N``.

    Args:
        mask_sizes: Mask sizes ``m`` (any shape).
        num_pixels: Number of pixels ``N`` of the image.

    Returns:
        float64 tensor shaped like ``mask_sizes``; NaN where ``m = 0``.
    """
    m = torch.as_tensor(mask_sizes, dtype=torch.float64)
    return torch.where(m > 0, m / (2 * torch.as_tensor(num_pixels, dtype=torch.float64, device=m.device)), torch.nan)


def nra(maps: Tensor, masks: Tensor) -> Tensor:
    """Normalized region AUC, ``max(AUC - AUC_low, 0) / (AUC_high - AUC_low)``.

    A mask covering the whole image gives NaN like an empty one: every map then has the ideal curve
    (``AUC = AUC_high``), and ``AUC_high - AUC_low`` is only the ``1/(2N)`` discretization term, so the score
    would be 1 whatever the map.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 NRA in ``[0, 1]``; NaN where the mask is empty or full.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.

    Example:
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> masks[:, :2, :2] = True
        >>> maps = torch.stack([masks.float()[0], 1 - masks.float()[1]])
        >>> nra(maps, masks).round(decimals=6)
        tensor([1., 0.], dtype=torch.float64)
    """
    maps, masks = _flatten_inputs(maps, masks)
    num_pixels = maps.shape[1]
    sizes = masks.sum(1)
    auc = _by_chunks(_auc_rows, maps, masks)
    low, high = auc_low(sizes, num_pixels), auc_high(sizes, num_pixels)
    score = (auc - low).clamp_min(0) / (high - low)
    return torch.where((sizes > 0) & (sizes < num_pixels), score, torch.nan)
