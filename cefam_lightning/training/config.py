"""Configuration: a typed schema, ``configs/default.yaml`` with every default, sparse experiment files on top,
and command-line ``key=value`` overrides last (the dinov2 pattern, with plain OmegaConf).

An unknown or misspelt key, a value of the wrong type or a missing value is a :class:`ConfigError` that names
the key and where it came from; so is a value out of its range or not among its choices (:data:`RULES`), checked
in :func:`load_config` before anything is built.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cefam_lightning.config_rules import ConfigError, CrossRule, Rule, above, at_least, between, one_of, rule_errors
from cefam_lightning.data.embedding_store import VLM_KINDS
from cefam_lightning.data.shapes_world import WorldSpec
from cefam_lightning.methods.optim import OPTIMIZERS, SCHEDULERS
from cefam_lightning.methods.registry import MethodSpec, UnknownMethodError, get_method
from cefam_lightning.training.loggers import check_logger_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


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
    attributes: str | None = MISSING
    targets: str | None = MISSING
    attribute_train: str | None = MISSING
    attribute_val: str | None = MISSING
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
    final_report: bool = MISSING


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
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    early_stopping: EarlyStoppingSchema = field(default_factory=EarlyStoppingSchema)
    data: DataSchema = field(default_factory=DataSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    demo: DemoSchema = field(default_factory=DemoSchema)
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    callbacks: CallbacksSchema = field(default_factory=CallbacksSchema)
    # + the method's own section (``cefam``, ``lcam``, ``siam``, ...), added by :func:`load_config` from the
    #   method's registration (:mod:`cefam_lightning.methods.registry`), with its defaults from configs/method/.


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
    one_of(DATA_SOURCES, "data.source"),
    Rule(("seed",), lambda v: min_seed_value <= v <= max_seed_value, f"in [{min_seed_value}, {max_seed_value}]"),
    at_least(0, "world.seed", "classifier.fit.seed", "evaluation.seed"),
    # Sizes and counts.
    at_least(1, "world.n_train", "world.n_val", "world.n_test", "classifier.fit.epochs", "classifier.fit.batch_size"),
    at_least(1, "data.batch_size", "evaluation.batch_size", "trainer.num_nodes", "demo.top_k"),
    at_least(1, "callbacks.region_maps.num_images", "callbacks.region_maps.top_k"),
    at_least(1, "callbacks.contributions.num_images", "callbacks.contributions.top_n", "callbacks.contributions.top"),
    at_least(
        1,
        "callbacks.region_maps.every_n_epochs",
        "callbacks.contributions.every_n_epochs",
        "callbacks.region_metrics.every_n_epochs",
    ),
    at_least(1, "classifier.fit.widths", each=True),
    at_least(1, "classifier.num_classes", "classifier.image_size", optional=True),
    at_least(1, "evaluation.max_images", "callbacks.region_metrics.max_images", optional=True),
    Rule(("classifier.layers",), lambda v: len(v) > 0, "a non-empty list of layer names"),
    at_least(0, "data.num_workers", "data.shuffle_buffer", "demo.num_figures", "trainer.log_every_n_steps"),
    at_least(0, "scheduler.patience", "scheduler.warmup_epochs", "early_stopping.patience"),
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
    above(0, "optimizer.lr", "classifier.fit.lr", "world.logit_scale"),
    at_least(0, "optimizer.weight_decay", "classifier.fit.weight_decay"),
    at_least(0, "world.background_noise", "world.embedding_noise"),
    between(0, 1, "optimizer.momentum", high_open=True),  # 1 would never forget a gradient
    between(0, 1, "scheduler.factor", low_open=True, high_open=True),
    at_least(1, "scheduler.warmup_factor"),  # the warm-up ramps the LR up to warmup_factor x lr
    between(0, 0.5, "world.min_radius", "world.max_radius", low_open=True, high_open=True),  # a fraction of the side
    # Fixed choices, from the code that reads them.
    one_of(OPTIMIZERS, "optimizer.name", ignore_case=True),
    one_of(SCHEDULERS, "scheduler.name", ignore_case=True),
    one_of(EarlyStopping.mode_dict, "early_stopping.mode"),
    one_of(VLM_KINDS, "world.vlm_kind"),
    *([one_of(_PRECISIONS, "trainer.precision")] if _PRECISIONS else []),
)


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
    CrossRule(  # the final report is the contribution logger's: without it, nothing would make it
        lambda c: c.callbacks.contributions.enabled or not c.callbacks.contributions.final_report,
        lambda c: "callbacks.contributions.final_report=true needs callbacks.contributions.enabled=true",
    ),
    CrossRule(  # torch's SGD refuses Nesterov momentum without momentum
        lambda c: not (c.optimizer.name.lower() == "sgd" and c.optimizer.nesterov and c.optimizer.momentum == 0),
        lambda c: "optimizer.nesterov=true needs optimizer.momentum > 0 with SGD, got 0",
    ),
)


def check_values(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every key whose value breaks a rule: the run's (:data:`RULES`,
    :data:`CROSS_RULES`) and its method's (the registration's ``rules``)."""
    errors = rule_errors(cfg, [*RULES, *get_method(cfg.method).rules], CROSS_RULES)
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


