"""CE-FAM's explanation rules (docs/method.md#explanation-rules): each rule computes what its docs say, the presets
reproduce the authors' rules in one switch, and explain / evaluate say which rules a result used."""

from __future__ import annotations

import json

import pytest
import torch

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.explain import main as explain_main
from cefam_lightning.methods.base import load_explainer
from cefam_lightning.methods.cefam.contributions import concept_contributions
from cefam_lightning.methods.cefam.pipeline import ExplanationPass, explain_batch, padded_concepts
from cefam_lightning.methods.cefam.regions import concept_regions, pool_activations
from cefam_lightning.methods.cefam.rules import LEGACY_RULES, PRESETS, describe_rules, resolve_rules
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.metrics.functional.region import nra
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator
from cefam_lightning.training.config import load_config


def _branch(seed: int = 0, size: int = 32, num_concepts: int = 6, embed_dim: int = 8):
    torch.manual_seed(seed)
    classifier = build_classifier("shapes_cnn", 4, weights=None, image_size=size)
    in_dim = sum(c for c, _, _ in classifier.layer_shapes(size).values())
    translator = Translator(in_dim, embed_dim, [32], input_norm=False).eval()
    text = torch.nn.functional.normalize(torch.randn(num_concepts, embed_dim), dim=1)
    module = type("Branch", (), {})()
    module.classifier, module.translator, module.scorer = classifier, translator, ConceptScorer(text, "clip", 10.0)
    return module, torch.rand(3, 3, size, size)


# ---------------------------------------------------------------------------------------------------- resolving
def test_rules_resolve_checkpoint_then_preset_then_given_and_name_a_bad_value():
    recorded = {"gradient": "direct", "k": 7}
    assert resolve_rules(recorded) == {**LEGACY_RULES, "gradient": "direct", "k": 7}
    assert resolve_rules(recorded, preset="paper") == PRESETS["paper"]
    assert resolve_rules(recorded, {"k": 3, "fill": None}, preset="paper") == {**PRESETS["paper"], "k": 3}
    for given, word in (
        ({"relevance": "softmax"}, "relevance"),
        ({"region_weights": "abs"}, "region_weights"),
        ({"gradient": "total"}, "gradient"),
        ({"k": 0}, "k"),
        ({"select_layers": "best"}, "select_layers"),
        ({"contribution_layer": "layer9"}, "contribution_layer"),
        ({"colour": "red"}, "colour"),
    ):
        with pytest.raises(ValueError, match=word):
            resolve_rules({}, given, layers=["layer1", "layer2"])
    with pytest.raises(ValueError, match="preset"):
        resolve_rules({}, preset="authors")
    assert "relevance=map" in describe_rules({**LEGACY_RULES, "relevance": "map"})


def test_the_paper_rules_config_file_is_the_paper_preset():
    cfg = load_config("configs/experiment/paper_rules.yaml", [])
    section = {key: cfg.cefam[key] for key in PRESETS["paper"]}
    assert section == PRESETS["paper"]


# ---------------------------------------------------------------------------------------------------- each rule
def test_positive_region_weights_draw_the_map_from_the_positive_weights_only():
    module, images = _branch()
    concepts = torch.tensor([[0, 2], [1, 3], [4, 5]])
    signed = ExplanationPass(module, images, gradient="full", region_weights="signed")
    positive = ExplanationPass(module, images, gradient="full", region_weights="positive")
    weights = signed.weights(concepts)
    jac = weights.gather(1, concepts[:, :, None].expand(-1, -1, weights.shape[2]))
    want = concept_regions(signed.activations, signed.layers, jac.clamp_min(0))
    got = positive.layer_regions(concepts)
    for layer in signed.layers:
        torch.testing.assert_close(got[layer], want[layer])
    assert any(not torch.equal(got[layer], signed.layer_regions(concepts)[layer]) for layer in signed.layers)
    # Relevance and contributions rank channels by the signed weights either way.
    torch.testing.assert_close(positive.relevance(concepts), signed.relevance(concepts))


