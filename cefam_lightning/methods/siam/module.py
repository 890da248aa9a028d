"""SIAM as a LightningModule: an interpretable-by-design head on a frozen classifier's activation map
(docs/method.md#siam).

The frozen classifier's map at one layer (``layer4`` by default) feeds :class:`~cefam_lightning.models.components.
siam_head.AttributeMaps` (one non-negative map per attribute) and :class:`~cefam_lightning.models.components.siam_head.
SIAMHead` (spatial templates -> attribute scores -> linear output). The classifier itself is never trained.

Loss: ``L = task + w_attr * BCE(presence, attribute labels) + w_tmpl * mean|templates|``, the task loss being
cross-entropy (``task="classification"``, targets are class indices) or MSE (``task="regression"``, float
targets ``(B,)`` or ``(B, n_out)``). The templates are projected back to ``>= 0`` after every optimizer step.

**Batches.** Images come as ``image`` (``B x 3 x H x W`` in ``[0, 1]``); the target under ``target_key``
(default ``label`` for classification, ``target`` for regression); attribute labels in ``[0, 1]`` as
``attributes`` ``(B, n_attr)``, falling back to ``presence`` (the shapes world's concept presence, which its
DataModule already provides), in the order of ``attribute_names``. In the authors' two-data-set setting a batch is
``{"target_data": batch, "attribute_data": batch}`` (:class:`~cefam_lightning.data.image_datamodule.ImageDataModule`):
the task loss is taken on the first, the attribute loss on the second, either left out where its batch is ``None``.
A batch may carry the classifier's map at
``layer`` precomputed as ``features`` ``(B, C, h, w)``; then the classifier is skipped (a frozen backbone gives
the same map every epoch, so a head can be trained on maps computed once).

**Explanation** (:meth:`SIAMModule.explain`), for the explained output ``k`` (default: the predicted class):
the contribution of attribute ``a`` is ``W[k, a] * s_a`` (final-layer weight times attribute score), so the
contributions plus the bias ``b[k]`` sum exactly to the output ``k``. The class map is, on the template grid,
``sum_a W[k, a] * P(m_a) * T_a`` with ``T_a`` the attribute's effective template (its templates weighted by
their combination weights; see :meth:`SIAMHead.contribution_maps`): it sums over the grid to ``logit_k - b[k]``
exactly, and is returned upsampled (bilinear) to the image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy, MultilabelAUROC

from cefam_lightning.data.image_datamodule import ATTRIBUTE_BATCH, TARGET_BATCH
from cefam_lightning.methods.base import (
    STAGES,
    EvaluationSettings,
    Evidence,
    ExplainerModule,
    ExplainSettings,
    ImageExplainer,
    RegionPanels,
    UnsupportedError,
    constructor_kwargs,
)
from cefam_lightning.methods.optim import configure_optimization
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components.siam_head import AttributeMaps, SIAMHead, attribute_presence

TASKS = ("classification", "regression")
FEATURES_KEY = "features"  # a batch's precomputed activation map at the SIAM layer
ATTRIBUTE_KEYS = ("attributes", "presence")  # where attribute labels are read, in this order
AUTHORS_BORDER, AUTHORS_MAP_SIZE = 2, 14  # the authors zero 2 pixels of a ~14x14 map (ResNet-50, 450 px crops)
_EPS = 1e-6


@dataclass
class SIAMOutput:
    outputs: Tensor  # (B, n_out): class logits or regression outputs
    scores: Tensor  # (B, n_attr): attribute scores (the linear layer's inputs)
    maps: Tensor  # (B, n_attr, h, w): attribute maps at the layer's resolution
    presence: Tensor  # (B, n_attr): attribute presence probabilities


@dataclass
class SIAMStep:
    loss: Tensor
    batch_size: int
    loss_task: Tensor
    loss_attr: Tensor
    loss_tmpl: Tensor
    outputs: Tensor | None  # (B, n_out) on the batch with targets; None: the step had none
    target: Tensor | None
    presence: Tensor | None  # (B', n_attr) on the batch with attribute labels; None: the step had none
    attributes: Tensor | None


def default_border(map_size: int) -> int:
    """The authors' 2-pixel border scaled to a ``map_size`` map: ``round(2 * map_size / 14)`` (8x8 -> 1)."""
    return max(0, round(AUTHORS_BORDER * map_size / AUTHORS_MAP_SIZE))


