"""A training run of any registered explainer: build or reuse the data, fit or load the frozen classifier, build
the method (:mod:`cefam_lightning.methods.registry`), train, test, evaluate, report.

The run never asks which method it trains: the method's registration builds the module and adds its own training
callbacks, and the module tests, evaluates and summarizes itself
(:class:`~cefam_lightning.methods.base.ExplainerModule`). With ``data.source=images`` the data are image sources
(folder, manifest or tar shards) joined by sample id with an embedding store written by ``precompute``, and the
classifier is ``classifier.name`` with ``classifier.weights``; the shapes-world steps (fitting the classifier, the
evaluation against the world's masks) are skipped.

The command line is :mod:`cefam_lightning.cli.train` (``python train.py [--config FILE] [key=value ...]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks import ConceptRegionMaps, ConceptScoreFigures, StopOnNonFiniteLoss
from cefam_lightning.config_rules import ConfigError
from cefam_lightning.data.image_datamodule import ImageDataModule
from cefam_lightning.data.image_sources import open_source
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.errors import CefamError, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.checkpoints import AtomicCheckpointIO, CheckpointError, read_checkpoint
from cefam_lightning.methods.registry import BuildContext, TrainContext, get_method
from cefam_lightning.metrics.shortcut import classifier_shortcut_reliance
from cefam_lightning.models.classifier import brings_own_weights, build_classifier
from cefam_lightning.reporting.evaluations import write_results
from cefam_lightning.training.classifier_fit import FitSettings, fit_shapes_classifier
from cefam_lightning.training.config import to_dict, world_spec
from cefam_lightning.training.loggers import build_loggers, code_version, finish_loggers, run_links
from cefam_lightning.training.run_folder import RunFolder, claim_run_folder

log = logging.getLogger("cefam_lightning")


def _stage(msg: str) -> None:
    print(f"[cefam] {msg}", flush=True)


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Run training and testing for a loaded config; returns what was written to ``metrics.json``.

    ``cfg.method`` picks the explainer trained on the frozen classifier: CE-FAM (the default), L-CAM-Fm,
    L-CAM-Img or SIAM. ``extra_callbacks`` are added to the trainer's own (checkpointing, figures, ...).

    The run folder ``output_dir/run_name`` is claimed for the run (:mod:`cefam_lightning.training.run_folder`): a folder
    that holds another run is refused unless ``ckpt_path`` resumes it or ``overwrite=true`` replaces it.
    """
    with claim_run_folder(cfg.output_dir, cfg.run_name, resume=bool(cfg.ckpt_path), overwrite=cfg.overwrite) as folder:
        return _run(cfg, folder, extra_callbacks)


@contextlib.contextmanager
def _built_from_config() -> Iterator[None]:
    """A ``ValueError`` raised while the data, classifier and module are built from the config is the config's
    (a bad layer, option or file named in it): it becomes a :class:`ConfigError`, one line from the command line."""
    try:
        yield
    except CefamError:
        raise
    except ValueError as e:
        raise ConfigError(one_line(e)) from e


