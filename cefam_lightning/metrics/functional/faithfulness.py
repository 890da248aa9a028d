"""Faithfulness of class maps (docs/method.md#faithfulness): Average Drop and Increase in Confidence.

``Y`` is the softmax probability of the explained class on the image, ``O`` the same class's probability on the
image multiplied by its (min-max normalized, upsampled, optionally thresholded) class map. The metrics take
these probabilities, so they apply to any class map (L-CAM's, Grad-CAM's, CE-FAM's); :func:`masked_inputs`
builds the masked images and :func:`faithfulness_probabilities` runs a classifier to get ``Y`` and ``O``.

- **Average Drop** ``AD = (100/N) Σ max(0, Y - O) / Y`` (lower is better).
- **Increase in Confidence** ``IC = (100/N) Σ 1[O > Y]`` (higher is better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cefam_lightning.metrics.functional.maps import minmax_normalize

# Fractions of the map's pixels kept: all of them ("100%"), the top half ("50%"), the top 15 % ("15%"),
# i.e. p in {0, 0.5, 0.85} when written as keeping the "top (1 - p)" (docs/method.md#faithfulness).
DEFAULT_KEEPS = (1.0, 0.5, 0.15)


def setting_name(keep: float) -> str:
    """The report name of a kept fraction: ``1.0 -> "100%"``, ``0.15 -> "15%"``."""
    return f"{100 * keep:g}%"


def _check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction of pixels in (0, 1], got {keep}")
    return keep


def masked_inputs(images: Tensor, maps: Tensor, keep: float = 1.0) -> Tensor:
    """Images multiplied by their class maps, keeping only the map's top ``keep`` fraction of pixels.

    Each map is upsampled bilinearly to the image size and min-max normalized to ``[0, 1]`` (a constant map
    becomes all zeros); for ``keep < 1`` the pixels outside the ``round(keep * H * W)`` highest are set to 0 (ties
    at the threshold are broken by position, so exactly that many pixels are kept); the kept pixels keep their
    map value. The result multiplies the ``[0, 1]`` images (the classifier normalizes them afterwards).

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps: ``(B, h, w)`` class maps at any resolution, any range.
        keep: the fraction of pixels kept, in ``(0, 1]`` (1.0, 0.5 and 0.15 are the reported 100/50/15 %).

    Returns:
        ``(B, 3, H, W)`` masked images.

    Raises:
        ValueError: If the shapes do not match or ``keep`` is out of range.

    Example:
        >>> images = torch.ones(1, 3, 2, 2)
        >>> maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
        >>> masked_inputs(images, maps)[0, 0]
        tensor([[0.0000, 0.2500],
                [0.5000, 1.0000]])
        >>> masked_inputs(images, maps, keep=0.5)[0, 0]
        tensor([[0.0000, 0.0000],
                [0.5000, 1.0000]])
    """
    keep = _check_keep(keep)
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images (B, 3, H, W) and maps (B, h, w), got images {tuple(images.shape)} and maps "
            f"{tuple(maps.shape)}"
        )
    size = images.shape[-2:]
    m = maps[:, None].to(images.dtype)
    if m.shape[-2:] != size:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    flat = minmax_normalize(m.flatten(1))
    if keep < 1.0:
        k = max(1, round(keep * flat.shape[1]))
        kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=1).indices, True)
        flat = torch.where(kept, flat, torch.zeros_like(flat))
    return images * flat.view(-1, 1, *size)


def _check_probabilities(y: Tensor, o: Tensor) -> None:
    if y.ndim != 1 or o.shape[0] != y.shape[0] or o.ndim not in (1, 2):
        raise ValueError(f"expected y (N,) and o (N,) or (N, S), got y {tuple(y.shape)} and o {tuple(o.shape)}")


def _faithfulness_update(y: Tensor, o: Tensor) -> tuple[Tensor, Tensor, int]:
    """Sufficient statistics of ``N`` images: per setting the summed relative drop and the count of ``O > Y``.

    Args:
        y: ``(N,)`` probabilities on the images.
        o: ``(N,)`` or ``(N, S)`` probabilities on the masked images (one column per setting).

    Returns:
        ``(drop_sum, increase_count, N)``: float64 and int64 tensors shaped ``o.shape[1:]``, and ``N``.
    """
    _check_probabilities(y, o)
    y64, o64 = y.to(torch.float64), o.to(torch.float64)
    if o.ndim == 2:
        y64 = y64[:, None]
    drop = ((y64 - o64).clamp_min(0) / y64).sum(0)
    return drop, (o64 > y64).sum(0), y.shape[0]


def _average_drop_compute(drop_sum: Tensor, total: Tensor | int) -> Tensor:
    return 100.0 * drop_sum / total


def _increase_in_confidence_compute(increase_count: Tensor, total: Tensor | int) -> Tensor:
    return 100.0 * increase_count.to(torch.float64) / total


def average_drop(y: Tensor, o: Tensor) -> Tensor:
    """Average Drop ``(100/N) Σ max(0, Y - O) / Y`` in percent (lower is better).

    Args:
        y: ``(N,)`` probabilities of the explained class on the images.
        o: ``(N,)`` (or ``(N, S)``, one column per setting) the same class's probabilities on the masked images.

    Returns:
        A float64 scalar (or ``(S,)``); NaN for ``N = 0``.

    Example:
        >>> average_drop(torch.tensor([0.8, 0.5]), torch.tensor([0.4, 0.6]))
        tensor(25., dtype=torch.float64)
    """
    drop, _, n = _faithfulness_update(y, o)
    return _average_drop_compute(drop, n) if n else torch.full_like(drop, torch.nan)


def increase_in_confidence(y: Tensor, o: Tensor) -> Tensor:
    """Increase in Confidence ``(100/N) Σ 1[O > Y]`` in percent (higher is better).

    Args:
        y: ``(N,)`` probabilities of the explained class on the images.
        o: ``(N,)`` (or ``(N, S)``) the same class's probabilities on the masked images.

    Returns:
        A float64 scalar (or ``(S,)``); NaN for ``N = 0``.

    Example:
        >>> increase_in_confidence(torch.tensor([0.8, 0.5]), torch.tensor([0.4, 0.6]))
        tensor(50., dtype=torch.float64)
    """
    _, increase, n = _faithfulness_update(y, o)
    return _increase_in_confidence_compute(increase, n) if n else torch.full_like(increase, torch.nan, dtype=float)


def _logits_of(output: Any) -> Tensor:
    """Logits from a classifier's output: a tensor, or an object with ``logits`` (:class:`ClassifierOutput`)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"the classifier must return (B, classes) logits or an object with .logits, got {output!r}")
    return logits


