"""Training operations through train.py: resume, a killed run, checkpoint identity, fine-tuning, W&B offline,
the training callbacks, 2-process DDP against one process, and the other methods (L-CAM, SIAM)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from cefam_lightning.cli.train import main
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.shapes_world import WorldSpec
from cefam_lightning.methods.cefam.module import CEFAMModule, CheckpointMismatchError, init_translator_from
from cefam_lightning.methods.checkpoints import read_checkpoint
from tests.cli import cli_error
from tests.conftest import TINY_WORLD, tiny_overrides
from tests.wandb_offline import read_offline_wandb_run

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["evaluation.enabled=false", "demo.num_figures=0"]


def _overrides(cache_dir, out, name, *extra):
    return [*tiny_overrides(cache_dir, out, name), *QUIET, *extra]


def _translator(ckpt) -> dict[str, torch.Tensor]:
    state = read_checkpoint(ckpt)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("translator.")}


def _assert_same_weights(a, b):
    wa, wb = _translator(a), _translator(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def two_epochs(cache_dir, tiny_classifier_weights, tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference of the resume tests."""
    out = tmp_path_factory.mktemp("ops")
    return main(_overrides(cache_dir, out, "full", "trainer.max_epochs=2")), out


def test_one_epoch_resumed_for_one_more_equals_two_epochs(two_epochs, cache_dir):
    full, out = two_epochs
    main(_overrides(cache_dir, out, "split", "trainer.max_epochs=1"))
    resumed = main(_overrides(cache_dir, out, "split", "trainer.max_epochs=2", "ckpt_path=last"))
    assert resumed["epochs_trained"] == full["epochs_trained"] == 2
    _assert_same_weights(out / "full" / "checkpoints" / "last.ckpt", out / "split" / "checkpoints" / "last.ckpt")
    assert resumed["test"] == pytest.approx(full["test"], rel=1e-5, abs=1e-6)


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint(two_epochs, cache_dir):
    full, out = two_epochs
    # 64 training images in batches of 16: 4 steps an epoch; killed (SIGKILL, nothing cleaned up) at step 6, in the
    # middle of the second epoch, after the first epoch's last.ckpt was written.
    script = textwrap.dedent(
        f"""
        import os, signal, lightning as L
        from cefam_lightning.training.config import load_config
        from cefam_lightning.training.run import run

        class Kill(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == 6:
                    os.kill(os.getpid(), signal.SIGKILL)

        run(load_config(None, {_overrides(cache_dir, out, "killed", "trainer.max_epochs=2")!r}), [Kill()])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "killed" / "metrics.json").exists()
    last = read_checkpoint(out / "killed" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0  # the end of the first epoch
    resumed = main(_overrides(cache_dir, out, "killed", "trainer.max_epochs=2", "ckpt_path=last"))
    assert resumed["test"] == pytest.approx(full["test"], rel=1e-4, abs=1e-5)
    _assert_same_weights(out / "full" / "checkpoints" / "last.ckpt", out / "killed" / "checkpoints" / "last.ckpt")


def test_resuming_with_another_setup_says_what_differs(two_epochs, cache_dir, tiny_spec, capsys):
    _, out = two_epochs
    ckpt = out / "full" / "checkpoints" / "last.ckpt"
    other = _overrides(cache_dir, out, "other", f"ckpt_path={ckpt}", "classifier.layers=[layer3,layer4]")
    assert re.search(r"classifier\.layers: checkpoint \['layer1'", cli_error(main, other, capsys))
    with pytest.raises(CheckpointMismatchError, match=r"classifier\.layers: checkpoint \['layer1'"):
        main(["--debug", *other])
    fresh = _overrides(cache_dir, out, "fresh", "ckpt_path=last")
    assert re.search("ckpt_path: no checkpoint at .*fresh.*last.ckpt", cli_error(main, fresh, capsys))
    identity = read_checkpoint(ckpt)["cefam_identity"]
    assert identity["classifier"]["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert identity["vlm"]["name"] == "shapes-oracle" and identity["concepts"]["count"] == tiny_spec.num_concepts


def test_fine_tuning_starts_from_a_trained_branch(two_epochs, cache_dir, capsys):
    full, out = two_epochs
    source = full["best_checkpoint"]
    trained = _translator(source)
    # Same classifier and VLM, new layers: the first linear layer (and the input standardization) start fresh.
    new = main(_overrides(cache_dir, out, "ft", f"cefam.init_from={source}", "classifier.layers=[layer3,layer4]"))
    assert "trained anew (their shape changed)" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor(new["test"]["test/cosine"]))

    module = CEFAMModule.from_checkpoint(source)
    fresh = CEFAMModule.from_checkpoint(source)
    for p in fresh.translator.parameters():
        torch.nn.init.normal_(p)
    report = init_translator_from(fresh, source)
    assert not report.reinitialized and len(report.loaded) == len(module.translator.state_dict())
    for key, value in fresh.translator.state_dict().items():
        torch.testing.assert_close(value, trained[f"translator.{key}"])

    # A new domain with a new classifier (other classes: the shapes CNN is fitted anew), same VLM and concepts:
    # every translator tensor fits and is loaded.
    classes = "world.classes=[red square,blue circle,yellow triangle]"
    main(_overrides(cache_dir, out, "ft_domain", f"cefam.init_from={source}", classes, "trainer.max_epochs=1"))
    said = capsys.readouterr().out
    assert f"translator initialized from {source}: {len(trained)} tensor(s) loaded\n" in said

    # Another VLM's embedding space (here: the oracle's embedding size) is refused, naming what differs.
    other_vlm = _overrides(cache_dir, out, "ft2", f"cefam.init_from={source}", "world.embed_dim=24")
    assert "vlm.embed_dim: checkpoint 32, this run 24" in cli_error(main, other_vlm, capsys)


@pytest.mark.usefixtures("wandb_sandbox")
def test_wandb_offline_run_holds_losses_region_maps_and_contribution_table(cache_dir, tmp_path, caplog):
    pytest.importorskip("wandb")
    caplog.set_level(logging.WARNING, logger="cefam_lightning.training.loggers")
    every = ["callbacks.region_maps.every_n_epochs=1", "callbacks.contributions.every_n_epochs=1"]
    cb = [*every, "callbacks.region_metrics.every_n_epochs=1", "callbacks.contributions.num_images=8"]
    wandb = ["logger.kinds=[csv,wandb]", "trainer.log_every_n_steps=1"]
    metrics = main(_overrides(cache_dir, tmp_path, "wb", *wandb, *cb))
    said = [r.getMessage() for r in caplog.records if "logging offline" in r.getMessage()]
    assert len(said) == 1 and "no W&B API key" in said[0]
    record = json.loads((tmp_path / "wb" / "run.json").read_text())
    assert record["loggers"]["wandb"]["mode"] == "offline"
    assert record["loggers"]["wandb"]["sync"].startswith("wandb sync ")
    assert record["code_version"]["package_version"] == "0.1.0"

    run = read_offline_wandb_run(tmp_path / "wb", wait_s=20)
    keys = {k for row in run["history"] for k in row}
    assert {"train/loss_step", "val/loss", "val/nra_mean"} <= keys
    losses = [row["val/loss"] for row in run["history"] if "val/loss" in row]
    assert losses[-1] == pytest.approx(metrics["best_val_loss"], rel=1e-5)
    assert run["config"]["cefam"]["lambda_sim"] == 0.001 and "code_version" in run["config"]
    assert any(f.startswith("media/images/val/region_maps") for f in run["files"])
    assert any(f.startswith("media/table/val/contributions") for f in run["files"])
    assert not (tmp_path / "wb" / "images").exists()  # the images went to W&B, not to files


def test_without_image_loggers_the_callbacks_write_files_into_the_run(cache_dir, tmp_path):
    cb = ["callbacks.region_maps.every_n_epochs=1", "callbacks.contributions.every_n_epochs=1"]
    main(_overrides(cache_dir, tmp_path, "files", *cb, "callbacks.contributions.num_images=8"))
    run = tmp_path / "files"
    assert len(list((run / "images" / "val" / "region_maps").glob("epoch_000_*.png"))) == 4
    (table,) = (run / "tables" / "val" / "contributions").glob("epoch_000.csv")
    assert table.read_text().startswith("class,images,positive_1")
    record = json.loads((run / "run.json").read_text())
    assert str(table) in record["images_and_tables"]


@pytest.mark.slow  # about 15 s on 2 CPU cores (two processes)
def test_ddp_metrics_equal_one_process_on_the_same_data_and_rank_zero_writes(cache_dir, tmp_path, tiny_spec):
    cb = ["callbacks.region_maps.every_n_epochs=1", "callbacks.region_metrics.every_n_epochs=1"]
    args = [sys.executable, "train.py", "trainer.devices=2", "trainer.strategy=ddp", "run_name=ddp"]
    args += [a for a in _overrides(cache_dir, tmp_path, "ddp", *cb) if not a.startswith("run_name=")]
    env = {k: v for k, v in os.environ.items() if k != "CEFAM_RUN_NAME"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".lock", "checkpoints", "config.yaml", "figures", "images", "logs", "metrics.json", "run.json"]
    )
    assert len(list((run / "images" / "val" / "region_maps").iterdir())) == 4  # one rank's figures, not two
    assert (run / "logs" / "metrics.csv").read_text().count("\n") > 1

    # The DDP test metrics (each rank tested half of the 32 test images, synced) equal one process on all of them.
    module = CEFAMModule.from_checkpoint(metrics["best_checkpoint"])
    dm = ShapesWorldDataModule(WorldSpec(**TINY_WORLD), cache_dir, batch_size=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(module, datamodule=dm, verbose=False)[0]
    for key in ("test/loss", "test/cosine", "test/concept_auroc", "test/classifier_acc"):
        assert metrics["test"][key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("method", ["lcam_img", "lcam_fm", "siam"])
def test_train_py_trains_and_evaluates_every_method(method, tiny_method_run):
    from cefam_lightning.methods.lcam.module import LCAMModule
    from cefam_lightning.methods.siam.module import SIAMModule

    metrics = tiny_method_run(method)
    run = Path(metrics["run_dir"])
    # The region-map callback renders each method's own maps: L-CAM's class map, SIAM's top attributes' maps.
    figures = sorted((run / "images" / "val" / "region_maps").glob("epoch_000_*.png"))
    assert len(figures) == 4
    caption = Image.open(figures[0]).info["Description"]
    assert ("class map (at layer4)" in caption) if method != "siam" else ("(contribution " in caption)
    assert not (run / "tables").exists()  # contribution tables are CE-FAM's
    assert metrics["method"] == method and json.loads((run / "metrics.json").read_text()) == metrics
    results = json.loads((run / "evaluation" / "evaluation.json").read_text())
    table = (run / "evaluation" / "evaluation.md").read_text()
    if method == "siam":
        module = SIAMModule.from_checkpoint(metrics["best_checkpoint"])
        assert 0 <= results["attr_auroc"] <= 1 and "attribute-presence AUROC" in table
        assert module.hparams.attribute_names[0] == "red"
        assert {"test/acc", "test/attr_auroc"} <= set(metrics["test"])
    else:
        module = LCAMModule.from_checkpoint(metrics["best_checkpoint"])
        assert module.variant == method.removeprefix("lcam_") and module.layer == "layer4"
        assert set(results["methods"]) == {method, "gradcam", "random"}
        assert "Grad-CAM" in table and "AD 100%" in table
        assert {"test/masked_acc", "test/mask_area"} <= set(metrics["test"])
    assert results == metrics["evaluation"]


def test_bf16_mixed_precision_trains_with_float32_weights_and_region_maps(cache_dir, tmp_path):
    cb = ["callbacks.region_maps.every_n_epochs=1", "callbacks.region_metrics.every_n_epochs=1"]
    metrics = main(_overrides(cache_dir, tmp_path, "bf16", "trainer.precision=bf16-mixed", *cb))
    assert torch.isfinite(torch.tensor(metrics["test"]["test/loss"]))
    weights = [w for w in _translator(metrics["best_checkpoint"]).values() if w.is_floating_point()]
    assert weights and all(w.dtype == torch.float32 for w in weights)
    assert len(list((tmp_path / "bf16" / "images" / "val" / "region_maps").glob("*.png"))) == 4
    module = CEFAMModule.from_checkpoint(metrics["best_checkpoint"])
    images = torch.rand(2, 3, TINY_WORLD["image_size"], TINY_WORLD["image_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = module.concept_regions(images, concepts=[0, 1], layers=["layer3"])
    assert maps["layer3"].dtype == torch.float32  # the Jacobian-based regions stay in float32 (SPEC, issue 5)
