"""L-CAM-Fm's and L-CAM-Img's registrations: one module class, two variants, one config section ``lcam:``
(``configs/method/lcam.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

from cefam_lightning.config_rules import Rule, above, at_least, one_of
from cefam_lightning.methods.lcam.module import LABEL_SOURCES, LCAMModule, build_lcam_module
from cefam_lightning.methods.registry import BuildContext, MethodSpec, register_method


@dataclass
class LCAMConfig:
    """The ``lcam:`` section (defaults in ``configs/method/lcam.yaml``)."""

    layer: str | None = MISSING  # the classifier's last conv block; null: classifier.layers[-1]
    label_source: str = MISSING  # prediction (the frozen classifier's) | target (ground truth)
    bias_lr_factor: float = MISSING  # the authors': biases learn at 2x the LR
    ce_weight: float = MISSING
    area_weight: float = MISSING
    tv_weight: float = MISSING
    area_eps: float = MISSING
    area_power: float = MISSING
    tv_border: float = MISSING


RULES: tuple[Rule, ...] = (
    above(0, "lcam.bias_lr_factor", "lcam.area_power"),
    at_least(0, "lcam.ce_weight", "lcam.area_weight", "lcam.tv_weight", "lcam.area_eps", "lcam.tv_border"),
    one_of(LABEL_SOURCES, "lcam.label_source"),
)


def build(ctx: BuildContext, spec: MethodSpec) -> LCAMModule:
    """The L-CAM module of a run: a 1x1-conv attention on the classifier's ``lcam.layer``."""
    cfg = ctx.cfg
    lc = OmegaConf.to_container(cfg.lcam, resolve=True)
    return build_lcam_module(
        ctx.classifier,
        len(ctx.class_names),
        ctx.class_names,
        variant=spec.options["variant"],
        layer=lc.pop("layer"),
        label_source=lc.pop("label_source"),
        optimizer={**OmegaConf.to_container(cfg.optimizer, resolve=True), "bias_lr_factor": lc.pop("bias_lr_factor")},
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        loss=lc,  # the loss weights are what is left
        config=OmegaConf.to_container(cfg, resolve=True),
        method=spec.name,
    )


for _variant, _title in (("fm", "L-CAM-Fm"), ("img", "L-CAM-Img")):
    register_method(
        f"lcam_{_variant}",
        LCAMModule,
        title=_title,
        build=build,
        section="lcam",
        schema=LCAMConfig,
        defaults="lcam.yaml",
        rules=RULES,
        variant=_variant,
    )
