"""``python precompute.py``: write a VLM's image and text embeddings of image sources to an embedding store.

The work is :func:`cefam_lightning.models.precompute.precompute` (resumable, atomic); see its module for what it
writes. Usage::

    python precompute.py --images SRC [SRC ...] --concepts FILE --model NAME [--pretrained TAG|PATH] --out STORE
    torchrun --nproc-per-node N precompute.py ...            # a process group splits the images (or --devices N)
    python precompute.py ... --shard-index I --num-shards N  # one independent job of an array, then:
    python precompute.py merge STORE.partial --out STORE     # assemble the store of the finished parts

Exit status 0 on success, 1 if no image could be read, 2 on a bad argument (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cefam_lightning.cli.options import add_debug_option, add_device_option, add_distributed_options
from cefam_lightning.distributed import Workers, launch
from cefam_lightning.errors import cli_errors
from cefam_lightning.models.precompute import (
    PrecomputeError,
    PrecomputeResult,
    check_sizes,
    load_concepts,
    log,
    merge,
    parse_template_flags,
    partial_path,
    precompute,
    read_templates,
)
from cefam_lightning.models.vlm import VLMError
from cefam_lightning.models.vlm_libraries import VLM_LIBRARIES, vlm_library


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=[], metavar="SRC", help="image folders, manifests or tar shards")
    p.add_argument("--concepts", required=True, metavar="FILE", help="concept file: one 'name,type' per line")
    p.add_argument(
        "--model", required=True, metavar="NAME", help="open_clip model name (ViT-B-32), or a transformers folder"
    )
    p.add_argument(
        "--library",
        choices=tuple(VLM_LIBRARIES),
        default="open_clip",
        help="the library that reads --model (default open_clip; transformers: a CLIP/SigLIP folder)",
    )
    p.add_argument("--pretrained", default=None, metavar="TAG|PATH", help="open_clip pretrained tag or checkpoint")
    p.add_argument("--out", required=True, metavar="STORE", help="embedding store folder to write")
    p.add_argument("--float16", action="store_true", help="store image embeddings as float16")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--chunk-size", type=int, default=1024, metavar="N", help="images per resumable chunk (1024)")
    add_device_option(p)
    add_distributed_options(p)
    p.add_argument("--shard-index", type=int, default=None, metavar="I", help="do part I only (a job of an array)")
    p.add_argument("--num-shards", type=int, default=None, metavar="N", help="... of N parts; then run merge")
    p.add_argument("--num-workers", type=int, default=0, metavar="N", help="image decoding workers (default 0)")
    p.add_argument("--templates", default=None, metavar="FILE", help="YAML/JSON mapping concept type -> template")
    p.add_argument(
        "--template",
        action="append",
        default=[],
        metavar="TYPE=TEMPLATE",
        help="one prompt template, e.g. 'material=a photo of something made of {}' (repeatable; overrides --templates)",
    )
    p.add_argument("--default-type", default="object", help="type of concepts given without one (default object)")
    p.add_argument("--kind", choices=("clip", "siglip"), default=None, help="override the scoring kind")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where cached pretrained weights are")
    p.add_argument("--download", action="store_true", help="allow downloading weights that are not cached")
    p.add_argument("--model-config", default=None, metavar="FILE", help="an open_clip model config JSON (or folder)")
    p.add_argument(
        "--random-init", action="store_true", help="random weights (no --pretrained): for tests and demos only"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights (default 0)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run's work instead of resuming")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_option(p)
    args = p.parse_args(argv)
    if (args.shard_index is None) != (args.num_shards is None):
        p.error("--shard-index and --num-shards go together")
    if args.shard_index is not None and (args.devices is not None or args.num_nodes is not None):
        p.error("--shard-index/--num-shards make independent jobs; they do not combine with --devices/--num-nodes")
    return args


def parse_merge_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="precompute.py merge",
        description="Assemble the store from the finished parts of a job array (--shard-index/--num-shards).",
    )
    p.add_argument("work", metavar="STORE.partial", help="the work folder the parts were written to")
    p.add_argument("--out", required=True, metavar="STORE", help="embedding store folder to write")
    p.add_argument("--float16", action="store_true", help="store image embeddings as float16 (default: the parts')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    add_debug_option(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, workers: Workers) -> PrecomputeResult:
    """Check the arguments, build the VLM and run :func:`precompute`; bad input raises :class:`PrecomputeError`."""
    try:
        library = vlm_library(args.library)
    except VLMError as e:
        raise PrecomputeError(str(e)) from e
    own_weights = library.brings_own_weights(args.model)
    if args.pretrained is None and not args.random_init and not own_weights:
        raise PrecomputeError(
            "no weights: give --pretrained TAG|PATH (e.g. --model ViT-B-32 --pretrained laion2b_s34b_b79k), "
            "or --random-init for a test with random weights"
        )
    if args.random_init and (args.pretrained is not None or own_weights):
        raise PrecomputeError(f"--random-init excludes --pretrained and a model that brings its weights ({args.model})")
    check_sizes(args.batch_size, args.chunk_size, args.num_workers)  # before the model is built
    templates = read_templates(args.templates) if args.templates else {}
    templates.update(parse_template_flags(args.template))
    concepts = load_concepts(args.concepts, templates, args.default_type)
    for spec in args.images:  # a mistyped path is reported before the model is built
        if not Path(spec).expanduser().exists() and not any(ch in str(spec) for ch in "*?[{"):
            raise PrecomputeError(f"image source not found: {spec}")
    try:
        if args.model_config:
            library.register_config(args.model_config)
        vlm = library(
            args.model,
            args.pretrained,
            cache_dir=args.cache_dir,
            download=args.download,
            device=workers.device,
            kind=args.kind,
            seed=args.seed,
        )
    except VLMError as e:
        raise PrecomputeError(str(e)) from e
    if args.random_init and workers.is_main:
        log.warning(f"warning: {args.model} has RANDOM weights (--random-init): the embeddings are meaningless")
    return precompute(
        vlm,
        args.out,
        concepts,
        args.images,
        dtype="float16" if args.float16 else "float32",
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        num_workers=args.num_workers,
        progress=not args.no_progress and sys.stderr.isatty(),
        restart=args.restart,
        overwrite=args.overwrite,
        workers=workers,
        part=(args.shard_index, args.num_shards) if args.shard_index is not None else None,
    )


def main(argv: list[str] | None = None) -> PrecomputeResult:
    """Command line; exits 2 on a bad argument, 1 when no image could be read."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # open_clip logs every step at INFO
    log.setLevel(logging.INFO)
    if argv[:1] == ["merge"]:
        margs = parse_merge_args(argv[1:])
        with cli_errors(margs.debug):
            result = merge(margs.work, margs.out, "float16" if margs.float16 else None, margs.overwrite)
        return _report(result, Workers())
    args = parse_args(argv)
    workers = Workers()
    try:
        with cli_errors(args.debug):
            workers = launch(args.device, args.devices, args.num_nodes, PrecomputeError)
            result = run(args, workers)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume (finished work is in {partial_path(args.out)})")
        raise SystemExit(130) from None
    if result.store is None:  # one part of a job array
        work = partial_path(args.out)
        print(
            f"part {result.part} of {result.parts} done: {result.num_images} images"
            + (f" ({result.num_skipped} unreadable, skipped)" if result.num_skipped else "")
            + f" in {result.chunks_total} chunks"
            + (f", {result.chunks_reused} resumed" if result.chunks_reused else "")
            + f"; when every part is done: python precompute.py merge {work} --out {args.out}"
        )
        return result
    return _report(result, workers)


def _report(result: PrecomputeResult, workers: Workers) -> PrecomputeResult:
    """Print what was written (rank 0), and exit 1 when no image could be read."""
    store = result.store
    skipped = f"; {result.num_skipped} unreadable image(s) skipped (listed in meta.json)" if result.num_skipped else ""
    if workers.is_main:
        print(
            f"wrote {store.path}: {store.num_samples} image embeddings, {len(store.concepts)} concepts, "
            f"dim {store.embed_dim}, {store.image_embeddings.dtype}"
            + skipped
            + (f"; resumed {result.chunks_reused} of {result.chunks_total} chunks" if result.chunks_reused else "")
            + (f"; {result.parts} processes" if result.parts > 1 else "")
        )
    if result.num_images and not store.num_samples:
        if workers.is_main:
            print(f"error: none of the {result.num_images} images could be read", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