# Keys that moved, for a message that says where to (a config or override written for an earlier version).
RENAMED = {
    "model": "cefam",
    "evaluation.k": "cefam.k",
    "evaluation.fill": "cefam.fill",
    "evaluation.select_layers": "cefam.select_layers",
}


def _renamed(cfg: DictConfig, source: str) -> None:
    """Refuse keys of an earlier layout, naming where each went."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for old, new in RENAMED.items():
        head, _, leaf = old.partition(".")
        node = plain.get(head) if isinstance(plain, dict) else None
        if (not leaf and node is not None) or (leaf and isinstance(node, dict) and leaf in node):
            raise ConfigError(f"{source}: {old!r} is now {new!r} (the method's own section, configs/method/)")


def method_spec(config_file: str | Path | None = None, overrides: list[str] | None = None) -> MethodSpec:
    """The registration of the method a config names (overrides, then the file, then the default)."""
    layers = [_load_yaml(DEFAULT_CONFIG)]
    if config_file is not None:
        layers.append(_load_yaml(Path(config_file)))
    layers.append(_dotlist(overrides))
    name = next((c.method for c in reversed(layers) if "method" in c), None)
    try:
        return get_method(name)
    except UnknownMethodError as e:
        raise ConfigError(str(e)) from None


def _dotlist(overrides: list[str] | None) -> DictConfig:
    if not overrides:
        return OmegaConf.create({})
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"Overrides must look like key=value, got {bad}")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise ConfigError(f"command-line overrides: {e}") from None


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- ``configs/default.yaml`` <- the method's section defaults (``configs/method/<method>.yaml``) <-
    ``config_file`` (sparse) <- ``overrides`` (``key=value``).

    The method (``method:``, from whichever layer sets it last) adds its own typed section to the schema: its
    registration's ``section``, ``schema`` and ``defaults``. A key of another method's section is unknown.

    Returns a read-only, fully resolved config.
    """
    spec = method_spec(config_file, overrides)
    cfg = OmegaConf.structured(Config)
    if spec.section is not None:
        with open_dict(cfg):
            cfg[spec.section] = OmegaConf.structured(spec.schema)
    layers = [(_load_yaml(DEFAULT_CONFIG), str(DEFAULT_CONFIG))]
    if spec.defaults is not None:
        layers.append((_load_yaml(spec.defaults), str(spec.defaults)))
    if config_file is not None:
        layers.append((_load_yaml(Path(config_file)), str(config_file)))
    layers.append((_dotlist(overrides), "command-line override"))
    for layer, source in layers:
        _renamed(layer, source)
        cfg = _merge(cfg, layer, source)
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
    check_data(cfg, spec)
    check_logger_config(to_dict(cfg.logger))
    if cfg.data.source not in spec.data_sources:
        raise ConfigError(
            f"method={spec.name} trains on data.source {' or '.join(spec.data_sources)}, not {cfg.data.source!r}"
        )
    OmegaConf.set_readonly(cfg, True)
    return cfg


def method_defaults(method: str) -> dict[str, Any]:
    """A method's own config section as a new run gets it by default (``configs/method/<method>.yaml`` over its
    schema), e.g. to evaluate an older checkpoint by today's default rules rather than the ones it recorded."""
    spec = get_method(method)
    if spec.section is None:
        return {}
    return OmegaConf.to_container(load_config(overrides=[f"method={method}"])[spec.section], resolve=True)


def world_spec(cfg: DictConfig) -> WorldSpec:
    try:
        return WorldSpec(**OmegaConf.to_container(cfg.world, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None


# The data keys each kind of MethodSpec.image_data needs (first) or may take (the rest), with images.
IMAGE_DATA_KEYS = {
    "embeddings": ("store",),
    "attributes": ("attributes", "attribute_train", "attribute_val"),
    "targets": ("targets",),
}


def check_data(cfg: DictConfig, spec: MethodSpec | None = None) -> None:
    """The keys ``data.source=images`` needs have values, and the method reads every data key given (the ranges
    are :data:`RULES`'): the method's ``image_data`` (:class:`~cefam_lightning.methods.registry.MethodSpec`) says
    which of ``data.store``, ``data.attributes`` (with ``attribute_train`` / ``attribute_val``) and
    ``data.targets`` it reads."""
    data = cfg.data
    reads = spec.image_data if spec is not None else ("embeddings",)
    if data.source == "images":
        needed = ["train", "val", *(IMAGE_DATA_KEYS[k][0] for k in reads if k != "targets")]
        missing = [f"data.{k}" for k in needed if data[k] is None]
        if missing:
            what = {"data.store": "the embedding store", "data.attributes": "the attribute table"}
            named = ", ".join(f"{k} ({what[k]})" if k in what else k for k in missing)
            who = f"method={spec.name} " if spec is not None else ""
            raise ConfigError(f"{who}data.source=images needs {named}")
    unread = [
        f"data.{key}"
        for kind, keys in IMAGE_DATA_KEYS.items()
        for key in keys
        if data[key] is not None and (kind not in reads or data.source != "images")
    ]
    if unread and spec is not None:
        where = "with data.source=images" if data.source == "images" else f"with data.source={data.source}"
        raise ConfigError(f"{', '.join(unread)}: not read by method={spec.name} {where}; leave it null")
    if (data.attribute_train is None) != (data.attribute_val is None):
        raise ConfigError("data.attribute_train and data.attribute_val come together (the two-data-set setting)")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
