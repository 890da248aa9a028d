"""Class-map baselines by name (methods/cam_baselines.py): the registry, the project's Grad-CAM against
pytorch-grad-cam's, the library's CAMs through the wrapper, RISE, and ``evaluate --baselines``."""

import importlib.util
import json

import pytest
import torch

from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.cam_baselines import (
    LIBRARY_CAMS,
    BaselineError,
    baseline_names,
    get_baseline,
    parse_baselines,
    rise_maps,
    rise_masks,
)
from cefam_lightning.methods.class_map import evaluate_class_maps, format_class_map_table, normalize_maps
from cefam_lightning.methods.lcam.module import build_lcam_module
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.models.classifier import build_classifier

HAS_LIBRARY = importlib.util.find_spec("pytorch_grad_cam") is not None
needs_library = pytest.mark.skipif(
    not HAS_LIBRARY, reason="pytorch-grad-cam is not installed (pip install -e '.[cams]')"
)
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def shapes_classifier(tiny_spec, tiny_classifier_weights):
    """The tiny world's trained shapes classifier, every layer wrapped."""
    return build_classifier(
        "shapes_cnn", len(tiny_spec.classes), LAYERS, weights=tiny_classifier_weights, image_size=32
    )


@pytest.fixture(scope="module")
def batch(tiny_world, shapes_classifier):
    images = next(iter(tiny_world.split("test").batches(4, 4, "cpu")))[0]
    out = shapes_classifier(images)
    return images, out, out.logits.argmax(1)


def test_registry_lists_the_project_and_library_baselines():
    names = baseline_names()
    assert names[0] == "gradcam" and "rise" in names
    assert {"gradcampp", "scorecam", "layercam", "eigencam", "xgradcam", "ablationcam", "hirescam", "fullgrad"} <= set(
        LIBRARY_CAMS
    )
    assert get_baseline("gradcam").requires is None and get_baseline("scorecam").source == "pytorch-grad-cam"


def test_unknown_names_are_refused_naming_the_value_and_the_choices():
    with pytest.raises(BaselineError, match=r"--baselines: unknown baseline 'gradcamm'; did you mean 'gradcam'\?"):
        parse_baselines("gradcam,gradcamm")
    with pytest.raises(BaselineError, match="choices: gradcam, gradcampp"):
        get_baseline("nope")
    with pytest.raises(BaselineError, match="no baseline named"):
        parse_baselines(" , ")
    assert parse_baselines("gradcam, rise,gradcam") == ("gradcam", "rise")


def test_a_missing_library_is_named_with_its_install_command(monkeypatch):
    import cefam_lightning.methods.cam_baselines as cams

    real = importlib.util.find_spec
    monkeypatch.setattr(cams.importlib.util, "find_spec", lambda name: None if name == cams.LIBRARY else real(name))
    with pytest.raises(BaselineError, match=r"'gradcampp' needs pytorch_grad_cam, which is not installed: pip install"):
        parse_baselines("gradcam,gradcampp")
    assert parse_baselines("gradcam,rise") == ("gradcam", "rise")  # the project's own need nothing


