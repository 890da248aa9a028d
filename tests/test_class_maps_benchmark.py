"""benchmarks/class_maps.py (README: Class-map baselines and faithfulness) runs its --small path: three tiny
trained runs, every compared map in one table, and the fastest-method line; its timing is fair (the same batches
for every method, a warm-up, rotated order, each method's classifier pass once) and its verdict weighs the spread."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("class_maps_benchmark", ROOT / "benchmarks" / "class_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_same_batches_warm_up_shuffled_blocks_budget_threads(bench):
    batches = [(torch.zeros(4, 3, 8, 8) + i, torch.zeros(4, dtype=torch.long)) for i in range(3)]
    seen = []

    def source(name):
        def make(images, target):
            seen.append((name, int(images[0, 0, 0, 0])))
            return images[:, 0]

        return make

    names = "abcdef"
    threads = torch.get_num_threads()
    calls = bench.time_methods({n: source(n) for n in names}, batches, repeats=6, budget=float("inf"), threads=1)
    assert torch.get_num_threads() == threads  # restored
    warm, timed = seen[:6], seen[6:]
    assert warm == [(n, 0) for n in names]  # one untimed call each
    assert [len(v) for v in calls.values()] == [18] * 6 and all(t > 0 for v in calls.values() for t in v)
    # every method sees the same batches in the same order, round by round, its calls of a round back to back
    for name in names:
        assert [b for n, b in timed if n == name] == [0, 1, 2] * 6
    blocks = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(len({n for n, _ in block}) == 1 for block in blocks)
    rounds = [[block[0][0] for block in blocks[r * 6 : (r + 1) * 6]] for r in range(6)]
    assert all(sorted(order) == list(names) for order in rounds)
    # the order is drawn afresh each round (seeded): no method always follows the same other one
    assert len({tuple(order) for order in rounds}) > 1
    predecessors = {n: {order[order.index(n) - 1] for order in rounds if order.index(n) > 0} for n in names}
    assert any(len(p) > 1 for p in predecessors.values())
    seen.clear()
    bench.time_methods({n: source(n) for n in names}, batches, repeats=6, budget=float("inf"), threads=1)
    assert seen[6:] == timed  # the same seed, the same order

    seen.clear()
    calls = bench.time_methods({n: source(n) for n in "ab"}, batches, repeats=3, budget=0.0, threads=1)
    assert [len(v) for v in calls.values()] == [3, 3]  # past the budget: the first round only


def test_timing_limits_blas_threads_too(bench):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    inside = []

    def make(images, target):
        inside.extend(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")
        return images[:, 0]

    before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    bench.time_methods({"a": make}, [(torch.zeros(2, 3, 4, 4), torch.zeros(2))], repeats=1, budget=1.0, threads=1)
    assert set(inside) == ({1} if before else set())  # numpy's SVD (EigenCAM): as many threads as torch
    assert [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"] == before


def test_baselines_run_the_classifier_once(bench):
    passes = []

    def classifier(images):
        passes.append(len(images))
        return SimpleNamespace(logits=torch.zeros(len(images), 2), activations={"layer4": images})

    lazy = bench.OnDemandOutput(classifier, torch.zeros(2, 3, 4, 4))
    assert passes == []  # a baseline that runs the classifier itself pays no extra pass
    assert lazy.logits.shape == (2, 2) and lazy.activations["layer4"].shape == (2, 3, 4, 4)
    assert passes == [2]  # computed once, when first read


def _results(lcam_ms, other_ms, fm_ms=None):
    calls = {"lcam_img": [t / 1e3 for t in lcam_ms], "lcam_fm": [t / 1e3 for t in fm_ms or lcam_ms]}
    calls["gradcam"] = [t / 1e3 for t in other_ms]
    calls["random"] = [1e-6] * len(lcam_ms)
    methods = {n: {"timing": {"16": bench_spread(v)}} for n, v in calls.items()}
    titles = {"lcam_img": "L-CAM-Img", "lcam_fm": "L-CAM-Fm", "gradcam": "Grad-CAM", "random": "random map"}
    return {"methods": methods, "titles": titles, "timing": {"sizes": {"16": {"calls": calls}}}}


def bench_spread(values):
    import statistics

    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "calls": len(values)}


def test_fastest_line_weighs_the_spread(bench):
    line = bench.fastest_line(_results([1.0, 1.1, 0.9, 1.0], [2.0, 2.1, 1.9, 2.2]), "16")
    assert line.startswith("batches of 16: L-CAM (L-CAM-Img)") and "Grad-CAM" in line
    assert line.endswith("L-CAM fastest PASS")
    miss = bench.fastest_line(_results([2.0, 2.1, 1.9, 2.2], [1.0, 1.1, 0.9, 1.0]), "16")
    assert miss.endswith("L-CAM fastest MISS")
    # a median win that the paired ratios do not carry: a tie, not a pass
    tie = bench.fastest_line(_results([1.0, 1.2, 1.0, 1.1], [1.1, 1.0, 1.3, 1.1]), "16")
    assert tie.endswith("L-CAM fastest TIE (within the run-to-run spread)")
    # a win on every call, but smaller than the gap between the two L-CAM variants (the same computation): a tie
    small = bench.fastest_line(_results([1.0] * 4, [1.05] * 4, fm_ms=[1.1] * 4), "16")
    assert "margin of 0.09" in small and small.endswith("L-CAM fastest TIE (within the run-to-run spread)")


def test_class_maps_benchmark_small(tmp_path, cache_dir):
    root = ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    args = [
        sys.executable,
        "benchmarks/class_maps.py",
        "--small",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(cache_dir),
    ]
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| L-CAM-Img |", "| L-CAM-Fm |", "| CE-FAM fused class map |", "| Grad-CAM |", "| random map |"):
        assert row in out, row
    assert "deletion ↓" in out and "ROAD MoRF ↓" in out
    # timed one image per call (explaining one image) and in the scoring's batches, a verdict for each
    assert "ms / image, 1 image per call (IQR)" in out and "ms / image, batches of 4 (IQR)" in out
    verdicts = ("PASS", "MISS", "TIE (within the run-to-run spread)")
    for prefix in ("1 image per call: L-CAM", "batches of 4: L-CAM"):
        line = next(line for line in out.splitlines() if line.startswith(prefix))
        assert any(line.endswith(f"L-CAM fastest {v}") for v in verdicts), line
    results = json.loads((tmp_path / "class_maps.json").read_text())
    assert results["images"] == 8
    assert all(set(r["seconds_per_image"]) == {"1", "4"} for r in results["methods"].values())
    assert all(t > 0 for r in results["methods"].values() for t in r["seconds_per_image"].values())
    timing = results["timing"]
    assert timing["threads"] == 1
    assert [(t["batches"], t["images_per_batch"]) for t in timing["sizes"].values()] == [(8, 1), (2, 4)]
    # every method timed on the same calls (no budget reached at this size)
    for t in timing["sizes"].values():
        assert {len(v) for v in t["calls"].values()} == {t["batches"] * timing["repeats"]}
