"""How images reach a classifier: one description of a model's own preprocessing, shared by every consumer.

Training data, evaluation data and ``explain`` all turn an image file into the ``3 x crop x crop`` float tensor in
``[0, 1]`` the :class:`~cefam_lightning.models.classifier.FrozenClassifier` expects (it applies its own normalization
inside ``forward``). :class:`InputSpec` records the geometric part of a model's preprocessing (torchvision's
``ImageClassification`` preset or timm's data config) and :func:`image_transform` builds it with
``torchvision.transforms.v2``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cefam_lightning.data.image_io import read_rgb, to_rgb

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class InputSpec:
    """A model's input geometry and normalization.

    Args:
        crop: the square input size the model sees.
        resize: the shorter side is resized to this first (``>= crop``; ``crop`` itself means no margin).
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        mean, std: per-channel normalization of ``[0, 1]`` images (applied by the classifier wrapper).
    """

    crop: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize < self.crop:
            raise ValueError(f"InputSpec: need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"InputSpec: interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def image_transform(spec: InputSpec):
    """PIL image (any mode, :func:`~cefam_lightning.data.image_io.to_rgb`) -> ``3 x crop x crop`` float32 in ``[0, 1]``:
    resize shorter side, center crop."""
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(spec.interpolation)
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.PILToTensor(),
            v2.Resize(spec.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(spec.crop),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def load_image(path: str | os.PathLike, spec: InputSpec) -> Tensor:
    """Read an image file (:func:`~cefam_lightning.data.image_io.read_rgb`) and apply :func:`image_transform`; PIL's own
    error for an unreadable file propagates."""
    return image_transform(spec)(read_rgb(path))