class SIAMModule(ExplainerModule):
    """Train SIAM's attribute maps and head on a frozen classifier's activation map.

    Args:
        classifier: the frozen classifier; ``layer`` must be among its layers.
        attribute_maps: the 1x1 conv to attribute maps (its input channels: the layer's).
        head: spatial templates and the linear output layer.
        class_names: names of the outputs (classes, or regression targets).
        attribute_names, attribute_types: the attributes, in the order of the maps and of the attribute labels.
        layer: the classifier's layer whose map SIAM reads.
        task: ``"classification"`` (cross-entropy, ``val/acc``) or ``"regression"`` (MSE, ``val/mse``).
        target_key: the batch key of the target; default ``label`` (classification) or ``target`` (regression).
        w_attr: weight of the attribute-presence BCE.
        w_tmpl: weight of the templates' L1 penalty.
        presence_tanh: presence = tanh(GAP(map)) (the authors') rather than ``min(GAP(map), 1)``.
        optimizer: ``{"name": "adam"|"adamw"|"sgd", "lr", "weight_decay", "momentum", "nesterov"}`` (default the
            authors': Adam, lr 1e-3).
        scheduler: ``{"name": "none"|"cosine"|"plateau", "factor", "patience", "monitor"}`` (the run's
            ``scheduler`` section; a warm-up is an error).
        auroc_thresholds: ``None`` for exact attribute AUROC, or a bin count for constant memory.
        config: the run's resolved configuration, kept in the checkpoint.
        method: the registry name the checkpoint records.
    """

    summary_metrics = (
        ("SIAM class accuracy", "test/acc"),
        ("SIAM regression MSE", "test/mse"),
        ("attribute-presence AUROC", "test/attr_auroc"),
        ("test loss", "test/loss"),
    )
    explain_options = frozenset({"top_n"})
    evaluate_options = frozenset({"data", "attributes", "targets"})

    def __init__(
        self,
        classifier: FrozenClassifier,
        attribute_maps: AttributeMaps,
        head: SIAMHead,
        class_names: Sequence[str],
        attribute_names: Sequence[str],
        attribute_types: Sequence[str],
        layer: str = "layer4",
        task: str = "classification",
        target_key: str | None = None,
        w_attr: float = 1.0,
        w_tmpl: float = 0.001,
        presence_tanh: bool = True,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        auroc_thresholds: int | None = None,
        config: dict[str, Any] | None = None,
        method: str = "siam",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["classifier", "attribute_maps", "head", "method"])
        if task not in TASKS:
            raise ValueError(f"siam.task: unknown task {task!r}; choose {' or '.join(TASKS)}")
        if layer not in classifier.layers:
            raise ValueError(
                f"siam.layer: {layer!r} is not among the classifier's layers {classifier.layers}; build the "
                f"classifier with layers=[{layer!r}]"
            )
        n_attr = attribute_maps.n_attr
        if len(attribute_names) != n_attr or len(attribute_types) != n_attr or head.n_attr != n_attr:
            raise ValueError(
                f"{len(attribute_names)} attribute names / {len(attribute_types)} types for {n_attr} attribute maps "
                f"and a head over {head.n_attr} attributes"
            )
        if head.n_out != len(class_names):
            raise ValueError(f"the head has {head.n_out} outputs for {len(class_names)} class names")
        for key, value in (("w_attr", w_attr), ("w_tmpl", w_tmpl)):
            if value < 0:
                raise ValueError(f"siam.{key} must be >= 0, got {value}")
        self.hparams["target_key"] = target_key or ("label" if task == "classification" else "target")
        self.record_arch(
            method,
            classifier,
            attribute_maps={
                "in_channels": attribute_maps.in_channels,
                "n_attr": n_attr,
                "border": attribute_maps.border,
            },
            head={
                "n_attr": head.n_attr,
                "n_out": head.n_out,
                "grid": list(head.grid),
                "n_templates": head.n_templates,
            },
        )
        self.classifier, self.attribute_maps, self.head = classifier, attribute_maps, head
        n_out = head.n_out
        # ModuleDict keys may not be "train" (an nn.Module attribute), hence the "_" suffix.
        if task == "classification":
            self.task_metric = nn.ModuleDict({f"{s}_": MulticlassAccuracy(n_out, average="micro") for s in STAGES})
        else:
            self.task_metric = nn.ModuleDict({f"{s}_": MeanSquaredError() for s in STAGES})
        self.auroc = nn.ModuleDict(
            {f"{s}_": MultilabelAUROC(n_attr, average="macro", thresholds=auroc_thresholds) for s in ("val", "test")}
        )

    @property
    def task_metric_name(self) -> str:
        return "acc" if self.hparams.task == "classification" else "mse"

    # ------------------------------------------------------------------ forward
    def backbone(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen classifier pass: (its logits ``(B, classes)``, its map at ``layer`` ``(B, C, h, w)``)."""
        with torch.no_grad():
            out = self.classifier(images)
        return out.logits, out.activations[self.hparams.layer]

    def forward_features(self, features: Tensor) -> SIAMOutput:
        """SIAM on the classifier's map at ``layer``."""
        maps = self.attribute_maps(features)
        outputs, scores = self.head(maps)
        presence = attribute_presence(maps, tanh=self.hparams.presence_tanh)
        return SIAMOutput(outputs=outputs, scores=scores, maps=maps, presence=presence)

    def forward(self, images: Tensor) -> SIAMOutput:
        """SIAM on images ``(B, 3, H, W)`` in ``[0, 1]``."""
        return self.forward_features(self.backbone(images)[1])

    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, **settings: Any) -> AttributeExplanation:
        """Explain SIAM's output for ``images`` (``(B, 3, H, W)`` in ``[0, 1]``); see :meth:`explain_features`."""
        return self.explain_features(self.backbone(images)[1], target, image_size=tuple(images.shape[-2:]))

    @torch.no_grad()
    def explain_features(
        self, features: Tensor, target: Tensor | int | None = None, image_size: tuple[int, int] | None = None
    ) -> AttributeExplanation:
        """What, where and how much, from the classifier's map at ``layer``.

        Args:
            features: ``(B, C, h, w)``.
            target: the explained output per image (``(B,)`` or one int); default: the predicted class
                (classification) or output 0 (regression).
            image_size: size the maps are upsampled to (default: the classifier's input crop).

        Returns:
            An :class:`AttributeExplanation`: ``logits`` ``(B, n_out)``; ``presence_probs`` ``(B, n_attr)``;
            ``target`` ``(B,)``;
            ``contributions`` ``(B, n_attr)`` = final-layer weight x attribute score (they sum with ``bias`` to
            ``logits[target]``); ``bias`` ``(B,)``; ``scores`` ``(B, n_attr)``; ``maps`` ``(B, n_attr, H, W)``,
            the attribute maps upsampled; ``contribution_maps`` ``(B, n_attr, gh, gw)`` on the template grid;
            ``class_map`` ``(B, H, W)``, their sum over attributes upsampled.
        """
        out = self.forward_features(features)
        b = features.shape[0]
        target = self._explained_target(out.outputs, target)
        weight = self.head.linear.weight[target]  # (B, n_attr)
        contribution_maps = self.head.contribution_maps(out.maps, weight)
        size = image_size or (self.classifier.input_spec.crop,) * 2
        return AttributeExplanation(
            logits=out.outputs,
            presence_probs=out.presence,
            target=target,
            scores=out.scores,
            contributions=weight * out.scores,
            bias=self.head.linear.bias[target],
            maps=_upsample(out.maps, size),
            contribution_maps=contribution_maps,
            class_map=_upsample(contribution_maps.sum(1, keepdim=True), size).view(b, *size),
        )

    def _explained_target(self, outputs: Tensor, target: Tensor | int | None) -> Tensor:
        b, n_out = outputs.shape
        if target is None:
            if self.hparams.task == "classification":
                return outputs.argmax(1)
            return torch.zeros(b, dtype=torch.long, device=outputs.device)
        target = torch.as_tensor(target, dtype=torch.long, device=outputs.device).expand(b)
        if target.numel() and (target.min() < 0 or target.max() >= n_out):
            raise ValueError(f"target must lie in [0, {n_out}), got {target.tolist()}")
        return target

    # ------------------------------------------------------------------ steps
    def batch_features(self, batch: dict) -> Tensor:
        """The classifier's map at ``layer``: precomputed (``features``) or from the images."""
        if FEATURES_KEY in batch:
            return batch[FEATURES_KEY]
        if "image" not in batch:
            raise KeyError(f"a SIAM batch needs 'image' (or precomputed '{FEATURES_KEY}'); it has {sorted(batch)}")
        return self.backbone(batch["image"])[1]

    def attribute_labels(self, batch: dict) -> Tensor:
        """Attribute labels in ``[0, 1]``, ``(B, n_attr)``: ``attributes``, else ``presence``."""
        for key in ATTRIBUTE_KEYS:
            if key in batch:
                labels = batch[key].float()
                n_attr = self.attribute_maps.n_attr
                if labels.ndim != 2 or labels.shape[1] != n_attr:
                    raise ValueError(f"batch[{key!r}] has shape {tuple(labels.shape)}; expected (B, {n_attr})")
                return labels
        raise KeyError(
            f"SIAM needs attribute labels in [0, 1] under the batch key 'attributes' (or 'presence'); the batch "
            f"has {sorted(batch)}"
        )

    def batch_target(self, batch: dict) -> Tensor:
        key = self.hparams.target_key
        if key not in batch:
            raise KeyError(f"siam.target_key: the batch has no {key!r} (its keys: {sorted(batch)})")
        target = batch[key]
        if self.hparams.task == "classification":
            return target.long()
        target = target.float()
        return target.unsqueeze(1) if target.ndim == 1 else target

    @staticmethod
    def batch_parts(batch: dict) -> tuple[dict | None, dict | None]:
        """``(batch with the target, batch with the attribute labels)``: the same batch for one data set; the two
        parts of a two-data-set batch, either ``None`` where its data set ran out."""
        if TARGET_BATCH in batch or ATTRIBUTE_BATCH in batch:
            return batch.get(TARGET_BATCH), batch.get(ATTRIBUTE_BATCH)
        return batch, batch

    def model_step(self, batch: dict, stage: str | None = None) -> SIAMStep:
        with_target, with_attributes = self.batch_parts(batch)
        if with_target is with_attributes:
            out = self.forward_features(self.batch_features(batch))
            outputs, presence = out.outputs, out.presence
        else:
            outputs = None if with_target is None else self.forward_features(self.batch_features(with_target)).outputs
            presence = None
            if with_attributes is not None:
                presence = self.forward_features(self.batch_features(with_attributes)).presence
        loss_tmpl = self.head.template_l1()
        loss_task = loss_attr = loss_tmpl.new_zeros(())
        target = attributes = None
        if outputs is not None:
            target = self.batch_target(with_target)
            if self.hparams.task == "classification":
                if target.numel() and int(target.min()) < 0:
                    raise ValueError(
                        "SIAM classification: the batch has unlabeled images (label -1); every image of the data "
                        "that gives the target needs a class"
                    )
                loss_task = F.cross_entropy(outputs, target)
            else:
                if target.shape != outputs.shape:
                    raise ValueError(f"regression targets of shape {tuple(target.shape)} for {tuple(outputs.shape)}")
                loss_task = F.mse_loss(outputs, target)
        if presence is not None:
            attributes = self.attribute_labels(with_attributes)
            loss_attr = F.binary_cross_entropy(presence.clamp(_EPS, 1 - _EPS), attributes)
        loss = loss_task + self.hparams.w_attr * loss_attr + self.hparams.w_tmpl * loss_tmpl
        size = int((outputs if outputs is not None else presence).shape[0])
        return SIAMStep(loss, size, loss_task, loss_attr, loss_tmpl, outputs, target, presence, attributes)

    def log_step(self, step: SIAMStep, batch: dict, stage: str) -> None:
        log = {"batch_size": step.batch_size, "sync_dist": True, "on_epoch": True}
        self.log(f"{stage}/loss_task", step.loss_task, on_step=False, **log)
        self.log(f"{stage}/loss_attr", step.loss_attr, on_step=False, **log)
        self.log(f"{stage}/loss_tmpl", step.loss_tmpl, on_step=False, **log)
        if step.outputs is not None:
            metric = self.task_metric[f"{stage}_"]
            metric(step.outputs.detach(), step.target)
            name = self.task_metric_name
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        if stage != "train" and step.presence is not None:
            self.auroc[f"{stage}_"](step.presence, (step.attributes >= 0.5).long())
            self.log(f"{stage}/attr_auroc", self.auroc[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=True)

    def validation_metrics(self) -> list[Any]:
        return [self.task_metric["val_"], self.auroc["val_"]]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: the templates stay non-negative (docs/method.md#templates-and-attribute-scores).
        # Between accumulated batches the weights have not moved and the projection changes nothing.
        self.head.clamp_templates_()

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        rank_zero_info(f"SIAM: {sum(p.numel() for p in params):,} trainable parameters (classifier frozen)")
        ocfg = {"name": "adam", "lr": 1e-3, **dict(self.hparams.optimizer or {})}  # the authors' Adam 1e-3
        return configure_optimization(params, ocfg, self.hparams.scheduler, getattr(self._trainer, "max_epochs", None))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_arch(cls, arch: dict[str, Any], classifier: FrozenClassifier, hparams: dict[str, Any]) -> SIAMModule:
        attribute_maps = AttributeMaps(**arch["attribute_maps"])
        head = SIAMHead(**arch["head"])
        return cls(classifier, attribute_maps, head, **constructor_kwargs(cls, hparams))

    # ------------------------------------------------------------------ explaining, evaluating
    def image_explainer(self, settings: ExplainSettings, checkpoint: str | None = None) -> ImageExplainer:
        from cefam_lightning.methods.siam.reports import SIAMImageExplainer

        return SIAMImageExplainer(self, settings, checkpoint)

    @property
    def evidence_concepts(self) -> list[str]:
        return [str(a) for a in self.hparams["attribute_names"]]

    def evidence(
        self,
        images: Tensor,
        target: Tensor | None = None,
        *,
        concepts: Tensor | None = None,
        top_n: int = 8,
        **options: Any,
    ) -> Evidence:
        """Every attribute (or ``concepts``) with its exact contribution (final-layer weight x score, which with
        the bias sums to the target's logit), its map and its presence call (probability > 0.5); ``top_n`` is not
        needed: the contributions of all attributes come from one pass."""
        if self.hparams.task != "classification":
            raise UnsupportedError("a SIAM regression checkpoint has no classes to report on")
        expl = self.explain(images, target)
        b, n_attr = expl.contributions.shape
        if concepts is None:
            concepts = torch.arange(n_attr, device=expl.contributions.device).expand(b, -1)
        concepts = concepts.to(expl.contributions.device)
        index = concepts[:, :, None, None].expand(-1, -1, *expl.maps.shape[-2:])
        return Evidence(
            logits=expl.logits,
            target=expl.target,
            concepts=concepts,
            contributions=expl.contributions.gather(1, concepts),
            regions=expl.maps.gather(1, index),
            detected=expl.presence_probs > 0.5,
        )

    def region_panels(self, images: Tensor, top_k: int) -> RegionPanels:
        """The ``top_k`` attributes by contribution to the predicted class, each with its attribute map."""
        ex = self.explain(images)
        b = images.shape[0]
        n = min(top_k, ex.contributions.shape[1])
        top = ex.contributions.topk(n, dim=1).indices
        names = list(self.hparams["attribute_names"])
        contrib = ex.contributions.gather(1, top).cpu()
        regions = ex.maps.gather(1, top[:, :, None, None].expand(-1, -1, *ex.maps.shape[-2:]))
        pairs = [list(zip(top[i].cpu().tolist(), contrib[i].tolist(), strict=True)) for i in range(b)]
        titles = [[f"{names[a]} c={c:.2f}\nattribute map" for a, c in row] for row in pairs]
        captions = [[f"{names[a]} (contribution {c:.2f})" for a, c in row] for row in pairs]
        prob = ex.logits.float().softmax(1).gather(1, ex.target[:, None])[:, 0]
        return RegionPanels(regions.cpu().numpy(), titles, captions, top.cpu(), ex.target.cpu(), prob.cpu())

    def evaluate_on_world(self, world: Any, split: str, settings: EvaluationSettings) -> tuple[dict[str, Any], str]:
        from cefam_lightning.methods.siam.evaluation import evaluate_siam_on_world, format_siam_table

        results = evaluate_siam_on_world(
            self, world, split, settings.batch_size, settings.max_images, settings.rank, settings.world_size
        )
        return results, format_siam_table(results)

    def evaluate_on_data(
        self,
        dataset: Any,
        settings: EvaluationSettings,
        attributes: Any = None,
        targets: Any = None,
        num_workers: int = 0,
        **options: Any,
    ) -> tuple[dict[str, Any], str]:
        """Attribute AUROC against an attribute table (``attributes``, required) and the target metric
        (:func:`~cefam_lightning.methods.siam.evaluation.evaluate_siam_on_data`)."""
        from cefam_lightning.methods.siam.evaluation import evaluate_siam_on_data, format_siam_data_table

        if attributes is None:
            raise UnsupportedError("a SIAM checkpoint is evaluated on data against an attribute table: --attributes")
        results = evaluate_siam_on_data(
            self,
            dataset,
            attributes,
            targets,
            settings.batch_size,
            settings.max_images,
            num_workers,
            settings.rank,
            settings.world_size,
        )
        return results, format_siam_data_table(results)


@dataclass
class AttributeExplanation:
    """SIAM's explanation of ``B`` images (see :meth:`SIAMModule.explain_features`)."""

    logits: Tensor  # (B, n_out)
    presence_probs: Tensor  # (B, n_attr)
    target: Tensor  # (B,) the explained output
    scores: Tensor  # (B, n_attr) attribute scores
    contributions: Tensor  # (B, n_attr) final-layer weight x score; with ``bias`` they sum to logits[target]
    bias: Tensor  # (B,)
    maps: Tensor  # (B, n_attr, H, W) attribute maps, upsampled
    contribution_maps: Tensor  # (B, n_attr, gh, gw) on the template grid
    class_map: Tensor  # (B, H, W) their sum over attributes, upsampled


def _upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def build_siam_module(
    classifier: FrozenClassifier,
    num_classes: int,
    class_names: Sequence[str] | None,
    attribute_names: Sequence[str],
    attribute_types: Sequence[str] | None = None,
    *,
    layer: str = "layer4",
    border: int | None = None,
    grid: int | Sequence[int] | None = None,
    n_templates: int = 2,
    template_init: float = 0.01,
    **options: Any,
) -> SIAMModule:
    """A :class:`SIAMModule` whose attribute maps and head fit ``classifier``'s map at ``layer``.

    Args:
        classifier: the frozen classifier (``layer`` among its layers).
        num_classes: outputs (classes; for regression, the number of targets).
        class_names: their names (``None``: ``"0", "1", ...``).
        attribute_names, attribute_types: the attributes (types default to ``"attribute"``).
        layer: the classifier's layer SIAM reads.
        border: zeroed border of the attribute maps in map pixels; ``None``: the authors' 2 pixels of a 14x14 map
            scaled to this map (:func:`default_border`; the shapes CNN's 8x8 ``layer4`` at 64 px -> 1).
        grid: the template grid; ``None``: the map's own size at the classifier's input crop (no pooling; the
            authors pool to 15x15).
        n_templates, template_init: see :class:`SIAMHead`.
        **options: the rest of :class:`SIAMModule`'s arguments (``task``, ``w_attr``, ``w_tmpl``, ...).
    """
    if layer not in classifier.layers:
        raise ValueError(f"siam.layer: {layer!r} is not among the classifier's layers {classifier.layers}")
    channels, h, w = classifier.layer_shapes()[layer]
    n_attr = len(attribute_names)
    if n_attr == 0:
        raise ValueError("SIAM needs at least one attribute")
    border = default_border(min(h, w)) if border is None else int(border)
    grid = (h, w) if grid is None else grid
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for num_classes={num_classes}")
    types = list(attribute_types) if attribute_types is not None else ["attribute"] * n_attr
    return SIAMModule(
        classifier,
        AttributeMaps(channels, n_attr, border=border),
        SIAMHead(n_attr, num_classes, grid=grid, n_templates=n_templates, template_init=template_init),
        names,
        list(attribute_names),
        types,
        layer=layer,
        **options,
    )