def _run(cfg: DictConfig, folder: RunFolder, extra_callbacks: Sequence[L.Callback]) -> dict[str, Any]:
    t0 = time.time()
    spec = get_method(cfg.method)
    run_dir = folder.path
    ckpt_path = resume_path(cfg, run_dir)  # a missing or unreadable checkpoint is refused before anything is built
    tcfg = cfg.trainer
    quick = bool(tcfg.fast_dev_run)

    ccfg = cfg.classifier
    images = cfg.data.source == "images"
    with _built_from_config():
        targets = None
        if images:
            dm, classifier, weights, class_names = _image_data_and_classifier(cfg)
            store, image_size, classifier_metrics = dm.store, dm.input_spec.crop, {}
            attributes = [(name, "attribute") for name in dm.attribute_names or []] or None
            targets = dm.target_names
        else:
            dm, classifier, weights, classifier_metrics = _shapes_data_and_classifier(cfg, quick)
            store, image_size, class_names = dm.world.store, dm.spec.image_size, dm.class_names
            attributes = [(c.name, c.type) for c in store.concepts]  # the world's concepts, with their masks

        # Seeded here, after the classifier: fitting it (cold cache) or not (warm) must not change the branch's
        # initialization or data order.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        context = BuildContext(cfg, classifier, class_names, store, image_size, attributes, targets)
        module = spec.build(context, spec)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)

    if rank_zero_only.rank == 0:  # the run starts: replace an overwritten run's files, then record the config
        folder.clear_for_overwrite()
        write_config(run_dir, cfg)

    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/loss",
        mode="min",
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # ModelCheckpoint(save_last=True) rewrites last.ckpt only when it also saves a new best, so a run whose
    # val/loss stops improving would keep a stale last.ckpt; a monitor-free checkpoint is written every epoch.
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    callbacks: list[L.Callback] = [ckpt, last]
    if cfg.logger.kinds:  # Lightning refuses an LR monitor without a logger (logger.kinds=[])
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    rm = cfg.callbacks.region_maps
    if rm.enabled:  # every method's own maps (module.region_panels)
        callbacks.append(ConceptRegionMaps(rm.every_n_epochs, rm.num_images, rm.top_k, out_dir=run_dir))
    if spec.training_callbacks is not None:
        ctx = TrainContext(cfg, run_dir, dm, module, classifier, images=images, masks=not images)
        callbacks.extend(spec.training_callbacks(ctx))
    es = cfg.early_stopping
    if es.enabled:
        callbacks.append(EarlyStopping(monitor=es.monitor, patience=es.patience, mode=es.mode))
    callbacks.append(StopOnNonFiniteLoss())  # every method: a NaN loss ends the run before a checkpoint holds it
    callbacks.extend(extra_callbacks)
    loggers = build_loggers(to_dict(cfg.logger), run_dir, config=to_dict(cfg), resume=bool(ckpt_path))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],  # whole checkpoints or none, read with weights_only=True
        **to_dict(tcfg),  # every trainer.* key is a lightning.Trainer argument
    )
    _stage(f"training {spec.title} ({trainable:,} parameters, layers {list(ccfg.layers)}) -> {run_dir}")
    if ckpt_path:
        _stage(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    best = ckpt.best_model_path or None
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)[0]

    evaluation, table = None, None
    ecfg = cfg.evaluation
    if ecfg.enabled and not images and trainer.is_global_zero:
        # trainer.test loaded the best weights into the module; the world's test masks are the ground truth.
        _stage("evaluating explanations on the test split against the world's masks")
        settings = EvaluationSettings(
            batch_size=ecfg.batch_size, max_images=ecfg.batch_size if quick else ecfg.max_images, seed=ecfg.seed
        )
        evaluation, table = module.evaluate_on_world(dm.world, "test", settings)
        evaluation = {"method": spec.name, **evaluation, "checkpoint": best}
        write_results(evaluation, run_dir / "evaluation", table)

    metrics = {
        "run_dir": str(run_dir),
        "method": spec.name,
        "classifier": {"name": ccfg.name, "weights": str(weights), **classifier_metrics},
        "test": {k: float(v) for k, v in test.items()},
        "best_checkpoint": best,
        "best_val_loss": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "epochs_trained": trainer.current_epoch,
        "figures": [str(p) for cb in callbacks if isinstance(cb, ConceptScoreFigures) for p in cb.written],
        "evaluation": module.evaluation_headline(evaluation) if evaluation is not None else None,
        "seconds": round(time.time() - t0, 1),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / "run.json", _run_record(run_dir, loggers, callbacks, metrics))
        _summary(metrics, module, images)
        if table is not None:
            print(table + f"(full results: {run_dir / 'evaluation' / 'evaluation.json'})", flush=True)
    finish_loggers(loggers)
    return metrics


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """``cfg.ckpt_path`` as a file to resume from: ``"last"`` is this run's ``checkpoints/last.ckpt``.

    The file is read once here (memory-mapped, ``weights_only=True``), so that a file that is not a checkpoint,
    or would run code when unpickled, is refused with its name before anything is built.

    Raises:
        FileNotFoundError: the checkpoint does not exist (naming the path and the key).
        CheckpointError: it cannot be read safely as a checkpoint.
    """
    if not cfg.ckpt_path:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        hint = f" (ckpt_path=last means {path}: resume a run by its run_name)" if cfg.ckpt_path == "last" else ""
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}{hint}")
    try:
        read_checkpoint(path, mmap=True)
    except CheckpointError as e:
        raise CheckpointError(f"ckpt_path: {e}") from None
    return str(path)


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """``config.yaml``: the run's resolved config. A resumed run with another config keeps the earlier one as
    ``config.<n>.yaml`` (n = 1, 2, ...), so the history of a run folder is never overwritten."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(path, run_dir / f"config.{n}.yaml")
    atomic_write_bytes(path, text.encode())


def _run_record(run_dir: Path, loggers: Sequence[Any], callbacks: Sequence[L.Callback], metrics: dict) -> dict:
    """``run.json``: what the run folder holds and where its loggers keep the run (the W&B URL when online)."""
    written = sorted({str(p) for cb in callbacks for p in getattr(cb, "written", [])})
    return {
        "method": metrics["method"],
        "code_version": code_version(),
        "config": str(run_dir / "config.yaml"),
        "metrics": str(run_dir / "metrics.json"),
        "checkpoints": {"best": metrics["best_checkpoint"], "last": str(run_dir / "checkpoints" / "last.ckpt")},
        "loggers": run_links(loggers),
        "images_and_tables": written,
    }


def _shapes_data_and_classifier(cfg: DictConfig, quick: bool) -> tuple[ShapesWorldDataModule, Any, Any, dict]:
    """The shapes world (built or reused) and its classifier (fitted or loaded): ``dm, classifier, weights,
    classifier_metrics``."""
    tcfg = cfg.trainer
    spec = world_spec(cfg)
    dm = ShapesWorldDataModule(
        spec, cfg.cache_dir, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed
    )
    _stage(
        f"shapes world: {spec.n_train}/{spec.n_val}/{spec.n_test} images, {spec.num_concepts} concepts, "
        f"{len(spec.classes)} classes (cache: {Path(cfg.cache_dir).expanduser()})"
    )
    dm.prepare_data()
    dm.setup("fit")

    ccfg = cfg.classifier
    num_classes = ccfg.num_classes or len(spec.classes)
    classifier_metrics: dict[str, Any] = {}
    weights = ccfg.weights
    if weights is None and ccfg.name != "shapes_cnn":
        _check_random_init(ccfg, "only shapes_cnn is fitted here")
    elif weights is None:
        _stage("fitting the shapes-world classifier (cached after the first run)")
        fit = FitSettings(**to_dict(ccfg.fit))
        if quick:
            fit.epochs = 1
        weights, classifier_metrics = fit_shapes_classifier(
            spec, cfg.cache_dir, fit, progress_bar=tcfg.enable_progress_bar, accelerator=tcfg.accelerator
        )
        _stage(f"classifier: test accuracy {classifier_metrics['test_acc']:.4f} ({weights})")
    classifier = build_classifier(
        ccfg.name,
        num_classes,
        list(ccfg.layers),
        weights=weights,
        widths=list(ccfg.fit.widths),
        image_size=spec.image_size,
    )
    if spec.shortcut is not None:  # how much the classifier leans on the planted shortcut, on the test split
        reliance = classifier_shortcut_reliance(classifier, dm.world, "test", batch_size=cfg.evaluation.batch_size)
        classifier_metrics = {**classifier_metrics, "shortcut": reliance}
        for line in _shortcut_lines(reliance):
            _stage(f"classifier: {line}")
    return dm, classifier, weights, classifier_metrics


def _shortcut_lines(r: dict[str, Any]) -> list[str]:
    """The classifier's reliance on a planted shortcut (:func:`classifier_shortcut_reliance`), in two lines."""

    def acc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    drop = "n/a" if r["acc_drop"] is None else f"{r['acc_drop']:+.4f}"
    return [
        f"shortcut {r['concept']} -> {r['class']} ({r['split']} split): accuracy {acc(r['acc_tie_holds'])} where the "
        f"tie holds ({r['n_tie_holds']} images), {acc(r['acc_tie_broken'])} where broken ({r['n_tie_broken']}), "
        f"drop {drop}",
        f"shortcut errors {r['shortcut_errors']} of {r['n_other_with_concept']} (other classes with {r['concept']} "
        f"taken for {r['class']}); {r['class']} without {r['concept']} missed {r['shortcut_misses']} of "
        f"{r['n_class_without_concept']}",
    ]


