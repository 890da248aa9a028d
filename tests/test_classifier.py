import pytest
import torch
import torchvision

from cefam_lightning.classifier import FrozenClassifier, build_classifier


def test_shapes_cnn_layers_and_logits_in_one_pass():
    clf = build_classifier("shapes_cnn", num_classes=6)
    out = clf(torch.rand(2, 3, 64, 64))
    assert out.logits.shape == (2, 6)
    assert {k: tuple(v.shape) for k, v in out.activations.items()} == {
        "layer1": (2, 16, 64, 64),
        "layer2": (2, 32, 32, 32),
        "layer3": (2, 64, 16, 16),
        "layer4": (2, 128, 8, 8),
    }


def test_resnet50_default_layers_match_the_spec():
    clf = build_classifier("resnet50", num_classes=1000)
    assert clf.layer_shapes(224) == {
        "layer1": (256, 56, 56),
        "layer2": (512, 28, 28),
        "layer3": (1024, 14, 14),
        "layer4": (2048, 7, 7),
    }


def test_logits_are_the_models_own_on_normalized_input():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    expected_model = torchvision.models.resnet18(num_classes=10)
    expected_model.load_state_dict(model.state_dict())
    expected_model.eval()
    clf = FrozenClassifier(model, ["layer3"], mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    x = torch.rand(2, 3, 64, 64)
    out = clf(x)
    torch.testing.assert_close(out.logits, expected_model((x - 0.5) / 0.2))
    assert out.activations["layer3"].shape == (2, 256, 4, 4)


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer5'\].*Valid names:.*layer4"):
        build_classifier("resnet18", num_classes=10, layers=["layer3", "layer5"])


def test_unknown_classifier_name():
    with pytest.raises(ValueError, match="Unknown classifier 'resnet7'"):
        build_classifier("resnet7", num_classes=10)


def test_frozen_and_always_in_eval_mode():
    clf = build_classifier("resnet18", num_classes=10)
    assert not any(p.requires_grad for p in clf.parameters())
    clf.train()
    assert not clf.training
    assert not any(m.training for m in clf.modules())


def test_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "weights.pth"
    # A DDP-style checkpoint: nested under "state_dict" with "module." prefixes.
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    clf = build_classifier("resnet18", num_classes=10, weights=path)
    loaded = dict(clf.model.named_parameters())
    torch.testing.assert_close(loaded["fc.weight"], source.fc.weight)
    torch.testing.assert_close(loaded["conv1.weight"], source.conv1.weight)


def test_bad_weights_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        build_classifier("resnet18", num_classes=10, weights=tmp_path / "nothing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        build_classifier("resnet18", num_classes=10, weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth.*do not fit resnet18 with 10 classes"):
        build_classifier("resnet18", num_classes=10, weights=wrong)
