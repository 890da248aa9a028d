"""Every class-map method on the shapes world's test split, in one table (README: Class-map baselines and
faithfulness).

Trains (or, with ``--reuse``, reuses under ``--out``) an L-CAM-Img, an L-CAM-Fm and a CE-FAM run on the same world
and frozen classifier (``train.py``; the demo's world and settings, fewer epochs), then scores on the same test
images, each map of the classifier's predicted class:

- L-CAM-Img and L-CAM-Fm: their class map (one forward pass);
- CE-FAM: its fused class map (the top-8 concepts' regions weighted by their positive contributions,
  docs/method.md#fused-class-map);
- the class-map baselines (``--baselines``; default every registered one that is installed): the project's
  Grad-CAM, pytorch-grad-cam's CAMs and RISE, at L-CAM's layer;
- a random map.

Columns: NRA and hit rate against the key object's pixels, Average Drop / Increase in Confidence with all pixels
kept, deletion / insertion AUC, ROAD (MoRF / LeRF, on the first ``--road-images`` images: its imputation is one
sparse solve per image and percentile), and the seconds per image it takes to make the map (the classifier's
forward pass included, batches of ``--batch-size``). The last line says whether L-CAM is the fastest of the learned
and CAM methods (the random map aside).

Run: ``python benchmarks/class_maps.py`` (default world, 200 test images; see the README for the time);
``--small`` is a seconds-long smoke run of the same path (a tiny world, one epoch, 8 images), for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.explanation_quality import QUIET  # noqa: E402  (the same quiet training runs)
from cefam_lightning.cli.train import main as train_main  # noqa: E402
from cefam_lightning.data.shapes_world import ShapesWorld, key_object_pixels  # noqa: E402
from cefam_lightning.methods.base import load_explainer  # noqa: E402
from cefam_lightning.methods.baselines import random_maps  # noqa: E402
from cefam_lightning.methods.cam_baselines import baseline_names, get_baseline, parse_baselines  # noqa: E402
from cefam_lightning.methods.cefam.pipeline import fused_class_map  # noqa: E402
from cefam_lightning.methods.class_map import ClassMapEvaluation, select_class  # noqa: E402
from cefam_lightning.reporting.tables import markdown_table  # noqa: E402
from cefam_lightning.training.config import world_spec  # noqa: E402

RUNS = {"lcam_img": 8, "lcam_fm": 8, "cefam": 10}  # method: epochs of the default run
SMALL = [
    "world.image_size=32",
    "world.n_train=64",
    "world.n_val=32",
    "world.n_test=32",
    "classifier.fit.epochs=1",
    "trainer.max_epochs=1",
]
LEARNED = ("lcam_img", "lcam_fm", "cefam")
SMALL_BASELINES = ("gradcam", "gradcampp", "eigencam")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_class_maps", help="where the runs are kept")
    p.add_argument("--reuse", action="store_true", help="reuse the runs under --out that exist")
    p.add_argument("--small", action="store_true", help="a seconds-long smoke run (tiny world, one epoch)")
    p.add_argument("--cache-dir", default=None, help="world and classifier cache (default: the config's)")
    p.add_argument("--images", type=int, default=200, help="test images scored (default 200)")
    p.add_argument("--road-images", type=int, default=48, help="of which ROAD scores the first N (default 48)")
    p.add_argument("--steps", type=int, default=8, help="deletion / insertion steps (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--baselines", default=None, help="comma-separated baselines (default: every installed one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small:
        args.images, args.road_images, args.steps, args.batch_size = 8, 4, 4, 4
        if args.baselines is None:  # the cheap ones: the path, not the numbers
            args.baselines = ",".join(n for n in SMALL_BASELINES if get_baseline(n).available)
    return args


def train(method: str, args: argparse.Namespace) -> Path:
    """The method's checkpoint (trained now unless ``--reuse`` finds it)."""
    ckpt = Path(args.out) / method / "checkpoints" / "best.ckpt"
    if args.reuse and ckpt.is_file():
        return ckpt
    overrides = [
        *([f"--config={ROOT / 'configs' / 'experiment' / f'{method}.yaml'}"] if method != "cefam" else []),
        f"method={method}",
        *(SMALL + (["cefam.hidden_dims=[64]"] if method == "cefam" else []) if args.small else []),
        *([] if args.small else [f"trainer.max_epochs={RUNS[method]}"]),
        *QUIET,
        f"output_dir={args.out}",
        f"run_name={method}",
        *([f"cache_dir={args.cache_dir}"] if args.cache_dir else []),
        "overwrite=true",
        f"seed={args.seed}",
    ]
    train_main(overrides)
    return ckpt


