"""Train CE-FAM: build or reuse the shapes world, fit or load the classifier, train the branch, test, report.

With ``data.source=images`` the data are image sources (folder, manifest or tar shards) joined by sample id with
an embedding store written by ``precompute``, and the classifier is ``classifier.name`` with ``classifier.weights``;
the shapes-world steps (fitting the classifier, concept-presence figures, evaluation against the world's masks)
are skipped.

Usage: ``python train.py [--config FILE] [key=value ...]`` (see ``configs/default.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks import (
    CachePooledFeatures,
    ConceptRegionMaps,
    ConceptScoreFigures,
    ContributionLogger,
    RegionMetricsCallback,
    StopOnNonFiniteLoss,
)
from cefam_lightning.cli.evaluate import evaluate_explainer_on_world, write_results
from cefam_lightning.data.feature_cache import PooledFeatureCache, pooled_identity
from cefam_lightning.data.image_datamodule import ImageDataModule
from cefam_lightning.data.image_sources import open_source
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.errors import CefamError, cli_errors, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json
from cefam_lightning.methods.cefam.module import CEFAMModule, init_translator_from
from cefam_lightning.methods.cefam.relevance import selectable_layers
from cefam_lightning.methods.checkpoints import AtomicCheckpointIO, CheckpointError, read_checkpoint
from cefam_lightning.methods.lcam.module import build_lcam_module
from cefam_lightning.methods.siam.module import build_siam_module
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator
from cefam_lightning.training.classifier_fit import FitSettings, fit_shapes_classifier
from cefam_lightning.training.config import ConfigError, load_config, to_dict, world_spec
from cefam_lightning.training.loggers import build_loggers, code_version, finish_loggers, run_links
from cefam_lightning.training.run_folder import RunFolder, claim_run_folder

log = logging.getLogger("cefam_lightning")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML merged on top of configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    p.add_argument("--debug", action="store_true", help="show a traceback instead of a one-line error")
    return p.parse_args(argv)


def _stage(msg: str) -> None:
    print(f"[cefam] {msg}", flush=True)


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Run training and testing for a loaded config; returns what was written to ``metrics.json``.

    ``cfg.method`` picks the explainer trained on the frozen classifier: CE-FAM (the default), L-CAM-Fm,
    L-CAM-Img or SIAM. ``extra_callbacks`` are added to the trainer's own (checkpointing, figures, ...).

    The run folder ``output_dir/run_name`` is claimed for the run (:mod:`cefam_lightning.training.run_folder`): a folder
    that holds another run is refused unless ``ckpt_path`` resumes it or ``overwrite=true`` replaces it.
    """
    _check_select_layers(cfg)
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
    method = cfg.method
    run_dir = folder.path
    ckpt_path = resume_path(cfg, run_dir)  # a missing or unreadable checkpoint is refused before anything is built
    tcfg = cfg.trainer
    quick = bool(tcfg.fast_dev_run)

    ccfg = cfg.classifier
    images = cfg.data.source == "images"
    if images and method == "siam":
        raise ConfigError(
            "method=siam trains on the shapes world (its concepts are the attributes); data.source=images has no "
            "attribute labels"
        )
    with _built_from_config():
        if images:
            dm, classifier, weights, class_names = _image_data_and_classifier(cfg)
            store, image_size, classifier_metrics = dm.store, dm.input_spec.crop, {}
        else:
            dm, classifier, weights, classifier_metrics = _shapes_data_and_classifier(cfg, quick)
            store, image_size, class_names = dm.world.store, dm.spec.image_size, dm.class_names

        # Seeded here, after the classifier: fitting it (cold cache) or not (warm) must not change the branch's
        # initialization or data order.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module, trainable = _build_module(cfg, classifier, store, class_names, image_size)
        if method == "cefam" and cfg.model.init_from:
            report = init_translator_from(module, cfg.model.init_from)
            _stage(report.summary())

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
    if cfg.data.feature_cache and method == "cefam":  # only CE-FAM's translator reads pooled activations alone
        dm.feature_caches = _feature_caches(cfg, dm, classifier, images)
        callbacks.append(CachePooledFeatures(dm.feature_caches))
    figures = None
    if not images and method == "cefam":  # the figures mark the concepts present in the world's ground truth
        figures = ConceptScoreFigures(
            run_dir / "figures", cfg.demo.num_figures, cfg.demo.top_k, dm.class_names, store.concept_names
        )
        callbacks.insert(1, figures)
    callbacks.extend(_training_callbacks(cfg, run_dir, masks=not images))
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
    _stage(f"training {METHOD_TITLES[method]} ({trainable:,} parameters, layers {list(ccfg.layers)}) -> {run_dir}")
    if ckpt_path:
        _stage(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    best = ckpt.best_model_path or None
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0]

    evaluation, table = None, None
    ecfg = cfg.evaluation
    if ecfg.enabled and not images and trainer.is_global_zero:
        # trainer.test loaded the best weights into the module; the world's test masks are the ground truth.
        _stage("evaluating explanations on the test split against the world's masks")
        evaluation, table = _evaluate(cfg, module, dm.world, ecfg.batch_size if quick else ecfg.max_images, best)

    metrics = {
        "run_dir": str(run_dir),
        "method": method,
        "classifier": {"name": ccfg.name, "weights": str(weights), **classifier_metrics},
        "test": {k: float(v) for k, v in test.items()},
        "best_checkpoint": best,
        "best_val_loss": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "epochs_trained": trainer.current_epoch,
        "figures": [str(p) for p in figures.written] if figures is not None else [],
        "evaluation": _evaluation_summary(method, evaluation),
        "seconds": round(time.time() - t0, 1),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / "run.json", _run_record(run_dir, loggers, callbacks, metrics))
        _summary(metrics, images)
        if table is not None:
            print(table + f"(full results: {run_dir / 'evaluation' / 'evaluation.json'})", flush=True)
    finish_loggers(loggers)
    return metrics


