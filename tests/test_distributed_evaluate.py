"""``evaluate.py`` on 2 CPU processes (gloo): the ranks split the images, the metrics' sums are gathered before the
tables are computed, and the tables are a one-process run's, on the shapes world (``--devices 2``, Lightning Fabric
starts the second process) and on data (``--data``, under ``torchrun``), for every method (CE-FAM, L-CAM, SIAM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cefam_lightning.cli.evaluate import main
from cefam_lightning.data.toy_data import write_toy_data
from tests.cli import REPO, flat, run_ok


def assert_same_evaluation(one: Path, two: Path) -> None:
    """The same tables, and every number of evaluation.json but the time equal (to 1e-4, as across batch sizes:
    float32 convolutions round differently in a batch of other images, which can reorder near-tied pixels)."""
    assert (two / "evaluation.md").read_text() == (one / "evaluation.md").read_text()
    a, b = (flat(json.loads((d / "evaluation.json").read_text())) for d in (one, two))
    for r in (a, b):
        r.pop("seconds/", None), r.pop("processes/", None)
    assert b.keys() == a.keys()
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), key


def test_world_evaluation_on_two_processes_equals_one(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--batch-size", "8", "--max-images", "12"]
    main([*args, "--out", str(tmp_path / "one")])
    log = run_ok([sys.executable, str(REPO / "evaluate.py"), *args, "--out", str(tmp_path / "two"), "--devices", "2"])
    assert log.count("written: ") == 1  # rank 0 writes
    assert json.loads((tmp_path / "two" / "evaluation.json").read_text())["processes"] == 2
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")


def test_mask_dataset_evaluation_under_torchrun_equals_one_process(tiny_checkpoint, tmp_path):
    toy = write_toy_data(tmp_path / "toy", n_train=1, n_val=1, image_size=32, per_shard=1, n_broden=9)
    args = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--data", str(toy / "broden"), "--batch-size", "4"]
    main([*args, "--out", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    run_ok([*launcher, str(REPO / "evaluate.py"), *args, "--out", str(tmp_path / "two")])
    results = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert results["images"] == 9 and results["processes"] == 2
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")


def _same_on_two_processes(tmp_path, name: str, args: list[str], torchrun: bool) -> dict:
    """``evaluate.py args`` on one process (in this one) and on two (under torchrun, else ``--devices 2``): the
    same evaluation. This process runs on one thread as the launched ones do (OMP_NUM_THREADS=1): other thread counts
    sum convolutions in another order, which moves near-tied pixels across the faithfulness thresholds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*args, "--out", str(tmp_path / f"{name}1")])
    finally:
        torch.set_num_threads(threads)
    two = [*args, "--out", str(tmp_path / f"{name}2")]
    run_ok(
        [*TORCHRUN, str(REPO / "evaluate.py"), *two] if torchrun else [PYTHON, "evaluate.py", *two, "--devices", "2"]
    )
    results = json.loads((tmp_path / f"{name}2" / "evaluation.json").read_text())
    assert results["processes"] == 2
    assert_same_evaluation(tmp_path / f"{name}1", tmp_path / f"{name}2")
    return results


PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_lcam_evaluation_on_two_processes_equals_one(tiny_method_run, tmp_path):
    """On the world and on class masks (toy data, under torchrun). The ranks' parts fall on batch boundaries (8
    images in batches of 4; 7 in batches of 3: parts of 3 and 4), so every batch holds the images it holds on one
    process: Grad-CAM's maps at a 4 x 4 layer, upsampled, have near-tied pixels that float32 orders differently in
    a batch of other images, which moves the 50 / 15 % faithfulness by more than the tolerance (as a batch size
    does on one process)."""
    ckpt = tiny_method_run("lcam_img")["best_checkpoint"]
    common = ["--checkpoint", ckpt, "--device", "cpu"]
    world_args = [*common, "--max-images", "8", "--batch-size", "4"]
    world = _same_on_two_processes(tmp_path, "world", world_args, torchrun=False)
    assert world["images"] == 8
    toy = write_toy_data(tmp_path / "toy", n_train=1, n_val=7, image_size=32, per_shard=4, n_broden=1)
    data_args = [*common, "--data", str(toy / "masks"), "--batch-size", "3"]
    data = _same_on_two_processes(tmp_path, "data", data_args, torchrun=True)
    assert data["images"] == 7 and data["class_masks"] == 7


def test_siam_evaluation_on_two_processes_equals_one(tiny_method_run, tmp_path):
    """On the world (presence AUROC, accuracies, attribute maps' region metrics, class-map NRA) and on data with an
    attribute table (toy data, under torchrun)."""
    ckpt = tiny_method_run("siam")["best_checkpoint"]
    common = ["--checkpoint", ckpt, "--device", "cpu", "--batch-size", "4"]
    world = _same_on_two_processes(tmp_path, "world", [*common, "--max-images", "11"], torchrun=False)
    assert world["n_images"] == 11
    toy = write_toy_data(tmp_path / "toy", n_train=1, n_val=7, image_size=32, per_shard=4, n_broden=1)
    data_args = ["--data", str(toy / "val.csv"), "--attributes", str(toy / "attributes.csv")]
    data = _same_on_two_processes(tmp_path, "data", [*common, *data_args], torchrun=True)
    assert data["n_images"] == 7 and data["n_labeled"] == 7
