import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cefam_lightning.data.shapes_world import key_object_concepts
from cefam_lightning.methods.base import load_explainer as load_checkpoint
from cefam_lightning.methods.baselines import SingleChannelBaseline, gradcam_maps
from cefam_lightning.methods.cefam.evaluation import ContributionAccuracy, evaluate_on_world, format_table
from cefam_lightning.methods.cefam.pipeline import padded_concepts as _padded_concepts
from cefam_lightning.metrics.functional.region import nra
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.reporting.evaluations import EvaluateError
from tests.cli import cli_error

ROOT = Path(__file__).resolve().parents[1]


def test_padded_concepts_lists_each_images_present_concepts():
    present = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    concepts, valid = _padded_concepts(present)
    assert concepts.shape == (3, 3)
    assert [set(c[v].tolist()) for c, v in zip(concepts, valid, strict=True)] == [{1, 3, 4}, {0}, set()]


def test_contribution_accuracy_counts_by_hand():
    # Image 0: key concepts {0, 1} rank first. Image 1: a non-key concept (2) tops the list, but key concept 0
    # is second. Image 2: misclassified, not counted. Image 3: only key concepts present, counted as trivial.
    # Image 4: all contributions tie at 0 (masking before global pooling), which is no hit.
    contributions = torch.tensor([[0.5, 0.4, 0.1], [0.3, -0.2, 0.6], [0.9, 0.8, 0.0], [0.2, 0.1, 0.0], [0, 0, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    key = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([True, True, False, True, True])
    metric = ContributionAccuracy()
    metric.update(contributions[:2], valid[:2], key[:2], correct[:2])
    metric.update(contributions[2:], valid[2:], key[2:], correct[2:])
    out = metric.compute()
    assert out["images_scored"] == 3 and out["images_without_other_concepts"] == 1 and out["images_correct"] == 4
    assert out["top1_key"].item() == pytest.approx(1 / 3)
    assert out["all_key_first"].item() == pytest.approx(1 / 3)


def test_single_channel_baseline_finds_the_channel_that_tracks_each_concept():
    gen = torch.Generator().manual_seed(0)
    presence = (torch.rand(200, 3, generator=gen) < 0.5).double()
    z = torch.rand(200, 4 + 6, generator=gen, dtype=torch.float64)
    z[:, 2] += 3 * presence[:, 0]  # layer "a", channel 2 tracks concept 0
    z[:, 4 + 5] += 5 * presence[:, 1]  # layer "b", channel 5 tracks concept 1
    presence[:, 2] = 1.0  # concept 2 always occurs: no correlation anywhere
    base = SingleChannelBaseline.from_pooled(["a", "b"], {"a": 4, "b": 6}, z, presence)
    assert base.channels["a"][0] == 2 and base.channels["b"][1] == 5
    assert base.best_layer[0] == 0 and base.best_layer[1] == 1
    assert (base.scores["a"][2] == -1) and (base.scores["b"][2] == -1)
    acts = {"a": torch.rand(2, 4, 3, 3), "b": torch.rand(2, 6, 5, 5)}
    maps = base.maps(acts, torch.tensor([[0, 1], [1, 0]]), "b")
    torch.testing.assert_close(maps[0, 1], acts["b"][0, 5])


def test_gradcam_through_the_tail_equals_gradcam_through_the_whole_network():
    torch.manual_seed(0)
    classifier = build_classifier("shapes_cnn", 5, ["layer2", "layer3"], widths=[4, 6, 8, 8])
    images = torch.rand(3, 3, 32, 32)
    out = classifier(images)
    target = torch.tensor([0, 3, 4])
    maps = gradcam_maps(classifier, out.activations, target, ["layer2", "layer3"])
    # Reference: gradients of the class logit w.r.t. the activations, in one pass from the input.
    x = images.clone().requires_grad_(True)
    ref_out = classifier(x)
    acts = [ref_out.activations[k] for k in ("layer2", "layer3")]
    grads = torch.autograd.grad(ref_out.logits.gather(1, target[:, None]).sum(), acts)
    for layer, a, g in zip(("layer2", "layer3"), acts, grads, strict=True):
        expected = (g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(1).relu()
        torch.testing.assert_close(maps[layer], expected, rtol=1e-4, atol=1e-6)


def test_key_object_concepts_are_the_labels_color_and_shape_and_one_texture(tiny_world, tiny_spec):
    split = tiny_world.split("test")
    key = key_object_concepts(tiny_spec, np.array(split.masks), split.labels)
    names = [c.name for c in tiny_spec.concepts]
    types = [c.type for c in tiny_spec.concepts]
    for row, label in zip(key, split.labels, strict=True):
        chosen = [names[i] for i in row.nonzero()[:, 0]]
        assert set(tiny_spec.classes[label].split()) <= set(chosen)
        assert sorted(types[i] for i in row.nonzero()[:, 0]) == ["color", "shape", "texture"]


def test_evaluation_on_the_tiny_world_is_complete_and_independent_of_batching(tiny_checkpoint, tiny_world):
    module = load_checkpoint(tiny_checkpoint)
    a = evaluate_on_world(module, tiny_world, batch_size=32, per_layer_contributions=True)
    b = evaluate_on_world(module, tiny_world, batch_size=7, per_layer_contributions=True)
    layers = module.classifier.layers
    assert set(a["regions"]) == {"cefam", "gradcam", "single_channel", "random"}
    assert set(a["regions"]["cefam"]) == {*layers, "top1", "best_layer"} and set(a["regions"]["random"]) == {"top1"}
    presence = np.array(tiny_world.split("test").masks).any(axis=(2, 3))
    for method, per_setting in a["regions"].items():
        for setting, values in per_setting.items():
            counted = sum(v for k, v in values.items() if k.startswith("count/")) + values["skipped_empty"]
            assert counted == presence.sum(), (method, setting)  # every present (image, concept) pair, once
            for key, value in values.items():
                # float32 convolutions round differently in other batch sizes, which can reorder near-tied pixels
                # of a map: hence the tolerance (1e-5 was seen to be exceeded by 4e-8 on torch 2.14).
                assert value == pytest.approx(b["regions"][method][setting][key], abs=1e-4), key
    assert a["regions"]["random"]["top1"]["nra/mean"] < 0.3
    assert set(a["contribution"]) == {*layers, "top1", "best_layer"}
    for setting, values in a["contribution"].items():
        assert values == pytest.approx(b["contribution"][setting], nan_ok=True), setting
    assert sum(a["layer_selection"].values()) == pytest.approx(1.0)
    faith = a["faithfulness"]
    assert faith["images"] == len(presence) and set(faith["methods"]) == {"cefam", "gradcam"}
    for method, row in faith["methods"].items():
        assert row == pytest.approx(b["faithfulness"]["methods"][method], abs=1e-4), method
        assert all(0 <= row[f"ic/{n}"] <= 100 for n in ("100%", "50%", "15%"))
    assert sum(faith["gradcam_layer"].values()) == pytest.approx(1.0)
    table = format_table(a)
    assert "Faithfulness of the class map" in table and "| Grad-CAM at that layer |" in table
    assert "Grad-CAM's layer (share of images)" in table  # its possessive, not "Grad-CAM' layer"
    assert "CE-FAM" in table and "single channel" in table and "top-1 layer" in table


NEW_RULES = {"gradient": "full", "region_weights": "positive", "relevance": "map", "contribution_layer": "image"}


@pytest.mark.parametrize("rules", [{}, NEW_RULES], ids=["legacy", "new"])
def test_evaluation_scores_what_explain_batch_explains(tiny_checkpoint, tiny_world, rules):
    """The evaluation and explain_batch share one ExplanationPass: for the present concepts, the evaluation's
    selected layers, CE-FAM region metrics and contribution accuracy are those of explain_batch's explanation of
    the same concepts; its CE-FAM class map is explain's (the top-8 concepts' regions at their selected layers,
    fused by positive contribution), whose AD/IC are computed here by hand."""
    from cefam_lightning.methods.cefam.evaluation import ExplanationEvaluation
    from cefam_lightning.methods.cefam.pipeline import ExplanationPass, explain_batch, fused_class_map
    from cefam_lightning.metrics import RegionMetrics
    from cefam_lightning.metrics.functional.faithfulness import (
        average_drop,
        faithfulness_probabilities,
        increase_in_confidence,
    )

    module = load_checkpoint(tiny_checkpoint)
    split = tiny_world.split("test")
    images = torch.from_numpy(np.array(split.images[:12])).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(np.array(split.masks[:12]))
    labels = torch.from_numpy(np.asarray(split.labels[:12]))
    key = key_object_concepts(tiny_world.spec, masks, labels)
    types = [c.type for c in tiny_world.concepts]
    evaluation = ExplanationEvaluation(
        module.classifier.layers, types, None, rules={"k": 20, **rules}, sync_on_compute=False
    )
    evaluation.update(module, images, masks, labels, key)
    results = evaluation.compute()

    concepts, valid = _padded_concepts(masks.flatten(2).any(dim=2))
    rows = valid.nonzero(as_tuple=True)
    expl = explain_batch(module, images, concepts=concepts, k=20, **rules)
    selected = torch.bincount(expl.layer_index[rows], minlength=len(expl.layers)).tolist()
    assert results["layer_selection"] == {
        layer: n / len(rows[0]) for layer, n in zip(expl.layers, selected, strict=True)
    }
    reference = RegionMetrics(types)
    reference.update(expl.regions[rows], masks[rows[0], concepts[rows]].bool(), concepts[rows])
    want = {k: float(v) for k, v in reference.compute().items()}
    assert results["regions"]["cefam"]["top1"] == pytest.approx(want, rel=0, abs=0, nan_ok=True)
    accuracy = ContributionAccuracy()
    accuracy.update(expl.contributions, valid, key.bool().gather(1, concepts) & valid, expl.target == labels)
    want = {k: float(v) for k, v in accuracy.compute().items()}
    assert results["contribution"]["top1"] == pytest.approx(want, nan_ok=True)

    # best_layer: the same rule with each concept at the layer whose upsampled map has the highest NRA on its mask.
    rule = evaluation.rules["contribution_layer"]
    pass_rules = {k: v for k, v in rules.items() if k != "contribution_layer"}
    p = ExplanationPass(module, images, **pass_rules)
    low = p.layer_regions(concepts)
    pair_masks = masks[rows[0], concepts[rows]].bool()
    fit = torch.stack([nra(p.upsample(low[layer])[rows], pair_masks).nan_to_num(-1.0) for layer in p.layers])
    best = torch.zeros_like(concepts)
    best[rows] = fit.argmax(dim=0)
    if rule == "image":
        by_hand = p.image_contributions(p.selected_regions(low, best), expl.target, valid)
    elif rule == "selected":
        by_hand = p.contributions(
            concepts, torch.where(valid, best, -1), expl.target, k=20, fill=evaluation.rules["fill"]
        )
    else:  # one layer for every concept: the top-1 numbers
        by_hand = expl.contributions
    accuracy = ContributionAccuracy()
    accuracy.update(by_hand, valid, key.bool().gather(1, concepts) & valid, expl.target == labels)
    want = {k: float(v) for k, v in accuracy.compute().items()}
    assert results["contribution"]["best_layer"] == pytest.approx(want, nan_ok=True)
    assert "best layer by mask (upper bound)" in format_table(results)

    # The pass's relevance of some rows only (the evaluation's extra class-map concepts) is theirs in the batch.
    torch.testing.assert_close(p.relevance(concepts, k=20), expl.relevance, rtol=0, atol=0)
    some = torch.tensor([0, 3, 7])
    # (map relevance runs other batches of masked images through the classifier: float32 rounding differs)
    torch.testing.assert_close(
        p.relevance(concepts[some, :2], k=20, rows=some), expl.relevance[some, :2], rtol=1e-4, atol=1e-4
    )

    evaluation = ExplanationEvaluation(
        module.classifier.layers,
        types,
        None,
        {"k": 20, **rules},
        sync_on_compute=False,
        contributions=False,
        faithfulness_top_n=8,
    )
    evaluation.update(module, images, masks, labels)
    got = evaluation.compute()["faithfulness"]["methods"]["cefam"]

    expl = explain_batch(module, images, top_n=8, k=20, **rules)
    class_map = fused_class_map(expl.regions, expl.contributions)
    y, o = faithfulness_probabilities(module.classifier, images, class_map, expl.target)
    for s, name in enumerate(("100%", "50%", "15%")):
        assert got[f"ad/{name}"] == pytest.approx(float(average_drop(y, o[:, s])), abs=1e-3), name
        assert got[f"ic/{name}"] == pytest.approx(float(increase_in_confidence(y, o[:, s])), abs=1e-6), name


def test_evaluation_rejects_a_checkpoint_of_another_world(tiny_checkpoint, cache_dir):
    from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec

    module = load_checkpoint(tiny_checkpoint)
    other = ShapesWorld.build(
        WorldSpec(image_size=32, n_train=8, n_val=4, n_test=4, seed=5, textures=["plain", "dotted"]), cache_dir
    )
    with pytest.raises(EvaluateError, match="concepts"):
        evaluate_on_world(module, other)


def test_evaluate_command_writes_json_and_table(tiny_checkpoint, tmp_path):
    out = tmp_path / "ev"
    args = [sys.executable, "evaluate.py", "--checkpoint", tiny_checkpoint, "--max-images", "12", "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| CE-FAM |" in proc.stdout
    results = json.loads((out / "evaluation.json").read_text())  # strict JSON: NaN written as null
    assert results["images"] == 12 and results["checkpoint"] == tiny_checkpoint
    assert set(results["contribution"]) == {"top1", "best_layer"}  # per-layer contributions only on request
    assert (out / "evaluation.md").read_text().startswith("Rules: gradient=")


def test_evaluate_command_names_a_bad_checkpoint(tmp_path, capsys):
    """In this process (evaluate.py's own entry point runs as a script in the distributed tests)."""
    from cefam_lightning.cli.evaluate import main

    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, bad)
    for path in (bad, tmp_path / "missing.ckpt"):
        assert str(path) in cli_error(main, ["--checkpoint", str(path)], capsys)


def test_training_run_evaluates_explanations_in_its_test_stage(tiny_run):
    run = Path(tiny_run["run_dir"])
    results = json.loads((run / "evaluation" / "evaluation.json").read_text())
    summary = json.loads((run / "metrics.json").read_text())["evaluation"]
    for method in ("cefam", "gradcam", "single_channel", "random"):
        want = results["regions"][method]["top1"]["nra/mean"]
        got = summary["top1_layer"][method]["nra"]
        assert (got is None and want is None) or math.isclose(got, want), method
    assert (run / "evaluation" / "evaluation.md").is_file()