@torch.no_grad()
def faithfulness_probabilities(
    classifier: Callable[[Tensor], Any],
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    keeps: Sequence[float] = DEFAULT_KEEPS,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``Y`` and ``O`` of a batch: the explained class's softmax probability on the images and on each masking.

    The masked images of all settings go through the classifier as one batch.

    Args:
        classifier: maps ``[0, 1]`` images to logits, or to an object with ``.logits`` (a
            :class:`~cefam_lightning.models.classifier.FrozenClassifier`, which normalizes its input itself).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps: ``(B, h, w)`` class maps of the explained class.
        target: ``(B,)`` the explained class; default the classifier's prediction on the images.
        keeps: kept pixel fractions (see :func:`masked_inputs`).
        logits: ``(B, classes)`` the classifier's logits on ``images`` when already computed (saves a pass).

    Returns:
        ``(y, o)``: ``(B,)`` and ``(B, len(keeps))`` float probabilities.
    """
    keeps = [_check_keep(k) for k in keeps]
    if not keeps:
        raise ValueError("keeps must name at least one kept fraction")
    masked = torch.cat([masked_inputs(images, maps, k) for k in keeps])
    if logits is None:
        masked = torch.cat([images, masked])
    out = _logits_of(classifier(masked)).float()
    if logits is None:
        logits, out = out[: len(images)], out[len(images) :]
    logits = logits.float()
    if target is None:
        target = logits.argmax(dim=1)
    target = target.to(logits.device).long()
    y = logits.softmax(dim=1).gather(1, target[:, None])[:, 0]
    per_setting = out.softmax(dim=1).view(len(keeps), len(images), -1)  # (S, B, classes)
    o = per_setting.gather(2, target[None, :, None].expand(len(keeps), -1, 1))[..., 0].T  # (B, S)
    return y, o.contiguous()
