"""benchmarks/class_maps.py (README: Class-map baselines and faithfulness) runs its --small path: three tiny
trained runs, every compared map in one table, and the fastest-method line."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_class_maps_benchmark_small(tmp_path, cache_dir):
    root = Path(__file__).resolve().parents[1]
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
    assert "deletion ↓" in out and "ROAD MoRF ↓" in out and "s / image" in out
    assert "L-CAM fastest PASS" in out or "L-CAM fastest MISS" in out
    results = json.loads((tmp_path / "class_maps.json").read_text())
    assert results["images"] == 8 and all(r["seconds_per_image"] > 0 for r in results["methods"].values())
