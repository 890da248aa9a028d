import pytest
import torch

from cefam_lightning.methods.cefam.regions import (
    concept_regions,
    concept_regions_reference,
    pool_activations,
    score_jacobian,
    upsample_regions,
)
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.components import ConceptScorer, Translator

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    clf = build_classifier("shapes_cnn", num_classes=4)
    acts = clf(torch.rand(3, 3, 32, 32)).activations
    translator = Translator(240, 16, [32, 24], input_norm=True)
    # Non-trivial running statistics, so the eval-mode standardization is part of what is differentiated.
    translator.net.input_norm.running_mean.uniform_(0, 0.5)
    translator.net.input_norm.running_var.uniform_(0.01, 0.2)
    scorer = ConceptScorer(torch.randn(10, 16), "siglip", logit_scale=10.0, logit_bias=-3.0)
    return acts, translator, scorer


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scorer_jacobian_is_exact(kind):
    torch.manual_seed(1)
    scorer = ConceptScorer(torch.randn(5, 8), kind, logit_scale=7.0, logit_bias=-2.0)
    e = torch.randn(3, 8, dtype=torch.float32)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda x: scorer(x[None])[0], ei) for ei in e])
    torch.testing.assert_close(scorer.jacobian(e), expected, rtol=1e-4, atol=1e-5)


def test_batched_regions_equal_the_per_concept_autograd_loop(parts):
    acts, translator, scorer = parts
    translator.train()  # the Jacobian must switch to eval statistics and switch back
    jac = score_jacobian(translator, scorer, pool_activations(acts, LAYERS))
    assert translator.training
    batched = concept_regions(acts, LAYERS, jac)
    reference = concept_regions_reference(acts, LAYERS, translator, scorer, range(scorer.num_concepts))
    for layer in LAYERS:
        assert batched[layer].shape == (3, 10, *acts[layer].shape[-2:])
        assert batched[layer].abs().max() > 0
        torch.testing.assert_close(batched[layer], reference[layer], rtol=1e-4, atol=1e-6)


def test_forward_mode_jacobian_when_the_embedding_is_wider_than_z(parts):
    acts, _, _ = parts
    torch.manual_seed(2)
    translator = Translator(240, 300, [16])  # d=300 > dim(z)=240: jacfwd
    scorer = ConceptScorer(torch.randn(4, 300), "clip")
    jac = score_jacobian(translator, scorer, pool_activations(acts, LAYERS))
    reference = concept_regions_reference(acts, LAYERS, translator, scorer, range(4))
    batched = concept_regions(acts, LAYERS, jac)
    for layer in LAYERS:
        torch.testing.assert_close(batched[layer], reference[layer], rtol=1e-4, atol=1e-6)


def test_concept_and_layer_subsets_and_upsampling(parts):
    acts, translator, scorer = parts
    jac = score_jacobian(translator, scorer, pool_activations(acts, LAYERS))
    full = concept_regions(acts, LAYERS, jac)
    part = concept_regions(acts, LAYERS, jac, concepts=[7, 2], select=["layer3"])
    assert list(part) == ["layer3"]
    torch.testing.assert_close(part["layer3"], full["layer3"][:, [7, 2]])
    up = upsample_regions(part["layer3"], (32, 32))
    assert up.shape == (3, 2, 32, 32)


def test_jacobian_stays_float32_under_autocast(parts):
    acts, translator, scorer = parts
    z = pool_activations(acts, LAYERS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        jac = score_jacobian(translator, scorer, z)
    assert jac.dtype == torch.float32
    torch.testing.assert_close(jac, score_jacobian(translator, scorer, z))


def test_concept_regions_benchmark_runs_every_row_small():
    """benchmarks/concept_regions.py at a tiny size: every row (both rules, the loops, the floors, the memory) prints;
    the timings themselves mean nothing at this size."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "benchmarks/concept_regions.py", "--arch", "resnet18", "--image-size", "32", "--batch", "2"]
    args += ["--concepts", "20", "--embed-dim", "8", "--top", "3", "--repeats", "1", "--full-products", "3"]
    args += ["--loop-subset", "1", "--gradcam-subset", "1", "--direct-loop-subset", "2", "--memory"]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("(a) ", "(b) ", "(c) ", "(d) ", "(e) ", "(g) ", "(e)/(c) =", "(d)/(a) =", "(b)/(a) =", "peak memory"):
        assert row in out, (row, out)
    assert "(f) " in out  # timed, or skipped with a note when pytorch-grad-cam is missing
    assert "(3 of 8 products timed, scaled)" in out
    assert out.count("PASS") + out.count("MISS") == 2