def map_sources(modules: dict[str, Any], names: tuple[str, ...], seed: int) -> dict[str, Callable]:
    """``{name: make(images, output, target) -> (B, h, w)}``: every compared map of the predicted class."""
    lcam = modules["lcam_img"]
    classifier, layer = lcam.classifier, lcam.map_layer
    generator = torch.Generator().manual_seed(seed)

    def learned(module):
        # At the layer's resolution, as every baseline's map (ClassMapEvaluation normalizes and upsamples them all).
        return lambda images, out, target: select_class(module.class_maps_at_layer(images)[1], target)

    def cefam(images, out, target):
        e = modules["cefam"].explain(images, top_n=8)
        return fused_class_map(e.regions, e.contributions)

    def baseline(name):
        spec = get_baseline(name)
        # The classifier's pass is part of a baseline's cost (L-CAM's and CE-FAM's include theirs).
        return lambda images, out, target: spec(classifier, images, classifier(images), target, [layer])[layer]

    sources = {"lcam_img": learned(modules["lcam_img"]), "lcam_fm": learned(modules["lcam_fm"]), "cefam": cefam}
    sources.update({n: baseline(n) for n in names})
    sources["random"] = lambda images, out, target: random_maps(
        (len(images), *images.shape[-2:]), generator, images.device
    )
    return sources


def titles(names: tuple[str, ...]) -> dict[str, str]:
    own = {"lcam_img": "L-CAM-Img", "lcam_fm": "L-CAM-Fm", "cefam": "CE-FAM fused class map", "random": "random map"}
    return {**own, **{n: get_baseline(n).title for n in names}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = parse_baselines(args.baselines or [n for n in baseline_names() if get_baseline(n).available])
    t_train = time.time()
    modules = {m: load_explainer(train(m, args)).eval() for m in LEARNED}
    t_train = time.time() - t_train
    classifier = modules["lcam_img"].classifier
    config = OmegaConf.create(modules["lcam_img"].hparams["config"])
    world = ShapesWorld.build(world_spec(config), args.cache_dir or config.cache_dir)
    sources = map_sources(modules, names, args.seed)
    evaluation = ClassMapEvaluation(list(sources), seed=args.seed, sync_on_compute=False, curves=True, steps=args.steps)
    seconds = dict.fromkeys(sources, 0.0)
    n, t0 = 0, time.time()
    for index, (images, masks, labels) in enumerate(world.split("test").batches(args.batch_size, args.images, "cpu")):
        with torch.no_grad():
            out = classifier(images)
        target = out.logits.argmax(1)
        if index == 0:  # one untimed pass first: lazy set-up (tails, probes, graphs) is not a per-image cost
            with torch.no_grad():
                for make in sources.values():
                    make(images, out, target)
        maps = {}
        for name, make in sources.items():
            start = time.perf_counter()
            with torch.no_grad():
                maps[name] = make(images, out, target)
            seconds[name] += time.perf_counter() - start
        key = key_object_pixels(world.spec, masks, labels)
        evaluation.update_maps(classifier, images, key, maps, target, out.logits, road=n < args.road_images)
        n += len(images)
    rows = evaluation.compute()
    for name in rows:
        rows[name]["seconds_per_image"] = seconds[name] / n
    return {
        "images": n,
        "road_images": min(n, -(-args.road_images // args.batch_size) * args.batch_size),
        "steps": args.steps,
        "layer": modules["lcam_img"].map_layer,
        "methods": rows,
        "titles": titles(names),
        "seconds": {"train": round(t_train, 1), "evaluate": round(time.time() - t0, 1)},
    }


def table(results: dict[str, Any]) -> str:
    head = [
        "method",
        "NRA",
        "hit rate",
        "AD 100% ↓",
        "IC 100% ↑",
        "deletion ↓",
        "insertion ↑",
        "ROAD MoRF ↓",
        "ROAD LeRF ↑",
        "s / image",
    ]
    rows = []
    for name, r in results["methods"].items():
        rows.append(
            [
                results["titles"][name],
                f"{r['nra']:.3f}",
                f"{r['hit_rate']:.3f}",
                f"{r['ad/100%']:.2f}",
                f"{r['ic/100%']:.1f}",
                f"{r['deletion']:.3f}",
                f"{r['insertion']:.3f}",
                f"{r.get('road/morf', float('nan')):.3f}",
                f"{r.get('road/lerf', float('nan')):.3f}",
                f"{r['seconds_per_image']:.5f}",
            ]
        )
    title = (
        f"Class maps of the predicted class, {results['images']} test images of the shapes world (baselines at "
        f"{results['layer']}; deletion / insertion in {results['steps']} steps; ROAD on the first "
        f"{results['road_images']} images)"
    )
    return markdown_table(head, rows, title=title)


def fastest_line(results: dict[str, Any]) -> str:
    timed = {n: r["seconds_per_image"] for n, r in results["methods"].items() if n != "random"}
    fastest = min(timed, key=timed.get)
    lcam = min(("lcam_img", "lcam_fm"), key=timed.get)
    others = sorted((t, n) for n, t in timed.items() if n not in ("lcam_img", "lcam_fm"))
    verdict = "PASS" if fastest in ("lcam_img", "lcam_fm") else "MISS"
    return (
        f"Fastest learned or CAM method: {results['titles'][fastest]} ({timed[fastest] * 1e3:.2f} ms / image); "
        f"L-CAM ({results['titles'][lcam]}) {timed[lcam] * 1e3:.2f} ms vs the next, {results['titles'][others[0][1]]} "
        f"{others[0][0] * 1e3:.2f} ms: L-CAM fastest {verdict}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    print()
    print(fastest_line(results))
    print(f"time: training {results['seconds']['train']} s, scoring {results['seconds']['evaluate']} s")
    out = Path(args.out) / "class_maps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main()
