"""Every class-map method on the shapes world's test split, in one table (README: Class-map baselines and
faithfulness).

Trains (or, with ``--reuse``, reuses under ``--out``) an L-CAM-Img, an L-CAM-Fm and a CE-FAM run on the same world
and frozen classifier (``train.py``; the demo's world and settings, fewer epochs), then scores on the same test
images, each map of the classifier's predicted class:

- L-CAM-Img and L-CAM-Fm: their class map (one forward pass);
- CE-FAM: its fused class map (the top-8 concepts' regions weighted by their positive contributions,
  docs/method.md#fused-class-map), by the default rules of ``configs/method/cefam.yaml``;
- the class-map baselines (``--baselines``; default every registered one that is installed): the project's
  Grad-CAM, pytorch-grad-cam's CAMs and RISE, at L-CAM's layer;
- a random map.

Columns: NRA and hit rate against the key object's pixels, Average Drop / Increase in Confidence with all pixels
kept, deletion / insertion AUC, ROAD (MoRF / LeRF, on the first ``--road-images`` images: its imputation is one
sparse solve per image and percentile), and the milliseconds per image it takes to make the map (the classifier's
forward pass included), at each of ``--timing-batch-sizes`` images per call: by default one image per call (what
explaining one image costs: the latency) and the scoring's batches of ``--batch-size`` (the throughput). The last
lines say, per batch size, whether L-CAM is the fastest of the learned and CAM methods (the random map aside), and
by how much against the run-to-run spread.

Timing (:func:`time_methods`) is its own phase, apart from the scoring: at each batch size, every method makes the
maps of the same full batches (from the first ``--timing-images`` test images) of the classes the classifier
predicts, after one untimed warm-up call each; ``--repeats`` rounds, each method's calls back to back (timed warm,
as when it explains a folder) and the methods in a seeded random order each round, so that no method always follows
the same other one and a change of load on the machine falls on all of them; ``--threads`` torch threads (and numpy
BLAS threads, with threadpoolctl). Each method runs the frozen classifier on the batch itself, exactly once (L-CAM's
and CE-FAM's pass is part of their map; a baseline that reads the classifier's output gets it computed inside its
timing, and one that runs the classifier itself, as pytorch-grad-cam's CAMs do, gets no extra pass). A method whose
calls have taken ``--time-budget`` seconds in all stops after the round it is in (the slow baselines: Score-CAM,
Ablation-CAM, RISE). ``ms / image`` is the median over the timed calls of a call's seconds divided by its images,
with the interquartile range; the verdict compares L-CAM with the fastest other method by the paired ratio of their
calls on the same batch in the same round, against the margin the setup resolves (:func:`fastest_line`: the two
L-CAM variants' ratio, the same computation): ``PASS`` or ``MISS`` only where the ratio's interquartile range clears
it, ``TIE`` (within the run-to-run spread) otherwise.

Run: ``python benchmarks/class_maps.py`` (default world, 200 test images; see the README for the time);
``--small`` is a seconds-long smoke run of the same path (a tiny world, one epoch, 8 images), for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.explanation_quality import DEFAULTS, QUIET  # noqa: E402  (the same quiet runs, default rules)
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
    p.add_argument("--timing-images", type=int, default=64, help="full batches timed (default the first 64 images)")
    p.add_argument(
        "--timing-batch-sizes",
        default=None,
        help="comma-separated images per timed call (default '1,BATCH_SIZE': one image, as explaining one image "
        "does, and the scoring's batches)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over those batches (default 5)")
    p.add_argument("--time-budget", type=float, default=30.0, help="a method's timed seconds after which it stops")
    p.add_argument("--threads", type=int, default=1, help="torch (and BLAS) threads while timing (default 1)")
    p.add_argument("--baselines", default=None, help="comma-separated baselines (default: every installed one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small:
        args.images, args.road_images, args.steps, args.batch_size = 8, 4, 4, 4
        args.timing_images, args.repeats = 8, 2
        if args.baselines is None:  # the cheap ones: the path, not the numbers
            args.baselines = ",".join(n for n in SMALL_BASELINES if get_baseline(n).available)
    sizes = args.timing_batch_sizes or f"1,{args.batch_size}"
    try:
        args.timing_batch_sizes = sorted({int(v) for v in sizes.split(",") if v.strip()})
    except ValueError:
        p.error(f"--timing-batch-sizes: not comma-separated integers: {sizes!r}")
    if not args.timing_batch_sizes or min(args.timing_batch_sizes) < 1:
        p.error(f"--timing-batch-sizes: give one or more sizes >= 1, got {sizes!r}")
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


class OnDemandOutput:
    """The classifier's output on ``images``, computed when first read: a baseline that reads it (the project's
    Grad-CAM) pays for the pass inside its own timing, one that runs the classifier itself (pytorch-grad-cam's CAMs,
    RISE) pays nothing extra."""

    def __init__(self, classifier: Callable, images: torch.Tensor):
        self._classifier, self._images, self._output = classifier, images, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._output is None:
            self._output = self._classifier(self._images)
        return getattr(self._output, name)


def map_sources(modules: dict[str, Any], names: tuple[str, ...], seed: int) -> dict[str, Callable]:
    """``{name: make(images, target) -> (B, h, w)}``: every compared map of the ``target`` classes, each method
    running the frozen classifier on ``images`` itself, once."""
    lcam = modules["lcam_img"]
    classifier, layer = lcam.classifier, lcam.map_layer
    generator = torch.Generator().manual_seed(seed)

    def learned(module):
        # At the layer's resolution, as every baseline's map (ClassMapEvaluation normalizes and upsamples them all).
        return lambda images, target: select_class(module.class_maps_at_layer(images)[1], target)

    def cefam(images, target):
        # Today's default rules (a reused run's checkpoint recorded those of its day).
        e = modules["cefam"].explain(images, top_n=8, **DEFAULTS)
        return fused_class_map(e.regions, e.contributions)

    def baseline(name):
        spec = get_baseline(name)
        return lambda images, target: spec(classifier, images, OnDemandOutput(classifier, images), target, [layer])[
            layer
        ]

    sources = {"lcam_img": learned(modules["lcam_img"]), "lcam_fm": learned(modules["lcam_fm"]), "cefam": cefam}
    sources.update({n: baseline(n) for n in names})
    sources["random"] = lambda images, target: random_maps((len(images), *images.shape[-2:]), generator, images.device)
    return sources


def time_methods(
    sources: dict[str, Callable],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    repeats: int,
    budget: float,
    threads: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{name: [seconds per image of each timed call]}``, in call order (round by round, batch by batch).

    One untimed warm-up call per method first (lazy set-up: tails, probes, graphs); then ``repeats`` rounds: in each,
    the methods in an order drawn afresh (seeded by ``seed`` and the round), each making the maps of every one of
    ``batches`` (``(images, target)``) back to back. So a method is timed warm, as when it explains a folder, and no
    method always follows the same other one (a fixed cyclic order put L-CAM-Img after RISE in every round: its
    calls paid for the caches RISE had flushed, 19 % slower than L-CAM-Fm's one image at a time); a change of load
    on the machine falls on every method over the rounds. A method whose timed seconds reach ``budget`` sits out
    the later rounds. ``threads`` torch threads meanwhile, and as many BLAS threads for numpy (pytorch-grad-cam's
    EigenCAM takes an SVD there; OpenBLAS threads that spin on a busy machine made it vary 10x between calls), both
    restored after.
    """
    names = list(sources)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    try:
        with blas_threads(threads), torch.no_grad():
            for name in names:
                sources[name](*batches[0])
            for round_ in range(repeats):
                order = random.Random(f"{seed}/{round_}").sample(names, len(names))
                for name in (n for n in order if round_ == 0 or spent[n] < budget):
                    for images, target in batches:
                        start = time.perf_counter()
                        sources[name](images, target)
                        seconds = time.perf_counter() - start
                        spent[name] += seconds
                        calls[name].append(seconds / len(images))
    finally:
        torch.set_num_threads(previous)
    return calls


