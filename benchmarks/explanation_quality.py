"""How well CE-FAM's explanations hold up across shapes worlds, with its default rules and with the authors' rules,
beside Grad-CAM, the single-channel baseline and random maps (README: How well the explanations hold up).

Each world differs from the others in seed and parameters (concepts, class list, image size, object count,
object size, noise, the oracle VLM's scoring), and gets its own fitted classifier and trained CE-FAM branch
(``train.py`` with the world's overrides; the demo's training settings otherwise). Every world's test split is then
evaluated (``evaluate_on_world``, docs/method.md#ce-fam-evaluation) once per rule set:

- ``defaults``: the default rules (``configs/method/cefam.yaml``'s, also for a reused run trained under older ones);
- ``direct``: the defaults with ``gradient: direct`` (the derivative through each layer's own pooled activations),
  the comparison that decides the default gradient rule;
- ``paper``: the CE-FAM authors' rules (``--preset paper``, docs/method.md#explanation-rules).

Printed per world and as mean ± sd over the worlds: top-1 NRA, the best layer by the mask (the authors' "Top-4",
an upper bound that reads the masks), hit rate, EPG and contribution accuracy (also with each concept at that
best layer: the upper bound of the contribution rule over layer choices); the baselines at CE-FAM's top-1 layer
(Grad-CAM), at their own best layer (single channel) and random maps. Then zero-shot concepts: a second branch per
world trained with one color and one texture held out of the concept set (``cefam.holdout_concepts``), evaluated
with the default rules, seen vs unseen concepts (top-1 NRA, hit rate, presence AUROC; ``--no-holdout`` skips it).
Last the floors for the default rules, PASS or MISS, per world.

Run: ``python benchmarks/explanation_quality.py`` (about 15 min on 2 CPU cores; trained runs are kept under
``--out`` and reused with ``--reuse``). ``--small`` is a seconds-long smoke run of the same path (tiny worlds, one
epoch), for tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cefam_lightning.cli.train import main as train_main  # noqa: E402
from cefam_lightning.data.shapes_world import ShapesWorld  # noqa: E402
from cefam_lightning.methods.base import EvaluationSettings, load_explainer  # noqa: E402
from cefam_lightning.methods.cefam.rules import RULE_KEYS  # noqa: E402
from cefam_lightning.training.config import method_defaults, world_spec  # noqa: E402

# Three worlds unlike each other and unlike the demo's (seed 0, 64 px, 6 classes, 1-3 objects).
WORLDS: dict[str, list[str]] = {
    "A": [
        "world.seed=11",
        "world.image_size=48",
        "world.classes=[red circle, green square, blue triangle, yellow circle, green triangle, blue square]",
        "world.min_objects=1",
        "world.max_objects=3",
        "world.background_noise=0.06",
    ],
    "B": [
        "world.seed=22",
        "world.image_size=64",
        "world.colors=[red, green, blue, purple, orange]",
        "world.shapes=[circle, square, triangle, diamond]",
        "world.textures=[plain, striped, dotted]",
        "world.classes=[purple diamond, orange circle, red square, blue triangle, green diamond]",
        "world.min_objects=2",
        "world.max_objects=4",
        "world.min_radius=0.09",
        "world.max_radius=0.16",
        "world.background_noise=0.10",
    ],
    "C": [
        "world.seed=33",
        "world.image_size=56",
        "world.colors=[red, blue, yellow, cyan]",
        "world.shapes=[circle, square, diamond]",
        "world.textures=[plain, dotted]",
        "world.classes=[cyan square, yellow diamond, red circle, blue square]",
        "world.min_objects=1",
        "world.max_objects=2",
        "world.min_radius=0.13",
        "world.max_radius=0.22",
        "world.background_noise=0.03",
        "world.vlm_kind=siglip",
        "world.logit_scale=10.0",
        "world.logit_bias=-5.0",
    ],
}
SIZES = ["world.n_val=300", "world.n_test=300"]  # and --n-train
SMALL = ["world.n_train=64", "world.n_val=32", "world.n_test=32", "classifier.fit.epochs=1", "trainer.max_epochs=1"]
QUIET = [
    "evaluation.enabled=false",
    "callbacks.region_maps.enabled=false",
    "callbacks.contributions.enabled=false",
    "callbacks.region_metrics.enabled=false",
    "trainer.enable_progress_bar=false",
    "demo.num_figures=0",
]
# The default rules as configs/method/cefam.yaml has them now (a reused run is evaluated by today's defaults, not by
# the ones its checkpoint recorded when it was trained).
DEFAULTS = {key: value for key, value in method_defaults("cefam").items() if key in RULE_KEYS}
RULE_SETS: dict[str, dict[str, Any]] = {
    "defaults": DEFAULTS,
    "direct": {**DEFAULTS, "gradient": "direct"},  # the other gradient rule: which one is the default
    "paper": {"preset": "paper"},
}
RULE_TITLES = {"defaults": "default rules", "direct": "default rules, direct gradient", "paper": "the authors' rules"}

# The floors for the defaults, per world.
FLOOR_NRA, FLOOR_MARGIN, FLOOR_CONTRIBUTION, FLOOR_UNSEEN = 0.60, 0.05, 0.85, 0.8


def holdout_of(name: str) -> list[str]:
    """The concepts a world's zero-shot branch leaves out: its last color and its last texture."""
    values = dict(o.split("=", 1) for o in WORLDS[name])
    colors = values.get("world.colors", "[red, green, blue, yellow]").strip("[]").split(",")
    textures = values.get("world.textures", "[plain, striped]").strip("[]").split(",")
    return [colors[-1].strip(), textures[-1].strip()]


