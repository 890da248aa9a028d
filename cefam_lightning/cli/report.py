"""A dataset-level concept report: what a trained model uses for each class, and why it errs (docs/report.md).

Usage::

    python report.py --checkpoint RUN/checkpoints/best.ckpt [--split test] [--max-images N] [--out DIR]
    python report.py --checkpoint CKPT --data SOURCE [--format auto|images|folder|broden|imagenet-s] [--split S]

Without ``--data`` the report reads a split (default ``test``) of the shapes world the checkpoint was trained on;
with it, an image source (a class-per-folder tree, a ``.csv``/``.jsonl`` manifest, WebDataset shards) or a mask
dataset (its masks give the concepts' presence). Every image is explained once toward its predicted class and each
misclassified one also toward its true class; the report lists per class the concepts with the largest mean
positive and negative contributions (with 95 % intervals, counts, presence rates and the images where each
contributed most), the misclassified images with the concepts that pushed toward the wrong class, a concept x class
heat map, example grids with region overlays and a short list of findings.

Writes ``report.json``, ``report.md``, ``report.html`` (one self-contained page) and ``figures/*.png`` to ``--out``
(default ``<run folder>/report[-<data>]``), as one folder moved into place when complete: an interrupted run leaves
nothing half-written. ``--logger wandb`` / ``--logger tensorboard`` also send the tables and figures there.
CE-FAM and SIAM report concepts; class-map methods (L-CAM) report their errors' class maps.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cefam_lightning.cli.options import add_channel_options, add_debug_option, add_device_option, channel_option_values
from cefam_lightning.data.mask_datasets import FORMATS
from cefam_lightning.data.report_data import open_report_data
from cefam_lightning.data.shapes_world import SPLITS, ShapesWorld
from cefam_lightning.errors import cli_errors
from cefam_lightning.reporting.concept_report import RANKS, ReportSettings, build_report
from cefam_lightning.reporting.explanations import check_options, load_explainer_for, select_device
from cefam_lightning.reporting.report_pages import log_report, write_report
from cefam_lightning.training.config import world_spec

LOGGERS = ("wandb", "tensorboard")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by train.py (any method)")
    p.add_argument("--data", default=None, metavar="SOURCE", help="images to report on (default: the shapes world)")
    p.add_argument("--format", default="auto", choices=("auto", "images", *FORMATS), help="--data's kind (auto)")
    p.add_argument("--split", default=None, help="shapes world: train, val or test (default test); mask data: theirs")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--top-n", type=int, default=8, metavar="N", help="concepts explained per image (default 8)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="concepts listed per class and sign (default 5)")
    p.add_argument("--typical", type=int, default=4, metavar="N", help="example images per listed concept (4)")
    p.add_argument("--rank", default="specific", choices=RANKS, help="rank a class's positive concepts by (specific)")
    p.add_argument("--figure-concepts", type=int, default=3, metavar="N", help="concepts per class example grid (3)")
    p.add_argument("--error-figures", type=int, default=24, metavar="N", help="misclassified images drawn (24)")
    p.add_argument("--error-concepts", type=int, default=3, metavar="N", help="concepts per error and side (3)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images explained together (32)")
    p.add_argument("--cache-dir", default=None, help="where the shapes world is cached (default: the run's)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default <run folder>/report[-<data>])")
    p.add_argument("--logger", action="append", choices=LOGGERS, default=[], help="also log to W&B / TensorBoard")
    p.add_argument("--wandb-project", default="cefam-lightning", help="the W&B project (with --logger wandb)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_channel_options(p)
    add_device_option(p)
    add_debug_option(p)
    args = p.parse_args(argv)
    if args.data is None:
        args.split = args.split or "test"
        if args.split not in SPLITS:
            p.error(f"argument --split: invalid choice: {args.split!r} (choose from {', '.join(SPLITS)})")
        if args.format != "auto":
            p.error("--format applies with --data only")
    elif args.cache_dir is not None:
        p.error("--cache-dir applies to the shapes world only, not with --data")
    if args.max_images is not None and args.max_images < 1:
        p.error(f"--max-images must be >= 1, got {args.max_images}")
    return args


def _world(module: Any, cache_dir: str | None) -> Any:
    config = module.hparams.get("config") or {}
    if "world" not in config or (config.get("data") or {}).get("source", "shapes") != "shapes":
        return None
    cfg = OmegaConf.create(config)
    return ShapesWorld.build(world_spec(cfg), cache_dir or cfg.cache_dir)


def _loggers(kinds: list[str], out: Path, project: str, settings: dict[str, Any]) -> list[Any]:
    if not kinds:
        return []
    from cefam_lightning.training.loggers import build_loggers

    cfg = {"kinds": list(dict.fromkeys(kinds)), "wandb": {"project": project, "name": out.name}}
    return build_loggers(cfg, out, config={"report": settings})  # out/tensorboard/, out/wandb/


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with cli_errors(args.debug):
        settings = ReportSettings(
            top_n=args.top_n,
            top=args.top,
            typical=args.typical,
            figure_concepts=args.figure_concepts,
            error_figures=args.error_figures,
            error_concepts=args.error_concepts,
            rank=args.rank,
            batch_size=args.batch_size,
        )
        settings.check()
        device = select_device(args.device)
        module = load_explainer_for(args.checkpoint, device).to(device)
        options = {k: v for k, v in channel_option_values(args).items() if v is not None}
        check_options(module, options, module.explain_options)
        settings.options = options
        world = _world(module, args.cache_dir) if args.data is None else None
        data = open_report_data(module, args.data, args.split, args.format, args.max_images, world=world)
        run_dir = Path(args.checkpoint).resolve().parent.parent
        if args.out:
            out = Path(args.out)
        elif args.data is None:
            out = run_dir / "report"
        else:
            name = re.sub(r"[^\w.\-]+", "_", Path(args.data).resolve().name) or "data"
            out = run_dir / f"report-{name}"
        report, pictures = build_report(module, data, settings, device, progress=not args.no_progress)
        report["checkpoint"] = str(args.checkpoint)
        figures = write_report(out, report, pictures)
        loggers = _loggers(args.logger, out, args.wandb_project, report["settings"])
        if loggers:
            from cefam_lightning.training.loggers import finish_loggers

            report["logged"] = log_report(loggers, report, figures)
            finish_loggers(loggers)
        for line in report["findings"]:
            print(f"- {line}")
        print(f"written: {out / 'report.html'}, {out / 'report.md'}, {out / 'report.json'}, {out / 'figures'}")
    return report


if __name__ == "__main__":
    main()