METHOD_TITLES = {"cefam": "the CE-FAM branch", "lcam_fm": "L-CAM-Fm", "lcam_img": "L-CAM-Img", "siam": "SIAM"}


def _build_module(
    cfg: DictConfig, classifier: Any, store: Any, class_names: list[str], image_size: int
) -> tuple[L.LightningModule, int]:
    """The LightningModule of ``cfg.method`` on the frozen classifier, and its number of trainable parameters."""
    method = cfg.method
    if method in ("lcam_fm", "lcam_img"):
        lc = to_dict(cfg.lcam)
        module = build_lcam_module(
            classifier,
            len(class_names),
            class_names,
            variant=method.removeprefix("lcam_"),
            layer=lc.pop("layer"),
            label_source=lc.pop("label_source"),
            optimizer={**to_dict(cfg.optimizer), "bias_lr_factor": lc.pop("bias_lr_factor")},
            scheduler=to_dict(cfg.scheduler),
            loss=lc,  # the loss weights are what is left
            config=to_dict(cfg),
        )
    elif method == "siam":
        sc = to_dict(cfg.siam)
        module = build_siam_module(
            classifier,
            len(class_names),
            class_names,
            store.concept_names,
            [c.type for c in store.concepts],
            **sc,
            optimizer=to_dict(cfg.optimizer),
            scheduler=to_dict(cfg.scheduler),
            auroc_thresholds=cfg.model.auroc_thresholds,
            config=to_dict(cfg),
        )
    else:
        shapes = classifier.layer_shapes(image_size)
        in_dim = sum(c for c, _, _ in shapes.values())
        hidden = list(cfg.model.hidden_dims) if cfg.model.hidden_dims is not None else None
        translator = Translator(in_dim, store.embed_dim, hidden, cfg.model.activation, cfg.model.input_norm)
        scorer = ConceptScorer(
            torch.from_numpy(store.text_embeddings), store.vlm.kind, store.vlm.logit_scale, store.vlm.logit_bias
        )
        module = CEFAMModule(
            classifier,
            translator,
            scorer,
            concept_names=store.concept_names,
            concept_types=[c.type for c in store.concepts],
            class_names=class_names,
            lambda_sim=cfg.model.lambda_sim,
            optimizer=to_dict(cfg.optimizer),
            scheduler=to_dict(cfg.scheduler),
            auroc_thresholds=cfg.model.auroc_thresholds,
            config=to_dict(cfg),
            vlm=asdict(store.vlm),
        )
    return module, sum(p.numel() for p in module.parameters() if p.requires_grad)


