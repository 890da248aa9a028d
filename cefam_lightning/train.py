"""Train CE-FAM: build or reuse the shapes world, fit or load the classifier, train the branch, test, report.

With ``data.source=images`` the data are image sources (folder, manifest or tar shards) joined by sample id with
an embedding store written by ``precompute``, and the classifier is ``classifier.name`` with ``classifier.weights``;
the shapes-world steps (fitting the classifier, concept-presence figures, evaluation against the world's masks)
are skipped.

Usage: ``python train.py [--config FILE] [key=value ...]`` (see ``configs/default.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks import CachePooledFeatures, ConceptScoreFigures
from cefam_lightning.cefam_module import CEFAMModule
from cefam_lightning.classifier import build_classifier
from cefam_lightning.classifier_fit import FitSettings, fit_shapes_classifier
from cefam_lightning.components import ConceptScorer, Translator
from cefam_lightning.config import ConfigError, load_config, to_dict, world_spec
from cefam_lightning.datamodule import ShapesWorldDataModule
from cefam_lightning.evaluate import evaluate_on_world, write_results
from cefam_lightning.feature_cache import PooledFeatureCache, pooled_identity
from cefam_lightning.image_datamodule import ImageDataModule
from cefam_lightning.image_sources import open_source
from cefam_lightning.io_utils import atomic_write_json
from cefam_lightning.transforms import InputSpec

log = logging.getLogger("cefam_lightning")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML merged on top of configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    return p.parse_args(argv)


RUN_NAME_ENV = "CEFAM_RUN_NAME"


def make_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/run_name``; a timestamp when no name is given.

    Lightning's DDP launcher starts the other ranks by re-running this script, possibly seconds later, so the
    chosen name is put in the environment, which the launched ranks inherit.
    """
    name = cfg.run_name or os.environ.get(RUN_NAME_ENV) or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    os.environ[RUN_NAME_ENV] = name
    run_dir = Path(cfg.output_dir).expanduser() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _stage(msg: str) -> None:
    print(f"[cefam] {msg}", flush=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run training and testing for a loaded config; returns what was written to ``metrics.json``."""
    t0 = time.time()
    run_dir = make_run_dir(cfg)
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tcfg = cfg.trainer
    quick = bool(tcfg.fast_dev_run)

    ccfg = cfg.classifier
    images = cfg.data.source == "images"
    if images:
        dm, classifier, weights, class_names = _image_data_and_classifier(cfg)
        store, image_size, classifier_metrics = dm.store, dm.input_spec.crop, {}
    else:
        dm, classifier, weights, classifier_metrics = _shapes_data_and_classifier(cfg, quick)
        store, image_size, class_names = dm.world.store, dm.spec.image_size, dm.class_names

    # Seeded here, after the classifier: fitting it (cold cache) or not (warm) must not change the branch's
    # initialization or data order.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
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
    )

    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/loss",
        mode="min",
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [ckpt, LearningRateMonitor(logging_interval="epoch")]
    if cfg.data.feature_cache:
        dm.feature_caches = _feature_caches(cfg, dm, classifier, images)
        callbacks.append(CachePooledFeatures(dm.feature_caches))
    figures = None
    if not images:  # the figures mark the concepts present in the world's ground truth
        figures = ConceptScoreFigures(
            run_dir / "figures", cfg.demo.num_figures, cfg.demo.top_k, dm.class_names, store.concept_names
        )
        callbacks.insert(1, figures)
    es = cfg.early_stopping
    if es.enabled:
        callbacks.append(EarlyStopping(monitor=es.monitor, patience=es.patience, mode=es.mode))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="logs", version=""),
        callbacks=callbacks,
        **to_dict(tcfg),  # every trainer.* key is a lightning.Trainer argument
    )
    _stage(
        f"training the CE-FAM branch ({sum(p.numel() for p in translator.parameters()):,} parameters, "
        f"layers {list(ccfg.layers)}) -> {run_dir}"
    )
    trainer.fit(module, datamodule=dm)
    best = ckpt.best_model_path or None
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0]

    evaluation, table = None, None
    ecfg = cfg.evaluation
    if ecfg.enabled and not images and trainer.is_global_zero:
        # trainer.test loaded the best weights into the module; the world's test masks are the ground truth.
        _stage("evaluating explanations on the test split (regions vs masks, baselines, contributions)")
        evaluation = evaluate_on_world(
            module,
            dm.world,
            "test",
            k=ecfg.k,
            fill=ecfg.fill,
            batch_size=ecfg.batch_size,
            max_images=ecfg.batch_size if quick else ecfg.max_images,
            seed=ecfg.seed,
        )
        evaluation["checkpoint"] = best
        table = write_results(evaluation, run_dir / "evaluation")

    metrics = {
        "run_dir": str(run_dir),
        "classifier": {"name": ccfg.name, "weights": str(weights), **classifier_metrics},
        "test": {k: float(v) for k, v in test.items()},
        "best_checkpoint": best,
        "best_val_loss": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "epochs_trained": trainer.current_epoch,
        "figures": [str(p) for p in figures.written] if figures is not None else [],
        "evaluation": _evaluation_summary(evaluation),
        "seconds": round(time.time() - t0, 1),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics)
        _summary(metrics, images)
        if table is not None:
            print(table + f"(full results: {run_dir / 'evaluation' / 'evaluation.json'})", flush=True)
    return metrics


def _shapes_data_and_classifier(cfg: DictConfig, quick: bool) -> tuple[ShapesWorldDataModule, Any, Any, dict]:
    """The shapes world (built or reused) and its classifier (fitted or loaded): ``dm, classifier, weights,
    classifier_metrics``."""
    tcfg = cfg.trainer
    spec = world_spec(cfg)
    dm = ShapesWorldDataModule(spec, cfg.cache_dir, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
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
        # What the pixels reaching the classifier depend on, besides the classifier's own input spec.
        data = {"source": str(cfg.data[split])} if images else {"shapes_world": world_spec(cfg).cache_key()}
        identity = pooled_identity(classifier, {**data, "split": split})
        caches[split] = PooledFeatureCache(root, dm.sample_ids(split), dim, identity)
    return caches


def _check_random_init(ccfg: DictConfig, why: str) -> None:
    """A classifier without weights is an error unless ``classifier.allow_random_init`` says it is meant."""
    if not ccfg.allow_random_init:
        raise ValueError(
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


def _evaluation_summary(results: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline numbers of an evaluation: top-1-layer NRA/hit rate/EPG per method, contribution accuracy."""
    if results is None:
        return None
    regions = {
        method: {m: per["top1"][f"{m}/mean"] for m in ("nra", "hit_rate", "epg")}
        for method, per in results["regions"].items()
    }
    return {"top1_layer": regions, "contribution": results["contribution"], "images": results["images"]}


def _summary(m: dict[str, Any], images: bool = False) -> None:
    t = m["test"]
    folders = (
        "config.yaml, metrics.json, checkpoints/, logs/"
        if images
        else "config.yaml, metrics.json, checkpoints/, figures/, logs/"
    )
    lines = [
        "",
        "=" * 72,
        "CE-FAM on images: test data" if images else "CE-FAM on the shapes world: held-out test split",
        f"  classifier accuracy            {t.get('test/classifier_acc', float('nan')):.4f}",
        # Plain images have no ground-truth concept presence.
        None if images else f"  concept-presence AUROC         {t.get('test/concept_auroc', float('nan')):.4f}",
        f"  cosine(predicted, VLM) embed.  {t.get('test/cosine', float('nan')):.4f}",
        f"  test loss                      {t.get('test/loss', float('nan')):.5f}",
        f"  epochs trained {m['epochs_trained']}, {m['seconds']:.0f} s",
        f"  run folder   {m['run_dir']}  ({folders})",
        "=" * 72,
    ]
    print("\n".join(line for line in lines if line is not None), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    return run(cfg)


if __name__ == "__main__":
    main()