def test_map_relevance_is_the_score_kept_by_the_map_minus_the_score_kept_by_its_complement():
    module, images = _branch(seed=1)
    concepts = torch.tensor([[0, 1], [2, 3], [5, 4]])
    p = ExplanationPass(module, images, gradient="full", region_weights="positive", relevance="map")
    got = p.relevance(concepts)
    low = p.layer_regions(concepts)
    for b in range(3):
        for n in range(2):
            c = int(concepts[b, n])
            for li, layer in enumerate(p.layers):
                m = minmax_normalize(p.upsample(low[layer][b : b + 1, n : n + 1]), dims=2)[0]  # (1, H, W)

                def score(x, c=c):
                    z = pool_activations(module.classifier(x[None]).activations, p.layers)
                    return module.scorer(module.translator(z))[0, c]

                want = score(images[b] * m) - score(images[b] * (1 - m))
                assert float(got[b, n, li]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    # The rows form (a few concepts of some images) gives those images' values.
    some = torch.tensor([0, 2])
    torch.testing.assert_close(p.relevance(concepts[some], rows=some), got[some])


def test_contributions_at_the_last_layer_or_a_named_one_mask_every_concept_there():
    module, images = _branch(seed=2)
    concepts = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 3, 5]])
    for rule, index in (("last", 3), ("layer2", 1)):
        expl = explain_batch(module, images, concepts=concepts, gradient="full", contribution_layer=rule)
        assert (expl.contribution_layer_index == index).all()
        p = ExplanationPass(module, images, gradient="full")
        want = concept_contributions(
            module.classifier,
            p.activations,
            p.logits,
            p.weights(concepts),
            p.z,
            p.slices,
            concepts,
            torch.full_like(concepts, index),
            p.predicted,
            pooled_only=module.classifier.mean_invariant_layers(),
        )
        torch.testing.assert_close(expl.contributions, want)
    selected = explain_batch(module, images, concepts=concepts, contribution_layer="selected")
    assert torch.equal(selected.contribution_layer_index, selected.layer_index)
    with pytest.raises(ValueError, match="contribution_layer"):
        explain_batch(module, images, concepts=concepts, contribution_layer="layer9")