def _check_random_init(ccfg: DictConfig, why: str) -> None:
    """A classifier without weights is an error unless ``classifier.allow_random_init`` says it is meant."""
    if not ccfg.allow_random_init:
        raise ConfigError(
            f"classifier.weights is required for {ccfg.name!r} ({why}); set classifier.allow_random_init=true to "
            f"explain a randomly initialized classifier (smoke tests only)"
        )
    _stage(f"classifier: {ccfg.name} keeps its random initialization (classifier.allow_random_init=true)")


def _image_data_and_classifier(cfg: DictConfig) -> tuple[ImageDataModule, Any, Any, list[str]]:
    """Image sources joined with the embedding store, and the classifier by name: ``dm, classifier, weights,
    class_names`` (the class indices as names when the data name no classes)."""
    dcfg, ccfg = cfg.data, cfg.classifier
    given = list(dcfg.class_names) if dcfg.class_names is not None else None
    train = open_source(dcfg.train, given)  # opened once: its class names size the classifier
    class_names = given or train.class_names
    num_classes = ccfg.num_classes or (len(class_names) if class_names else None)
    if num_classes is None:
        raise ConfigError(
            f"classifier.num_classes is needed: the training data ({train.describe()}) has no class names "
            f"(set classifier.num_classes or data.class_names)"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"classifier.num_classes={num_classes}, but the data have {len(class_names)} class names")
    weights = ccfg.weights
    if weights is None and not brings_own_weights(ccfg.name):
        _check_random_init(ccfg, "data.source=images: no classifier is fitted here")
        torch.manual_seed(cfg.seed)  # a reproducible random classifier
    kwargs: dict[str, Any] = {"image_size": ccfg.image_size}
    if ccfg.name == "shapes_cnn":
        kwargs["widths"] = list(ccfg.fit.widths)
    classifier = build_classifier(ccfg.name, num_classes, list(ccfg.layers), weights=weights, **kwargs)
    input_spec = getattr(classifier, "input_spec", None) or InputSpec(crop=224, resize=256)
    dm = ImageDataModule(
        train,
        dcfg.val,
        dcfg.test,
        store=dcfg.store,  # load_config checked that the method reads what is given (MethodSpec.image_data)
        attributes=dcfg.attributes,
        targets=dcfg.targets,
        attribute_train=dcfg.attribute_train,
        attribute_val=dcfg.attribute_val,
        input_spec=input_spec,
        batch_size=dcfg.batch_size,
        num_workers=dcfg.num_workers,
        shuffle_buffer=dcfg.shuffle_buffer,
        seed=cfg.seed,
        class_names=class_names,
    )
    dm.setup("fit")
    splits = ", ".join(f"{k} {v.describe()}" for k, v in dm.sources.items())
    joined = []
    if dm.store is not None:
        joined.append(f"embeddings {dm.store.path} ({dm.store.vlm.name}, {len(dm.store.concepts)} concepts)")
    for key, table in dm.tables.items():
        extra = dm.unmatched.get(key, 0)
        joined.append(
            f"{table.kind}s {table.path} ({len(table.names)} columns, {len(table.ids)} rows"
            + (f", {extra} matching no image" if extra else "")
            + ")"
        )
    _stage(
        f"images: {splits}; {'; '.join(joined) or 'images and labels only'}; classifier input {input_spec.crop} px "
        f"crop of {input_spec.resize}"
    )
    _stage("data.source=images: the shapes-world steps (concept-presence figures, evaluation on masks) are skipped")
    return dm, classifier, weights, class_names or [str(i) for i in range(num_classes)]


def _summary(m: dict[str, Any], module: Any, images: bool = False) -> None:
    t = m["test"]
    where = "on images: test data" if images else "on the shapes world: held-out test split"
    folders = "config.yaml, run.json, metrics.json, checkpoints/, logs/" + ("" if images else ", evaluation/")
    lines = ["", "=" * 72, f"{module.title} {where}"]
    rows = module.summary_metrics  # a method logs only what its data let it measure (no presence: no AUROC)
    lines += [f"  {label:<30} {t[key]:.4f}" for label, key in rows if key in t]
    shortcut = m["classifier"].get("shortcut")
    if shortcut is not None:
        lines += [f"  classifier {line}" for line in _shortcut_lines(shortcut)]
    lines += [
        f"  epochs trained {m['epochs_trained']}, {m['seconds']:.0f} s",
        f"  run folder   {m['run_dir']}  ({folders})",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
