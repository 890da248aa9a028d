"""Evaluate a trained checkpoint (any registered method) against ground-truth masks, beside baselines.

Usage::

    python evaluate.py --checkpoint RUN/checkpoints/best.ckpt [--split test] [--max-images N] [--out DIR]
    python evaluate.py --checkpoint CKPT --data ROOT [--format auto|folder|broden|imagenet-s|images] [--split SPLIT]
                       [--store STORE_DIR] [--fit-split SPLIT|none] [--max-images N] [--max-fit-images N]
                       [--attributes CSV] [--targets CSV]

The checkpoint's method is read from it. Without ``--data`` it is evaluated on the shapes world it was trained on
(rebuilt from the run's config), on the held-out split, by the method's own evaluation
(:meth:`~cefam_lightning.methods.base.ExplainerModule.evaluate_on_world`; what each measures is in
``docs/method.md``):

- **CE-FAM**: region metrics per concept type and layer beside Grad-CAM, the single-channel baseline and a random
  map, the contribution accuracy, and the faithfulness (Average Drop / Increase in Confidence) of the class map
  fused from the top concepts beside Grad-CAM's;
- **L-CAM-Fm / L-CAM-Img** (and any class-map method): the class map's NRA, hit rate and EPG against the key
  object's pixels and its AD/IC, beside Grad-CAM at the same layer and a random map;
- **SIAM**: attribute-presence AUROC, class accuracy beside the frozen classifier's, how often the top
  contribution is a key-object concept, the attribute maps' region metrics and the class map's NRA.

With ``--data`` it is evaluated on a mask dataset (:mod:`cefam_lightning.data.mask_datasets`: the documented folder
format, Broden's or ImageNet-S's released layout), on ``--split`` (default ``val`` / ``validation`` where the
dataset has it, else every image), or on any image source (a class-per-folder tree, a manifest, tar shards; no
masks), by the method's own evaluation
(:meth:`~cefam_lightning.methods.base.ExplainerModule.evaluate_on_data`):

- **CE-FAM** (mask datasets): the dataset's concepts the checkpoint knows by name are evaluated; others take their
  text embeddings from ``--store`` (an embedding store made with the checkpoint's VLM) and otherwise are skipped,
  counted and listed in the results. The single-channel baseline is fitted on the dataset's training split
  (``train``, ImageNet-S ``train-semi``; ``--fit-split``) and left out, with a note, where there is none;
- **L-CAM-Fm / L-CAM-Img**: Average Drop / Increase in Confidence at 100/50/15 % of the predicted class's map on
  every image, and where the data have class masks (a mask named after one of the checkpoint's classes:
  ImageNet-S's, the folder format's) NRA, hit rate and EPG of that class's map against them; beside Grad-CAM and
  a random map;
- **SIAM**: the attribute-presence AUROC against ``--attributes`` (a CSV of id + one column per attribute in
  [0, 1], joined by the images' ids) and the target metric: class accuracy against the data's labels, or the MSE
  against ``--targets`` (a CSV of id + one column per output) for a regression checkpoint.

``--baselines gradcam,gradcampp,scorecam`` sets the class-map baselines compared (registered by name in
:mod:`cefam_lightning.methods.cam_baselines`; pytorch-grad-cam's CAMs are an optional extra), and ``--curves`` adds the
class maps' deletion / insertion AUC and ROAD (CE-FAM and the class-map methods).

``--k``, ``--fill``, ``--select-layers``, ``--per-layer-contributions``, ``--store``, ``--fit-split``,
``--attributes``, ``--targets`` and ``--data`` are options of the methods that take them; left out, they are the
checkpoint's own (its run's settings). An option the checkpoint's method does not take is an error.

Writes ``evaluation.json`` (every number) and ``evaluation.md`` (the readable table) to ``--out`` (default:
``evaluation/`` in the checkpoint's run folder, ``evaluation-<dataset>-<split>/`` with ``--data``) and prints the
table.

Under ``torchrun``/``srun``, or with ``--devices N [--num-nodes M]`` (:mod:`cefam_lightning.distributed`), the
evaluation (any method's) splits the images across the processes and sums the metrics' statistics over them before
the tables are computed, so the numbers are a one-process run's; rank 0 writes them.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cefam_lightning.cli.options import (
    add_channel_options,
    add_debug_option,
    add_device_option,
    add_distributed_options,
    channel_option_values,
)
from cefam_lightning.data.evaluation_data import IMAGES_FORMAT, open_evaluation_data
from cefam_lightning.data.mask_datasets import FORMATS
from cefam_lightning.data.shapes_world import ShapesWorld
from cefam_lightning.distributed import launch
from cefam_lightning.errors import CefamError, cli_errors
from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.cam_baselines import baseline_names, parse_baselines
from cefam_lightning.reporting.evaluations import EvaluateError, write_results
from cefam_lightning.reporting.explanations import check_options, load_explainer_for
from cefam_lightning.training.config import world_spec

WORLD_SPLITS = ("train", "val", "test")


DATA_OPTIONS = ("format", "store", "fit_split", "max_fit_images", "categories", "class_names", "attributes", "targets")
METHOD_DATA_OPTIONS = ("store", "fit_split", "max_fit_images", "attributes", "targets")  # checked per method


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a CE-FAM, L-CAM or SIAM checkpoint written by train.py")
    p.add_argument(
        "--split",
        default=None,
        help="shapes world: train, val or test (default test); --data: the dataset's split (default val/validation)",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split")
    data = p.add_argument_group("mask datasets (--data)")
    data.add_argument(
        "--data", default=None, metavar="ROOT", help="evaluate on this mask dataset or image source instead"
    )
    data.add_argument(
        "--format", default=None, choices=("auto", *FORMATS, IMAGES_FORMAT), help="its layout (default auto)"
    )
    data.add_argument(
        "--store", default=None, metavar="STORE_DIR", help="embedding store for concepts the checkpoint lacks"
    )
    data.add_argument(
        "--fit-split", default=None, help="split to fit the single-channel baseline on (default train/train-semi; none)"
    )
    data.add_argument("--max-fit-images", type=int, default=None, help="fit the baseline on the first N images only")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the dataset (default 0)")
    data.add_argument("--categories", default=None, help="ImageNet-S: the release's ImageNetS_categories_im{N}.txt")
    data.add_argument("--class-names", default=None, help="ImageNet-S: '<wnid> <name>' lines (LOC_synset_mapping.txt)")
    data.add_argument("--attributes", default=None, metavar="CSV", help="SIAM: attribute table (id + attributes)")
    data.add_argument("--targets", default=None, metavar="CSV", help="SIAM regression: target table (id + targets)")
    add_channel_options(p)
    p.add_argument(
        "--per-layer-contributions",
        action="store_true",
        help="also score contributions with every concept masked at each single layer (slower)",
    )
    p.add_argument(
        "--baselines",
        default=None,
        metavar="NAMES",
        help="class-map baselines beside the method's maps, comma-separated (default gradcam; choices: "
        + ", ".join(baseline_names())
        + "; all but gradcam and rise need pip install -e '.[cams]')",
    )
    p.add_argument(
        "--curves", action="store_true", help="also the class maps' deletion / insertion AUC and ROAD (slower)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64; 16 with --data)")
    p.add_argument("--cache-dir", default=None, help="where the shapes world is cached (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/evaluation[-<data>-<split>])")
    add_device_option(p)
    add_distributed_options(p)
    add_debug_option(p)
    args = p.parse_args(argv)
    if args.data is None:
        given = [f"--{o.replace('_', '-')}" for o in DATA_OPTIONS if getattr(args, o) is not None]
        if given:
            p.error(f"{', '.join(given)} only apply with --data")
        args.split = args.split or "test"
        if args.split not in WORLD_SPLITS:
            p.error(f"argument --split: invalid choice: {args.split!r} (choose from {', '.join(WORLD_SPLITS)})")
        args.batch_size = args.batch_size or 64
    else:
        for flag, value in (
            ("--per-layer-contributions", args.per_layer_contributions),
            ("--cache-dir", args.cache_dir),
        ):
            if value:
                p.error(f"{flag} applies to the shapes world only, not with --data")
        args.batch_size = args.batch_size or 16
        for flag in ("batch_size", "num_workers", "max_images", "max_fit_images"):
            value = getattr(args, flag)
            if value is not None and value < (0 if flag == "num_workers" else 1):
                p.error(
                    f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'num_workers' else '>= 1'}, got {value}"
                )
    return args


def _evaluate_world(args: argparse.Namespace, module: Any, settings: EvaluationSettings) -> tuple[dict, str, Path]:
    """The method's evaluation on the shapes world of the checkpoint's run (its recorded config)."""
    config = module.hparams.get("config") or {}
    if "world" not in config:
        raise EvaluateError(f"{args.checkpoint}: the checkpoint records no shapes-world config to evaluate on")
    cfg = OmegaConf.create(config)
    world = ShapesWorld.build(world_spec(cfg), args.cache_dir or cfg.cache_dir)
    try:
        results, table = module.evaluate_on_world(world, args.split, settings)
    except CefamError:
        raise
    except ValueError as e:  # the module does not fit the world (other classes, concepts, task)
        raise EvaluateError(f"{module.title} evaluation: {e}") from None
    return results, table, Path(args.checkpoint).resolve().parent.parent / "evaluation"


def _evaluate_data(args: argparse.Namespace, module: Any, settings: EvaluationSettings) -> tuple[dict, str, Path]:
    """The method's evaluation on a mask dataset or image source, opened with the classifier's input geometry."""
    fits = "fit_split" in module.evaluate_options  # a method that fits a baseline on the data's training split
    dataset, fit = open_evaluation_data(
        args.data,
        module.classifier.input_spec,
        args.format or "auto",
        split=args.split,
        fit_split=args.fit_split if fits else "none",
        class_names=module.class_names,
        categories=args.categories,
        imagenet_class_names=args.class_names,
    )
    options = {name: getattr(args, name) for name in METHOD_DATA_OPTIONS if getattr(args, name) is not None}
    options.pop("fit_split", None)
    if fit is not None:
        options["fit_dataset"] = fit
    results, table = module.evaluate_on_data(dataset, settings, num_workers=args.num_workers, **options)
    name = re.sub(r"[^\w.\-]+", "_", Path(args.data).resolve().name) or "data"
    return results, table, Path(args.checkpoint).resolve().parent.parent / f"evaluation-{name}-{dataset.split or 'all'}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with cli_errors(args.debug):
        baselines = parse_baselines(args.baselines) if args.baselines is not None else None
        workers = launch(args.device, args.devices, args.num_nodes, EvaluateError)
        device = workers.device
        module = load_explainer_for(args.checkpoint, device).to(device)
        given = {
            "data": args.data,
            **{name: getattr(args, name) for name in METHOD_DATA_OPTIONS},
            **channel_option_values(args),
            "per_layer_contributions": args.per_layer_contributions,
            "baselines": baselines,
            "curves": args.curves,
        }
        check_options(module, given, module.evaluate_options)
        recorded = (module.hparams.get("config") or {}).get("evaluation") or {}
        settings = EvaluationSettings(
            batch_size=args.batch_size,
            max_images=args.max_images,
            seed=recorded.get("seed", 0),
            **channel_option_values(args),
            per_layer_contributions=args.per_layer_contributions,
            baselines=baselines,
            curves=args.curves,
        )
        # each rank scores its part; the metrics sum over the ranks
        settings = replace(settings, rank=workers.rank, world_size=workers.world_size)
        evaluate = _evaluate_data if args.data is not None else _evaluate_world
        results, table, default_out = evaluate(args, module, settings)
        if not workers.is_main:  # rank 0 writes and prints the results
            workers.barrier()
            return {}
        results = {"method": module.method, **results, "checkpoint": str(args.checkpoint)}
        if workers.distributed:
            results["processes"] = workers.world_size
        out = Path(args.out) if args.out else default_out
        print(write_results(results, out, table))
        print(f"written: {out / 'evaluation.json'}, {out / 'evaluation.md'}")
        workers.barrier()
    return results


if __name__ == "__main__":
    main()
