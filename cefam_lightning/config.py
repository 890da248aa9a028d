"""Configuration: a typed schema, ``configs/default.yaml`` with every default, sparse experiment files on top,
and command-line ``key=value`` overrides last (the dinov2 pattern, with plain OmegaConf).

An unknown or misspelt key, a value of the wrong type or a missing value is a :class:`ConfigError` that names
the key and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cefam_lightning.errors import CefamError
from cefam_lightning.shapes_world import WorldSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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
    world = world_spec(cfg)  # validates the world's values
    del world
    check_data(cfg)
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    from cefam_lightning.loggers import check_logger_config  # loggers imports this module

    check_logger_config(to_dict(cfg.logger))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def world_spec(cfg: DictConfig) -> WorldSpec:
    try:
        return WorldSpec(**OmegaConf.to_container(cfg.world, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_data(cfg: DictConfig) -> None:
    """``data.source`` is known, and the keys ``data.source=images`` needs have values."""
    data = cfg.data
    if data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {DATA_SOURCES}, got {data.source!r}")
    if data.source == "images":
        missing = [f"data.{k}" for k in ("train", "val", "store") if data[k] is None]
        if missing:
            raise ConfigError(f"data.source=images needs {', '.join(missing)} (image sources and the embedding store)")
    if data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
