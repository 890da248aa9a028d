"""SIAM (SPEC §6): the head's algebra, the module's losses and hooks, training, checkpoints and world evaluation."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.methods.siam.evaluation import evaluate_siam_on_world, format_siam_table
from cefam_lightning.methods.siam.module import SIAMModule, build_siam_module, default_border
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components.siam_head import AttributeMaps, SIAMHead, attribute_presence, zero_border


@pytest.fixture(scope="module")
def classifier(tiny_spec, tiny_classifier_weights):
    return build_classifier(
        "shapes_cnn", len(tiny_spec.classes), ["layer4"], weights=tiny_classifier_weights, image_size=32
    )


def make_module(classifier, spec, **options) -> SIAMModule:
    concepts = spec.concepts
    return build_siam_module(
        classifier,
        len(spec.classes),
        spec.classes,
        [c.name for c in concepts],
        [c.type for c in concepts],
        **options,
    )


def world_batch(world, n: int = 8, split: str = "val") -> dict:
    data = world.split(split)
    return {
        "image": torch.from_numpy(np.array(data.images[:n])).permute(0, 3, 1, 2).float() / 255,
        "label": torch.from_numpy(np.asarray(data.labels[:n])),
        "presence": torch.from_numpy(np.asarray(data.presence[:n])).float(),
    }


def randomize_head(module: SIAMModule, seed: int = 0) -> None:
    """Non-uniform non-negative templates and signed combination weights, so the algebra is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.head.templates.weight.copy_(torch.rand(module.head.templates.weight.shape, generator=g))
        module.head.combine.copy_(torch.randn(module.head.combine.shape, generator=g))
        module.head.linear.weight.copy_(torch.randn(module.head.linear.weight.shape, generator=g))
        module.head.linear.bias.copy_(torch.randn(module.head.linear.bias.shape, generator=g))


# ---------------------------------------------------------------------------------------------- components
def test_default_border_scales_the_authors_two_pixels():
    assert default_border(14) == 2  # the authors' map
    assert default_border(8) == 1  # the shapes CNN's layer4 at 64 px
    assert default_border(4) == 1
    assert default_border(2) == 0


def test_border_is_zeroed_and_the_inside_kept():
    torch.manual_seed(0)
    module = AttributeMaps(5, 3, border=2)
    features = torch.randn(2, 5, 9, 9)
    maps = module(features)
    inside = maps[..., 2:7, 2:7]
    reference = F.relu(F.conv2d(features, module.conv.weight, module.conv.bias))[..., 2:7, 2:7]
    torch.testing.assert_close(inside, reference)
    frame = torch.ones(9, 9, dtype=torch.bool)
    frame[2:7, 2:7] = False
    assert maps[..., frame].abs().max() == 0
    assert inside.abs().max() > 0
    assert maps.shape == (2, 3, 9, 9)


def test_border_zero_keeps_the_maps():
    maps = torch.rand(2, 3, 4, 4)
    assert torch.equal(zero_border(maps, 0), maps)
    module = AttributeMaps(5, 3, border=0)
    features = torch.randn(1, 5, 4, 4)
    torch.testing.assert_close(module(features), F.relu(F.conv2d(features, module.conv.weight, module.conv.bias)))


def test_border_that_leaves_nothing_is_an_error():
    with pytest.raises(ValueError, match="border=2 leaves nothing of a 4x4"):
        zero_border(torch.ones(1, 1, 4, 4), 2)
    with pytest.raises(ValueError, match="border must be >= 0"):
        AttributeMaps(4, 2, border=-1)
    with pytest.raises(ValueError, match="template_init must be > 0"):
        SIAMHead(2, 2, grid=3, template_init=0.0)


def test_presence_is_the_global_average_of_each_map():
    maps = torch.rand(3, 4, 5, 6) * 3
    mean = maps.flatten(2).sum(2) / 30
    torch.testing.assert_close(attribute_presence(maps, tanh=True), torch.tanh(mean))
    torch.testing.assert_close(attribute_presence(maps, tanh=False), mean.clamp(max=1.0))


