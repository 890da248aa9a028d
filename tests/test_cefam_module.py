import lightning as L
import pytest
import torch

from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator


def _module(tiny_world, weights, lambda_sim=0.001, kind="clip", bias=0.0, explain=None):
    store = tiny_world.store
    classifier = build_classifier("shapes_cnn", len(tiny_world.class_names), weights=weights)
    in_dim = sum(c for c, _, _ in classifier.layer_shapes(32).values())
    return CEFAMModule(
        classifier,
        Translator(in_dim, store.embed_dim, [64], input_norm=True),
        ConceptScorer(torch.from_numpy(store.text_embeddings), kind, store.vlm.logit_scale, bias),
        concept_names=store.concept_names,
        concept_types=[c.type for c in store.concepts],
        class_names=tiny_world.class_names,
        lambda_sim=lambda_sim,
        optimizer={"name": "adam", "lr": 1e-3},
        scheduler={"name": "none"},
        explain=explain,
    )


def _datamodule(tiny_spec, cache_dir):
    return ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16)


def _trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_training_leaves_the_classifier_untouched(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights):
    module = _module(tiny_world, tiny_classifier_weights)
    before = {k: v.clone() for k, v in module.classifier.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BatchNorm statistics are part of what is compared
    translator_before = module.translator.net.fc1.weight.clone()
    _trainer(max_epochs=2).fit(module, datamodule=_datamodule(tiny_spec, cache_dir))
    after = module.classifier.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"classifier state {k} changed")
    assert not module.classifier.training
    assert not torch.equal(module.translator.net.fc1.weight, translator_before)  # the branch did train


@pytest.mark.parametrize("lambda_sim", [0.001, 0.0])
def test_loss_falls_on_a_tiny_run(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights, lambda_sim):
    torch.manual_seed(0)
    module = _module(tiny_world, tiny_classifier_weights, lambda_sim=lambda_sim)
    dm = _datamodule(tiny_spec, cache_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(module.translator.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        out = module.model_step(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    if lambda_sim == 0:
        assert out.loss_sim.item() == 0.0 and out.loss.item() == pytest.approx(out.loss_emb.item())


def test_validation_logs_losses_cosine_and_auroc(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights):
    module = _module(tiny_world, tiny_classifier_weights)
    metrics = _trainer().validate(module, datamodule=_datamodule(tiny_spec, cache_dir), verbose=False)[0]
    assert {"val/loss", "val/loss_emb", "val/loss_sim", "val/cosine", "val/concept_auroc"} <= set(metrics)
    assert -1.0 <= metrics["val/cosine"] <= 1.0 and 0.0 <= metrics["val/concept_auroc"] <= 1.0


def test_clip_and_siglip_scoring():
    text = torch.eye(4, 6)
    emb = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0, 0]])
    clip = ConceptScorer(text, "clip", logit_scale=100.0)
    s = clip(emb)
    torch.testing.assert_close(s[0], torch.tensor([100.0, 0, 0, 0]))  # cosine, not dot product
    torch.testing.assert_close(clip.probabilities(s).sum(-1), torch.ones(2))
    siglip = ConceptScorer(text, "siglip", logit_scale=10.0, logit_bias=-5.0)
    s = siglip(emb)
    torch.testing.assert_close(s[1], torch.tensor([-5.0, 10 / 2**0.5 - 5, 10 / 2**0.5 - 5, -5.0]))
    torch.testing.assert_close(siglip.probabilities(s), torch.sigmoid(s))
    with pytest.raises(ValueError, match="'blip'"):
        ConceptScorer(text, "blip")


def test_translator_defaults_follow_the_authors():
    t = Translator(3840, 512)
    assert [m.out_features for m in t.net if isinstance(m, torch.nn.Linear)] == [2048, 1024, 512]
    assert list(dict(t.named_children())["net"]._modules)[:2] == ["fc1", "act1"]
    assert isinstance(t.net.act1, torch.nn.Tanh)
    assert [m.out_features for m in Translator(240, 32).net if isinstance(m, torch.nn.Linear)] == [1024, 1024, 32]


def test_mismatched_parts_are_rejected(tiny_world, tiny_classifier_weights):
    module = _module(tiny_world, tiny_classifier_weights)
    with pytest.raises(ValueError, match="translator output"):
        CEFAMModule(
            module.classifier,
            Translator(240, 7, [8]),
            module.scorer,
            module.hparams.concept_names,
            module.hparams.concept_types,
            module.hparams.class_names,
        )


def test_warmup_then_plateau_decay(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights):
    module = _module(tiny_world, tiny_classifier_weights)
    module.hparams.optimizer = {"name": "sgd", "lr": 0.1}
    module.hparams.scheduler = {
        "name": "plateau",
        "factor": 0.1,
        "patience": 0,
        "monitor": "val/loss",
        "warmup_epochs": 2,
        "warmup_factor": 2.0,
    }
    lrs = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(max_epochs=3, callbacks=[Record()]).fit(module, datamodule=_datamodule(tiny_spec, cache_dir))
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.15)
    # Epoch 3 starts at the warm-up's end (0.2), or ten times lower if the plateau already decayed it.
    assert lrs[2] == pytest.approx(0.2) or lrs[2] == pytest.approx(0.02)


def test_module_concept_regions_at_image_size(tiny_world, tiny_classifier_weights):
    module = _module(tiny_world, tiny_classifier_weights).eval()
    images = torch.rand(2, 3, 32, 32)
    maps = module.concept_regions(images, concepts=[0, 4], layers=["layer2", "layer4"])
    assert list(maps) == ["layer2", "layer4"]
    assert all(m.shape == (2, 2, 32, 32) and (m >= 0).all() for m in maps.values())
    low = module.concept_regions(images, layers=["layer4"], upsample=False)["layer4"]
    assert low.shape == (2, len(tiny_world.concepts), 4, 4)
    with pytest.raises(ValueError, match="layer9"):
        module.concept_regions(images, layers=["layer9"])