def timing_batches(split, classifier: Callable, size: int, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The full batches of ``size`` among the first ``limit`` test images (at least one batch), each with the
    classes the classifier predicts."""
    batches = [b for b in split.batches(size, max(limit, size), "cpu") if len(b[0]) == size]
    if not batches:
        batches = list(split.batches(size, 1, "cpu"))
    with torch.no_grad():
        return [(images, classifier(images).logits.argmax(1)) for images, _, _ in batches]


def blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """numpy's BLAS limited to ``threads`` (threadpoolctl, where installed; otherwise left as it is)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles (a single value is its own quartiles)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "calls": len(values)}


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
    split = world.split("test")

    # Timing: the same full batches for every method, apart from the scoring, at each batch size.
    timings, t_time = {}, time.time()
    for size in args.timing_batch_sizes:
        timed = timing_batches(split, classifier, size, args.timing_images)
        calls = time_methods(sources, timed, args.repeats, args.time_budget, args.threads, args.seed)
        timings[str(size)] = {"images_per_batch": len(timed[0][0]), "batches": len(timed), "calls": calls}
    t_time = time.time() - t_time

    evaluation = ClassMapEvaluation(list(sources), seed=args.seed, sync_on_compute=False, curves=True, steps=args.steps)
    n, t0 = 0, time.time()
    for images, masks, labels in split.batches(args.batch_size, args.images, "cpu"):
        with torch.no_grad():
            out = classifier(images)
            target = out.logits.argmax(1)
            maps = {name: make(images, target) for name, make in sources.items()}
        key = key_object_pixels(world.spec, masks, labels)
        evaluation.update_maps(classifier, images, key, maps, target, out.logits, road=n < args.road_images)
        n += len(images)
    rows = evaluation.compute()
    for name in rows:
        rows[name]["timing"] = {size: spread(t["calls"][name]) for size, t in timings.items()}
        rows[name]["seconds_per_image"] = {size: r["median"] for size, r in rows[name]["timing"].items()}
    return {
        "images": n,
        "road_images": min(n, -(-args.road_images // args.batch_size) * args.batch_size),
        "steps": args.steps,
        "layer": modules["lcam_img"].map_layer,
        "methods": rows,
        "titles": titles(names),
        "timing": {"repeats": args.repeats, "budget_s": args.time_budget, "threads": args.threads, "sizes": timings},
        "seconds": {"train": round(t_train, 1), "timing": round(t_time, 1), "evaluate": round(time.time() - t0, 1)},
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
    ]
    sizes = results["timing"]["sizes"]
    head += [f"ms / image, {per_call(size)} (IQR)" for size in sizes]
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
            ]
            + [f"{t['median'] * 1e3:.2f} ({t['q25'] * 1e3:.2f}-{t['q75'] * 1e3:.2f})" for t in r["timing"].values()]
        )
    title = (
        f"Class maps of the predicted class, {results['images']} test images of the shapes world (baselines at "
        f"{results['layer']}; deletion / insertion in {results['steps']} steps; ROAD on the first "
        f"{results['road_images']} images; ms / image: median over the timed calls, {timing_note(results['timing'])})"
    )
    return markdown_table(head, rows, title=title)


def per_call(size: str | int) -> str:
    return "1 image per call" if int(size) == 1 else f"batches of {size}"


def timing_note(timing: dict[str, Any]) -> str:
    calls = " and ".join(f"{t['batches']} x {per_call(size)}" for size, t in timing["sizes"].items())
    return (
        f"{calls}, x {timing['repeats']} rounds (fewer past {timing['budget_s']:g} s), {timing['threads']} torch "
        f"thread{'s' if timing['threads'] > 1 else ''}"
    )


def fastest_line(results: dict[str, Any], size: str) -> str:
    """At ``size`` images per call: L-CAM (the faster variant) against the fastest other learned or CAM method (the
    random map aside): the median per-image times, and the paired ratio other / L-CAM of their calls on the same
    batch and round.

    The two L-CAM variants make their maps with the same computation (the classifier's pass and a 1x1 convolution;
    only the weights differ), so the paired ratio of their calls measures what the setup can resolve: its median's
    distance from 1 is the margin a win must clear (``PASS``: the ratio's lower quartile above ``1 + margin``;
    ``MISS``: its upper quartile below ``1 - margin``; ``TIE`` otherwise)."""
    methods = results["methods"]
    median = {n: r["timing"][size]["median"] for n, r in methods.items() if n != "random"}
    lcam = min(("lcam_img", "lcam_fm"), key=median.get)
    other = min((n for n in median if n not in ("lcam_img", "lcam_fm")), key=median.get)
    calls = results["timing"]["sizes"][size]["calls"]
    # A method past its time budget has fewer calls: the first rounds of both pair up.
    r = spread([o / a for o, a in zip(calls[other], calls[lcam], strict=False)])
    same = spread([a / b for a, b in zip(calls["lcam_img"], calls["lcam_fm"], strict=False)])
    margin = abs(same["median"] - 1)
    verdict = (
        "PASS" if r["q25"] > 1 + margin else "MISS" if r["q75"] < 1 - margin else "TIE (within the run-to-run spread)"
    )
    titles = results["titles"]
    return (
        f"{per_call(size)}: L-CAM ({titles[lcam]}) {median[lcam] * 1e3:.2f} ms / image vs the fastest other method, "
        f"{titles[other]}, {median[other] * 1e3:.2f} ms; {titles[other]} / L-CAM on the same calls: median "
        f"{r['median']:.2f}, IQR {r['q25']:.2f}-{r['q75']:.2f} ({r['calls']} pairs); the same computation "
        f"(L-CAM-Img / L-CAM-Fm): {same['median']:.2f}, so a margin of {margin:.2f}: L-CAM fastest {verdict}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    print()
    for size in results["timing"]["sizes"]:
        print(fastest_line(results, size))
    t = results["seconds"]
    print(f"time: training {t['train']} s, timing {t['timing']} s, scoring {t['evaluate']} s")
    out = Path(args.out) / "class_maps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main()