def test_head_contribution_maps_sum_to_the_attribute_scores():
    torch.manual_seed(0)
    head = SIAMHead(n_attr=4, n_out=3, grid=5, n_templates=3)
    with torch.no_grad():
        head.templates.weight.uniform_(0, 1)
        head.combine.normal_()
    maps = torch.rand(2, 4, 10, 10)
    outputs, scores = head(maps)
    ones = torch.ones(2, 4)
    cmaps = head.contribution_maps(maps, ones)
    assert cmaps.shape == (2, 4, 5, 5)
    torch.testing.assert_close(cmaps.sum((2, 3)), scores)
    # The scores by hand: 2x2 average pooling, one inner product per template, the combination weights.
    pooled = F.avg_pool2d(maps, 2)
    responses = torch.einsum("bahw,athw->bat", pooled, head.templates.weight.view(4, 3, 5, 5)).relu()
    torch.testing.assert_close(scores, (responses * head.combine).sum(-1))
    torch.testing.assert_close(outputs, scores @ head.linear.weight.T + head.linear.bias)


def test_template_clamp_and_l1():
    head = SIAMHead(n_attr=2, n_out=2, grid=3)
    with torch.no_grad():
        head.templates.weight.copy_(torch.linspace(-1, 1, head.templates.weight.numel()).view_as(head.templates.weight))
    expected_l1 = torch.linspace(-1, 1, 36).abs().mean()
    torch.testing.assert_close(head.template_l1(), expected_l1)
    head.clamp_templates_()
    assert head.templates.weight.min() == 0
    torch.testing.assert_close(head.templates.weight.flatten(), torch.linspace(-1, 1, 36).clamp(min=0))


# ---------------------------------------------------------------------------------------------- the module
def test_explain_shapes_and_exact_decomposition(classifier, tiny_spec, tiny_world):
    module = make_module(classifier, tiny_spec).eval()
    randomize_head(module)
    batch = world_batch(tiny_world)
    ex = module.explain(batch["image"])
    b, n_attr = 8, tiny_spec.num_concepts
    assert ex.maps.shape == (b, n_attr, 32, 32)
    assert ex.class_map.shape == (b, 32, 32)
    assert ex.contributions.shape == ex.presence_probs.shape == (b, n_attr)
    assert ex.logits.shape == (b, len(tiny_spec.classes))
    torch.testing.assert_close(ex.target, ex.logits.argmax(1))
    rows = torch.arange(b)
    logit = ex.logits[rows, ex.target]
    # contributions (final-layer weight x attribute score) + the bias = the explained logit
    torch.testing.assert_close(ex.contributions.sum(1) + ex.bias, logit)
    torch.testing.assert_close(ex.bias, module.head.linear.bias[ex.target])
    # the spatial decomposition on the grid sums to each contribution
    torch.testing.assert_close(ex.contribution_maps.sum((2, 3)), ex.contributions)
    # another explained class
    ex2 = module.explain(batch["image"], target=2)
    torch.testing.assert_close(ex2.contributions.sum(1) + ex2.bias, ex2.logits[:, 2])
    with pytest.raises(ValueError, match="target must lie in"):
        module.explain(batch["image"], target=len(tiny_spec.classes))


def test_losses_by_hand_and_attributes_before_presence(classifier, tiny_spec, tiny_world):
    module = make_module(classifier, tiny_spec, w_attr=0.7, w_tmpl=0.3)
    randomize_head(module)
    batch = world_batch(tiny_world)
    features = classifier(batch["image"]).activations["layer4"]
    maps = module.attribute_maps(features)
    probs = torch.tanh(maps.mean((2, 3)))
    attributes = torch.rand(8, tiny_spec.num_concepts, generator=torch.Generator().manual_seed(1))
    step = module.model_step({**batch, "attributes": attributes})
    ce = F.cross_entropy(module.head(maps)[0], batch["label"])
    bce = -(attributes * probs.clamp(1e-6).log() + (1 - attributes) * (1 - probs).clamp(1e-6).log()).mean()
    l1 = module.head.templates.weight.abs().mean()
    torch.testing.assert_close(step.loss_task, ce)
    torch.testing.assert_close(step.loss_attr, bce)
    torch.testing.assert_close(step.loss_tmpl, l1)
    torch.testing.assert_close(step.loss, ce + 0.7 * bce + 0.3 * l1)


