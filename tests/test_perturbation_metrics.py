"""Deletion / insertion AUC and ROAD (metrics/perturbation.py, metrics/functional/perturbation.py) on generated
data: the curves against a per-step loop, the AUC by hand, a map that finds the evidence against one that does not,
sum states that merge like one pass, and ROAD through pytorch-grad-cam."""

import importlib.util

import pytest
import torch

from cefam_lightning.methods.base import EvaluationSettings
from cefam_lightning.methods.baselines import image_random_maps
from cefam_lightning.methods.class_map import evaluate_class_maps, format_class_map_table
from cefam_lightning.methods.lcam.module import build_lcam_module
from cefam_lightning.metrics import ROAD, DeletionInsertion
from cefam_lightning.metrics.functional.perturbation import (
    blurred,
    curve_auc,
    deletion_insertion_curves,
    pixel_ranks,
    road_probabilities,
)
from cefam_lightning.metrics.functional.seeding import image_seed
from cefam_lightning.models.classifier import build_classifier

HAS_LIBRARY = importlib.util.find_spec("pytorch_grad_cam") is not None
needs_library = pytest.mark.skipif(
    not HAS_LIBRARY, reason="pytorch-grad-cam is not installed (ROAD's imputation is its: pip install -e '.[cams]')"
)


class Quadrant(torch.nn.Module):
    """Class 0's logit grows with the brightness of the top-left 8x8 quadrant; class 1's is 0."""

    def forward(self, x):
        s = 10 * x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 5
        return torch.stack([s, torch.zeros_like(s)], 1)


def _maps():
    good = torch.zeros(2, 16, 16)
    good[:, :8, :8] = 1 + torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    bad = 1 - good / 2  # highest outside the quadrant
    return good, bad


def test_curves_equal_a_per_step_loop():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    deletion, insertion = deletion_insertion_curves(Quadrant(), images, maps, torch.tensor([0, 1]), steps=4)
    ranks = pixel_ranks(maps, (16, 16))
    start = blurred(images)
    for i in range(5):
        keep = (ranks >= i * 64).float()[:, None]  # 256 pixels, 64 per step
        p_del = Quadrant()(images * keep).softmax(1)
        p_ins = Quadrant()(start * keep + images * (1 - keep)).softmax(1)
        assert torch.allclose(deletion[:, i], torch.stack([p_del[0, 0], p_del[1, 1]]), atol=1e-6)
        assert torch.allclose(insertion[:, i], torch.stack([p_ins[0, 0], p_ins[1, 1]]), atol=1e-6)
    assert deletion[:, -1].allclose(Quadrant()(torch.zeros_like(images)).softmax(1)[[0, 1], [0, 1]])


def test_pixel_ranks_are_a_permutation_highest_first_ties_by_position():
    ranks = pixel_ranks(torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]), (2, 2))
    assert ranks.tolist() == [[[1, 2], [0, 3]]]
    r = pixel_ranks(torch.rand(3, 5, 5), (10, 10))
    assert (r.flatten(1).sort(1).values == torch.arange(100)).all()


def test_a_map_on_the_evidence_deletes_faster_and_inserts_faster():
    images = torch.zeros(2, 3, 16, 16)
    images[:, :, :8, :8] = 1  # the evidence, which the blur of the insertion's start spreads out
    target = torch.zeros(2, dtype=torch.long)
    good, bad = _maps()
    d_good, i_good = deletion_insertion_curves(Quadrant(), images, good, target, steps=8)
    d_bad, i_bad = deletion_insertion_curves(Quadrant(), images, bad, target, steps=8)
    assert (curve_auc(d_good) < curve_auc(d_bad) - 0.2).all()
    assert (curve_auc(i_good) > curve_auc(i_bad) + 0.05).all()


def test_curve_auc_by_hand_and_the_metric_over_two_updates_equals_one():
    assert curve_auc(torch.tensor([[0.0, 1.0], [0.2, 0.4]])).tolist() == pytest.approx([0.5, 0.3])
    d = torch.rand(6, 5, generator=torch.Generator().manual_seed(3))
    i = torch.rand(6, 5, generator=torch.Generator().manual_seed(4))
    one, two = DeletionInsertion(steps=4), DeletionInsertion(steps=4)
    one.update(d, i)
    two.update(d[:2], i[:2])
    two.update(d[2:], i[2:])
    a, b = one.compute(), two.compute()
    assert float(a["deletion"]) == pytest.approx(float(curve_auc(d).mean()))
    assert float(a["insertion"]) == pytest.approx(float(curve_auc(i).mean()))
    for key in a:
        assert torch.allclose(a[key], b[key])
    with pytest.raises(ValueError, match=r"expected deletion and insertion curves \(6, 5\)"):
        one.update(d[:, :3], i)


