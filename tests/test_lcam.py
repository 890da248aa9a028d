"""L-CAM-Fm / L-CAM-Img (SPEC §5) and their evaluation on the shapes world."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.shapes_world import key_object_concepts
from cefam_lightning.data.shapes_world import key_object_pixels as key_object_masks
from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.class_map import evaluate_class_maps, format_class_map_table
from cefam_lightning.methods.lcam.module import (
    LCAMModule,
    area_loss,
    build_lcam_module,
    total_variation,
)
from cefam_lightning.models.classifier import build_classifier

CLASSES = ["a", "b", "c", "d"]
LAYERS = ["layer3", "layer4"]


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    return build_classifier("shapes_cnn", len(CLASSES), LAYERS, widths=(4, 8, 8, 16), image_size=32)


@pytest.fixture
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _module(classifier, variant="img", **options):
    torch.manual_seed(1)
    return build_lcam_module(classifier, len(CLASSES), CLASSES, variant, **options)


# ---------------------------------------------------------------------- loss terms


def test_total_variation_equals_a_hand_computation():
    a = torch.tensor(
        [[[0.1, 0.9, 0.3], [0.4, 0.2, 0.8], [0.5, 0.7, 0.6]], [[1.0, 0.0, 0.5], [0.0, 0.25, 0.0], [0.5, 0.0, 1.0]]]
    )
    b, h, w = a.shape
    expected = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                if i + 1 < h:
                    expected += (a[n, i + 1, j] - a[n, i, j]).item() ** 2
                if j + 1 < w:
                    expected += (a[n, i, j + 1] - a[n, i, j]).item() ** 2
                if i in (0, h - 1) or j in (0, w - 1):  # the outer ring, each pixel once
                    expected += 0.3 * a[n, i, j].item() ** 2
    assert total_variation(a, border_weight=0.3).item() == pytest.approx(expected / (2 * b), rel=1e-6)
    # The centre pixel is not on the border: changing it moves only the difference terms.
    single = torch.zeros(1, 3, 3)
    single[0, 1, 1] = 1.0
    assert total_variation(single).item() == pytest.approx(4 / 2)


def test_area_loss_equals_a_hand_computation():
    a = torch.tensor([[[0.0, 1.0], [0.25, 0.5]]])
    expected = sum((v + 0.0005) ** 0.3 for v in (0.0, 1.0, 0.25, 0.5)) / 4
    assert area_loss(a).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_the_weighted_sum_of_ce_area_and_tv(classifier, images):
    module = _module(classifier, "fm")
    step = module.model_step({"image": images})
    out = classifier(images)
    a_y = torch.sigmoid(module.attention(out.activations["layer4"])[torch.arange(3), out.logits.argmax(1)])
    masked = classifier.tail("layer4")(out.activations["layer4"] * a_y[:, None])
    ce = F.cross_entropy(masked, out.logits.argmax(1))
    expected = 1.5 * ce + 2 * ((a_y + 0.0005) ** 0.3).mean() + 0.01 * total_variation(a_y)
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert step.loss_ce.item() == pytest.approx(ce.item(), rel=1e-5)
    # Loss weights are configurable.
    light = _module(classifier, "fm", loss={"area_weight": 0.0, "tv_weight": 0.0})
    assert light.model_step({"image": images}).loss.item() == pytest.approx(1.5 * ce.item(), rel=1e-5)


# ---------------------------------------------------------------------- the two variants


def test_fm_path_masks_the_feature_maps_and_runs_the_tail(classifier, images):
    module = _module(classifier, "fm")
    out = classifier(images)
    a = torch.rand(3, 4, 4)
    expected = classifier.tail("layer4")(classifier(images).activations["layer4"] * a[:, None])
    torch.testing.assert_close(module.masked_logits(images, out, a), expected)
    # An all-ones attention leaves the classifier's own logits.
    torch.testing.assert_close(module.masked_logits(images, out, torch.ones(3, 4, 4)), out.logits, atol=1e-5, rtol=0)


def test_img_path_masks_the_image_and_gradients_reach_only_the_attention(classifier, images):
    module = _module(classifier, "img").train()
    out = classifier(images)
    a = torch.rand(3, 4, 4)
    logits = module.masked_logits(images, out, a)
    up = F.interpolate(a[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    assert logits.shape == (3, len(CLASSES))
    torch.testing.assert_close(logits, classifier(images * up).logits)
    torch.testing.assert_close(module.masked_logits(images, out, torch.ones(3, 4, 4)), out.logits)

    step = module.model_step({"image": images})
    step.loss_ce.backward()  # the CE term alone: its gradient must pass through the frozen classifier
    assert module.attention.weight.grad is not None and module.attention.weight.grad.abs().sum() > 0
    assert module.attention.bias.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in module.classifier.parameters())
    assert not module.classifier.training  # frozen: eval mode although the module trains
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["attention.weight", "attention.bias"]


def test_class_maps_one_forward_pass_in_unit_range_at_image_size(classifier, images):
    module = _module(classifier, "img")
    calls = []
    handle = module.classifier.register_forward_pre_hook(lambda *_: calls.append(1))
    maps = module.class_maps(images)
    handle.remove()
    assert len(calls) == 1
    assert maps.shape == (3, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    # The predicted class by default; the map of class t is c_t (pre-sigmoid) min-max normalized, upsampled.
    out = classifier(images)
    pred = out.logits.argmax(1)
    torch.testing.assert_close(maps, module.class_maps(images, pred))
    c = module.attention(out.activations["layer4"])
    for t in range(len(CLASSES)):
        low = c[:, t]
        norm = (low - low.amin((1, 2), keepdim=True)) / (
            low.amax((1, 2), keepdim=True) - low.amin((1, 2), keepdim=True)
        )
        expected = F.interpolate(norm[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(module.class_maps(images, torch.full((3,), t)), expected)


def test_label_source_prediction_or_target(classifier, images):
    pred = classifier(images).logits.argmax(1)
    other = (pred + 1) % len(CLASSES)
    assert torch.equal(_module(classifier).model_step({"image": images, "label": other}).label, pred)
    step = _module(classifier, label_source="target").model_step({"image": images, "label": other})
    assert torch.equal(step.label, other)
    with pytest.raises(ValueError, match="label_source='target' needs a 'label'"):
        _module(classifier, label_source="target").model_step({"image": images})


def test_bad_options_name_the_key(classifier):
    with pytest.raises(ValueError, match="lcam.variant"):
        _module(classifier, "pixels")
    with pytest.raises(ValueError, match="lcam.label_source"):
        _module(classifier, label_source="oracle")
    with pytest.raises(ValueError, match=r"lcam.layer: 'layer2' is not among"):
        _module(classifier, layer="layer2")
    with pytest.raises(ValueError, match="lcam.loss: unknown key"):
        _module(classifier, loss={"area": 1.0})
    with pytest.raises(ValueError, match="lcam: unknown option"):
        _module(classifier, lr=0.1)
    with pytest.raises(ValueError, match="3 class names"):
        build_lcam_module(classifier, 4, CLASSES[:3])
    with pytest.raises(ValueError, match="3 class names for a classifier with 4 outputs"):
        LCAMModule(classifier, CLASSES[:3])
    with pytest.raises(ValueError, match="lcam.optimizer.name"):
        _module(classifier, optimizer={"name": "lbfgs"}).configure_optimizers()
    with pytest.raises(ValueError, match="lcam.optimizer: unknown key"):
        _module(classifier, optimizer={"learning_rate": 1.0}).configure_optimizers()


def test_layer_defaults_to_the_last_and_can_be_chosen(classifier, images):
    assert _module(classifier).layer == "layer4"
    module = _module(classifier, "fm", layer="layer3")
    assert module.attention.in_channels == 8
    assert module.class_maps(images).shape == (3, 32, 32)
    assert math.isfinite(module.model_step({"image": images}).loss.item())


def test_optimizer_defaults_to_the_authors_with_biases_at_twice_the_lr(classifier):
    opt = _module(classifier).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    weights, biases = opt.param_groups
    assert weights["lr"] == pytest.approx(1e-4) and biases["lr"] == pytest.approx(2e-4)
    assert weights["nesterov"] and weights["momentum"] == 0.9 and weights["weight_decay"] == 5e-4
    adam = _module(classifier, optimizer={"name": "adam", "lr": 0.01, "bias_lr_factor": 1.0}).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and [g["lr"] for g in adam.param_groups] == [0.01, 0.01]


# ---------------------------------------------------------------------- training, checkpoints, evaluation


def test_training_smoke_and_checkpoint_reload(tiny_spec, tiny_world, tiny_classifier_weights, cache_dir, tmp_path):
    classifier = build_classifier(
        "shapes_cnn", len(tiny_spec.classes), ["layer4"], weights=tiny_classifier_weights, image_size=32
    )
    module = build_lcam_module(
        classifier, len(tiny_spec.classes), tiny_spec.classes, "fm", optimizer={"name": "adam", "lr": 0.01}
    )
    dm = ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16, with_embeddings=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/masked_acc"):
        assert math.isfinite(float(metrics[key])), key
    assert 0 <= float(metrics["val/masked_acc"]) <= 1

    path = trainer.checkpoint_callback.best_model_path
    reloaded = LCAMModule.from_checkpoint(path)
    assert (reloaded.variant, reloaded.layer) == ("fm", "layer4")
    images = torch.from_numpy(tiny_world.split("val").images[:4].copy()).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(reloaded.class_maps(images), module.eval().class_maps(images), rtol=0, atol=0)


def test_from_checkpoint_rejects_other_checkpoints(tmp_path):
    cefam = tmp_path / "cefam.ckpt"
    torch.save({"hyper_parameters": {"arch": {"translator": {}, "classifier": {}}}, "state_dict": {}}, cefam)
    with pytest.raises(ValueError, match="not a L-CAM-Fm or L-CAM-Img checkpoint .a CE-FAM checkpoint"):
        LCAMModule.from_checkpoint(cefam)
    with pytest.raises(ValueError, match="checkpoint not found"):
        LCAMModule.from_checkpoint(tmp_path / "missing.ckpt")


def test_key_object_masks_are_the_pixels_of_the_key_objects_concepts(tiny_spec, tiny_world):
    split = tiny_world.split("test")
    masks, labels = torch.from_numpy(split.masks[:16].copy()), torch.from_numpy(split.labels[:16].copy())
    key = key_object_masks(tiny_spec, masks, labels)
    assert key.flatten(1).any(1).all()  # every image has its key object
    # The concepts whose masks cover the key object's pixels are exactly the key object's concepts.
    covered = (masks & key[:, None]).flatten(2).any(2)
    assert torch.equal(covered, key_object_concepts(tiny_spec, masks, labels))


def test_evaluation_on_the_world_reports_every_method(tiny_spec, tiny_world, tiny_classifier_weights):
    classifier = build_classifier(
        "shapes_cnn", len(tiny_spec.classes), ["layer4"], weights=tiny_classifier_weights, image_size=32
    )
    module = build_lcam_module(classifier, len(tiny_spec.classes), tiny_spec.classes, "img")
    results = evaluate_class_maps(module, tiny_world, "test", EvaluationSettings(batch_size=5, max_images=12))
    assert results["images"] == 12 and results["layer"] == "layer4"
    assert set(results["methods"]) == {"lcam_img", "gradcam", "random"}
    for row in results["methods"].values():
        assert 0 <= row["nra"] <= 1 and row["scored"] == 12
        assert {"ad/100%", "ad/50%", "ad/15%", "ic/100%", "ic/50%", "ic/15%"} <= set(row)
    # Batching does not change the numbers (sum states).
    again = evaluate_class_maps(module, tiny_world, "test", EvaluationSettings(batch_size=12, max_images=12))
    for method, row in results["methods"].items():
        for key, value in row.items():
            assert again["methods"][method][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (method, key)
    table = format_class_map_table(results)
    assert "| L-CAM-Img |" in table and "| Grad-CAM |" in table and "| random map |" in table and "AD 15%" in table
    with pytest.raises(ValueError, match="split"):
        evaluate_class_maps(module, tiny_world, "holdout")


# ---------------------------------------------------------------------- ResNet-50 and VGG-16 layouts (SPEC §5)


@pytest.mark.parametrize(
    ("name", "layer", "channels", "side"),
    [("resnet50", "layer4", 2048, 2), ("vgg16", "features.29", 512, 4)],
)
@pytest.mark.parametrize("variant", ["img", "fm"])
def test_resnet50_and_vgg16_layouts_with_random_weights(name, layer, channels, side, variant):
    """The attention reads ResNet-50's layer4 (2048 channels) or VGG-16's features[:30] (512): the spec's layouts.
    At 64 px their maps are 2x2 and 4x4; L-CAM-Fm runs the rest of the network from there (ResNet: avgpool, fc;
    VGG: the last max-pool, avgpool, the classifier)."""
    torch.manual_seed(0)
    clf = build_classifier(name, 5, [layer], image_size=64)  # weights=None: random initialization
    module = build_lcam_module(clf, 5, list("abcde"), variant).train()
    assert module.layer == layer and module.attention.in_channels == channels and module.attention.out_channels == 5
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out, c = module.attend(images)
    assert c.shape == (2, 5, side, side)
    ones = torch.ones(2, side, side)
    torch.testing.assert_close(module.masked_logits(images, out, ones), out.logits, rtol=1e-4, atol=1e-4)
    step = module.model_step({"image": images})
    step.loss.backward()
    assert module.attention.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())
    maps = module.class_maps(images)
    assert maps.shape == (2, 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1