def test_precomputed_features_give_the_same_step(classifier, tiny_spec, tiny_world):
    module = make_module(classifier, tiny_spec)
    batch = world_batch(tiny_world)
    features = classifier(batch["image"]).activations["layer4"]
    from_images = module.model_step(batch)
    from_features = module.model_step({"features": features, "label": batch["label"], "presence": batch["presence"]})
    torch.testing.assert_close(from_features.loss, from_images.loss)


def test_missing_labels_and_bad_arguments_are_clear_errors(classifier, tiny_spec, tiny_world):
    module = make_module(classifier, tiny_spec)
    batch = world_batch(tiny_world)
    del batch["presence"]
    with pytest.raises(KeyError, match="'attributes'"):
        module.model_step(batch)
    with pytest.raises(ValueError, match="expected \\(B, 9\\)"):
        module.model_step({**batch, "attributes": torch.zeros(8, 3)})
    with pytest.raises(KeyError, match="target_key"):
        module.model_step({"image": batch["image"], "presence": torch.zeros(8, 9)})
    with pytest.raises(ValueError, match="siam.task"):
        make_module(classifier, tiny_spec, task="segmentation")
    with pytest.raises(ValueError, match="siam.layer: 'layer3'"):
        make_module(classifier, tiny_spec, layer="layer3")
    with pytest.raises(ValueError, match="siam.w_tmpl"):
        make_module(classifier, tiny_spec, w_tmpl=-1.0)
    with pytest.raises(ValueError, match="optimizer.name: unknown optimizer 'lbfgs'"):
        make_module(classifier, tiny_spec, optimizer={"name": "lbfgs"}).configure_optimizers()
    with pytest.raises(ValueError, match="scheduler.name: unknown scheduler 'step'"):
        make_module(classifier, tiny_spec, scheduler={"name": "step"}).configure_optimizers()
    with pytest.raises(ValueError, match="scheduler.warmup_factor must be >= 1"):
        make_module(classifier, tiny_spec, scheduler={"warmup_epochs": 2, "warmup_factor": 0.5}).configure_optimizers()
    # The shared schedule (cefam_lightning/optim.py): a warm-up from lr to 2 x lr, as for CE-FAM.
    (opt,), (warmup,) = make_module(
        classifier, tiny_spec, optimizer={"lr": 0.01}, scheduler={"name": "none", "warmup_epochs": 2}
    ).configure_optimizers()
    assert isinstance(warmup, torch.optim.lr_scheduler.LinearLR) and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_templates_stay_nonnegative_after_optimizer_steps(classifier, tiny_spec, tiny_world):
    torch.manual_seed(0)
    module = make_module(classifier, tiny_spec)  # templates start at 0.01; Adam's first step moves each by ~0.1
    opt = torch.optim.Adam(module.head.parameters(), lr=0.1)
    batch = world_batch(tiny_world)
    module.model_step(batch).loss.backward()
    opt.step()
    assert module.head.templates.weight.min() < 0  # without the projection a step leaves some negative
    module.on_train_batch_end(None, batch, 0)
    assert module.head.templates.weight.min() == 0
    assert module.head.templates.weight.max() > 0