def test_road_metric_averages_and_combines():
    metric = ROAD(percentiles=(20, 80))
    metric.update(torch.tensor([[0.1, 0.3], [0.5, 0.7]]), torch.tensor([[0.9, 0.9], [0.5, 0.7]]))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"road/morf": 0.4, "road/lerf": 0.75, "road/combined": 0.175})
    with pytest.raises(ValueError, match=r"percentiles must be in \(0, 100\)"):
        ROAD(percentiles=(0, 50))


@needs_library
def test_road_through_pytorch_grad_cam_ranks_a_good_map_above_a_bad_one():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.2 + 0.8
    target = torch.zeros(2, dtype=torch.long)
    good, bad = _maps()
    morf_g, lerf_g = road_probabilities(Quadrant(), images, good, target, percentiles=(50, 75), seed=0)
    morf_b, lerf_b = road_probabilities(Quadrant(), images, bad, target, percentiles=(50, 75), seed=0)
    assert morf_g.shape == (2, 2) and (morf_g <= 1).all() and (morf_g >= 0).all()
    # Removing the quadrant first (good map, MoRF) hurts the class more than removing it last.
    assert morf_g.mean() < morf_b.mean() and lerf_g.mean() > lerf_b.mean()
    again = road_probabilities(Quadrant(), images, good, target, percentiles=(50, 75), seed=0)
    assert torch.equal(again[0], morf_g)  # seeded imputation noise


@needs_library
def test_road_noise_is_each_images_own_whatever_the_batch():
    """An image's ROAD numbers depend on the seed and its index, not on the other images of its batch: a split
    evaluated in other batches, or across processes, gives the same numbers."""
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 0.2 + 0.8
    target = torch.zeros(4, dtype=torch.long)
    maps = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(7))
    index = torch.tensor([10, 11, 12, 13])
    whole = road_probabilities(Quadrant(), images, maps, target, percentiles=(50,), seed=3, image_index=index)
    parts = [
        road_probabilities(
            Quadrant(), images[sl], maps[sl], target[sl], percentiles=(50,), seed=3, image_index=index[sl]
        )
        for sl in (slice(0, 1), slice(1, 4))
    ]
    for k in range(2):
        assert torch.allclose(torch.cat([p[k] for p in parts]), whole[k], atol=1e-6)
    # the noise is drawn: another seed, or the same image under another index, imputes other pixels
    other = road_probabilities(Quadrant(), images, maps, target, percentiles=(50,), seed=4, image_index=index)
    shifted = road_probabilities(Quadrant(), images, maps, target, percentiles=(50,), seed=3, image_index=index + 1)
    assert not torch.equal(other[0], whole[0]) and not torch.equal(shifted[0], whole[0])
    with pytest.raises(ValueError, match="image_index has 3 entries for 4 images"):
        road_probabilities(Quadrant(), images, maps, target, percentiles=(50,), image_index=index[:3])


def test_class_map_evaluation_with_curves(tiny_spec, tiny_world, tiny_classifier_weights):
    classifier = build_classifier(
        "shapes_cnn", len(tiny_spec.classes), ["layer4"], weights=tiny_classifier_weights, image_size=32
    )
    module = build_lcam_module(classifier, len(tiny_spec.classes), tiny_spec.classes, "img")
    results = evaluate_class_maps(
        module, tiny_world, "test", EvaluationSettings(batch_size=3, max_images=3, curves=True)
    )
    keys = {"deletion", "insertion"} | ({"road/morf", "road/lerf", "road/combined"} if HAS_LIBRARY else set())
    for row in results["methods"].values():
        assert keys <= set(row) and all(0 <= row[k] <= 1 for k in ("deletion", "insertion"))
    assert results["curves"]["steps"] == 16
    table = format_class_map_table(results)
    assert "deletion AUC ↓" in table and "insertion AUC ↑" in table and ("ROAD MoRF ↓" in table) == HAS_LIBRARY


def test_random_maps_follow_the_evaluation_seed_and_each_image_index():
    """The random-map baseline's ``seed`` (evaluate.py's ``--seed``) gives other maps (torch keeps only a seed's low
    32 bits, which once dropped it); an image's map is its own whatever the batch; seed 0 is image i's seed i."""
    index = torch.tensor([3, 4, 5])
    zero, one = (image_random_maps(index, (6, 6), seed) for seed in (0, 1))
    assert not torch.allclose(zero, one)
    assert torch.equal(image_random_maps(index[1:], (6, 6), 1), one[1:])  # another batch, the same maps
    assert torch.equal(zero[0], torch.rand(6, 6, generator=torch.Generator().manual_seed(3)))
    seeds = {image_seed(s, i) for s in range(4) for i in range(10_000)}
    assert len(seeds) == 40_000 and max(seeds) < 2**32  # no two (seed, image) streams alike
