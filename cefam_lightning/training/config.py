"""Configuration: a typed schema, ``configs/default.yaml`` with every default, sparse experiment files on top,
and command-line ``key=value`` overrides last (the dinov2 pattern, with plain OmegaConf).

An unknown or misspelt key, a value of the wrong type or a missing value is a :class:`ConfigError` that names
the key and where it came from; so is a value out of its range or not among its choices (:data:`RULES`), checked
in :func:`load_config` before anything is built.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cefam_lightning.data.embedding_store import VLM_KINDS
from cefam_lightning.data.shapes_world import WorldSpec
from cefam_lightning.errors import CefamError
from cefam_lightning.methods.cefam.contributions import FILLS
from cefam_lightning.methods.lcam.module import LABEL_SOURCES
from cefam_lightning.methods.optim import OPTIMIZERS, SCHEDULERS
from cefam_lightning.models.components.translator import ACTIVATIONS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(CefamError):
    """A configuration file or override is invalid."""


@dataclass
class ClassifierFitSchema:
    widths: list[int] = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    seed: int = MISSING


@dataclass
class ClassifierSchema:
    name: str = MISSING
    layers: list[str] = MISSING
    weights: str | None = MISSING
    num_classes: int | None = MISSING
    image_size: int | None = MISSING
    allow_random_init: bool = MISSING
    fit: ClassifierFitSchema = field(default_factory=ClassifierFitSchema)


@dataclass
class ModelSchema:
    hidden_dims: list[int] | None = MISSING
    activation: str = MISSING
    input_norm: bool = MISSING
    lambda_sim: float = MISSING
    auroc_thresholds: int | None = MISSING
    init_from: str | None = MISSING


@dataclass
class OptimizerSchema:
    name: str = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    nesterov: bool = MISSING


@dataclass
class SchedulerSchema:
    name: str = MISSING
    factor: float = MISSING
    patience: int = MISSING
    monitor: str = MISSING
    warmup_epochs: int = MISSING
    warmup_factor: float = MISSING


@dataclass
class EarlyStoppingSchema:
    enabled: bool = MISSING
    monitor: str = MISSING
    patience: int = MISSING
    mode: str = MISSING


DATA_SOURCES = ("shapes", "images")


@dataclass
class DataSchema:
    source: str = MISSING
    train: str | None = MISSING
    val: str | None = MISSING
    test: str | None = MISSING
    store: str | None = MISSING
    class_names: list[str] | None = MISSING
    shuffle_buffer: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    feature_cache: bool = MISSING
    feature_cache_dir: str | None = MISSING


@dataclass
class TrainerSchema:
    """Keyword arguments of ``lightning.Trainer``, passed through as they are."""

    max_epochs: int = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING
    strategy: str = MISSING
    num_nodes: int = MISSING
    precision: str = MISSING
    fast_dev_run: Any = MISSING  # bool or a number of batches
    limit_train_batches: Any = MISSING  # fraction (float) or number of batches (int)
    limit_val_batches: Any = MISSING
    limit_test_batches: Any = MISSING
    log_every_n_steps: int = MISSING
    deterministic: bool = MISSING
    enable_progress_bar: bool = MISSING


@dataclass
class DemoSchema:
    num_figures: int = MISSING
    top_k: int = MISSING


@dataclass
class EvaluationSchema:
    enabled: bool = MISSING
    k: int = MISSING
    fill: str = MISSING
    select_layers: Any = MISSING  # "auto" | "all" | a list of layer names
    batch_size: int = MISSING
    max_images: int | None = MISSING
    seed: int = MISSING


@dataclass
class WandbSchema:
    project: str = MISSING
    entity: str | None = MISSING
    name: str | None = MISSING
    tags: list[str] = MISSING
    group: str | None = MISSING
    mode: str = MISSING
    log_model: Any = MISSING  # true, false or "all"


@dataclass
class LoggerSchema:
    kinds: list[str] = MISSING
    wandb: WandbSchema = field(default_factory=WandbSchema)


@dataclass
class RegionMapsCallbackSchema:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    num_images: int = MISSING
    top_k: int = MISSING


@dataclass
class ContributionsCallbackSchema:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    num_images: int = MISSING
    top_n: int = MISSING
    top: int = MISSING


@dataclass
class RegionMetricsCallbackSchema:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    max_images: int | None = MISSING


@dataclass
class CallbacksSchema:
    region_maps: RegionMapsCallbackSchema = field(default_factory=RegionMapsCallbackSchema)
    contributions: ContributionsCallbackSchema = field(default_factory=ContributionsCallbackSchema)
    region_metrics: RegionMetricsCallbackSchema = field(default_factory=RegionMetricsCallbackSchema)


@dataclass
class LCAMSchema:
    layer: str | None = MISSING
    label_source: str = MISSING
    bias_lr_factor: float = MISSING
    ce_weight: float = MISSING
    area_weight: float = MISSING
    tv_weight: float = MISSING
    area_eps: float = MISSING
    area_power: float = MISSING
    tv_border: float = MISSING


@dataclass
class SIAMSchema:
    layer: str = MISSING
    border: int | None = MISSING
    grid: int | None = MISSING
    n_templates: int = MISSING
    template_init: float = MISSING
    w_attr: float = MISSING
    w_tmpl: float = MISSING
    presence_tanh: bool = MISSING


METHODS = ("cefam", "lcam_fm", "lcam_img", "siam")


@dataclass
class Config:
    method: str = MISSING
    run_name: str | None = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    overwrite: bool = MISSING
    world: WorldSpec = field(default_factory=WorldSpec)
    classifier: ClassifierSchema = field(default_factory=ClassifierSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    early_stopping: EarlyStoppingSchema = field(default_factory=EarlyStoppingSchema)
    data: DataSchema = field(default_factory=DataSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    demo: DemoSchema = field(default_factory=DemoSchema)
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    callbacks: CallbacksSchema = field(default_factory=CallbacksSchema)
    lcam: LCAMSchema = field(default_factory=LCAMSchema)
    siam: SIAMSchema = field(default_factory=SIAMSchema)


# ------------------------------------------------------------------------------------------------ value rules
@dataclass(frozen=True)
class Rule:
    """What the values of some config keys must be.

    Attributes:
        keys: the dotted keys the rule applies to.
        test: whether a value is allowed.
        expect: what ``test`` asks for, as the error says it: ``<key> must be <expect>, got <value>``.
        optional: ``null`` is allowed too.
        each: the value is a list, and each of its elements must pass ``test``.
    """

    keys: tuple[str, ...]
    test: Callable[[Any], bool]
    expect: str
    optional: bool = False
    each: bool = False


def _number(v: Any) -> bool:
    """A finite int or float (not a bool: YAML's ``true`` is no count)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: float, *keys: str, optional: bool = False, each: bool = False) -> Rule:
    """``keys`` hold finite numbers ``>= low`` (``null`` too if ``optional``; every element if ``each``)."""
    return Rule(keys, lambda v: _number(v) and v >= low, f">= {low}", optional, each)


def above(low: float, *keys: str) -> Rule:
    """``keys`` hold finite numbers ``> low``."""
    return Rule(keys, lambda v: _number(v) and v > low, f"> {low}")


def between(low: float, high: float, *keys: str, low_open: bool = False, high_open: bool = False) -> Rule:
    """``keys`` hold numbers in the interval from ``low`` to ``high``, each end closed unless said open."""

    def test(v: Any) -> bool:
        return _number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return Rule(keys, test, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(choices: Collection[str], *keys: str, ignore_case: bool = False) -> Rule:
    """A fixed set of strings, the code's own list; ``ignore_case`` where the code lower-cases the value."""
    allowed = tuple(choices)
    folded = {c.lower() for c in allowed}
    return Rule(
        keys,
        lambda v: isinstance(v, str) and (v.lower() in folded if ignore_case else v in allowed),
        f"one of {allowed}",
    )


def _lightning_precisions() -> tuple[str, ...] | None:
    """The ``trainer.precision`` strings Lightning accepts, read from its own type (``None`` if it moved)."""
    try:
        from lightning.fabric.plugins.precision import precision
    except ImportError:
        return None
    types = (getattr(precision, "_PRECISION_INPUT_STR", None), getattr(precision, "_PRECISION_INPUT_STR_ALIAS", None))
    return tuple(c for t in types for c in typing.get_args(t)) or None


def _fraction_or_count(v: Any) -> bool:
    # Lightning's limit_*_batches: a float is a fraction of the batches, an int a number of them. 0 is refused:
    # train.py's checkpoint, LR schedule and test need every stage to run.
    if isinstance(v, float):
        return 0 < v <= 1
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_PRECISIONS = _lightning_precisions()

RULES: tuple[Rule, ...] = (
    one_of(METHODS, "method"),
    one_of(DATA_SOURCES, "data.source"),
    Rule(("seed",), lambda v: min_seed_value <= v <= max_seed_value, f"in [{min_seed_value}, {max_seed_value}]"),
    at_least(0, "world.seed", "classifier.fit.seed", "evaluation.seed"),
    # Sizes and counts.
    at_least(1, "world.n_train", "world.n_val", "world.n_test", "classifier.fit.epochs", "classifier.fit.batch_size"),
    at_least(1, "data.batch_size", "evaluation.k", "evaluation.batch_size", "trainer.num_nodes", "demo.top_k"),
    at_least(1, "siam.n_templates", "callbacks.region_maps.num_images", "callbacks.region_maps.top_k"),
    at_least(1, "callbacks.contributions.num_images", "callbacks.contributions.top_n", "callbacks.contributions.top"),
    at_least(
        1,
        "callbacks.region_maps.every_n_epochs",
        "callbacks.contributions.every_n_epochs",
        "callbacks.region_metrics.every_n_epochs",
    ),
    at_least(1, "classifier.fit.widths", each=True),
    at_least(1, "model.hidden_dims", optional=True, each=True),
    at_least(1, "classifier.num_classes", "classifier.image_size", "siam.grid", optional=True),
    at_least(1, "evaluation.max_images", "callbacks.region_metrics.max_images", optional=True),
    at_least(2, "model.auroc_thresholds", optional=True),  # torchmetrics' binned AUROC needs 2 thresholds
    Rule(("classifier.layers",), lambda v: len(v) > 0, "a non-empty list of layer names"),
    at_least(0, "data.num_workers", "data.shuffle_buffer", "demo.num_figures", "trainer.log_every_n_steps"),
    at_least(0, "scheduler.patience", "scheduler.warmup_epochs", "early_stopping.patience"),
    at_least(0, "siam.border", optional=True),
    Rule(
        ("trainer.max_epochs",),
        lambda v: v >= 1 or v == -1,
        ">= 1, or -1 for no limit (early stopping ends the run)",
    ),
    Rule(
        ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches"),
        _fraction_or_count,
        "a fraction in (0.0, 1.0] or a number of batches >= 1",
    ),
    Rule(
        ("trainer.fast_dev_run",),
        lambda v: isinstance(v, bool) or (isinstance(v, int) and v >= 0),
        "true, false or a number of batches >= 0",
    ),
    # Rates, weights and other magnitudes.
    above(0, "optimizer.lr", "classifier.fit.lr", "lcam.bias_lr_factor", "lcam.area_power", "world.logit_scale"),
    at_least(0, "optimizer.weight_decay", "classifier.fit.weight_decay", "model.lambda_sim"),
    at_least(0, "lcam.ce_weight", "lcam.area_weight", "lcam.tv_weight", "lcam.area_eps", "lcam.tv_border"),
    at_least(0, "siam.template_init", "siam.w_attr", "siam.w_tmpl", "world.background_noise", "world.embedding_noise"),
    between(0, 1, "optimizer.momentum", high_open=True),  # 1 would never forget a gradient
    between(0, 1, "scheduler.factor", low_open=True, high_open=True),
    at_least(1, "scheduler.warmup_factor"),  # the warm-up ramps the LR up to warmup_factor x lr
    between(0, 0.5, "world.min_radius", "world.max_radius", low_open=True, high_open=True),  # a fraction of the side
    # Fixed choices, from the code that reads them.
    one_of(OPTIMIZERS, "optimizer.name", ignore_case=True),
    one_of(SCHEDULERS, "scheduler.name", ignore_case=True),
    one_of(ACTIVATIONS, "model.activation"),
    one_of(LABEL_SOURCES, "lcam.label_source"),
    one_of(FILLS, "evaluation.fill"),
    one_of(EarlyStopping.mode_dict, "early_stopping.mode"),
    one_of(VLM_KINDS, "world.vlm_kind"),
    *([one_of(_PRECISIONS, "trainer.precision")] if _PRECISIONS else []),
)


@dataclass(frozen=True)
class CrossRule:
    """A constraint between keys: ``test(cfg)`` must hold, else ``message(cfg)`` is the error."""

    test: Callable[[DictConfig], bool]
    message: Callable[[DictConfig], str]


CROSS_RULES: tuple[CrossRule, ...] = (
    CrossRule(
        lambda c: c.trainer.max_epochs != -1 or c.early_stopping.enabled,
        lambda c: "trainer.max_epochs=-1 (no limit) needs early_stopping.enabled=true, or the run never ends",
    ),
    CrossRule(
        lambda c: c.trainer.max_epochs != -1 or c.scheduler.name.lower() != "cosine",
        lambda c: "scheduler.name=cosine needs a finite trainer.max_epochs (its period), got -1",
    ),
    CrossRule(
        lambda c: c.world.min_radius <= c.world.max_radius,
        lambda c: f"world.min_radius must be <= world.max_radius, got {c.world.min_radius} > {c.world.max_radius}",
    ),
    CrossRule(  # torch's SGD refuses Nesterov momentum without momentum
        lambda c: not (c.optimizer.name.lower() == "sgd" and c.optimizer.nesterov and c.optimizer.momentum == 0),
        lambda c: "optimizer.nesterov=true needs optimizer.momentum > 0 with SGD, got 0",
    ),
)


def _show(v: Any) -> str:
    """A value as the error shows it: strings quoted, numbers and lists as they are."""
    return repr(v) if isinstance(v, str) else str(v)


def rule_errors(cfg: DictConfig) -> list[str]:
    """Every value of ``cfg`` that breaks a rule of :data:`RULES` (then of :data:`CROSS_RULES`), as messages that
    name the key and the value."""
    errors = []
    for rule in RULES:
        for key in rule.keys:
            value = OmegaConf.select(cfg, key)
            if value is None and rule.optional:
                continue
            items = list(enumerate(value)) if rule.each else [(None, value)]
            for i, v in items:
                if not rule.test(v):
                    where = key if i is None else f"{key}[{i}]"
                    finite = "a finite number " if isinstance(v, float) and not math.isfinite(v) else ""
                    errors.append(f"{where} must be {finite}{rule.expect}, got {_show(v)}")
    if not errors:  # the cross rules compare values that passed their own rules
        errors = [r.message(cfg) for r in CROSS_RULES if not r.test(cfg)]
    return errors


def check_values(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every key whose value breaks a rule (:func:`rule_errors`)."""
    errors = rule_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid key {key!r}: {msg}" if key else f"{source}: {msg}") from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml raises several kinds
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- ``configs/default.yaml`` <- ``config_file`` (sparse) <- ``overrides`` (``key=value``).

    Returns a read-only, fully resolved config.
    """
    cfg = OmegaConf.structured(Config)
    cfg = _merge(cfg, _load_yaml(DEFAULT_CONFIG), str(DEFAULT_CONFIG))
    if config_file is not None:
        cfg = _merge(cfg, _load_yaml(Path(config_file)), str(config_file))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"Overrides must look like key=value, got {bad}")
        try:
            dot = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line overrides: {e}") from None
        cfg = _merge(cfg, dot, "command-line override")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"Config keys without a value: {missing}")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"Could not resolve the config: {e}") from None
    check_values(cfg)
    world = world_spec(cfg)  # the world's own checks: its concepts, classes and object counts
    del world
    check_data(cfg)
    from cefam_lightning.training.loggers import check_logger_config  # loggers imports this module

    check_logger_config(to_dict(cfg.logger))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def world_spec(cfg: DictConfig) -> WorldSpec:
    try:
        return WorldSpec(**OmegaConf.to_container(cfg.world, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_data(cfg: DictConfig) -> None:
    """The keys ``data.source=images`` needs have values (the ranges are :data:`RULES`')."""
    data = cfg.data
    if data.source == "images":
        missing = [f"data.{k}" for k in ("train", "val", "store") if data[k] is None]
        if missing:
            raise ConfigError(f"data.source=images needs {', '.join(missing)} (image sources and the embedding store)")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