def train_world(name: str, args: argparse.Namespace, holdout: bool = False) -> Path:
    """The world's trained CE-FAM checkpoint (trained now unless ``--reuse`` finds it); ``holdout``: the branch
    trained without :func:`holdout_of` the world."""
    run = f"{name}-holdout" if holdout else name
    ckpt = Path(args.out) / run / "checkpoints" / "best.ckpt"
    if args.reuse and ckpt.is_file():
        return ckpt
    overrides = [
        *WORLDS[name],
        *([f"cefam.holdout_concepts=[{', '.join(holdout_of(name))}]"] if holdout else []),
        *(SMALL if args.small else [*SIZES, f"world.n_train={args.n_train}"]),
        *QUIET,
        f"output_dir={args.out}",
        f"run_name={run}",
        f"cache_dir={args.cache_dir}",
        "overwrite=true",
        f"seed={args.seed}",
    ]
    train_main(overrides)
    return ckpt


def evaluate(ckpt: Path, rules: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    module = load_explainer(ckpt).eval()
    world = ShapesWorld.build(world_spec(OmegaConf.create(module.hparams["config"])), args.cache_dir)
    settings = EvaluationSettings(batch_size=args.batch_size, max_images=args.max_images, **rules)
    return module.evaluate_on_world(world, "test", settings)[0]


def summary(results: dict[str, Any]) -> dict[str, float]:
    """The numbers the tables show, from one evaluation's results."""
    g = results["regions"]
    out = {
        "top1_nra": g["cefam"]["top1"]["nra/mean"],
        "best_layer_nra": g["cefam"]["best_layer"]["nra/mean"],
        "hit": g["cefam"]["top1"]["hit_rate/mean"],
        "epg": g["cefam"]["top1"]["epg/mean"],
        "contribution": results["contribution"]["top1"]["top1_key"],
        "best_layer_contribution": results["contribution"]["best_layer"]["top1_key"],
    }
    for method in ("gradcam", "single_channel", "random"):
        if method in g:
            out[f"{method}_nra"] = g[method]["top1"]["nra/mean"]
            out[f"{method}_hit"] = g[method]["top1"]["hit_rate/mean"]
            out[f"{method}_epg"] = g[method]["top1"]["epg/mean"]
    return out


COLUMNS = [
    ("top-1 NRA", "top1_nra"),
    ("best layer by mask NRA (upper bound)", "best_layer_nra"),
    ("hit rate", "hit"),
    ("EPG", "epg"),
    ("contribution acc.", "contribution"),
    ("best layer by mask contribution acc. (upper bound)", "best_layer_contribution"),
]
BASELINES = [("Grad-CAM (class)", "gradcam"), ("single channel", "single_channel"), ("random map", "random")]


def table(rows: dict[str, dict[str, float]], fmt) -> list[str]:
    lines = [
        "| explainer | " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for rules, s in rows.items():
        lines.append(f"| CE-FAM, {RULE_TITLES[rules]} | " + " | ".join(fmt(s, key) for _, key in COLUMNS) + " |")
    base = next(iter(rows.values()))
    for title, m in BASELINES:
        if f"{m}_nra" in base:
            cells = {"top1_nra": f"{m}_nra", "hit": f"{m}_hit", "epg": f"{m}_epg"}
            lines.append(
                f"| {title} | " + " | ".join(fmt(base, cells[key]) if key in cells else "" for _, key in COLUMNS) + " |"
            )
    return lines


def zero_shot_summary(results: dict[str, Any]) -> dict[str, float]:
    z = results["zero_shot"]
    out = {}
    for group in ("seen", "unseen"):
        top1 = z[group]["regions"]["cefam"]
        out[f"{group}_nra"], out[f"{group}_hit"] = top1["nra/mean"], top1["hit_rate/mean"]
        out[f"{group}_auroc"] = z[group]["presence_auroc"]
    out["ratio"] = out["unseen_nra"] / out["seen_nra"]
    return out


def floors(s: dict[str, float], zero_shot: dict[str, float] | None = None) -> dict[str, bool]:
    baselines = [s[f"{m}_nra"] for m in ("gradcam", "single_channel", "random") if f"{m}_nra" in s]
    hits = [s[f"{m}_hit"] for m in ("gradcam", "single_channel", "random") if f"{m}_hit" in s]
    return {
        f"top-1 NRA >= {FLOOR_NRA}": s["top1_nra"] >= FLOOR_NRA,
        f"top-1 NRA >= best baseline + {FLOOR_MARGIN}": s["top1_nra"] >= max(baselines) + FLOOR_MARGIN,
        "hit rate above every baseline": s["hit"] > max(hits),
        f"contribution accuracy >= {FLOOR_CONTRIBUTION}": s["contribution"] >= FLOOR_CONTRIBUTION,
        **({f"unseen NRA >= {FLOOR_UNSEEN} x seen": zero_shot["ratio"] >= FLOOR_UNSEEN} if zero_shot else {}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/explanation_quality", help="where the worlds' runs are written")
    p.add_argument("--cache-dir", default="~/.cache/cefam_lightning", help="worlds and fitted classifiers")
    p.add_argument("--worlds", default=",".join(WORLDS), help="comma-separated subset of " + ",".join(WORLDS))
    p.add_argument("--max-images", type=int, default=None, help="test images per world (default all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the training seed of every world's branch")
    p.add_argument("--n-train", type=int, default=4000, help="training images per world (the demo's 4000)")
    p.add_argument("--reuse", action="store_true", help="reuse a world's trained checkpoint found under --out")
    p.add_argument("--small", action="store_true", help="tiny worlds, one epoch: a smoke run of the same path")
    p.add_argument("--json", default=None, help="also write every number to this file")
    p.add_argument("--no-holdout", action="store_true", help="skip the zero-shot branches")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.worlds.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORLDS]
    if unknown:
        p.error(f"unknown world {unknown[0]!r}; known: {', '.join(WORLDS)}")

    t0 = time.time()
    per_world: dict[str, dict[str, dict[str, float]]] = {}
    zero_shot: dict[str, dict[str, float]] = {}
    described: dict[str, str] = {}
    for name in names:
        t = time.time()
        ckpt = train_world(name, args)
        per_world[name] = {}
        for rules, given in RULE_SETS.items():
            results = evaluate(ckpt, given, args)
            per_world[name][rules] = summary(results)
            described[rules] = results["settings"]["rules"]
        print(f"\n## World {name} ({time.time() - t:.0f} s): {' '.join(WORLDS[name])}\n", flush=True)
        print("\n".join(table(per_world[name], lambda s, k: f"{s[k]:.3f}")))
        if not args.no_holdout:
            zero_shot[name] = zero_shot_summary(evaluate(train_world(name, args, holdout=True), {}, args))

    if zero_shot:
        print("\n## Zero-shot concepts (default rules; each world's branch trained without two concepts)\n")
        print(
            "| world | held out | NRA seen | NRA unseen | unseen / seen | hit seen | hit unseen | AUROC seen "
            "| AUROC unseen |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, z in zero_shot.items():
            print(
                f"| {name} | {', '.join(holdout_of(name))} | {z['seen_nra']:.3f} | {z['unseen_nra']:.3f} | "
                f"{z['ratio']:.2f} | {z['seen_hit']:.3f} | {z['unseen_hit']:.3f} | {z['seen_auroc']:.3f} | "
                f"{z['unseen_auroc']:.3f} |"
            )

    print(f"\n## Mean ± sd over {len(names)} worlds ({', '.join(names)})\n")
    mean_rows = {}
    for rules in RULE_SETS:
        keys = per_world[names[0]][rules].keys()
        mean_rows[rules] = {
            k: (
                statistics.fmean(per_world[n][rules][k] for n in names),
                statistics.stdev([per_world[n][rules][k] for n in names]) if len(names) > 1 else 0.0,
            )
            for k in keys
        }
    print("\n".join(table(mean_rows, lambda s, k: f"{s[k][0]:.3f} ± {s[k][1]:.3f}")))
    print()
    for rules, text in described.items():
        print(f"- {RULE_TITLES[rules]}: {text}")

    print("\n## Floors (defaults, every world)\n")
    verdicts = {name: floors(per_world[name]["defaults"], zero_shot.get(name)) for name in names}
    for check in next(iter(verdicts.values())):
        cells = ", ".join(f"{name} {'PASS' if verdicts[name][check] else 'MISS'}" for name in names)
        print(f"- {check}: {cells}")
    print(f"\ntotal {time.time() - t0:.0f} s")
    out = {"worlds": per_world, "zero_shot": zero_shot, "rules": described, "floors": verdicts}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
