"""Faithfulness metrics of class maps (SPEC §4): masked inputs, Average Drop, Increase in Confidence."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cefam_lightning.metrics import Faithfulness
from cefam_lightning.metrics.functional import (
    average_drop,
    faithfulness_probabilities,
    increase_in_confidence,
    masked_inputs,
)


def _upsampled_normalized(map_: torch.Tensor, size: int) -> torch.Tensor:
    """One map upsampled bilinearly, then min-max normalized: what the kept pixels are ranked by."""
    up = F.interpolate(map_[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return (up - up.min()) / (up.max() - up.min())


def _probabilities(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) * 0.9 + 0.05, torch.rand(n, 3, generator=gen)


def test_masked_inputs_multiplies_the_upsampled_normalized_map():
    gen = torch.Generator().manual_seed(0)
    images, maps = torch.rand(3, 3, 16, 16, generator=gen), torch.randn(3, 4, 4, generator=gen) * 5
    out = masked_inputs(images, maps)
    for i in range(3):
        torch.testing.assert_close(out[i], images[i] * _upsampled_normalized(maps[i], 16))


@pytest.mark.parametrize("keep", [0.5, 0.15, 0.01])
def test_keep_thresholding_keeps_the_top_fraction(keep):
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 5, 5, generator=gen)
    out = masked_inputs(torch.ones(4, 3, 20, 20), maps, keep=keep)
    expected_count = round(keep * 400)
    for i in range(4):
        kept = out[i, 0] > 0
        assert int(kept.sum()) == expected_count
        ranked = _upsampled_normalized(maps[i], 20)
        # Every kept pixel ranks above every dropped one, and keeps its map value.
        assert ranked[kept].min() >= ranked[~kept].max()
        torch.testing.assert_close(out[i, 0][kept], ranked[kept])
    assert torch.equal(out[:, 0], out[:, 2])  # the same mask on every channel


def test_constant_map_masks_everything_and_full_keep_is_the_default():
    images = torch.rand(2, 3, 8, 8)
    assert masked_inputs(images, torch.full((2, 8, 8), 3.0)).abs().sum() == 0
    maps = torch.rand(2, 8, 8)
    assert torch.equal(masked_inputs(images, maps, keep=1.0), masked_inputs(images, maps))


def test_masked_inputs_rejects_bad_keep_and_shapes():
    images, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4)
    for keep in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep"):
            masked_inputs(images, maps, keep=keep)
    with pytest.raises(ValueError, match=r"maps \(3, 4, 4\)"):
        masked_inputs(images, torch.rand(3, 4, 4))


def test_average_drop_and_increase_in_confidence_equal_a_direct_loop():
    y, o = _probabilities(50, 2)
    for column in range(3):
        yy, oo = y.tolist(), o[:, column].tolist()
        ad = 100 * sum(max(0.0, a - b) / a for a, b in zip(yy, oo, strict=True)) / len(yy)
        ic = 100 * sum(b > a for a, b in zip(yy, oo, strict=True)) / len(yy)
        assert average_drop(y, o[:, column]).item() == pytest.approx(ad, rel=1e-9)
        assert increase_in_confidence(y, o[:, column]).item() == pytest.approx(ic, rel=1e-12)
    # One column per setting gives each setting's value.
    torch.testing.assert_close(average_drop(y, o), torch.stack([average_drop(y, o[:, c]) for c in range(3)]))


def test_empty_input_gives_nan_and_bad_shapes_raise():
    assert average_drop(torch.ones(0), torch.ones(0)).isnan()
    assert increase_in_confidence(torch.ones(0), torch.ones(0)).isnan()
    with pytest.raises(ValueError, match="expected y"):
        average_drop(torch.ones(3), torch.ones(4))


class _TinyNet(nn.Module):
    """Returns plain logits (any classifier callable works, not only FrozenClassifier)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.net(x))


class _WithLogits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return type("Out", (), {"logits": self.net(x)})()


def test_faithfulness_probabilities_equal_a_per_image_loop():
    net = _TinyNet().eval()
    gen = torch.Generator().manual_seed(3)
    images, maps = torch.rand(4, 3, 12, 12, generator=gen), torch.rand(4, 3, 3, generator=gen)
    keeps = (1.0, 0.5, 0.15)
    target = torch.tensor([0, 3, 1, 4])
    y, o = faithfulness_probabilities(net, images, maps, target, keeps)
    assert y.shape == (4,) and o.shape == (4, 3)
    with torch.no_grad():
        for i in range(4):
            assert y[i].item() == pytest.approx(net(images[i : i + 1]).softmax(1)[0, target[i]].item(), abs=1e-6)
            for s, keep in enumerate(keeps):
                x = masked_inputs(images[i : i + 1], maps[i : i + 1], keep)
                assert o[i, s].item() == pytest.approx(net(x).softmax(1)[0, target[i]].item(), abs=1e-6)
    # Default target: the prediction; an object with .logits works too; given logits skip the first pass.
    y_pred, o_pred = faithfulness_probabilities(_WithLogits(net), images, maps)
    with torch.no_grad():
        logits = net(images)
    y_given, o_given = faithfulness_probabilities(net, images, maps, None, keeps, logits=logits)
    torch.testing.assert_close(y_pred, logits.softmax(1).amax(1))
    torch.testing.assert_close((y_given, o_given), (y_pred, o_pred))


def test_metric_equals_functional_over_two_updates():
    y, o = _probabilities(40, 4)
    metric = Faithfulness()
    metric.update(y[:15], o[:15])
    metric.update(y[15:], o[15:])
    out = metric.compute()
    assert list(out) == ["ad/100%", "ic/100%", "ad/50%", "ic/50%", "ad/15%", "ic/15%"]
    for s, name in enumerate(("100%", "50%", "15%")):
        assert out[f"ad/{name}"].item() == pytest.approx(average_drop(y, o[:, s]).item(), rel=1e-12)
        assert out[f"ic/{name}"].item() == pytest.approx(increase_in_confidence(y, o[:, s]).item(), rel=1e-12)


def test_two_ranks_merge_to_the_single_process_result():
    y, o = _probabilities(30, 5)
    whole, rank0, rank1 = Faithfulness(), Faithfulness(), Faithfulness()
    whole.update(y, o)
    rank0.update(y[:11], o[:11])
    rank1.update(y[11:], o[11:])
    rank0.merge_state(rank1)  # what a DDP "sum" reduction of the states gives
    for key, value in whole.compute().items():
        assert rank0.compute()[key].item() == pytest.approx(value.item(), rel=1e-12), key


def test_metric_settings_and_errors():
    metric = Faithfulness(keeps=(0.3,))
    metric.update(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75]))  # one setting: (N,) is accepted
    assert {k: v.item() for k, v in metric.compute().items()} == {"ad/30%": 25.0, "ic/30%": 50.0}
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert Faithfulness().compute()["ad/100%"].isnan()
    with pytest.raises(ValueError, match=r"o must be \(N, 3\)"):
        Faithfulness().update(torch.ones(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="duplicate"):
        Faithfulness(keeps=(0.5, 0.5))
    with pytest.raises(ValueError, match="keep"):
        Faithfulness(keeps=(0.0,))
