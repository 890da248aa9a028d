"""benchmarks/fidelity.py (README: Fidelity to the authors' code) runs at a small size and prints every row the
fidelity table cites."""

import os
import subprocess
import sys
from pathlib import Path


def test_fidelity_benchmark_prints_its_rows():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "benchmarks/fidelity.py", "--images", "3", "--sizes", "64"]
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "vectorized = pixel loop" in out  # the re-implementation of the authors' NRA was checked first
    assert "their samples' total width 1.0298" in out  # 40 pixels at 1/4096 plus 102 samples at 1/100
    for row in (
        "cover 0%-5%",
        "cover 80%-100%",
        "cam 0.1",
        "blur 0.3",
        "random cam",
        "all",
        "NRA theirs > 1",
        "EPG ours",
        "a mask covering the whole image",
        "a constant map",
        "upsampling",
        "layer relevance",
        "contribution at layer3",
        "contribution at layer4 (whole-tensor mean)",
    ):
        assert row in out, row
    # The procedures compared with the authors' agree to float32 precision.
    for line in out.splitlines():
        if "max |ours - theirs|" in line:
            assert float(line.rsplit(" ", 1)[1]) < 1e-5, line
