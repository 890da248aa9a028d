"""Precompute throughput: images per second for decoding alone, the VLM alone and end to end, on 1 and on 2
processes side by side, so that a user sees whether a precompute is decode- or model-bound and what a second
process brings.

Generated 224 px JPEGs in tar shards (the data pipeline benchmark's ``natural_jpeg``) are encoded by a randomly
initialised open_clip model (default ViT-B-32: the cost of real weights, none downloaded). Each configuration runs
this script's ``--worker`` mode: alone for 1 process, under ``torchrun --standalone`` for 2 (gloo on CPU, nccl on
GPU), and every rank measures its own part after a barrier:

- **decode alone**: reading, decoding and preprocessing the part's images through the DataLoader precompute uses
  (``--num-workers`` decoding workers per process);
- **VLM alone**: ``encode_images`` on those already-decoded images, in batches of ``--batch-size``;
- **end to end**: :func:`~cefam_lightning.models.precompute.precompute` of the shards into a store (listing the
  shards, the text embeddings, the chunks, and rank 0 assembling the store), from a barrier to the store written.

Rates are all images over the slowest rank's time. On one machine the processes share its CPU cores (each of the
2 processes gets half the threads), so a second process helps when one leaves cores idle (decoding waiting on the
model, or the other way round); on GPUs each process takes its own. Run: ``python benchmarks/precompute.py``
(about a minute and a half on a 2-core CPU with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import write_data  # noqa: E402  (the same generated JPEG shards)


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: measure this rank's part, and rank 0 prints the rates as JSON."""
    from cefam_lightning.data.concepts import make_concepts
    from cefam_lightning.data.image_sources import open_source
    from cefam_lightning.distributed import launch, part_range
    from cefam_lightning.models.precompute import image_loader, precompute
    from cefam_lightning.models.vlm import OpenCLIPVLM

    workers = launch(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers.world_size))
    vlm = OpenCLIPVLM(args.model, None, device=workers.device, seed=0)
    records = list(open_source(args.shards, labels=False))
    mine = [records[i] for i in part_range(len(records), workers.rank, workers.world_size)]

    def timed(fn) -> float:
        workers.barrier()
        start = time.perf_counter()
        fn()
        if workers.device.type == "cuda":
            torch.cuda.synchronize()
        workers.barrier()
        return time.perf_counter() - start

    decoded: list[torch.Tensor] = []

    def decode() -> None:
        for batch in image_loader(mine, vlm.preprocess, args.batch_size, args.num_workers):
            decoded.append(torch.stack([x for _, x, _ in batch]))

    def encode() -> None:
        for x in decoded:
            vlm.encode_images(x)

    def end_to_end() -> None:
        concepts = make_concepts([(f"concept{i}", "object") for i in range(16)])
        precompute(
            vlm,
            Path(args.out) / "store",
            concepts,
            [args.shards],
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            num_workers=args.num_workers,
            workers=workers,
            overwrite=True,
        )

    vlm.encode_images(torch.rand(2, 3, *vlm.preprocess_config["size"]))  # a warm-up, out of the timings
    seconds = {"decode": timed(decode), "vlm": timed(encode), "end_to_end": timed(end_to_end)}
    if workers.is_main:
        print("RESULT " + json.dumps({k: len(records) / v for k, v in seconds.items()}), flush=True)


def run_config(processes: int, args: argparse.Namespace, shards: str, out: Path) -> dict[str, float]:
    """The rates of ``processes`` processes (a ``--worker`` run, under torchrun for more than one)."""
    own = [
        str(Path(__file__).resolve()),
        "--worker",
        "--shards",
        shards,
        "--out",
        str(out / f"p{processes}"),
        *("--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size)),
        *("--chunk-size", str(args.chunk_size), "--num-workers", str(args.num_workers)),
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, *own] if processes > 1 else [sys.executable, *own]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {processes}-process run failed:\n{proc.stdout[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="JPEGs generated (default 64)")
    p.add_argument("--shards", default=None, help=argparse.SUPPRESS)  # the --worker's data
    p.add_argument("--num-shards", type=int, default=4, help="tar shards they are written to (default 4)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model, random init (default ViT-B-32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="decoding workers per process (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: one GPU per process")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="configurations (default 1 2)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        shards, _, kb = write_data(Path(tmp), args.images, args.num_shards)
        rates = {n: run_config(n, args, shards, Path(tmp)) for n in args.processes}
        print(
            f"precompute throughput: {args.images} JPEGs (224 px, {kb:.0f} kB each, {args.num_shards} tar shards), "
            f"{args.model} (random init) on {args.device}, batch {args.batch_size}, "
            f"{args.num_workers} decoding worker(s) per process, {os.cpu_count()} CPU cores"
        )
        print()
        base = rates[args.processes[0]]["end_to_end"]
        print("| processes | decode alone (img/s) | VLM alone (img/s) | end to end (img/s) | end to end vs 1st row |")
        print("|---|---|---|---|---|")
        for n, r in rates.items():
            row = (
                f"| {n} | {r['decode']:.1f} | {r['vlm']:.1f} | {r['end_to_end']:.1f} | {r['end_to_end'] / base:.2f}x |"
            )
            print(row)
        print()
        for n, r in rates.items():
            bound = "model" if r["vlm"] < r["decode"] else "decode"
            print(
                f"{n} process(es): {bound}-bound (decoding runs at {r['decode'] / r['vlm']:.2f}x the VLM's rate); "
                f"end to end reaches {r['end_to_end'] / min(r['decode'], r['vlm']):.2f} of the slower stage's rate"
            )
        print(f"\n({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
