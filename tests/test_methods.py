"""The method interface: a new method is one registration (here a toy one, in this file alone) that train.py,
explain.py and evaluate.py run unchanged; checkpoints written before the registry still load, explain and
evaluate; and nothing outside the method packages asks which method it has."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.explain import main as explain_main
from cefam_lightning.cli.train import main as train_main
from cefam_lightning.methods.base import constructor_kwargs, load_explainer
from cefam_lightning.methods.class_map import ClassMapExplainer
from cefam_lightning.methods.registry import method_names, register_method, unregister_method
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


class ToyCAM(ClassMapExplainer):
    """A toy explainer: a 1x1 conv on the classifier's last layer whose class maps, globally pooled, learn to
    give the classifier's prediction (a plain CAM). Everything else it inherits from the class-map family."""

    def __init__(self, classifier, class_names, lr: float = 0.01, config=None, method: str = "toy_cam"):
        super().__init__()
        self.save_hyperparameters(ignore=["classifier", "method"])
        self.classifier = classifier
        channels = classifier.layer_shapes()[classifier.layers[-1]][0]
        self.head = nn.Conv2d(channels, len(class_names), kernel_size=1)
        self.record_arch(method, classifier, head={"in_channels": channels})

    @property
    def map_layer(self) -> str:
        return self.classifier.layers[-1]

    def class_maps_at_layer(self, images):
        with torch.no_grad():
            out = self.classifier(images)
        return out, self.head(out.activations[self.map_layer].float())

    def model_step(self, batch, stage):
        out, maps = self.class_maps_at_layer(batch["image"])
        loss = F.cross_entropy(maps.mean(dim=(2, 3)), out.logits.argmax(dim=1))
        return SimpleNamespace(loss=loss, batch_size=batch["image"].shape[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.hparams.lr)

    @classmethod
    def from_arch(cls, arch, classifier, hparams):
        return cls(classifier, **constructor_kwargs(cls, hparams))


def _build(ctx, spec):
    return ToyCAM(ctx.classifier, ctx.class_names, config=OmegaConf.to_container(ctx.cfg), method=spec.name)


@pytest.fixture
def toy_method():
    register_method("toy_cam", ToyCAM, title="Toy CAM", build=_build)
    yield "toy_cam"
    unregister_method("toy_cam")


def _image(tiny_world, path: Path) -> Path:
    Image.fromarray(np.asarray(tiny_world.split("test").images[0])).save(path)
    return path


def test_a_fifth_method_registered_here_trains_explains_and_evaluates(
    toy_method, cache_dir, tiny_world, tmp_path, capsys
):
    assert toy_method in method_names()
    metrics = train_main([*tiny_overrides(cache_dir, tmp_path, "toy", method=toy_method), "demo.num_figures=0"])
    assert metrics["method"] == "toy_cam" and metrics["epochs_trained"] == 1
    assert set(metrics["evaluation"]["methods"]) == {"toy_cam", "gradcam", "random"}  # the family's evaluation
    assert "| Toy CAM |" in capsys.readouterr().out  # its title in the run's table
    ckpt = metrics["best_checkpoint"]
    assert isinstance(load_explainer(ckpt), ToyCAM)

    summary = explain_main(
        ["--checkpoint", ckpt, "--out", str(tmp_path / "ex"), str(_image(tiny_world, tmp_path / "a.png"))]
    )
    report = json.loads((Path(summary["explained"][0]["folder"]) / "report.json").read_text())
    assert report["method"] == "toy_cam" and report["class_map"]["region"] == "regions.npz:class_map"
    results = evaluate_main(["--checkpoint", ckpt, "--max-images", "8", "--out", str(tmp_path / "ev")])
    assert results["method"] == "toy_cam" and results["images"] == 8
    # Its options are its own: CE-FAM's are refused, naming the method.
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", ckpt, "--k", "5"])
    assert "--k: not an option of Toy CAM checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["cefam", "lcam_img", "siam"])
def test_checkpoints_written_before_the_registry_load_explain_and_evaluate(method, cache_dir, tiny_world, tmp_path):
    ckpt = LEGACY / f"{method}.ckpt"
    module = load_explainer(ckpt)
    assert module.method == method and module.hparams["arch"]["method"] == method
    image = _image(tiny_world, tmp_path / "a.png")
    summary = explain_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ex"), str(image)])
    assert summary["method"] == method and len(summary["explained"]) == 1
    results = evaluate_main(
        ["--checkpoint", str(ckpt), "--cache-dir", str(cache_dir), "--max-images", "8", "--out", str(tmp_path / "ev")]
    )
    assert results["method"] == method
    if method == "cefam":  # its explanation settings came from the run's evaluation section, where they were then
        assert module.explain_defaults() == {
            "k": 20,
            "fill": "spatial_mean",
            "select_layers": "auto",
            "gradient": "direct",  # the rules they were computed with
            "region_weights": "signed",
            "relevance": "paper",
            "contribution_layer": "selected",
        }
        assert results["settings"]["k"] == 20


def test_no_method_name_is_branched_on_outside_the_method_packages():
    """The CLIs, the training run, the callbacks and the reporting layer look a method up; they never compare
    its name (the method packages and the registry are where names live)."""
    pattern = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](cefam|lcam|lcam_fm|lcam_img|siam)["']""")
    places = [*(ROOT / "cefam_lightning").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")]
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in places
        if "methods" not in p.relative_to(ROOT).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
