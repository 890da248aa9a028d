"""Which layers a concept's top-1 layer may be chosen from (``select_layers``), in every place that chooses one."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.explain import main as explain_main
from cefam_lightning.cli.train import main as train_main
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.methods.base import load_explainer as load_checkpoint
from cefam_lightning.methods.baselines import SingleChannelBaseline
from cefam_lightning.methods.cefam.evaluation import evaluate_on_world, format_table
from cefam_lightning.methods.cefam.pipeline import explain_batch
from cefam_lightning.methods.cefam.relevance import parse_select_layers, selectable_layers, top_layer
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ShapesCNN
from tests.cli import cli_error
from tests.conftest import tiny_overrides

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def test_the_last_block_before_global_pooling_is_found_and_left_out_by_auto():
    torch.manual_seed(0)
    shapes = FrozenClassifier(ShapesCNN(6), LAYERS, input_spec=InputSpec(crop=32, resize=32))
    resnet = FrozenClassifier(torchvision.models.resnet18(weights=None, num_classes=10), LAYERS)
    for classifier in (shapes, resnet):
        # Masking layer4's channels with their spatial means cannot move the logits; any earlier layer's can.
        assert classifier.mean_invariant_layers() == ["layer4"]
        assert selectable_layers(classifier) == ["layer1", "layer2", "layer3"]
        assert selectable_layers(classifier, "all") == LAYERS
        assert selectable_layers(classifier, ["layer3", "layer1"]) == ["layer1", "layer3"]  # classifier order
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a callback in bf16-mixed training asks under autocast
        fresh = FrozenClassifier(ShapesCNN(6), LAYERS, input_spec=InputSpec(crop=32, resize=32))
        assert fresh.mean_invariant_layers() == ["layer4"]
    only_last = FrozenClassifier(ShapesCNN(6), ["layer4"], input_spec=InputSpec(crop=32, resize=32))
    assert selectable_layers(only_last) == ["layer4"]  # nothing else to choose: auto keeps it


def test_bad_select_layers_name_the_value():
    classifier = FrozenClassifier(ShapesCNN(6), LAYERS, input_spec=InputSpec(crop=32, resize=32))
    with pytest.raises(ValueError, match=r"'layer9' is not one"):
        selectable_layers(classifier, ["layer2", "layer9"])
    with pytest.raises(ValueError, match=r"non-empty subset"):
        selectable_layers(classifier, [])
    with pytest.raises(ValueError, match=r"'auto', 'all' or a list.*'best'"):
        selectable_layers(classifier, "best")
    assert parse_select_layers("layer1, layer3") == ["layer1", "layer3"]
    assert parse_select_layers("auto") == "auto" and parse_select_layers(None) is None


def test_top_layer_is_the_most_relevant_selectable_layer():
    relevance = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.5, 0.1, 0.2, 0.4]])
    assert top_layer(relevance, LAYERS, LAYERS).tolist() == [3, 0]
    assert top_layer(relevance, LAYERS, LAYERS[:3]).tolist() == [2, 0]
    assert top_layer(relevance, LAYERS, ["layer2", "layer4"]).tolist() == [3, 3]
    assert top_layer(relevance, LAYERS, ["layer2"]).tolist() == [1, 1]


def test_single_channel_best_layer_among_a_subset():
    scores = {
        "layer1": torch.tensor([0.1, 0.9]),
        "layer2": torch.tensor([0.5, 0.2]),
        "layer3": torch.tensor([0.7, 0.1]),
    }
    channels = {layer: torch.zeros(2, dtype=torch.long) for layer in scores}
    sc = SingleChannelBaseline(["layer1", "layer2", "layer3"], channels, scores)
    assert sc.best_layer.tolist() == [2, 0]
    assert sc.best_layer_among(["layer1", "layer2"]).tolist() == [1, 0]
    assert sc.best_layer_among(["layer2"]).tolist() == [1, 1]


@pytest.fixture(scope="module")
def module(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def images(tiny_world):
    return torch.from_numpy(np.array(tiny_world.split("test").images[:6])).permute(0, 3, 1, 2).float() / 255


def test_explain_batch_chooses_among_the_selectable_layers(module, images):
    every = explain_batch(module, images, top_n=4, k=5, select_layers="all")
    auto = explain_batch(module, images, top_n=4, k=5)
    only = explain_batch(module, images, top_n=4, k=5, select_layers=["layer2"])
    assert every.selectable == LAYERS and auto.selectable == LAYERS[:3] and only.selectable == ["layer2"]
    torch.testing.assert_close(auto.relevance, every.relevance)  # relevance is reported at every layer
    assert torch.equal(every.layer_index, every.relevance.argmax(dim=-1))
    assert torch.equal(auto.layer_index, auto.relevance[..., :3].argmax(dim=-1))
    assert (only.layer_index == 1).all()
    # The region is the one at the chosen layer: with a single selectable layer, that layer's maps.
    fixed = explain_batch(module, images, concepts=only.concepts, k=5, select_layers=["layer2"])
    torch.testing.assert_close(fixed.regions, only.regions)


def test_evaluation_chooses_cefam_and_single_channel_layers_among_the_selectable_ones(module, tiny_world):
    auto = evaluate_on_world(module, tiny_world, max_images=16, faithfulness_top_n=None)
    assert auto["layer_selection"]["layer4"] == 0 and auto["settings"]["select_layers"] == LAYERS[:3]
    assert "chosen among layer1, layer2, layer3" in format_table(auto)
    one = evaluate_on_world(module, tiny_world, max_images=16, faithfulness_top_n=None, select_layers=["layer2"])
    assert one["layer_selection"] == {"layer1": 0.0, "layer2": 1.0, "layer3": 0.0, "layer4": 0.0}
    for method in ("cefam", "gradcam", "single_channel"):  # every baseline's top-1 is then layer2 too
        assert one["regions"][method]["top1"] == pytest.approx(one["regions"][method]["layer2"], nan_ok=True), method


def test_commands_take_and_check_select_layers(tiny_checkpoint, tiny_world, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.array(tiny_world.split("test").images[0])).save(image)
    explain_main(
        ["--checkpoint", tiny_checkpoint, "--select-layers", "layer3", "--out", str(tmp_path / "ex"), str(image)]
    )
    report = json.loads((tmp_path / "ex" / "img" / "report.json").read_text())
    assert report["settings"]["select_layers"] == ["layer3"]
    assert {c["layer"] for c in report["concepts"]} == {"layer3"}

    for main, extra in ((explain_main, [str(image)]), (evaluate_main, [])):
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "--checkpoint",
                    tiny_checkpoint,
                    "--select-layers",
                    "layer3,layer9",
                    "--out",
                    str(tmp_path / "x"),
                    *extra,
                ]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert "select" in err[0] and "'layer9' is not one" in err[0]
    assert not (tmp_path / "x").exists()

    results = evaluate_main(
        ["--checkpoint", tiny_checkpoint, "--select-layers", "all", "--max-images", "8", "--out", str(tmp_path / "ev")]
    )
    assert results["settings"]["select_layers"] == LAYERS


def test_training_config_names_a_bad_select_layers(cache_dir, tmp_path, capsys):
    overrides = [*tiny_overrides(cache_dir, tmp_path, "bad"), "cefam.select_layers=[layer2,layer5]"]
    assert re.search(r"cefam.select_layers: .*'layer5' is not one", cli_error(train_main, overrides, capsys))
    assert not Path(tmp_path / "bad").exists()  # checked before the run folder is made
