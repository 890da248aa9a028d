"""L-CAM-Fm and L-CAM-Img: a learned 1x1-conv attention that explains a frozen classifier in one forward pass
(docs/method.md#l-cam).

A ``Conv2d(C_in, n_classes, 1)`` on the classifier's last conv block gives pre-activation maps ``c``
(``B x n_classes x h x w``) and attention ``a = sigmoid(c)``. For the training label ``y`` (the frozen classifier's
prediction by default, the ground truth as an option):

- **L-CAM-Img** (``variant="img"``): ``a_y`` is upsampled bilinearly to the input size, multiplied into the
  ``[0, 1]`` image, and the whole frozen classifier runs on the result (it normalizes its input itself).
- **L-CAM-Fm** (``variant="fm"``): ``a_y`` is multiplied into the feature maps and the rest of the frozen
  classifier runs on them (:meth:`FrozenClassifier.tail`; ResNet: avgpool -> fc).

Loss ``1.5 CE(f(masked), y) + 2 mean((a_y + 0.0005)^0.3) + 0.01 TV(a_y)`` on the low-resolution map, with
``TV(a) = [Σ (vertical diff)² + Σ (horizontal diff)² + 0.3 Σ (border pixels)²] / (2B)``. Gradients flow through the
frozen classifier into the attention only. The explanation of class ``t`` is ``c_t`` (pre-sigmoid), min-max
normalized per image and upsampled: one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cefam_lightning.methods.base import STAGES, constructor_kwargs
from cefam_lightning.methods.class_map import ClassMapExplainer, select_class
from cefam_lightning.methods.optim import configure_optimization
from cefam_lightning.models.classifier import ClassifierOutput, FrozenClassifier

VARIANTS = ("fm", "img")
LABEL_SOURCES = ("prediction", "target")

# The authors' loss constants (docs/method.md#l-cam-loss).
DEFAULT_LOSS = {"ce_weight": 1.5, "area_weight": 2.0, "tv_weight": 0.01, "area_eps": 0.0005, "area_power": 0.3}
DEFAULT_TV_BORDER = 0.3
# The authors' optimizer. On the shapes world it barely moves the attention in a few epochs; the demo config
# uses Adam instead (configs/experiment/lcam_*.yaml set the run's optimizer).
AUTHORS_OPTIMIZER = {
    "name": "sgd",
    "lr": 1e-4,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": True,
    "bias_lr_factor": 2.0,
}


def total_variation(a: Tensor, border_weight: float = DEFAULT_TV_BORDER) -> Tensor:
    """L-CAM's total variation of ``(B, h, w)`` maps, with a penalty on the border pixels.

    ``TV(a) = [Σ (a[i+1, j] - a[i, j])² + Σ (a[i, j+1] - a[i, j])² + border_weight Σ_{(i, j) on the border} a[i, j]²]
    / (2B)``, the border being the outer ring of pixels (first and last row and column), each pixel counted once.

    Args:
        a: ``(B, h, w)`` attention maps.
        border_weight: weight of the border term (the authors' 0.3).

    Returns:
        A scalar.

    Example:
        >>> total_variation(torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]), border_weight=0.3)
        tensor(1.1500)
    """
    if a.ndim != 3:
        raise ValueError(f"expected (B, h, w) maps, got {tuple(a.shape)}")
    vertical = (a[:, 1:, :] - a[:, :-1, :]).pow(2).sum()
    horizontal = (a[:, :, 1:] - a[:, :, :-1]).pow(2).sum()
    inner = a[:, 1:-1, 1:-1].pow(2).sum()  # everything but the ring
    border = a.pow(2).sum() - inner
    return (vertical + horizontal + border_weight * border) / (2 * a.shape[0])


def area_loss(a: Tensor, eps: float = DEFAULT_LOSS["area_eps"], power: float = DEFAULT_LOSS["area_power"]) -> Tensor:
    """L-CAM's area term ``mean((a + eps)^power)`` over all pixels of all maps."""
    return (a + eps).pow(power).mean()


@dataclass
class LCAMStep:
    loss: Tensor
    batch_size: int
    loss_ce: Tensor
    loss_area: Tensor
    loss_tv: Tensor
    label: Tensor  # the training label y, (B,)
    masked_logits: Tensor  # the frozen classifier's logits on the masked input, (B, num_classes)
    logits: Tensor  # its logits on the unmasked images, (B, num_classes)
    attention: Tensor  # a_y, (B, h, w)


