"""How long the dataset report takes (README: Model debugging; the floor: 500 test images of the demo's checkpoint in
under 5 minutes on 2 CPU cores).

Times :func:`~cefam_lightning.reporting.concept_report.build_report` and
:func:`~cefam_lightning.reporting.report_pages.write_report` on the first ``--images`` test images of the
checkpoint's shapes world, with the ``report`` command's defaults, and prints the split: the explanation pass (every
image toward its predicted class, the errors toward their true class), the second pass for the figures' images, and
the figures and pages.

Run: ``python benchmarks/report_time.py --checkpoint outputs/<run>/checkpoints/best.ckpt`` (a checkpoint of
``python train.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cefam_lightning.reporting.concept_report as concept_report  # noqa: E402
from cefam_lightning.data.report_data import shapes_world_data  # noqa: E402
from cefam_lightning.data.shapes_world import ShapesWorld  # noqa: E402
from cefam_lightning.methods.base import load_explainer  # noqa: E402
from cefam_lightning.reporting.report_pages import write_report  # noqa: E402
from cefam_lightning.training.config import world_spec  # noqa: E402

FLOOR_S = 300.0


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a CE-FAM checkpoint trained on the shapes world")
    p.add_argument("--images", type=int, default=500, help="test images reported on (default 500)")
    p.add_argument("--cache-dir", default=None, help="where the shapes world is cached (default: the run's)")
    args = p.parse_args(argv)
    module = load_explainer(args.checkpoint).eval()
    cfg = OmegaConf.create(module.hparams["config"])
    world = ShapesWorld.build(world_spec(cfg), args.cache_dir or cfg.cache_dir)
    data = shapes_world_data(world, "test", args.images)
    stages: dict[str, float] = {}
    pictures_fn = concept_report._pictures

    def timed_pictures(*a, **k):
        start = time.perf_counter()
        out = pictures_fn(*a, **k)
        stages["second pass (figure images)"] = time.perf_counter() - start
        return out

    concept_report._pictures = timed_pictures
    start = time.perf_counter()
    report, pictures = concept_report.build_report(module, data, progress=False)
    total_build = time.perf_counter() - start
    stages = {"explanation pass": total_build - stages["second pass (figure images)"], **stages}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp) / "report", report, pictures)
    stages["figures and pages"] = time.perf_counter() - start
    total = sum(stages.values())
    print(f"report on {report['images']} images ({report['errors']['count']} misclassified), {module.method}:")
    for name, seconds in stages.items():
        print(f"  {name:<30} {seconds:7.1f} s")
    print(f"  {'total':<30} {total:7.1f} s  (floor {FLOOR_S:.0f} s: {'PASS' if total < FLOOR_S else 'MISS'})")
    return total


if __name__ == "__main__":
    main()
