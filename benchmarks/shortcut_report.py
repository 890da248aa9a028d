"""Does the dataset report find a shortcut we planted? (README: Model debugging; docs/report.md)

For each seed, two runs on the demo's shapes world (``train.py`` with the demo's settings, the world's seed set):

- **shortcut**: ``configs/experiment/shortcut.yaml``'s planted tie (in the train split only, every red circle's key
  object is striped and no other class's image shows stripes; val and test break the tie);
- **clean**: the same world without it.

Each run's CE-FAM branch is trained, then the report (``report.py``'s :func:`build_report`, default settings) is
made on the test split. Printed per seed and as mean ± sd:

- how much the classifier leans on the shortcut (test accuracy where the tie holds vs where it is broken; shortcut
  errors: other classes' images carrying the planted texture, predicted as the planted class);
- the planted concept's rank among its class's positive concepts in the report (shortcut and clean runs);
- the share of shortcut errors the report explains by the planted concept (it is among the top 3 concepts pushing
  toward the wrong class).

Then the checks the report must pass: rank <= 2 in every shortcut run; >= 70 % of shortcut errors explained; not in
the class's top 3 in any clean run.

Run: ``python benchmarks/shortcut_report.py`` (about 40 min on 2 CPU cores; trained runs are kept under ``--out``
and reused with ``--reuse``). ``--small`` is a minutes-long smoke run of the same path.
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

from benchmarks.explanation_quality import DEFAULTS, QUIET  # noqa: E402  (the same quiet runs, default rules)
from cefam_lightning.cli.train import main as train_main  # noqa: E402
from cefam_lightning.data.report_data import shapes_world_data  # noqa: E402
from cefam_lightning.data.shapes_world import ShapesWorld, shortcut_tie  # noqa: E402
from cefam_lightning.methods.base import load_explainer  # noqa: E402
from cefam_lightning.metrics.shortcut import classifier_shortcut_reliance  # noqa: E402
from cefam_lightning.reporting.concept_report import ReportSettings, build_report  # noqa: E402
from cefam_lightning.training.config import world_spec  # noqa: E402

SHORTCUT = OmegaConf.load(ROOT / "configs" / "experiment" / "shortcut.yaml").world.shortcut
PLANTED = {"class": SHORTCUT["class"], "concept": SHORTCUT.concept}
SMALL = ["world.n_train=400", "world.n_val=100", "world.n_test=100", "classifier.fit.epochs=2", "trainer.max_epochs=2"]
TOP_RANK, EXPLAINED, CLEAN_RANK = 2, 0.70, 3  # the checks


def train(seed: int, shortcut: bool, args: argparse.Namespace) -> Path:
    run = f"{'shortcut' if shortcut else 'clean'}-{seed}"
    ckpt = Path(args.out) / run / "checkpoints" / "best.ckpt"
    if args.reuse and ckpt.is_file():
        return ckpt
    planted = [
        f"world.shortcut.class={PLANTED['class']}",
        f"world.shortcut.concept={PLANTED['concept']}",
        f"world.shortcut.strength={SHORTCUT.strength}",
    ]
    overrides = [
        f"world.seed={seed}",
        *(planted if shortcut else []),
        *(SMALL if args.small else []),
        *QUIET,
        f"output_dir={args.out}",
        f"run_name={run}",
        f"cache_dir={args.cache_dir}",
        "overwrite=true",
        f"seed={seed}",
    ]
    train_main(overrides)
    return ckpt


def rank_of(report: dict[str, Any], cls: str, concept: str) -> int | None:
    """The concept's 1-based rank among the class's positive concepts (``None``: not listed)."""
    row = next(r for r in report["classes"] if r["class"] == cls)
    names = [c["concept"] for c in row["positive"]]
    return names.index(concept) + 1 if concept in names else None


def measure(ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    module = load_explainer(ckpt).eval()
    world = ShapesWorld.build(world_spec(OmegaConf.create(module.hparams["config"])), args.cache_dir)
    # Today's default rules (a reused run's checkpoint recorded those of its day), or the layer asked for.
    options = dict(DEFAULTS)
    if args.contribution_layer:
        options["contribution_layer"] = args.contribution_layer
    report, _ = build_report(
        module, shapes_world_data(world, "test", args.max_images), ReportSettings(options=options), progress=False
    )
    out: dict[str, Any] = {"rank": rank_of(report, PLANTED["class"], PLANTED["concept"])}
    out["accuracy"] = report["accuracy"]
    if world.spec.shortcut is None:
        return out
    out["reliance"] = classifier_shortcut_reliance(module.classifier, world, "test")
    # Shortcut errors: other classes' images carrying the planted concept, predicted as the planted class.
    split = world.split("test")
    n = report["images"]
    tie = shortcut_tie(world.spec, split.masks[:n], split.labels[:n])
    errors = [
        e
        for e in report["errors"]["items"]
        if e["predicted"] == PLANTED["class"] and e["true"] != PLANTED["class"] and not bool(tie[e["position"]])
    ]
    explained = [e for e in errors if PLANTED["concept"] in [c["concept"] for c in e["toward_predicted"]]]
    out["shortcut_errors"] = len(errors)
    out["explained"] = len(explained) / len(errors) if errors else None
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/shortcut_report", help="where the runs are written")
    p.add_argument("--cache-dir", default="~/.cache/cefam_lightning", help="worlds and fitted classifiers")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated world and training seeds")
    p.add_argument("--max-images", type=int, default=None, help="test images reported on (default all)")
    p.add_argument("--reuse", action="store_true", help="reuse a run's trained checkpoint found under --out")
    p.add_argument("--small", action="store_true", help="small worlds, two epochs: a smoke run of the same path")
    p.add_argument("--json", default=None, help="also write every number to this file")
    p.add_argument(
        "--contribution-layer",
        default=None,
        help="the report's CE-FAM contribution layer (default: configs/method/cefam.yaml's)",
    )
    args = p.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {"planted": PLANTED, "strength": SHORTCUT.strength, "seeds": {}}
    for seed in seeds:
        results["seeds"][seed] = {
            "shortcut": measure(train(seed, True, args), args),
            "clean": measure(train(seed, False, args), args),
        }
    rows = [
        "| seed | acc. tie holds | acc. tie broken | shortcut errors | rank (shortcut) | errors explained "
        "| rank (clean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, r in results["seeds"].items():
        s, c = r["shortcut"], r["clean"]
        rel = s["reliance"]
        rows.append(
            f"| {seed} | {_fmt(rel['acc_tie_holds'])} | {_fmt(rel['acc_tie_broken'])} | {s['shortcut_errors']} "
            f"| {s['rank'] or '-'} | {_fmt(s['explained'])} | {c['rank'] or '-'} |"
        )
    runs = list(results["seeds"].values())
    rows.append(
        f"| mean ± sd | {_mean_sd([r['shortcut']['reliance']['acc_tie_holds'] for r in runs])} "
        f"| {_mean_sd([r['shortcut']['reliance']['acc_tie_broken'] for r in runs])} "
        f"| {_mean_sd([r['shortcut']['shortcut_errors'] for r in runs])} | | "
        f"{_mean_sd([r['shortcut']['explained'] for r in runs])} | |"
    )
    checks = {
        f"planted concept in its class's top {TOP_RANK} (every shortcut run)": all(
            r["shortcut"]["rank"] is not None and r["shortcut"]["rank"] <= TOP_RANK for r in runs
        ),
        f">= {EXPLAINED:.0%} of shortcut errors explained by it (every shortcut run)": all(
            r["shortcut"]["explained"] is not None and r["shortcut"]["explained"] >= EXPLAINED for r in runs
        ),
        f"not in its class's top {CLEAN_RANK} (every clean run)": all(
            r["clean"]["rank"] is None or r["clean"]["rank"] > CLEAN_RANK for r in runs
        ),
    }
    results["checks"] = checks
    layer = args.contribution_layer or DEFAULTS["contribution_layer"] + " (the default)"
    print(f"\n## Planted: '{PLANTED['concept']}' -> {PLANTED['class']} (strength {SHORTCUT.strength})")
    print(f"report contributions measured at: {layer}\n")
    print("\n".join(rows))
    print("\n## Checks\n")
    for name, ok in checks.items():
        print(f"- {name}: {'PASS' if ok else 'MISS'}")
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
