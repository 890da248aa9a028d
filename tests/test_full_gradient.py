"""Full-gradient concept regions (the total derivative through the rest of the classifier, as the CE-FAM authors'
code takes it) against a per-concept autograd reference at every layer; the direct path unchanged."""

from __future__ import annotations

import pytest
import torch

from cefam_lightning.methods.cefam.pipeline import ExplanationPass, explain_batch
from cefam_lightning.methods.cefam.regions import (
    concept_regions,
    concept_regions_reference_full,
    full_channel_gradients,
    score_jacobian,
    vjp_channel_sums,
)
from cefam_lightning.methods.cefam.relevance import layer_relevance
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator


def _parts(classifier, image_size: int, num_concepts: int, embed_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    in_dim = sum(c for c, _, _ in classifier.layer_shapes(image_size).values())
    translator = Translator(in_dim, embed_dim, [32], input_norm=False).eval()
    text = torch.nn.functional.normalize(torch.randn(num_concepts, embed_dim), dim=1)
    scorer = ConceptScorer(text, "clip", 10.0, 0.0)
    images = torch.rand(2, 3, image_size, image_size)
    return translator, scorer, images


def _module(classifier, translator, scorer):
    return type("Branch", (), {"classifier": classifier, "translator": translator, "scorer": scorer})()


def _assert_maps_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    for layer in want:
        scale = want[layer].abs().max().clamp_min(1e-12)
        err = (got[layer] - want[layer]).abs().max() / scale
        assert float(err) <= rtol, (layer, float(err))


@pytest.mark.parametrize(
    ("name", "size", "num_concepts", "embed_dim"),
    [
        ("shapes_cnn", 32, 5, 8),  # fewer concepts than embedding dims: one backward pass per concept
        ("shapes_cnn", 32, 12, 6),  # more: every concept from the 6 embedding dimensions' products
        ("resnet50", 64, 3, 16),
        ("resnet50", 64, 20, 8),
    ],
)
def test_full_gradient_regions_equal_a_per_concept_autograd_reference_at_every_layer(
    name, size, num_concepts, embed_dim
):
    torch.manual_seed(1)
    classifier = build_classifier(name, 4, weights=None, image_size=size) if name == "shapes_cnn" else None
    if classifier is None:
        classifier = build_classifier(name, 4, weights=None, input_spec={"crop": size, "resize": size})
    translator, scorer, images = _parts(classifier, size, num_concepts, embed_dim)
    layers = list(classifier.layers)
    concepts = list(range(num_concepts))
    p = ExplanationPass(_module(classifier, translator, scorer), images, select_layers="all", gradient="full")
    got = p.layer_regions(torch.tensor(concepts).expand(2, -1))
    want = concept_regions_reference_full(classifier, images, layers, translator, scorer, concepts)
    _assert_maps_close(got, want)
    # Only the last explained layer has no later layers: there the two derivatives agree.
    direct = concept_regions(p.activations, layers, score_jacobian(translator, scorer, p.z))
    _assert_maps_close({layers[-1]: got[layers[-1]]}, {layers[-1]: direct[layers[-1]]})
    assert not torch.allclose(got[layers[0]], direct[layers[0]], rtol=1e-3)  # the early layers differ


def test_the_concepts_asked_for_are_computed_once_and_alone():
    classifier = build_classifier("shapes_cnn", 4, weights=None, image_size=32)
    translator, scorer, images = _parts(classifier, 32, 9, 16)
    p = ExplanationPass(_module(classifier, translator, scorer), images, gradient="full")
    weights = p.weights(torch.tensor([[2, 5], [5, 7]]))
    assert p._computed.nonzero().flatten().tolist() == [2, 5, 7]  # only these rows ran a backward pass
    rows = full_channel_gradients(p._graph, translator, scorer, [2, 5, 7])
    torch.testing.assert_close(weights[:, [2, 5, 7]], rows, rtol=0, atol=0)
    assert weights[:, 0].abs().sum() == 0  # not computed


def test_relevance_contributions_and_regions_rank_by_the_same_full_weights(tiny_checkpoint, tiny_world):
    from cefam_lightning.methods.base import load_explainer

    module = load_explainer(tiny_checkpoint)
    images = torch.from_numpy(tiny_world.split("test").images[:3].copy()).permute(0, 3, 1, 2).float() / 255
    full = explain_batch(module, images, top_n=3, k=5, select_layers="all", gradient="full")
    direct = explain_batch(module, images, top_n=3, k=5, select_layers="all", gradient="direct")
    assert torch.equal(full.concepts, direct.concepts) and torch.equal(full.scores, direct.scores)
    p = ExplanationPass(module, images, select_layers="all", gradient="full")
    want = layer_relevance(p.z, p.weights(full.concepts), p.slices, module.translator, module.scorer, full.concepts, 5)
    torch.testing.assert_close(full.relevance, want)
    assert not torch.allclose(full.relevance, direct.relevance)  # the channel rankings moved with the weights


def test_the_direct_path_is_the_jacobian_of_the_pooled_activations(tiny_checkpoint, tiny_world):
    from cefam_lightning.methods.base import load_explainer

    module = load_explainer(tiny_checkpoint)
    images = torch.from_numpy(tiny_world.split("test").images[:2].copy()).permute(0, 3, 1, 2).float() / 255
    p = ExplanationPass(module, images)
    assert p.gradient == "direct" and p.weights() is p.jacobian  # one Jacobian, no backward pass
    with pytest.raises(ValueError, match="gradient must be one of"):
        ExplanationPass(module, images, gradient="total")


@pytest.mark.parametrize(("num_concepts", "embed_dim"), [(12, 6), (4, 16)])  # the all-concept and per-concept branches
def test_chunked_and_batched_products_equal_one_at_a_time(num_concepts, embed_dim):
    """Memory is bounded by ``chunk`` products at a time; how they are grouped does not change the weights."""
    classifier = build_classifier("shapes_cnn", 4, weights=None, image_size=32)
    translator, scorer, images = _parts(classifier, 32, num_concepts, embed_dim)
    p = ExplanationPass(_module(classifier, translator, scorer), images, gradient="full")
    concepts = list(range(num_concepts))
    e = translator(torch.cat([a.mean(dim=(2, 3)) for a in p._graph], dim=1))
    one_at_a_time = vjp_channel_sums(e, range(embed_dim), p._graph, chunk=1, batched=False)
    want = full_channel_gradients(p._graph, translator, scorer, concepts, chunk=1)
    for chunk in (1, 3, 64):
        for batched in (False, True):
            got = vjp_channel_sums(e, range(embed_dim), p._graph, chunk=chunk, batched=batched)
            torch.testing.assert_close(got, one_at_a_time, rtol=1e-6, atol=1e-6)
        got = full_channel_gradients(p._graph, translator, scorer, concepts, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_full_regions_and_weights_stay_float32_under_autocast():
    """bf16 autocast around the whole pass (as in bf16-mixed training) leaves the full rule's weights and regions
    float32 and equal to those of a float32 run."""
    classifier = build_classifier("shapes_cnn", 4, weights=None, image_size=32)
    translator, scorer, images = _parts(classifier, 32, 12, 6)
    module = _module(classifier, translator, scorer)
    concepts = torch.tensor([[0, 3, 7], [1, 3, 11]])
    p32 = ExplanationPass(module, images, select_layers="all", gradient="full")
    want_weights, want_maps = p32.weights(concepts).clone(), p32.layer_regions(concepts)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        p = ExplanationPass(module, images, select_layers="all", gradient="full")
        weights, maps = p.weights(concepts), p.layer_regions(concepts)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    for layer in want_maps:
        assert maps[layer].dtype == torch.float32, layer
    _assert_maps_close(maps, want_maps, rtol=1e-5)
