"""Perturbation faithfulness of class maps (docs/method.md#deletion-insertion-and-road): deletion and insertion
curves, and ROAD.

Like Average Drop (:mod:`.faithfulness`), these score any class map by what the classifier does when the image is
changed where the map is high or low; the probabilities come from the functions here, the averages from the metric
classes in :mod:`cefam_lightning.metrics.perturbation`.

- **Deletion** (Petsiuk et al., RISE, 2018): the map's pixels are set to 0 (black) most relevant first, in
  ``steps`` equal steps from none to all; the curve is the explained class's probability after each step, and the
  score its area over the deleted fraction in ``[0, 1]`` (lower is better: the evidence goes first).
- **Insertion**: from a blurred copy of the image, the original pixels come back most relevant first; the area under
  that curve (higher is better). The blur is the authors' (Gaussian, kernel 11, sigma 5).
- **ROAD** (Rong et al., ICML 2022): the most relevant (MoRF) or least relevant (LeRF) pixels are removed and filled
  in by noisy linear imputation from their neighbours, so the removal itself carries little class information.
  This uses pytorch-grad-cam's implementation (``pytorch_grad_cam.metrics.road``: ``ROADMostRelevantFirst``,
  ``ROADLeastRelevantFirst`` and their ``NoisyLinearImputer``), an optional extra. For each percentile ``q`` MoRF
  removes the ``100 - q`` % most relevant pixels and LeRF the ``100 - q`` % least relevant; the scores are the
  explained class's probability averaged over the percentiles (MoRF lower is better, LeRF higher) and
  ``(LeRF - MoRF) / 2`` (higher is better; the library's ``ROADCombined`` on probabilities).

Pixels are ranked by the map upsampled bilinearly to the image size; ties are broken by position.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cefam_lightning.errors import CefamError
from cefam_lightning.metrics.functional.faithfulness import _logits_of
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.metrics.functional.seeding import image_seed

DEFAULT_STEPS = 16
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0  # the RISE authors' insertion baseline
DEFAULT_PERCENTILES = (10, 30, 50, 70, 90)
ROAD_LIBRARY = "pytorch_grad_cam"


def _image_size_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    m = maps[:, None].float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    return m[:, 0]


def _check(images: Tensor, maps: Tensor) -> None:
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images (B, 3, H, W) and maps (B, h, w), got images {tuple(images.shape)} and maps "
            f"{tuple(maps.shape)}"
        )


def pixel_ranks(maps: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, H, W)`` rank of every pixel by the map at the image size, 0 = most relevant (ties: first in row-major
    order first).

    Example:
        >>> pixel_ranks(torch.tensor([[[0.0, 3.0], [3.0, 1.0]]]), (2, 2))
        tensor([[[3, 0],
                 [1, 2]]])
    """
    flat = _image_size_maps(maps, size).flatten(1)
    order = torch.sort(-flat, dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view(-1, *size)


def blurred(images: Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Tensor:
    """The insertion curve's start: the images under a Gaussian blur (reflect padding)."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def _probability(classifier: Callable[[Tensor], Any], images: Tensor, target: Tensor) -> Tensor:
    logits = _logits_of(classifier(images)).float()
    return logits.softmax(1).gather(1, target.to(logits.device).long()[:, None])[:, 0]


@torch.no_grad()
def deletion_insertion_curves(
    classifier: Callable[[Tensor], Any],
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    blur_kernel: int = BLUR_KERNEL,
    blur_sigma: float = BLUR_SIGMA,
) -> tuple[Tensor, Tensor]:
    """The deletion and insertion curves of a batch (see the module docstring).

    Args:
        classifier: ``[0, 1]`` images -> logits (or an object with ``.logits``).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps: ``(B, h, w)`` class maps of the explained class, any resolution and scale.
        target: ``(B,)`` the explained class; default the classifier's prediction.
        steps: the curves have ``steps + 1`` points, at ``0, 1/steps, ..., 1`` of the pixels.
        blur_kernel, blur_sigma: the insertion start's Gaussian blur.

    Returns:
        ``(deletion, insertion)``, each ``(B, steps + 1)`` probabilities of the explained class.
    """
    _check(images, maps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = images.shape[-2:]
    if target is None:
        target = _logits_of(classifier(images)).argmax(1)
    ranks = pixel_ranks(maps.to(images.device), size)[:, None]  # (B, 1, H, W)
    n = size[0] * size[1]
    start = blurred(images, blur_kernel, blur_sigma)
    deletion, insertion = [], []
    for i in range(steps + 1):
        changed = (ranks < round(i * n / steps)).to(images.dtype)  # the i-th step's most relevant pixels
        both = torch.cat([images * (1 - changed), start * (1 - changed) + images * changed])
        p = _probability(classifier, both, torch.cat([target, target]))
        deletion.append(p[: len(images)])
        insertion.append(p[len(images) :])
    return torch.stack(deletion, 1), torch.stack(insertion, 1)


def curve_auc(curve: Tensor) -> Tensor:
    """``(N, S + 1)`` curves at equally spaced fractions of ``[0, 1]`` -> ``(N,)`` trapezoid areas.

    Example:
        >>> curve_auc(torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"expected (N, S + 1) curves with S >= 1, got {tuple(curve.shape)}")
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * (curve.shape[1] - 1))


def road_available() -> bool:
    """Whether pytorch-grad-cam (ROAD's implementation) is installed."""
    return importlib.util.find_spec(ROAD_LIBRARY) is not None


def _check_percentiles(percentiles: Sequence[float]) -> list[float]:
    values = [float(q) for q in percentiles]
    if not values or any(not 0 < q < 100 for q in values):
        raise ValueError(f"ROAD percentiles must be in (0, 100), at least one, got {list(percentiles)}")
    return values


@torch.no_grad()
def road_probabilities(
    classifier: Callable[[Tensor], Any],
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    seed: int = 0,
    image_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The explained class's probability after ROAD's MoRF and LeRF removal at each percentile.

    pytorch-grad-cam's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` build the imputed images (its
    ``NoisyLinearImputer``, one sparse solve per image on the CPU); the imputation noise of each image is drawn
    from ``seed`` and the image's index, so an image's numbers do not depend on the batch it is in, or on how
    the images are split across processes.

    Args:
        classifier: ``[0, 1]`` images -> logits (or an object with ``.logits``).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        maps: ``(B, h, w)`` class maps, any resolution and scale.
        target: ``(B,)`` the explained class; default the classifier's prediction.
        percentiles: the library's percentiles (``q``: ``100 - q`` % of the pixels removed).
        seed: seed of the imputation noise.
        image_index: ``(B,)`` each image's index among the evaluated images (default its position in ``images``).

    Returns:
        ``(morf, lerf)``, each ``(B, len(percentiles))``.

    Raises:
        CefamError: pytorch-grad-cam is not installed.
    """
    _check(images, maps)
    percentiles = _check_percentiles(percentiles)
    if not road_available():
        raise CefamError("ROAD needs pytorch-grad-cam, which is not installed: pip install -e '.[cams]'")
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    if target is None:
        target = _logits_of(classifier(images)).argmax(1)
    cams = minmax_normalize(_image_size_maps(maps, images.shape[-2:]), dims=2).cpu().numpy().astype(np.float32)
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target.tolist()]

    def model(x: Tensor) -> Tensor:
        return _logits_of(classifier(x)).float()

    index = torch.arange(len(images)) if image_index is None else image_index
    if len(index) != len(images):
        raise ValueError(f"image_index has {len(index)} entries for {len(images)} images")
    out: dict[str, list[np.ndarray]] = {"morf": [], "lerf": []}
    for i, image in enumerate(index.tolist()):
        one = images[i : i + 1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(seed, image))  # the library draws its noise from torch's generator
            for name, metric in (("morf", ROADMostRelevantFirst), ("lerf", ROADLeastRelevantFirst)):
                scores = [
                    metric(q)(one, cams[i : i + 1], targets[i : i + 1], model, return_diff=False) for q in percentiles
                ]
                out[name].append(np.stack(scores, 1))
    return tuple(torch.from_numpy(np.concatenate(out[n])).to(images.device) for n in ("morf", "lerf"))
