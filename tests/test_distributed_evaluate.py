"""``evaluate.py`` on 2 CPU processes (gloo): the ranks split the images, the metrics' sums are gathered before the
tables are computed, and the tables are a one-process run's, on the shapes world (``--devices 2``, Lightning Fabric
starts the second process) and on a mask dataset (``--data``, under ``torchrun``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cefam_lightning.cli.evaluate import main
from cefam_lightning.data.toy_data import write_toy_data

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log
    return log


def assert_same_evaluation(one: Path, two: Path) -> None:
    """The same tables, and every number of evaluation.json but the time equal (to 1e-4, as across batch sizes:
    float32 convolutions round differently in a batch of other images, which can reorder near-tied pixels)."""
    assert (two / "evaluation.md").read_text() == (one / "evaluation.md").read_text()
    a, b = (_flat(json.loads((d / "evaluation.json").read_text())) for d in (one, two))
    for r in (a, b):
        r.pop("seconds/"), r.pop("processes/", None)
    assert b.keys() == a.keys()
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), key


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}/").items()}
    return {prefix: obj}


def test_world_evaluation_on_two_processes_equals_one(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--batch-size", "8", "--max-images", "12"]
    main([*args, "--out", str(tmp_path / "one")])
    log = _run([sys.executable, str(REPO / "evaluate.py"), *args, "--out", str(tmp_path / "two"), "--devices", "2"])
    assert log.count("written: ") == 1  # rank 0 writes
    assert json.loads((tmp_path / "two" / "evaluation.json").read_text())["processes"] == 2
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")


def test_mask_dataset_evaluation_under_torchrun_equals_one_process(tiny_checkpoint, tmp_path):
    toy = write_toy_data(tmp_path / "toy", n_train=1, n_val=1, image_size=32, per_shard=1, n_broden=9)
    args = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--data", str(toy / "broden"), "--batch-size", "4"]
    main([*args, "--out", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    _run([*launcher, str(REPO / "evaluate.py"), *args, "--out", str(tmp_path / "two")])
    results = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert results["images"] == 9 and results["processes"] == 2
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")
