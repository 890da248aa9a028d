"""CE-FAM's registration: its config section ``cefam:`` (``configs/method/cefam.yaml``), how a run builds it, and
its own training callbacks (the pooled-feature cache, concept-score figures, contribution tables, region
metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import MISSING, OmegaConf

from cefam_lightning.config_rules import ConfigError, Rule, at_least, one_of
from cefam_lightning.methods.cefam.contributions import FILLS
from cefam_lightning.methods.cefam.module import CEFAMModule, checked_holdout, init_translator_from
from cefam_lightning.methods.cefam.regions import GRADIENTS, REGION_WEIGHTS
from cefam_lightning.methods.cefam.relevance import RELEVANCES, selectable_layers
from cefam_lightning.methods.cefam.rules import RULE_KEYS, check_rules
from cefam_lightning.methods.registry import BuildContext, MethodSpec, TrainContext, register_method
from cefam_lightning.models.components import ConceptScorer, Translator
from cefam_lightning.models.components.translator import ACTIVATIONS


@dataclass
class CEFAMConfig:
    """The ``cefam:`` section (defaults in ``configs/method/cefam.yaml``)."""

    hidden_dims: list[int] | None = MISSING  # translator widths; null: the authors'
    activation: str = MISSING
    input_norm: bool = MISSING  # standardize the pooled activations first
    lambda_sim: float = MISSING  # weight of MSE(S, S_VLM); 0 is the concept-free setting
    auroc_thresholds: int | None = MISSING
    init_from: str | None = MISSING  # fine-tuning: a CE-FAM checkpoint to start the translator from
    k: int = MISSING  # channels deleted (relevance) and masked (contribution) at most
    fill: str = MISSING  # masked-channel fill for contributions
    select_layers: Any = MISSING  # "auto" | "all" | a list of layer names
    gradient: str = MISSING  # channel weights: "direct" (own pooled z only) | "full" (through the rest of the net)
    region_weights: str = MISSING  # which channel weights draw a region: "signed" | "positive"
    relevance: str = MISSING  # how a concept's layer is chosen: "paper" | "map"
    contribution_layer: str = MISSING  # where contributions are measured: "selected" | "last" | "image" | a layer
    holdout_concepts: list[str] = MISSING  # zero-shot: concepts left out of training, explained from text only


def select_layers_value(value: Any) -> str | list[str]:
    """``cefam.select_layers`` as :func:`~cefam_lightning.methods.cefam.relevance.selectable_layers` takes it."""
    if isinstance(value, str):
        return value
    return [str(x) for x in OmegaConf.to_container(value)] if OmegaConf.is_config(value) else list(value)


def _select_layers_ok(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("auto", "all")
    return bool(select_layers_value(value))


RULES: tuple[Rule, ...] = (
    at_least(1, "cefam.hidden_dims", optional=True, each=True),
    at_least(2, "cefam.auroc_thresholds", optional=True),  # torchmetrics' binned AUROC needs 2 thresholds
    at_least(0, "cefam.lambda_sim"),
    at_least(1, "cefam.k"),
    one_of(ACTIVATIONS, "cefam.activation"),
    one_of(FILLS, "cefam.fill"),
    one_of(GRADIENTS, "cefam.gradient"),
    one_of(REGION_WEIGHTS, "cefam.region_weights"),
    one_of(RELEVANCES, "cefam.relevance"),
    Rule(("cefam.select_layers",), _select_layers_ok, "'auto', 'all' or a non-empty list of layer names"),
    Rule(("cefam.holdout_concepts",), lambda v: isinstance(v, str) and bool(v), "a concept name", each=True),
)


def holdout_concepts(value: Any, concept_names: list[str]) -> list[str]:
    """``cefam.holdout_concepts`` checked against the store's concept names, in the store's order
    (:func:`~cefam_lightning.methods.cefam.module.checked_holdout`); a bad one is a ``ConfigError`` naming it."""
    names = [str(x) for x in (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value or [])]
    try:
        return checked_holdout(names, concept_names)
    except ValueError as e:
        raise ConfigError(f"cefam.holdout_concepts: {e}") from None


def build(ctx: BuildContext, spec: MethodSpec) -> CEFAMModule:
    """The CE-FAM module of a run: a translator from the classifier's pooled layers to the store's VLM space."""
    cfg, c = ctx.cfg, ctx.cfg.cefam
    explain = {key: c[key] for key in RULE_KEYS}
    explain["select_layers"] = select_layers_value(c.select_layers)
    try:  # the layer names against the classifier's, before anything is trained
        selectable_layers(ctx.classifier, explain["select_layers"])
    except ValueError as e:
        raise ConfigError(f"cefam.select_layers: {e}") from None
    try:
        check_rules(explain, layers=list(ctx.classifier.layers))
    except ValueError as e:
        raise ConfigError(f"cefam.{e}") from None
    shapes = ctx.classifier.layer_shapes(ctx.image_size)
    in_dim = sum(ch for ch, _, _ in shapes.values())
    hidden = list(c.hidden_dims) if c.hidden_dims is not None else None
    store = ctx.store
    holdout = holdout_concepts(c.holdout_concepts, list(store.concept_names))
    translator = Translator(in_dim, store.embed_dim, hidden, c.activation, c.input_norm)
    scorer = ConceptScorer(
        torch.from_numpy(store.text_embeddings), store.vlm.kind, store.vlm.logit_scale, store.vlm.logit_bias
    )
    module = CEFAMModule(
        ctx.classifier,
        translator,
        scorer,
        concept_names=store.concept_names,
        concept_types=[t.type for t in store.concepts],
        class_names=ctx.class_names,
        lambda_sim=c.lambda_sim,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        auroc_thresholds=c.auroc_thresholds,
        config=OmegaConf.to_container(cfg, resolve=True),
        vlm=asdict(store.vlm),
        explain=explain,
        holdout_concepts=holdout,
        method=spec.name,
    )
    if c.init_from:
        print(f"[cefam] {init_translator_from(module, c.init_from).summary()}", flush=True)
    return module


def training_callbacks(ctx: TrainContext) -> list[L.Callback]:
    """CE-FAM's own: the pooled-feature cache (``data.feature_cache``), the concept-score figures of the test
    images (shapes world), and the ``callbacks.contributions`` / ``callbacks.region_metrics`` loggers."""
    from callbacks import CachePooledFeatures, ConceptScoreFigures, ContributionLogger, RegionMetricsCallback

    cfg, out = ctx.cfg, []
    if cfg.data.feature_cache:  # the translator reads pooled activations alone: later epochs skip the classifier
        ctx.datamodule.feature_caches = feature_caches(cfg, ctx.datamodule, ctx.classifier, ctx.images)
        out.append(CachePooledFeatures(ctx.datamodule.feature_caches))
    if not ctx.images:  # the figures mark the concepts present in the world's ground truth
        store = ctx.datamodule.world.store
        out.append(
            ConceptScoreFigures(
                ctx.run_dir / "figures",
                cfg.demo.num_figures,
                cfg.demo.top_k,
                ctx.datamodule.class_names,
                store.concept_names,
            )
        )
    c = cfg.callbacks
    if c.contributions.enabled:
        cc = c.contributions
        out.append(
            ContributionLogger(
                cc.every_n_epochs,
                cc.num_images,
                cc.top_n,
                top=cc.top,
                out_dir=ctx.run_dir,
                final_report=cc.final_report,
            )
        )
    if c.region_metrics.enabled and ctx.masks:
        out.append(RegionMetricsCallback(c.region_metrics.every_n_epochs, c.region_metrics.max_images))
    return out


def feature_caches(cfg: Any, dm: Any, classifier: Any, images: bool) -> dict[str, Any]:
    """Pooled-activation caches of the train and val splits, keyed by all that the activations depend on."""
    from cefam_lightning.data.feature_cache import PooledFeatureCache, pooled_identity

    root = cfg.data.feature_cache_dir or Path(cfg.cache_dir).expanduser() / "features"
    dim = sum(c for c, _, _ in classifier.layer_shapes().values())
    caches = {}
    for split in ("train", "val"):
        # What the pixels reaching the classifier depend on, besides the classifier's own input spec: the files
        # (absolute paths, sizes, mtimes; images replaced in place make a new cache) or the world's spec.
        data = {"source": dm.sources[split].fingerprint()} if images else {"shapes_world": dm.spec.cache_key()}
        identity = pooled_identity(classifier, {**data, "split": split})
        caches[split] = PooledFeatureCache(root, dm.sample_ids(split), dim, identity)
    return caches


REGISTRATION = register_method(
    "cefam",
    CEFAMModule,
    title="CE-FAM",
    build=build,
    section="cefam",
    schema=CEFAMConfig,
    defaults="cefam.yaml",
    image_data=("embeddings",),  # the translator learns the VLM's image embeddings (data.store)
    training_callbacks=training_callbacks,
    rules=RULES,
)
