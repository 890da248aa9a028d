"""SIAM's registration: config section ``siam:`` (``configs/method/siam.yaml``). On the shapes world its attributes
are the world's concepts; on images (``data.source=images``) the columns of an attribute table (``data.attributes``),
and its target the class labels or, with ``siam.task=regression``, the columns of a target table (``data.targets``)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

from cefam_lightning.config_rules import Rule, at_least, one_of
from cefam_lightning.methods.registry import BuildContext, MethodSpec, register_method
from cefam_lightning.methods.siam.module import TASKS, SIAMModule, build_siam_module


@dataclass
class SIAMConfig:
    """The ``siam:`` section (defaults in ``configs/method/siam.yaml``)."""

    task: str = MISSING  # classification (the class labels) | regression (data.targets' columns)
    layer: str = MISSING  # the classifier's layer the attribute maps read
    border: int | None = MISSING  # zeroed border of the attribute maps; null: the authors' 2 of 14, scaled
    grid: int | None = MISSING  # template grid; null: the map's own size
    n_templates: int = MISSING
    template_init: float = MISSING
    w_attr: float = MISSING  # weight of the attribute-presence BCE
    w_tmpl: float = MISSING  # weight of the templates' L1 penalty
    presence_tanh: bool = MISSING  # presence = tanh(GAP(map)) (the authors')
    auroc_thresholds: int | None = MISSING  # null: exact attribute-presence AUROC; an int: binned


RULES: tuple[Rule, ...] = (
    one_of(TASKS, "siam.task"),
    at_least(1, "siam.n_templates"),
    at_least(1, "siam.grid", optional=True),
    at_least(0, "siam.border", optional=True),
    at_least(0, "siam.template_init", "siam.w_attr", "siam.w_tmpl"),
    at_least(2, "siam.auroc_thresholds", optional=True),
)


def build(ctx: BuildContext, spec: MethodSpec) -> SIAMModule:
    """The SIAM module of a run: attribute maps (the data's attributes) and a template head at ``siam.layer``,
    whose outputs are the classes or (``siam.task=regression``) the target table's columns."""
    cfg = ctx.cfg
    options = OmegaConf.to_container(cfg.siam, resolve=True)
    if not ctx.attributes:
        raise ValueError("SIAM needs attributes: the shapes world's concepts, or data.attributes with images")
    outputs = ctx.class_names
    if options["task"] == "regression":
        if not ctx.targets:
            raise ValueError("siam.task=regression needs a target table: data.targets (with data.source=images)")
        outputs = ctx.targets
    names, types = zip(*ctx.attributes, strict=True)
    return build_siam_module(
        ctx.classifier,
        len(outputs),
        outputs,
        list(names),
        list(types),
        **options,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        config=OmegaConf.to_container(cfg, resolve=True),
        method=spec.name,
    )


REGISTRATION = register_method(
    "siam",
    SIAMModule,
    title="SIAM",
    build=build,
    section="siam",
    schema=SIAMConfig,
    defaults="siam.yaml",
    rules=RULES,
    image_data=("attributes", "targets"),  # with images: data.attributes, and data.targets for regression
)