@needs_library
def test_project_gradcam_equals_pytorch_grad_cams_gradcam_on_the_shapes_classifier(shapes_classifier, batch):
    """At every layer of the trained shapes classifier, to 1e-5: the library min-max normalizes at the layer's
    resolution, resizes to the image (cv2, bilinear) and normalizes again; the project's map, normalized,
    upsampled and normalized the same way, is the same map."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cefam_lightning.methods.cam_baselines import LayerModel

    images, out, target = batch
    own = get_baseline("gradcam")(shapes_classifier, images, out, target, LAYERS)
    for layer in LAYERS:
        model = LayerModel(shapes_classifier, layer)
        with GradCAM(model=model, target_layers=[model.target]) as cam, torch.enable_grad():
            theirs = torch.from_numpy(cam(images, [ClassifierOutputTarget(int(t)) for t in target]))
        ours = minmax_normalize(normalize_maps(own[layer], images.shape[-2:]), dims=2)
        assert own[layer].amax() > 0, layer
        assert (ours - theirs).abs().max() < 1e-5, layer


@needs_library
@pytest.mark.parametrize("name", LIBRARY_CAMS)
def test_every_library_cam_gives_a_finite_map_per_image_and_layer(name, shapes_classifier, batch):
    images, out, target = batch
    maps = get_baseline(name)(shapes_classifier, images[:2], out, target[:2], ["layer3"])
    assert set(maps) == {"layer3"}
    assert maps["layer3"].shape == (2, 32, 32) and torch.isfinite(maps["layer3"]).all() and maps["layer3"].min() >= 0


def test_rise_equals_its_formula_and_finds_the_region_the_class_reads():
    """A classifier whose class-0 logit is the mean of the top-left quadrant: RISE's map is highest there, and equals
    a per-mask loop of ``Σ_i p(I ⊙ M_i) M_i / (N p)``."""

    class TopLeft(torch.nn.Module):
        def forward(self, x):
            s = 10 * x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 5
            return torch.stack([s, torch.zeros_like(s)], 1)

    images = torch.ones(2, 3, 16, 16)
    target = torch.zeros(2, dtype=torch.long)
    maps = rise_maps(TopLeft(), images, target, num_masks=300, cells=4, seed=1, chunk=64)
    assert maps[:, :8, :8].mean() > maps[:, 8:, 8:].mean() + 0.1
    masks = rise_masks(300, (16, 16), cells=4, seed=1)
    assert masks.shape == (300, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    loop = sum(TopLeft()(images * m).softmax(1)[:, 0, None, None] * m for m in masks) / (300 * 0.5)
    assert torch.allclose(maps, loop, atol=1e-5)


def test_class_map_evaluation_sets_its_baselines_by_name(tiny_spec, tiny_world, tiny_classifier_weights):
    classifier = build_classifier(
        "shapes_cnn", len(tiny_spec.classes), ["layer4"], weights=tiny_classifier_weights, image_size=32
    )
    module = build_lcam_module(classifier, len(tiny_spec.classes), tiny_spec.classes, "fm")
    names = ("gradcam", "gradcampp", "eigencam") if HAS_LIBRARY else ("gradcam", "rise")
    settings = EvaluationSettings(batch_size=4, max_images=4, baselines=names)
    results = evaluate_class_maps(module, tiny_world, "test", settings)
    assert list(results["methods"]) == ["lcam_fm", *names, "random"] and results["baselines"] == list(names)
    table = format_class_map_table(results)
    for name in names:
        assert f"| {get_baseline(name).title} |" in table
    assert "deletion AUC" not in table  # the curves only when asked


def test_evaluate_command_takes_baselines_and_refuses_unknown_ones(tiny_method_run, tmp_path, capsys):
    from cefam_lightning.cli.evaluate import main

    ckpt = tiny_method_run("lcam_img")["best_checkpoint"]
    names = "gradcam,eigencam" if HAS_LIBRARY else "gradcam,rise"
    results = main(["--checkpoint", ckpt, "--max-images", "6", "--baselines", names, "--out", str(tmp_path)])
    assert list(results["methods"]) == ["lcam_img", *names.split(","), "random"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["baselines"] == names.split(",")
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", ckpt, "--baselines", "gradcam,foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --baselines: unknown baseline 'foo'") and "choices: gradcam," in err
    assert len(err.splitlines()) == 1


def test_cefam_evaluation_compares_every_baseline_at_every_layer(tiny_checkpoint, tiny_world):
    from cefam_lightning.methods.base import load_explainer

    module = load_explainer(tiny_checkpoint)
    other = "eigencam" if HAS_LIBRARY else "rise"
    settings = EvaluationSettings(batch_size=2, max_images=2, baselines=("gradcam", other), curves=True)
    results, table = module.evaluate_on_world(tiny_world, "test", settings)
    assert list(results["regions"]) == ["cefam", "gradcam", other, "single_channel", "random"]
    assert set(results["regions"][other]) == {*module.classifier.layers, "top1", "best_layer"}
    assert set(results["faithfulness"]["methods"]) == {"cefam", "gradcam", other}
    assert {"deletion", "insertion"} <= set(results["faithfulness"]["methods"][other])
    title = get_baseline(other).title
    assert f"| {title} (class) |" in table and f"| {title} at that layer |" in table and "deletion AUC ↓" in table
