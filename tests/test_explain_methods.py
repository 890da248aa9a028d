"""``explain`` and ``evaluate`` on L-CAM and SIAM checkpoints: one command for every method, told apart by the
checkpoint (``checkpoint_kind``)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.explain import main as explain_main
from cefam_lightning.methods.base import load_explainer
from cefam_lightning.methods.checkpoints import CheckpointError, read_checkpoint
from cefam_lightning.methods.lcam.module import LCAMModule
from cefam_lightning.methods.siam.module import SIAMModule
from cefam_lightning.metrics.functional.faithfulness import faithfulness_probabilities
from cefam_lightning.reporting.explanations import ExplainError, explain_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tiny_world, tmp_path_factory) -> Path:
    """Three test-split images as PNG files and one unreadable file, in one folder."""
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(np.array(tiny_world.split("test").images[:3])):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _images(folder: Path, names=("img0", "img1", "img2")) -> torch.Tensor:
    arrays = [np.array(Image.open(folder / f"{n}.png").convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_the_checkpoint_says_which_method_wrote_it(tiny_checkpoint, tiny_method_run, tmp_path):
    assert load_explainer(tiny_checkpoint).method == "cefam"
    for method, cls in (("lcam_img", LCAMModule), ("lcam_fm", LCAMModule), ("siam", SIAMModule)):
        ckpt = tiny_method_run(method)["best_checkpoint"]
        module = load_explainer(ckpt)
        assert module.method == method and isinstance(module, cls)
        assert read_checkpoint(ckpt)["hyper_parameters"]["arch"]["method"] == method  # one marker on disk
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("no checkpoint\n")
    with pytest.raises(CheckpointError, match=f"{garbage}: not an explainer checkpoint"):
        load_explainer(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": {"kind": "unet"}}}, foreign)
    with pytest.raises(CheckpointError, match="record no explainer architecture"):
        load_explainer(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_explainer(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("method", ["lcam_img", "lcam_fm"])
def test_explain_an_lcam_checkpoint_writes_its_class_map_and_kept_probabilities(
    method, tiny_method_run, image_folder, tmp_path
):
    ckpt = tiny_method_run(method)["best_checkpoint"]
    out = tmp_path / "out"
    summary = explain_main(["--checkpoint", ckpt, "--out", str(out), str(image_folder)])
    assert summary["method"] == method and [Path(f["image"]).name for f in summary["failed"]] == ["broken.png"]
    assert len(summary["explained"]) == 3
    module = LCAMModule.from_checkpoint(ckpt)
    images = _images(image_folder)
    logits = module.classifier(images).logits
    maps = module.class_maps(images)  # the predicted class's map
    y, o = faithfulness_probabilities(module.classifier, images, maps, logits.argmax(1))
    classes = list(module.hparams.class_names)
    for i in range(3):
        folder = out / f"img{i}"
        report = json.loads((folder / "report.json").read_text())
        assert report["method"] == method and report["layer"] == module.layer
        assert report["predicted_class"] == classes[int(logits[i].argmax())]
        assert report["explained_probability"] == pytest.approx(float(logits[i].softmax(0).max()), abs=1e-5)
        stored = np.load(folder / "regions.npz")["class_map"].astype(np.float32)
        np.testing.assert_allclose(stored, maps[i].numpy(), atol=1e-3)
        kept = report["class_map"]["probability_kept"]
        assert list(kept) == ["100%", "50%", "15%"]
        assert list(kept.values()) == pytest.approx(o[i].tolist(), abs=1e-5)
        drop = report["class_map"]["drop_kept"]["15%"]
        assert drop == pytest.approx(max(0.0, float(y[i] - o[i, 2])) / float(y[i]), abs=1e-5)
        figure = Image.open(io.BytesIO((folder / "figure.png").read_bytes()))
        assert figure.format == "PNG" and figure.size[0] > 300


def test_explain_a_siam_checkpoint_reports_every_attribute_and_draws_the_top_ones(
    tiny_method_run, image_folder, tmp_path
):
    ckpt = tiny_method_run("siam")["best_checkpoint"]
    out = tmp_path / "out"
    target = "red circle"
    summary = explain_images(ckpt, [image_folder], top_n=3, target=target, out_dir=out)
    assert summary["method"] == "siam" and len(summary["failed"]) == 1
    module = SIAMModule.from_checkpoint(ckpt)
    images = _images(image_folder)
    classes = list(module.hparams.class_names)
    ex = module.explain(images, classes.index(target))
    names = list(module.hparams.attribute_names)
    for i in range(3):
        report = json.loads((out / f"img{i}" / "report.json").read_text())
        maps = np.load(out / f"img{i}" / "regions.npz")
        assert report["explained_class"] == target
        attributes = report["attributes"]
        assert sorted(a["name"] for a in attributes) == sorted(names)
        magnitudes = [abs(a["contribution"]) for a in attributes]
        assert magnitudes == sorted(magnitudes, reverse=True)
        # The contributions and the bias sum to the explained class's logit.
        total = sum(a["contribution"] for a in attributes) + report["bias"]
        assert total == pytest.approx(float(ex.logits[i, classes.index(target)]), abs=1e-4)
        drawn = [a for a in attributes if "region" in a]
        assert [a["name"] for a in drawn] == [a["name"] for a in attributes[:3]]
        for a in drawn:
            j = names.index(a["name"])
            stored = maps[a["region"].split(":", 1)[1]].astype(np.float32)
            np.testing.assert_allclose(stored, ex.maps[i, j].numpy(), atol=2e-3, rtol=2e-3)
            assert a["presence_probability"] == pytest.approx(float(ex.presence_probs[i, j]), abs=1e-6)
        np.testing.assert_allclose(maps["class_map"].astype(np.float32), ex.class_map[i].numpy(), atol=2e-3, rtol=2e-3)
        assert (out / f"img{i}" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_rejects_cefam_options_for_other_methods(tiny_method_run, image_folder, tmp_path, capsys):
    ckpt = tiny_method_run("siam")["best_checkpoint"]
    with pytest.raises(ExplainError, match=r"--concepts: not an option of SIAM checkpoints \(siam\); .* takes --top-n"):
        explain_images(ckpt, [image_folder], concepts="red", out_dir=tmp_path)
    with pytest.raises(SystemExit) as exc:
        explain_main(
            ["--checkpoint", tiny_method_run("lcam_img")["best_checkpoint"], "--concepts", "red", str(image_folder)]
        )
    assert exc.value.code == 2 and "not an option of L-CAM-Img checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lcam_img", "siam"])
def test_evaluate_command_evaluates_lcam_and_siam_checkpoints(method, tiny_method_run, tmp_path, capsys):
    run = tiny_method_run(method)
    out = tmp_path / "ev"
    results = evaluate_main(["--checkpoint", run["best_checkpoint"], "--max-images", "20", "--out", str(out)])
    assert results["method"] == method and json.loads((out / "evaluation.json").read_text()) == results
    table = (out / "evaluation.md").read_text()
    assert table in capsys.readouterr().out
    if method == "siam":
        assert results["n_images"] == 20 and "attribute-presence AUROC" in table
        assert {"attr_auroc", "siam_acc", "classifier_acc", "top_attr_is_key"} <= set(results)
    else:
        assert results["images"] == 20 and set(results["methods"]) == {method, "gradcam", "random"}
        assert "| L-CAM-Img |" in table and "| Grad-CAM |" in table
    # Same numbers as the run's own test-stage evaluation, on the same images.
    if method == "siam":
        full = evaluate_main(["--checkpoint", run["best_checkpoint"], "--out", str(tmp_path / "full")])
        assert full["attr_auroc"] == pytest.approx(run["evaluation"]["attr_auroc"], abs=1e-6)


def test_evaluate_rejects_cefam_options_for_other_methods(tiny_method_run, tmp_path, capsys):
    ckpt = tiny_method_run("lcam_img")["best_checkpoint"]
    # (--data is every method's now: L-CAM evaluates on data too; --per-layer-contributions is CE-FAM's)
    for extra in (["--k", "5"], ["--select-layers", "all"], ["--per-layer-contributions"]):
        with pytest.raises(SystemExit) as exc:
            evaluate_main(["--checkpoint", ckpt, *extra, "--out", str(tmp_path / "ev")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and "of L-CAM-Img checkpoints" in err[0] and extra[0] in err[0]
    assert not (tmp_path / "ev").exists()


def test_cli_scripts_accept_every_method(tiny_method_run, image_folder, tmp_path):
    """``python explain.py`` and ``python evaluate.py`` from the repository root (what the README shows)."""
    import subprocess

    ckpt = tiny_method_run("lcam_fm")["best_checkpoint"]
    args = [
        sys.executable,
        "explain.py",
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp_path / "ex"),
        str(image_folder / "img0.png"),
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ex" / "img0" / "figure.png").is_file()