def select_layers_setting(value: Any) -> str | list[str]:
    """``evaluation.select_layers`` as :func:`~cefam_lightning.methods.cefam.relevance.selectable_layers` takes it."""
    if isinstance(value, str):
        return value
    return [str(x) for x in OmegaConf.to_container(value)] if OmegaConf.is_config(value) else list(value)


def _check_select_layers(cfg: DictConfig) -> None:
    """``evaluation.select_layers`` against ``classifier.layers``, before anything is written."""
    layers = SimpleNamespace(layers=list(cfg.classifier.layers), mean_invariant_layers=list)
    try:
        selectable_layers(layers, select_layers_setting(cfg.evaluation.select_layers))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"evaluation.select_layers: {e}") from None


def _training_callbacks(cfg: DictConfig, run_dir: Path, masks: bool) -> list[L.Callback]:
    """The ``callbacks`` section: the method's maps (every method), and for CE-FAM contribution tables and region
    metrics where the data have masks.

    Their images and tables go to the run's W&B / TensorBoard loggers, else to files under the run folder.
    """
    c, k, sel = cfg.callbacks, cfg.evaluation.k, select_layers_setting(cfg.evaluation.select_layers)
    out: list[L.Callback] = []
    if c.region_maps.enabled:
        rm = c.region_maps
        out.append(
            ConceptRegionMaps(rm.every_n_epochs, rm.num_images, rm.top_k, out_dir=run_dir, k=k, select_layers=sel)
        )
    if cfg.method != "cefam":  # the contribution and region-metric callbacks explain CE-FAM's concepts
        return out
    if c.contributions.enabled:
        cc = c.contributions
        out.append(
            ContributionLogger(
                cc.every_n_epochs,
                cc.num_images,
                cc.top_n,
                k=k,
                top=cc.top,
                fill=cfg.evaluation.fill,
                out_dir=run_dir,
                select_layers=sel,
            )
        )
    if c.region_metrics.enabled and masks:
        rmc = c.region_metrics
        out.append(RegionMetricsCallback(rmc.every_n_epochs, rmc.max_images, k=k, select_layers=sel))
    return out


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


def _evaluate(
    cfg: DictConfig, module: Any, world: Any, max_images: int | None, checkpoint: str | None
) -> tuple[dict[str, Any], str]:
    """The method's evaluation on the world's test split (of ``checkpoint``'s weights, which ``module`` holds),
    written to ``<run>/evaluation/``: results and table (what ``evaluate.py --checkpoint`` computes)."""
    ecfg = cfg.evaluation
    results, table = evaluate_explainer_on_world(
        module,
        world,
        "test",
        k=ecfg.k,
        fill=ecfg.fill,
        select_layers=select_layers_setting(ecfg.select_layers),
        batch_size=ecfg.batch_size,
        max_images=max_images,
        seed=ecfg.seed,
    )
    results["checkpoint"] = checkpoint
    return results, write_results(results, Path(module.trainer.default_root_dir) / "evaluation", table)


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
    return dm, classifier, weights, classifier_metrics


