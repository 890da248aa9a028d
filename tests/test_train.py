import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cefam_lightning.cli.train import main
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec
from cefam_lightning.methods.cefam.module import CEFAMModule
from tests.conftest import TINY_WORLD, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_train_py_fast_dev_run(tmp_path, cache_dir):
    """The entry point a user runs, as a user runs it."""
    args = [sys.executable, "train.py", "trainer.fast_dev_run=true", *tiny_overrides(cache_dir, tmp_path, "fdr")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CE-FAM on the shapes world" in proc.stdout
    run = tmp_path / "fdr"
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()


def test_training_run_writes_a_self_describing_folder(tmp_path, cache_dir):
    metrics = main(tiny_overrides(cache_dir, tmp_path, "run"))
    run = tmp_path / "run"
    # The resolved config, readable back with the overrides applied.
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.world.image_size == 32 and cfg.cache_dir == str(cache_dir)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("test/classifier_acc", "test/concept_auroc", "test/cosine", "test/loss"):
        assert np.isfinite(metrics["test"][key]), key
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "figures").glob("*.png"))) == 2

    # The best checkpoint rebuilds the module and reproduces the reported test cosine.
    module = CEFAMModule.from_checkpoint(metrics["best_checkpoint"])
    world = ShapesWorld.build(WorldSpec(**TINY_WORLD), cache_dir)
    test = world.split("test")
    images = torch.from_numpy(np.array(test.images)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(np.asarray(world.store.image_embeddings[world.store.rows_for(test.ids)]))
    with torch.no_grad():
        cos = F.cosine_similarity(module(images)["embedding"], target, dim=-1).mean().item()
    assert abs(cos - metrics["test"]["test/cosine"]) < 1e-4


def test_two_process_ddp_on_cpu_writes_one_run_folder(tmp_path, cache_dir, tiny_classifier_weights):
    """Lightning's DDP launcher re-runs train.py for rank 1; both ranks must share one timestamped run folder."""
    overrides = [o for o in tiny_overrides(cache_dir, tmp_path, "unused") if not o.startswith("run_name=")]
    args = [sys.executable, "train.py", "run_name=null", "trainer.devices=2", "trainer.strategy=ddp", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "CEFAM_RUN_NAME"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs
    assert proc.stdout.count("CE-FAM on the shapes world") == 1  # the summary comes from rank zero only
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["test/cosine"])
    assert len(list((runs[0] / "figures").glob("*.png"))) == 2
    assert (runs[0] / "evaluation" / "evaluation.json").is_file()  # evaluated once, by rank zero


def test_warm_cache_run_reproduces_a_cold_cache_run(tmp_path):
    """Fitting the classifier (cold cache) must not shift the random state the CE-FAM branch trains with."""
    cache = tmp_path / "fresh_cache"
    cold = main(tiny_overrides(cache, tmp_path / "out", "cold"))
    warm = main(tiny_overrides(cache, tmp_path / "out", "warm"))
    assert "val_acc" in cold["classifier"]  # the first run did fit the classifier
    assert cold["test"] == warm["test"]


def test_training_without_any_logger(tmp_path, cache_dir):
    metrics = main([*tiny_overrides(cache_dir, tmp_path, "nolog"), "logger.kinds=[]", "evaluation.enabled=false"])
    run = tmp_path / "nolog"
    assert metrics["epochs_trained"] == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "logs").exists()
