"""Explain images with a trained checkpoint: what the classifier saw, where, at which layer, how much.

Usage::

    python explain.py --checkpoint CKPT [--concepts NAMES|FILE] [--store STORE_DIR] [--top-n N] [--k K]
                      [--fill spatial_mean|zero] [--select-layers auto|all|L1,L2] [--target CLASS] [--out DIR]
                      [--batch-size 16] [--device auto|cpu|cuda] [--devices N] [--no-figures] INPUT [INPUT ...]

The checkpoint may be of any registered method (CE-FAM, L-CAM-Fm, L-CAM-Img, SIAM, ...); which one is read from
it. ``INPUT`` is an image file or a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff,
in sorted order). Each image goes through the classifier's own input transform (shorter side resized, center
crop: ``classifier.input_spec``, recorded in the checkpoint) and is explained. For each image ``<out>/<name>/``
receives ``report.json``, ``regions.npz`` (float16 maps at the classifier's input resolution) and ``figure.png``;
``<out>/summary.json`` lists the explained images, the images that could not be read (with the reason) and the
settings. What each method's report holds is in ``docs/method.md``; in short:

- **CE-FAM**: the predicted and explained class, and for each reported concept (decreasing score) its score,
  probability, selected layer, relevance at every layer, contribution to the explained class and region map.
- **L-CAM** (and any class-map method): the class map of the explained class and how much of the class it holds
  (the class's probability on the image kept where the map is high: 100 / 50 / 15 % of the pixels).
- **SIAM**: every attribute's presence, score and contribution (they sum with ``bias`` to the class logit), the
  top attributes' maps and the class map.

``--concepts``, ``--store``, ``--k``, ``--fill`` and ``--select-layers`` are CE-FAM's options, ``--top-n`` also
SIAM's; an option the checkpoint's method does not take is an error. Left out, ``--k``, ``--fill`` and
``--select-layers`` are the checkpoint's own (its run's ``cefam:`` section). CE-FAM concepts: by default the
checkpoint's own set, top ``--top-n`` by score; ``--concepts`` gives a set instead (names, or a file of
``name[,type]`` lines); names the checkpoint does not know need an embedding store made with the same VLM
(``--store``).

Under ``torchrun``/``srun``, or with ``--devices N [--num-nodes M]`` (:mod:`cefam_lightning.distributed`), the images
are split across the processes (contiguous parts of the sorted list, balanced by count): each writes its images'
folders, and rank 0 writes ``summary.json`` once all are done, so the output folder is a one-process run's (its
settings also record ``processes``).

Exit status: 0 when at least one image was explained, 1 when none could be read, 2 for a bad argument (missing or
foreign checkpoint, unknown concept or class, missing input, an option the method does not take), reported on one
``error:`` line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cefam_lightning.cli.options import (
    add_channel_options,
    add_debug_option,
    add_device_option,
    add_distributed_options,
    channel_option_values,
)
from cefam_lightning.distributed import launch
from cefam_lightning.errors import cli_errors
from cefam_lightning.reporting.explanations import ExplainError, explain_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by train.py (any method)")
    p.add_argument(
        "--concepts",
        default=None,
        metavar="NAMES|FILE",
        help="CE-FAM: comma-separated concept names, or a file of 'name[,type]' lines",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="STORE_DIR",
        help="CE-FAM: embedding store folder holding concepts the checkpoint lacks",
    )
    p.add_argument(
        "--top-n",
        type=int,
        metavar="N",
        default=None,
        help="CE-FAM: concepts reported per image, by score; SIAM: attribute maps drawn (default 8)",
    )
    add_channel_options(p)
    p.add_argument("--target", default=None, metavar="CLASS", help="class to explain (default: the predicted one)")
    p.add_argument("--out", default="explanations", metavar="DIR", help="output folder (default: explanations)")
    p.add_argument("--batch-size", type=int, metavar="N", default=16, help="images explained together (default 16)")
    add_device_option(p)
    add_distributed_options(p)
    p.add_argument("--no-figures", action="store_true", help="skip figure.png (the slowest output)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    add_debug_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: explain the inputs; returns the summary. Exits 2 on a bad argument, 1 if nothing was read."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli_errors(args.debug):
        workers = launch(args.device, args.devices, args.num_nodes, ExplainError)
        summary = explain_images(
            args.checkpoint,
            args.inputs,
            concepts=args.concepts,
            store=args.store,
            top_n=args.top_n,
            **channel_option_values(args),
            target=args.target,
            out_dir=args.out,
            batch_size=args.batch_size,
            device=workers.device,
            figures=not args.no_figures,
            workers=workers,
        )
    n_ok, n_bad = len(summary["explained"]), len(summary["failed"])  # every rank's: every rank exits alike
    if n_ok == 0:
        if workers.is_main:
            print(
                f"error: none of the {n_bad} input images could be read (see {args.out}/summary.json)", file=sys.stderr
            )
        raise SystemExit(1)
    if not workers.is_main:  # rank 0 reports
        return summary
    print(f"explained {n_ok} image(s) -> {args.out}" + (f"; {n_bad} could not be read" if n_bad else ""))
    return summary


if __name__ == "__main__":
    main()