def _feature_caches(cfg: DictConfig, dm: Any, classifier: Any, images: bool) -> dict[str, PooledFeatureCache]:
    """Pooled-activation caches of the train and val splits, keyed by all that the activations depend on."""
    root = cfg.data.feature_cache_dir or Path(cfg.cache_dir).expanduser() / "features"
    dim = sum(c for c, _, _ in classifier.layer_shapes().values())
    caches = {}
    for split in ("train", "val"):
        # What the pixels reaching the classifier depend on, besides the classifier's own input spec: the files
        # (absolute paths, sizes, mtimes; images replaced in place make a new cache) or the world's spec.
        data = {"source": dm.sources[split].fingerprint()} if images else {"shapes_world": world_spec(cfg).cache_key()}
        identity = pooled_identity(classifier, {**data, "split": split})
        caches[split] = PooledFeatureCache(root, dm.sample_ids(split), dim, identity)
    return caches


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
    if weights is None:
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
        store=dcfg.store,
        input_spec=input_spec,
        batch_size=dcfg.batch_size,
        num_workers=dcfg.num_workers,
        shuffle_buffer=dcfg.shuffle_buffer,
        seed=cfg.seed,
        class_names=class_names,
    )
    dm.setup("fit")
    splits = ", ".join(f"{k} {v.describe()}" for k, v in dm.sources.items())
    _stage(
        f"images: {splits}; embeddings {dm.store.path} ({dm.store.vlm.name}, {len(dm.store.concepts)} concepts); "
        f"classifier input {input_spec.crop} px crop of {input_spec.resize}"
    )
    _stage("data.source=images: the shapes-world steps (concept-presence figures, evaluation on masks) are skipped")
    return dm, classifier, weights, class_names or [str(i) for i in range(num_classes)]


def _evaluation_summary(method: str, results: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline numbers of an evaluation: for CE-FAM top-1-layer NRA/hit rate/EPG per method and the
    contribution accuracy; for L-CAM and SIAM their evaluation's own numbers."""
    if results is None:
        return None
    if method != "cefam":
        return results
    regions = {
        method: {m: per["top1"][f"{m}/mean"] for m in ("nra", "hit_rate", "epg")}
        for method, per in results["regions"].items()
    }
    return {"top1_layer": regions, "contribution": results["contribution"], "images": results["images"]}


SUMMARY_LINES = {  # (label, test metric key) per method
    "cefam": [
        ("classifier accuracy", "test/classifier_acc"),
        ("concept-presence AUROC", "test/concept_auroc"),
        ("cosine(predicted, VLM) embed.", "test/cosine"),
        ("test loss", "test/loss"),
    ],
    "lcam": [
        ("accuracy on masked inputs", "test/masked_acc"),
        ("mean attention (mask area)", "test/mask_area"),
        ("test loss", "test/loss"),
    ],
    "siam": [
        ("SIAM class accuracy", "test/acc"),
        ("attribute-presence AUROC", "test/attr_auroc"),
        ("test loss", "test/loss"),
    ],
}


def _summary(m: dict[str, Any], images: bool = False) -> None:
    t, method = m["test"], m["method"]
    title = {"cefam": "CE-FAM", "lcam_fm": "L-CAM-Fm", "lcam_img": "L-CAM-Img", "siam": "SIAM"}[method]
    where = "on images: test data" if images else "on the shapes world: held-out test split"
    folders = "config.yaml, run.json, metrics.json, checkpoints/, logs/" + ("" if images else ", evaluation/")
    rows = SUMMARY_LINES["lcam" if method.startswith("lcam") else method]
    lines = ["", "=" * 72, f"{title} {where}"]
    # Plain images have no ground-truth concept presence.
    lines += [f"  {label:<30} {t[key]:.4f}" for label, key in rows if key in t and not (images and "auroc" in key)]
    lines += [
        f"  epochs trained {m['epochs_trained']}, {m['seconds']:.0f} s",
        f"  run folder   {m['run_dir']}  ({folders})",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: a bad config, file or setting ends with one ``error: ...`` line and exit status 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli_errors(args.debug, extra=(MisconfigurationException,)):
        cfg = load_config(args.config, args.overrides)
        return run(cfg)


if __name__ == "__main__":
    main()
