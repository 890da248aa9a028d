"""Zero-shot concepts (``cefam.holdout_concepts``): left out of training, explained and evaluated from their text
embeddings alone, reported as seen vs unseen concepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.train import main as train_main
from cefam_lightning.data.feature_cache import POOLED_INDEX, POOLED_KEY
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.data.shapes_world import WorldSpec
from cefam_lightning.methods.base import load_explainer
from cefam_lightning.methods.cefam.evaluation import evaluate_on_world
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.methods.cefam.zero_shot import holdout_of
from cefam_lightning.methods.checkpoints import read_checkpoint
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator
from cefam_lightning.reporting.explanations import explain_images
from cefam_lightning.training.config import CONFIG_DIR, load_config
from tests.cli import cli_error
from tests.conftest import tiny_overrides

HOLDOUT = ["yellow", "striped"]
EXPERIMENT = CONFIG_DIR / "experiment" / "holdout.yaml"


@pytest.fixture(scope="module")
def holdout_run(cache_dir, tmp_path_factory) -> dict:
    """A tiny 1-epoch run of configs/experiment/holdout.yaml: its metrics.json dict."""
    out = tmp_path_factory.mktemp("holdout_runs")
    return train_main(["--config", str(EXPERIMENT), *tiny_overrides(cache_dir, out, "holdout")])


@pytest.fixture(scope="module")
def holdout_module(holdout_run) -> CEFAMModule:
    return load_explainer(holdout_run["best_checkpoint"])


# ------------------------------------------------------------------ config


def test_the_experiment_holds_out_concepts_of_the_shapes_world():
    assert load_config().cefam.holdout_concepts == []
    cfg = load_config(EXPERIMENT)
    names = [c.name for c in WorldSpec(**OmegaConf.to_container(cfg.world)).concepts]  # the demo world's
    assert list(cfg.cefam.holdout_concepts) == HOLDOUT and set(HOLDOUT) <= set(names)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[yellow,purple]", r"cefam.holdout_concepts: unknown concept 'purple'; the store's concepts are \['red'"),
        (
            "[red,green,blue,yellow,circle,square,triangle,plain,striped]",
            r"cefam.holdout_concepts: every concept of the store \(9\) is left out",
        ),
        ("[striped,striped]", r"cefam.holdout_concepts: 'striped' is listed more than once"),
    ],
)
def test_a_bad_holdout_is_named_before_the_run_folder_is_made(cache_dir, tmp_path, capsys, value, message):
    overrides = [*tiny_overrides(cache_dir, tmp_path, "bad"), f"cefam.holdout_concepts={value}"]
    assert re.search(message, cli_error(train_main, overrides, capsys))
    assert not Path(tmp_path / "bad").exists()


# ------------------------------------------------------------------ training


def _module(tiny_world, weights, text: torch.Tensor, holdout: list[str]) -> CEFAMModule:
    store = tiny_world.store
    classifier = build_classifier("shapes_cnn", len(tiny_world.class_names), weights=weights)
    in_dim = sum(c for c, _, _ in classifier.layer_shapes(32).values())
    torch.manual_seed(0)  # the same initial translator for every module
    return CEFAMModule(
        classifier,
        Translator(in_dim, store.embed_dim, [64], input_norm=True),
        ConceptScorer(text, store.vlm.kind, store.vlm.logit_scale, 0.0),
        concept_names=store.concept_names,
        concept_types=[c.type for c in store.concepts],
        class_names=tiny_world.class_names,
        lambda_sim=1.0,  # the concept-score term weighs as much as the embedding term: any influence would show
        holdout_concepts=holdout,
    )


def _trained_translator(module: CEFAMModule, batches: list[dict], steps: int = 5) -> dict[str, torch.Tensor]:
    opt = torch.optim.Adam(module.translator.parameters(), lr=1e-2)
    module.train()
    for _ in range(steps):
        for batch in batches:
            out = module.model_step(batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in module.translator.state_dict().items()}


def test_a_held_out_concepts_text_embedding_has_no_influence_on_the_trained_weights(
    tiny_world, tiny_spec, cache_dir, tiny_classifier_weights
):
    """Two trainings that differ only in the held-out concepts' text embeddings end with the same translator, bit for
    bit; without the holdout the same change does move it (the test can see an influence)."""
    dm = ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16)
    dm.setup("fit")
    text = torch.from_numpy(tiny_world.store.text_embeddings).clone()
    # Two batches, their pooled activations computed once (the classifier is frozen and the same in every run).
    classifier = _module(tiny_world, tiny_classifier_weights, text, [])
    batches = []
    for batch, _ in zip(dm.train_dataloader(), range(2), strict=False):
        _, z = classifier.pooled(batch["image"])
        batches.append({"embedding": batch["embedding"], POOLED_KEY: z, POOLED_INDEX: torch.arange(len(z))})
    other = text.clone()
    names = tiny_world.store.concept_names
    for name in HOLDOUT:  # any other direction: here each held-out concept reads as another concept
        other[names.index(name)] = torch.randn(text.shape[1], generator=torch.Generator().manual_seed(7))

    runs = {}
    for holdout in (HOLDOUT, []):
        a = _trained_translator(_module(tiny_world, tiny_classifier_weights, text, holdout), batches)
        b = _trained_translator(_module(tiny_world, tiny_classifier_weights, other, holdout), batches)
        runs[bool(holdout)] = all(torch.equal(a[k], b[k]) for k in a)
    assert runs[True], "the held-out concepts' text embeddings changed the trained translator"
    assert not runs[False], "without a holdout, changing concepts' text embeddings should change training"


def test_the_held_out_concepts_score_term_and_auroc_split(tiny_world, tiny_classifier_weights, tiny_spec, cache_dir):
    text = torch.from_numpy(tiny_world.store.text_embeddings)
    module = _module(tiny_world, tiny_classifier_weights, text, HOLDOUT)
    names = tiny_world.store.concept_names
    assert module.holdout_concepts == HOLDOUT and module.hparams["holdout_concepts"] == HOLDOUT
    assert module.unseen_index.tolist() == [names.index(n) for n in HOLDOUT]
    dm = ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = module.model_step(batch)
    seen = module.seen_index
    emb, target = out.embedding, batch["embedding"].float()
    expected = torch.nn.functional.mse_loss(module.scorer(emb)[:, seen], module.scorer(target)[:, seen])
    torch.testing.assert_close(out.loss_sim, expected)
    assert out.scores.shape[1] == len(names) and not out.scores.requires_grad  # all reported, none trained
    assert module.identity()["concepts"]["holdout"] == HOLDOUT


# ------------------------------------------------------------------ checkpoint


def test_the_checkpoint_keeps_every_text_embedding_and_records_the_holdout(holdout_run, holdout_module, tiny_world):
    assert holdout_module.hparams["holdout_concepts"] == HOLDOUT and holdout_module.holdout_concepts == HOLDOUT
    torch.testing.assert_close(
        holdout_module.scorer.text, torch.nn.functional.normalize(torch.from_numpy(tiny_world.store.text_embeddings))
    )
    test = holdout_run["test"]
    assert {"test/concept_auroc", "test/concept_auroc_unseen"} <= set(test)


def test_a_checkpoint_without_the_record_held_nothing_out(tiny_checkpoint, holdout_run, tmp_path):
    assert holdout_of(load_explainer(tiny_checkpoint)) == []
    ckpt = read_checkpoint(holdout_run["best_checkpoint"])
    del ckpt["hyper_parameters"]["holdout_concepts"]  # as a checkpoint written before holdouts were recorded
    ckpt.pop("cefam_identity", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = load_explainer(tmp_path / "old.ckpt")
    assert old.holdout_concepts == [] and "holdout" not in old.identity()["concepts"]


# ------------------------------------------------------------------ evaluation


def test_evaluation_reports_seen_and_unseen_concepts(holdout_run, holdout_module, tiny_world):
    results = evaluate_on_world(holdout_module, tiny_world, "test", faithfulness_top_n=None)
    zs = results["zero_shot"]
    names = tiny_world.store.concept_names
    assert zs["concepts"] == {"unseen": HOLDOUT, "seen": [n for n in names if n not in HOLDOUT]}
    assert set(zs["presence_auroc_by_concept"]) == set(names)
    for group in ("seen", "unseen"):
        assert set(zs[group]["regions"]) == set(results["regions"])  # every compared method, split
        for metric in ("nra", "hit_rate", "epg"):
            assert 0 <= zs[group]["regions"]["cefam"][f"{metric}/mean"] <= 1
        assert 0 <= zs[group]["presence_auroc"] <= 1
    # The unseen group's pairs are exactly the held-out concepts' types: a color and a texture.
    assert {k for k in zs["unseen"]["regions"]["cefam"] if k.startswith("count/")} >= {"count/color", "count/texture"}
    assert zs["unseen"]["regions"]["cefam"]["count/shape"] == 0
    total = results["regions"]["cefam"]["top1"]
    assert zs["seen"]["pairs"] + zs["unseen"]["pairs"] == sum(v for k, v in total.items() if k.startswith("count/"))
    # The training run's test stage scored the same presence AUROCs on the same split.
    test = holdout_run["test"]
    assert zs["seen"]["presence_auroc"] == pytest.approx(test["test/concept_auroc"], abs=1e-5)
    assert zs["unseen"]["presence_auroc"] == pytest.approx(test["test/concept_auroc_unseen"], abs=1e-5)

    # The split only adds: the same checkpoint without its holdout record scores the same existing keys.
    holdout_module.hparams["holdout_concepts"] = []
    try:
        plain = evaluate_on_world(holdout_module, tiny_world, "test", faithfulness_top_n=None)
    finally:
        holdout_module.hparams["holdout_concepts"] = HOLDOUT
    assert "zero_shot" not in plain
    assert plain["regions"] == results["regions"] and plain["contribution"] == results["contribution"]


def test_the_evaluate_command_writes_the_seen_vs_unseen_table(holdout_run, tmp_path):
    out = tmp_path / "ev"
    results = evaluate_main(["--checkpoint", holdout_run["best_checkpoint"], "--max-images", "8", "--out", str(out)])
    assert results["zero_shot"]["concepts"]["unseen"] == HOLDOUT
    table = (out / "evaluation.md").read_text()
    assert "Seen vs unseen concepts (held out of training: yellow, striped" in table
    assert "| method | NRA seen | NRA unseen |" in table and "Concept-presence AUROC" in table
    assert json.loads((out / "evaluation.json").read_text())["zero_shot"]["unseen"]["pairs"] >= 0
    assert holdout_run["evaluation"]["zero_shot"]["unseen"].keys() == {"nra", "hit_rate", "epg", "presence_auroc"}


def test_a_run_without_holdout_has_no_zero_shot_report(tiny_run):
    assert "zero_shot" not in tiny_run["evaluation"]
    table = (Path(tiny_run["run_dir"]) / "evaluation" / "evaluation.md").read_text()
    assert "Seen vs unseen" not in table


# ------------------------------------------------------------------ explain


def test_an_unseen_concept_is_explained_from_its_text(holdout_module, tiny_world, tmp_path):
    images = np.array(tiny_world.split("test").images[:2])
    (tmp_path / "in").mkdir()
    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "in" / f"{i}.png")
        paths.append(tmp_path / "in" / f"{i}.png")
    summary = explain_images(holdout_module, paths, concepts="yellow,striped,red", k=3, out_dir=tmp_path / "out")
    assert summary["failed"] == [] and len(summary["explained"]) == 2
    for entry in summary["explained"]:
        report = json.loads((Path(entry["folder"]) / "report.json").read_text())
        by_name = {c["name"]: c for c in report["concepts"]}
        assert set(by_name) == {"yellow", "striped", "red"}
        regions = np.load(Path(entry["folder"]) / "regions.npz")
        for name in HOLDOUT:
            c = by_name[name]
            assert c["layer"] in report["layers"] and np.isfinite(c["contribution"])
            assert regions[c["region"].split(":")[-1]].shape == images.shape[1:3]
    # In the library call too: the unseen concepts' scores are the translated embedding against their text alone.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    names = list(holdout_module.hparams["concept_names"])
    unseen = torch.tensor([names.index(n) for n in HOLDOUT])
    expl = holdout_module.explain(x, concepts=unseen, k=3)
    assert expl.concepts.tolist() == [unseen.tolist()] * 2 and expl.regions.shape[:2] == (2, 2)
    emb = holdout_module(x)["embedding"]
    expected = holdout_module.scorer.logit_scale * torch.nn.functional.cosine_similarity(
        emb[:, None], holdout_module.scorer.text[unseen][None], dim=-1
    )
    torch.testing.assert_close(expl.scores[:, unseen], expected, rtol=1e-4, atol=1e-4)