def test_regression_task(classifier, tiny_spec, tiny_world):
    torch.manual_seed(0)
    concepts = tiny_spec.concepts
    module = build_siam_module(
        classifier, 1, ["score"], [c.name for c in concepts], None, task="regression", optimizer={"lr": 0.05}
    )
    assert module.hparams.target_key == "target" and module.task_metric_name == "mse"
    batch = world_batch(tiny_world, n=16, split="train")
    batch["target"] = batch["presence"][:, 0] * 2.0 - 0.5  # a learnable target: "red is present"
    images = batch.pop("image")
    batch["features"] = classifier(images).activations["layer4"]  # the classifier runs once, not every step
    opt = module.configure_optimizers()
    losses = []
    for _ in range(100):
        step = module.model_step(batch)
        opt.zero_grad()
        step.loss_task.backward()
        opt.step()
        module.head.clamp_templates_()
        losses.append(float(step.loss_task.detach()))
    # Better than the best constant prediction (the target's variance): the attributes explain the target.
    assert losses[-1] < 0.5 * float(batch["target"].var(unbiased=False))
    torch.testing.assert_close(step.loss_task, F.mse_loss(step.outputs[:, 0], batch["target"]))
    ex = module.explain(images)
    assert (ex.target == 0).all()
    torch.testing.assert_close(ex.contributions.sum(1) + ex.bias, ex.logits[:, 0])


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(classifier, tiny_spec, cache_dir, tmp_path_factory):
    L.seed_everything(0, verbose=False)
    module = make_module(classifier, tiny_spec, optimizer={"name": "adam", "lr": 0.05})
    dm = ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16, with_embeddings=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("siam"),
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_one_epoch_training_logs_and_keeps_templates_nonnegative(trained):
    module, trainer = trained
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/acc", "val/attr_auroc", "val/loss_tmpl"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert 0 <= float(metrics["val/attr_auroc"]) <= 1
    # Adam's first step (~lr = 0.05) moves every template weight by more than its start (0.01): some end at 0.
    assert module.head.templates.weight.min() == 0


def test_checkpoint_reload_gives_identical_outputs(trained, tiny_world, tmp_path):
    module, trainer = trained
    path = trainer.checkpoint_callback.best_model_path
    reloaded = SIAMModule.from_checkpoint(path)
    images = world_batch(tiny_world)["image"]
    a, b = module.eval().explain(images), reloaded.explain(images)
    for key in ("logits", "presence_probs", "contributions", "maps", "class_map"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=0)
    assert reloaded.attribute_maps.border == module.attribute_maps.border
    assert reloaded.hparams.attribute_names == module.hparams.attribute_names


def test_wrong_checkpoint_kind_is_a_clear_error(tmp_path):
    path = tmp_path / "cefam.ckpt"
    torch.save({"hyper_parameters": {"arch": {"translator": {}, "classifier": {}}}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a SIAM checkpoint \\(a CE-FAM checkpoint\\)"):
        SIAMModule.from_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        SIAMModule.from_checkpoint(tmp_path / "missing.ckpt")


def test_evaluate_on_world(trained, classifier, tiny_world, tiny_spec):
    module, _ = trained
    results = evaluate_siam_on_world(module, tiny_world, split="test", batch_size=10, max_images=25)
    assert results["n_images"] == 25
    batch = world_batch(tiny_world, n=25, split="test")
    with torch.no_grad():
        logits = classifier(batch["image"]).logits
        siam = module(batch["image"]).outputs
    assert results["classifier_acc"] == pytest.approx((logits.argmax(1) == batch["label"]).float().mean().item())
    assert results["siam_acc"] == pytest.approx((siam.argmax(1) == batch["label"]).float().mean().item())
    assert results["agreement"] == pytest.approx((siam.argmax(1) == logits.argmax(1)).float().mean().item())
    assert results["n_correct"] == int((siam.argmax(1) == batch["label"]).sum())
    for key in ("attr_auroc", "top_attr_is_key", "regions"):
        assert key in results
    assert 0 <= results["top_attr_is_key"] <= 1 and 0 <= results["regions"]["nra/mean"] <= 1
    table = format_siam_table(results)
    assert f"{results['attr_auroc']:.3f}" in table and "| NRA |" in table
    assert table.startswith("SIAM on the shapes world (test split, 25 images)\n\n| metric | value |\n|---|---|\n")
    assert "|\n\nAttribute maps vs concept masks (present concepts)\n\n| concept type | " in table
    with pytest.raises(ValueError, match="max_images"):
        evaluate_siam_on_world(module, tiny_world, max_images=0)


def test_evaluate_needs_the_worlds_concepts(classifier, tiny_spec, tiny_world):
    module = build_siam_module(classifier, len(tiny_spec.classes), tiny_spec.classes, ["a", "b"], None)
    with pytest.raises(ValueError, match="not the world's concepts"):
        evaluate_siam_on_world(module, tiny_world)