def test_image_contributions_delete_each_concepts_region_from_the_image():
    """``contribution_layer: image``: each concept's region at its selected layer, min-max normalized, is deleted
    from the image (``x * (1 - m)``) and the classifier's relative drop in the explained class's probability is the
    contribution; a constant region deletes nothing; the layer index says "image" (-1)."""
    module, images = _branch(seed=3)
    concepts = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 3, 5]])
    target = torch.tensor([0, 1, 3])
    expl = explain_batch(module, images, concepts=concepts, target=target, relevance="map", contribution_layer="image")
    assert (expl.contribution_layer_index == -1).all()
    p_y = module.classifier(images).logits.softmax(dim=1)[torch.arange(3), target]
    for b in range(3):
        for n in range(3):
            m = minmax_normalize(expl.regions[b, n], dims=2)
            deleted = module.classifier(images[b : b + 1] * (1 - m)).logits.softmax(dim=1)[0, target[b]]
            want = (p_y[b] - deleted) / p_y[b]
            assert float(expl.contributions[b, n]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert expl.contributions.abs().sum() > 0
    # Only the valid slots cost a classifier pass; a constant region contributes nothing.
    p = ExplanationPass(module, images)
    regions = torch.rand(3, 2, 32, 32)
    regions[0, 1] = 0.5
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    got = p.image_contributions(regions, target, valid=valid)
    assert got[0, 1] == pytest.approx(0.0, abs=1e-6) and (got[~valid] == 0).all() and got[0, 0] != 0


def test_the_best_layer_by_mask_is_each_pairs_best_layer(tiny_checkpoint, tiny_world):
    """The authors' Top-4 row: per pair the layer whose map has the highest NRA against the pair's own mask."""
    from cefam_lightning.methods.cefam.evaluation import ExplanationEvaluation
    from cefam_lightning.metrics import RegionMetrics

    module = load_explainer(tiny_checkpoint).eval()
    images, masks, labels = next(tiny_world.split("test").batches(12))
    types = [c.type for c in tiny_world.concepts]
    evaluation = ExplanationEvaluation(module.classifier.layers, types, None, sync_on_compute=False)
    evaluation.update(module, images, masks, labels)
    got = evaluation.compute()["regions"]["cefam"]["best_layer"]

    concepts, valid = padded_concepts(masks.flatten(2).any(dim=2))
    rows = valid.nonzero(as_tuple=True)
    p = ExplanationPass(module, images)
    low = p.layer_regions(concepts)
    pair_masks = masks[rows[0], concepts[rows]]
    per_layer = torch.stack([p.upsample(low[layer])[rows] for layer in p.layers])  # (L, P, H, W)
    scores = torch.stack([nra(maps, pair_masks) for maps in per_layer])
    best = per_layer[scores.nan_to_num(-1).argmax(0), torch.arange(len(rows[0]))]
    reference = RegionMetrics(types)
    reference.update(best, pair_masks, concepts[rows])
    want = {k: float(v) for k, v in reference.compute().items()}
    assert got == pytest.approx(want, nan_ok=True)
    top1 = evaluation.compute()["regions"]["cefam"]["top1"]["nra/mean"]
    assert got["nra/mean"] >= top1 - 1e-9  # an upper bound on the layer choice


# ---------------------------------------------------------------------------------------------------- the CLIs
def test_explain_and_evaluate_take_the_paper_preset_and_say_which_rules_they_used(
    tiny_checkpoint, tiny_world, cache_dir, tmp_path
):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(tiny_world.split("test").images[0]).save(image)
    layers = list(load_explainer(tiny_checkpoint).classifier.layers)
    out = tmp_path / "ex"
    explain_main(["--checkpoint", tiny_checkpoint, "--preset", "paper", "--k", "4", "--out", str(out), str(image)])
    report = json.loads(next(out.glob("*/report.json")).read_text())
    assert {k: report["settings"][k] for k in PRESETS["paper"]} == {
        **PRESETS["paper"],
        "k": 4,  # a rule given as well wins over the preset
        "select_layers": layers,
    }
    assert all(c["contribution_layer"] == c["layer"] for c in report["concepts"])  # contributions where selected

    results = evaluate_main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--cache-dir",
            str(cache_dir),
            "--max-images",
            "8",
            "--relevance",
            "map",
            "--contribution-layer",
            "last",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert results["settings"]["relevance"] == "map" and results["settings"]["contribution_layer"] == "last"
    table = (tmp_path / "ev" / "evaluation.md").read_text()
    assert table.startswith("Rules: ") and "relevance=map" in table and "contribution layer=last" in table
    assert "best layer by mask (upper bound)" in table


def test_a_bad_rule_on_the_command_line_is_one_error_line(tiny_checkpoint, cache_dir, tmp_path, capsys):
    args = ["--checkpoint", tiny_checkpoint, "--cache-dir", str(cache_dir), "--out", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as e:
        evaluate_main([*args, "--contribution-layer", "layer9"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "layer9" in err[0]


def test_training_config_names_a_contribution_layer_the_classifier_lacks(cache_dir, tmp_path, capsys):
    from cefam_lightning.cli.train import main as train_main
    from tests.cli import cli_error
    from tests.conftest import tiny_overrides

    overrides = [*tiny_overrides(cache_dir, tmp_path, "bad"), "cefam.contribution_layer=layer9"]
    expected = "cefam.contribution_layer must be 'selected', 'last', 'image' or one of"
    assert expected in cli_error(train_main, overrides, capsys)
    assert not (tmp_path / "bad").exists()  # checked before the run folder is made


def test_the_explanation_quality_benchmark_runs_its_whole_path_small(tmp_path):
    """benchmarks/explanation_quality.py at toy size (one tiny world, one epoch): trains, evaluates both rule sets
    and prints the tables and the floors (the numbers are meaningless at this size)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "benchmarks/explanation_quality.py", "--small", "--worlds", "C", "--max-images", "8"]
    args += [
        "--out",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json",
        str(tmp_path / "q.json"),
    ]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| CE-FAM, default rules |" in proc.stdout and "| CE-FAM, the authors' rules |" in proc.stdout
    assert "- contribution accuracy >= 0.85: C " in proc.stdout
    assert "| C | cyan, dotted |" in proc.stdout and "- unseen NRA >= 0.8 x seen: C " in proc.stdout
    numbers = json.loads((tmp_path / "q.json").read_text())
    assert set(numbers["worlds"]["C"]) == {"defaults", "direct", "paper"} and "ratio" in numbers["zero_shot"]["C"]
    assert 0 <= numbers["worlds"]["C"]["defaults"]["best_layer_contribution"] <= 1
    assert "best layer by mask contribution acc. (upper bound)" in proc.stdout
    assert "relevance=paper" in numbers["rules"]["paper"] and "relevance=map" in numbers["rules"]["defaults"]
