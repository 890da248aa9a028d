"""SIAM's registration: config section ``siam:`` (``configs/method/siam.yaml``); it trains on the shapes world,
whose concepts are its attributes."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

from cefam_lightning.config_rules import Rule, at_least
from cefam_lightning.methods.registry import BuildContext, MethodSpec, register_method
from cefam_lightning.methods.siam.module import SIAMModule, build_siam_module


@dataclass
class SIAMConfig:
    """The ``siam:`` section (defaults in ``configs/method/siam.yaml``)."""

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
    at_least(1, "siam.n_templates"),
    at_least(1, "siam.grid", optional=True),
    at_least(0, "siam.border", optional=True),
    at_least(0, "siam.template_init", "siam.w_attr", "siam.w_tmpl"),
    at_least(2, "siam.auroc_thresholds", optional=True),
)


def build(ctx: BuildContext, spec: MethodSpec) -> SIAMModule:
    """The SIAM module of a run: attribute maps (the store's concepts) and a template head at ``siam.layer``."""
    cfg, store = ctx.cfg, ctx.store
    return build_siam_module(
        ctx.classifier,
        len(ctx.class_names),
        ctx.class_names,
        store.concept_names,
        [c.type for c in store.concepts],
        **OmegaConf.to_container(cfg.siam, resolve=True),
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
    data_sources=("shapes",),  # its attributes are the world's concepts; image sources have no attribute labels
)