class LCAMModule(ClassMapExplainer):
    """Train L-CAM's attention on a frozen classifier.

    Args:
        classifier: the frozen classifier; ``layer`` must be among its layers.
        class_names: names of the classifier's classes (their number sets the attention's outputs).
        variant: ``"img"`` (mask the image) or ``"fm"`` (mask the feature maps).
        layer: the classifier's last conv block (``None``: the classifier's last layer; ``layer4`` for ResNets and
            the shapes CNN, ``features.29`` = ``features[:30]`` for VGG-16).
        label_source: the training label: ``"prediction"`` (the frozen classifier's, default) or ``"target"``
            (the batch's ``label``).
        loss: overrides of :data:`DEFAULT_LOSS` (``ce_weight``, ``area_weight``, ``tv_weight``, ``area_eps``,
            ``area_power``) and ``tv_border``.
        optimizer: ``{"name": "sgd"|"adam"|"adamw", "lr", "momentum", "weight_decay", "nesterov",
            "bias_lr_factor"}``; default the authors' (:data:`AUTHORS_OPTIMIZER`).
        scheduler: ``{"name": "none"|"cosine"|"plateau", "factor", "patience", "monitor"}``.
        config: the run's resolved configuration, kept in the checkpoint.
        method: the registry name the checkpoint records (``lcam_img`` or ``lcam_fm``).
    """

    summary_metrics = (
        ("accuracy on masked inputs", "test/masked_acc"),
        ("mean attention (mask area)", "test/mask_area"),
        ("test loss", "test/loss"),
    )

    def __init__(
        self,
        classifier: FrozenClassifier,
        class_names: Sequence[str],
        variant: str = "img",
        layer: str | None = None,
        label_source: str = "prediction",
        loss: Mapping[str, float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        method: str | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"lcam.variant: unknown variant {variant!r}; choose one of {VARIANTS}")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"lcam.label_source: unknown label source {label_source!r}; choose one of {LABEL_SOURCES}")
        layer = layer or classifier.layers[-1]
        if layer not in classifier.layers:
            raise ValueError(
                f"lcam.layer: {layer!r} is not among the classifier's layers {classifier.layers}; add it to "
                "classifier.layers"
            )
        unknown = sorted(set(loss or {}) - {*DEFAULT_LOSS, "tv_border"})
        if unknown:
            raise ValueError(f"lcam.loss: unknown key(s) {unknown}; valid keys: {[*DEFAULT_LOSS, 'tv_border']}")
        if len(class_names) < 2:
            raise ValueError(f"L-CAM needs at least 2 classes, got {list(class_names)}")
        outputs = getattr(classifier, "spec", {}).get("num_classes")
        if outputs is not None and outputs != len(class_names):
            raise ValueError(f"{len(class_names)} class names for a classifier with {outputs} outputs")
        shapes = classifier.layer_shapes()
        in_channels = shapes[layer][0]
        self.save_hyperparameters(ignore=["classifier", "method"])
        self.hparams["layer"] = layer
        self.record_arch(
            method or f"lcam_{variant}",
            classifier,
            attention={"in_channels": in_channels, "num_classes": len(class_names)},
        )
        self.classifier, self.layer, self.variant, self.label_source = classifier, layer, variant, label_source
        self.attention = nn.Conv2d(in_channels, len(class_names), kernel_size=1, bias=True)
        self.loss_cfg = {
            **DEFAULT_LOSS,
            "tv_border": DEFAULT_TV_BORDER,
            **{k: float(v) for k, v in (loss or {}).items()},
        }
        n_classes = len(class_names)
        # ModuleDict keys may not be "train" (an nn.Module attribute), hence the "_" suffix.
        self.masked_acc = nn.ModuleDict({f"{s}_": MulticlassAccuracy(n_classes, average="micro") for s in STAGES})
        self.area = nn.ModuleDict({f"{s}_": MeanMetric() for s in STAGES})

    # ------------------------------------------------------------------ forward
    @property
    def map_layer(self) -> str:
        return self.layer

    def class_maps_at_layer(self, images: Tensor) -> tuple[ClassifierOutput, Tensor]:
        return self.attend(images)

    def attend(self, images: Tensor) -> tuple[ClassifierOutput, Tensor]:
        """One frozen classifier pass and the attention's pre-activation maps.

        Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(classifier output, c)`` with ``c`` of shape ``(B, n_classes, h, w)`` at the layer's resolution.
        """
        with torch.no_grad():
            out = self.classifier(images)
        return out, self.attention(out.activations[self.layer].float())

    def masked_logits(self, images: Tensor, out: ClassifierOutput, a_y: Tensor) -> Tensor:
        """The frozen classifier's logits on the input masked by ``a_y`` (``(B, h, w)``), per the variant."""
        if self.variant == "img":
            mask = F.interpolate(a_y[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
            return self.classifier(images * mask.to(images.dtype)).logits
        features = out.activations[self.layer]
        masked = features * a_y[:, None].to(features.dtype)
        return self.classifier.tail(self.layer)(masked, out.activations.prefix_tokens.get(self.layer))

    def model_step(self, batch: Mapping[str, Tensor], stage: str | None = None) -> LCAMStep:
        images = batch["image"]
        out, c = self.attend(images)
        if self.label_source == "target":
            if "label" not in batch:
                raise ValueError("lcam.label_source='target' needs a 'label' in each batch")
            label = batch["label"].to(c.device).long()
        else:
            label = out.logits.argmax(dim=1)
        a_y = torch.sigmoid(select_class(c, label))
        masked_logits = self.masked_logits(images, out, a_y).float()
        cfg = self.loss_cfg
        loss_ce = F.cross_entropy(masked_logits, label)
        loss_area = area_loss(a_y, cfg["area_eps"], cfg["area_power"])
        loss_tv = total_variation(a_y, cfg["tv_border"])
        loss = cfg["ce_weight"] * loss_ce + cfg["area_weight"] * loss_area + cfg["tv_weight"] * loss_tv
        return LCAMStep(loss, int(images.shape[0]), loss_ce, loss_area, loss_tv, label, masked_logits, out.logits, a_y)

    # ------------------------------------------------------------------ steps
    def log_step(self, out: LCAMStep, batch: Mapping[str, Tensor], stage: str) -> None:
        bs = out.batch_size
        for name in ("loss_ce", "loss_area", "loss_tv"):
            self.log(f"{stage}/{name}", getattr(out, name), on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.masked_acc[f"{stage}_"](out.masked_logits.detach(), out.label)
        self.log(f"{stage}/masked_acc", self.masked_acc[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=True)
        self.area[f"{stage}_"](out.attention.detach().mean(dim=(1, 2)))
        self.log(f"{stage}/mask_area", self.area[f"{stage}_"], on_step=False, on_epoch=True)

    def validation_metrics(self) -> list[Any]:
        return [self.masked_acc["val_"], self.area["val_"]]

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        ocfg = {**AUTHORS_OPTIMIZER, **dict(self.hparams.optimizer or {})}
        unknown = sorted(set(ocfg) - set(AUTHORS_OPTIMIZER))
        if unknown:
            raise ValueError(f"lcam.optimizer: unknown key(s) {unknown}; valid keys: {sorted(AUTHORS_OPTIMIZER)}")
        weights = [p for n, p in self.attention.named_parameters() if not n.endswith("bias")]
        biases = [p for n, p in self.attention.named_parameters() if n.endswith("bias")]
        # The authors' rule: biases learn at bias_lr_factor x the LR.
        groups = [{"params": weights}, {"params": biases, "lr_factor": float(ocfg["bias_lr_factor"])}]
        rank_zero_info(
            f"L-CAM-{self.variant.capitalize()}: {sum(p.numel() for p in self.attention.parameters()):,} trainable "
            "parameters (classifier frozen)"
        )
        max_epochs = getattr(self._trainer, "max_epochs", None)
        return configure_optimization(groups, ocfg, self.hparams.scheduler, max_epochs, where="lcam.optimizer")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_arch(cls, arch: Mapping[str, Any], classifier: FrozenClassifier, hparams: Mapping[str, Any]) -> LCAMModule:
        return cls(classifier, **constructor_kwargs(cls, hparams))


def build_lcam_module(
    classifier: FrozenClassifier,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    variant: str = "img",
    **options: Any,
) -> LCAMModule:
    """Build an :class:`LCAMModule` from the run's classifier and the ``lcam`` config section.

    Args:
        classifier: the frozen classifier (its layers must include ``options["layer"]`` if given).
        num_classes: the classifier's number of classes.
        class_names: their names (default ``class_0 ...``); must number ``num_classes``.
        variant: ``"img"`` or ``"fm"``.
        **options: the other :class:`LCAMModule` arguments (``layer``, ``label_source``, ``loss``, ``optimizer``,
            ``scheduler``, ``config``).
    """
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a classifier with {num_classes} classes")
    known = {"layer", "label_source", "loss", "optimizer", "scheduler", "config", "method"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"lcam: unknown option(s) {unknown}; valid options: {sorted(known)}")
    return LCAMModule(classifier, names, variant=variant, **options)
