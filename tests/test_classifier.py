"""Frozen classifiers of every family: logits and maps in one pass, token layers, tails, weights, transforms."""

import math

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from cefam_lightning.data.transforms import InputSpec, image_transform
from cefam_lightning.methods.cefam.contributions import concept_contributions
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.methods.cefam.pipeline import explain_batch
from cefam_lightning.methods.cefam.regions import layer_slices, pool_activations, score_jacobian
from cefam_lightning.methods.cefam.relevance import top_channels
from cefam_lightning.models.classifier import (
    SHAPES_MEAN,
    SHAPES_STD,
    FrozenClassifier,
    build_classifier,
    load_state_dict_file,
)
from cefam_lightning.models.components import ConceptScorer, Translator


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


# ---------------------------------------------------------------------- families, token layers
# Expensive models are built once per module; everything runs at small inputs except one ViT-B/16 pass at 224 px
# for the SPEC's 768 x 14 x 14 grid.
TIMM_VIT_LAYERS = [f"blocks.{i}" for i in range(6)]


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return build_classifier("vgg16", num_classes=4)


@pytest.fixture(scope="module")
def vit_b_16():
    torch.manual_seed(0)
    clf = build_classifier("vit_b_16", num_classes=3)
    with torch.no_grad():  # torchvision zero-initializes the head, which would make every logit 0
        torch.nn.init.normal_(clf.model.get_submodule("heads.head").weight)
    return clf


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """timm's test ViT at 32 px (a 2 x 2 grid plus a class token), weights loaded from a local file."""
    torch.manual_seed(0)
    plain = timm.create_model("test_vit", num_classes=5, img_size=32).eval()
    path = tmp_path_factory.mktemp("timm") / "test_vit.pth"
    torch.save(plain.state_dict(), path)
    return plain, build_classifier("timm:test_vit", num_classes=5, weights=path, image_size=32), path


def _tiny_torchvision_vit(num_classes=5):
    """A small torchvision VisionTransformer: 32 px, 8 px patches (4 x 4 grid + class token), 3 blocks."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes
    ).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head: constant logits
    return model


def test_vgg16_default_layers_are_each_blocks_last_relu(vgg16):
    # Blocks 2..5 end at ReLUs 8, 15, 22, 29 (each followed by a max-pool); 32 px keeps the test cheap.
    relus = [vgg16.model.get_submodule(layer) for layer in vgg16.layers]
    assert vgg16.layers == ["features.8", "features.15", "features.22", "features.29"]
    assert all(isinstance(m, torch.nn.ReLU) for m in relus)
    out = vgg16(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 4)
    assert {k: tuple(v.shape) for k, v in out.activations.items()} == {
        "features.8": (2, 128, 16, 16),
        "features.15": (2, 256, 8, 8),
        "features.22": (2, 512, 4, 4),
        "features.29": (2, 512, 2, 2),
    }


def test_vgg16_bn_default_layers_follow_its_own_indices():
    clf = build_classifier("vgg16_bn", num_classes=2)
    assert clf.layers == ["features.12", "features.22", "features.32", "features.42"]
    for layer in clf.layers:  # each a ReLU right before a max-pool
        index = int(layer.split(".")[1])
        assert isinstance(clf.model.get_submodule(layer), torch.nn.ReLU)
        assert isinstance(clf.model.get_submodule(f"features.{index + 1}"), torch.nn.MaxPool2d)


def test_vit_b_16_gives_the_spec_grid_of_its_last_normalized_tokens(vit_b_16):
    captured = {}
    ln = vit_b_16.model.get_submodule("encoder.ln")
    handle = ln.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    try:
        out = vit_b_16(torch.rand(1, 3, 224, 224))
    finally:
        handle.remove()
    assert vit_b_16.layers == ["encoder.ln"]
    grid = out.activations["encoder.ln"]
    assert grid.shape == (1, 768, 14, 14) and out.logits.shape == (1, 3)
    tokens = captured["tokens"]  # (1, 197, 768): class token first, then the 14 x 14 patches row by row
    torch.testing.assert_close(out.activations.prefix_tokens["encoder.ln"], tokens[:, :1])
    for r, c in [(0, 0), (0, 13), (5, 2), (13, 13)]:
        torch.testing.assert_close(grid[0, :, r, c], tokens[0, 1 + 14 * r + c])
    tail = vit_b_16.tail("encoder.ln")  # the head reads the class token only
    torch.testing.assert_close(tail(grid, out.activations.prefix_tokens["encoder.ln"]), out.logits)


def test_token_grid_is_oriented_like_the_patch_embedding():
    """With no position embedding, the tokens entering the encoder are the patch embedding's conv map
    flattened: the token layer's map must be that very NCHW map, so rows and columns are not swapped."""
    model = _tiny_torchvision_vit()
    with torch.no_grad():
        model.encoder.pos_embedding.zero_()
    clf = FrozenClassifier(model, ["conv_proj", "encoder.dropout"], input_spec=InputSpec(32, 32))
    x = torch.rand(2, 3, 32, 32)
    out = clf(x)
    torch.testing.assert_close(out.activations["encoder.dropout"], out.activations["conv_proj"])
    assert out.activations["conv_proj"].shape == (2, 16, 4, 4)
    assert "conv_proj" not in out.activations.prefix_tokens  # a plain map has no prefix tokens
    torch.testing.assert_close(out.logits, model(clf.normalize(x)))


def test_timm_vit_tokens_become_maps_with_the_class_token_kept_aside(timm_vit):
    plain, clf, _ = timm_vit
    assert clf.layers == TIMM_VIT_LAYERS  # timm's feature_info modules
    x = torch.rand(2, 3, 32, 32)
    out = clf(x)
    assert {k: tuple(v.shape) for k, v in out.activations.items()} == {k: (2, 64, 2, 2) for k in TIMM_VIT_LAYERS}
    assert {k: tuple(v.shape) for k, v in out.activations.prefix_tokens.items()} == {
        k: (2, 1, 64) for k in TIMM_VIT_LAYERS
    }
    captured = {}
    handle = plain.blocks[3].register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    try:
        expected_logits = plain(clf.normalize(x))
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, expected_logits)  # the local weights were loaded, one pass
    tokens = captured["tokens"]
    torch.testing.assert_close(out.activations["blocks.3"].flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(out.activations.prefix_tokens["blocks.3"], tokens[:, :1])


def test_timm_cnn_layers_and_logits(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=4).eval()
    path = tmp_path / "test_resnet.safetensors"  # the format timm/Hugging Face weights come in
    from safetensors.torch import save_file

    save_file(plain.state_dict(), str(path))
    clf = build_classifier("timm:test_resnet", num_classes=4, weights=path, image_size=64)
    assert clf.layers == [f["module"] for f in plain.feature_info] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.rand(2, 3, 64, 64)
    out = clf(x)
    torch.testing.assert_close(out.logits, plain(clf.normalize(x)))
    assert {k: tuple(v.shape[1:]) for k, v in out.activations.items()} == {
        f["module"]: (f["num_chs"], 64 // f["reduction"], 64 // f["reduction"]) for f in plain.feature_info
    }
    assert not any(p.requires_grad for p in clf.parameters())
    clf.train()
    assert not any(m.training for m in clf.modules())


def test_nhwc_maps_of_a_swin_are_permuted_to_nchw():
    torch.manual_seed(0)
    plain = timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 1),
        img_size=32,
        window_size=4,
        num_classes=3,
    ).eval()
    clf = FrozenClassifier(plain, ["layers.0", "layers.1"], input_spec=InputSpec(32, 32))
    assert clf.channels_last
    x = torch.rand(2, 3, 32, 32)
    captured = {}
    handle = plain.layers[1].register_forward_hook(lambda m, i, o: captured.setdefault("nhwc", o))
    try:
        expected = plain(clf.normalize(x))
    finally:
        handle.remove()
    out = clf(x)
    assert captured["nhwc"].shape == (2, 4, 4, 16)
    torch.testing.assert_close(out.activations["layers.1"], captured["nhwc"].permute(0, 3, 1, 2))
    for layer in clf.layers:
        torch.testing.assert_close(clf.tail(layer)(out.activations[layer]), expected)


def test_non_square_token_grids_and_non_maps_are_clear_errors():
    model = _tiny_torchvision_vit()
    # 17 tokens: with 2 assumed prefix tokens, 15 remain, which is no square grid.
    clf = FrozenClassifier(model, ["encoder.ln"], input_spec=InputSpec(32, 32), prefix_tokens=2)
    with pytest.raises(
        ValueError, match=r"'encoder.ln'.*17 tokens; without its 2 prefix.*15 others do not form a square"
    ):
        clf(torch.rand(1, 3, 32, 32))
    clf = FrozenClassifier(model, ["encoder.layers.encoder_layer_0.self_attention"], input_spec=InputSpec(32, 32))
    with pytest.raises(ValueError, match=r"self_attention' of classifier .* gives a tuple, not an activation map"):
        clf(torch.rand(1, 3, 32, 32))
    clf = FrozenClassifier(model, ["getitem_5"], input_spec=InputSpec(32, 32))  # the class token, (B, 16)
    with pytest.raises(ValueError, match=r"'getitem_5' .* gives a \(1, 16\) tensor, not an activation map"):
        clf(torch.rand(1, 3, 32, 32))


def test_unknown_names_list_the_valid_ones(timm_vit):
    _, clf, path = timm_vit
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['blocks.9'\].*Valid names:.*blocks\.5.*norm"):
        build_classifier("timm:test_vit", num_classes=5, layers=["blocks.9"], image_size=32)
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer4'\].*encoder\.ln.*heads\.head"):
        FrozenClassifier(_tiny_torchvision_vit(), ["layer4"])
    with pytest.raises(ValueError, match=r"Unknown classifier 'vgg19'.*shapes_cnn, resnet18.*vgg16.*vit_b_16.*timm:"):
        build_classifier("vgg19", num_classes=3)
    with pytest.raises(ValueError, match=r"Unknown timm model 'resnet_18'.*close matches:.*\bresnet18\b"):
        build_classifier("timm:resnet_18", num_classes=3)
    with pytest.raises(ValueError, match=r"Unknown torchvision weights preset 'V9'.*IMAGENET1K_V1, IMAGENET1K_V2"):
        build_classifier("resnet50.V9", num_classes=3)
    with pytest.raises(ValueError, match=r"Tags of resnet18:.*a1_in1k"):
        build_classifier("timm:resnet18.no_such_tag", num_classes=3)
    with pytest.raises(ValueError, match="no hub or URL sources"):
        build_classifier("timm:hf-hub:timm/resnet18.a1_in1k", num_classes=3)
    with pytest.raises(ValueError, match=rf"{path.name}.*do not fit timm:test_vit with 7 classes"):
        build_classifier("timm:test_vit", num_classes=7, weights=path, image_size=32)


def test_safetensors_and_unreadable_files(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.arange(6.0).view(2, 3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(load_state_dict_file(tmp_path / "w.safetensors")["w"], state["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="bad.safetensors: could not be read"):
        load_state_dict_file(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------- input transforms


def _image(seed=0, size=(300, 220)):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)  # smooth content, as a photo
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def _normalized(spec, im):
    x = image_transform(spec)(im)
    return (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet50.IMAGENET1K_V2", torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
        ("vgg16", torchvision.models.VGG16_Weights.IMAGENET1K_V1),
        ("vit_b_16", torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1),
    ],
)
def test_input_spec_is_torchvisions_preset(name, weights, request):
    if name == "vgg16":
        clf = request.getfixturevalue("vgg16")
    elif name == "vit_b_16":
        clf = request.getfixturevalue("vit_b_16")
    else:
        clf = build_classifier(name, num_classes=2)
    preset = weights.transforms()  # ImageClassification; building it downloads nothing
    spec = clf.input_spec
    assert (spec.crop, spec.resize, spec.interpolation) == (
        preset.crop_size[0],
        preset.resize_size[0],
        preset.interpolation.value,
    )
    assert spec.mean == pytest.approx(preset.mean) and spec.std == pytest.approx(preset.std)
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(preset.mean))  # the wrapper normalizes with it
    # End to end: the same image through our transform + the wrapper's normalization and through torchvision's
    # own preset agree up to uint8 rounding (one grey level).
    im = _image()
    torch.testing.assert_close(_normalized(spec, im), preset(im), atol=1.5 / 255 / min(preset.std), rtol=0)
    assert clf.spec["input_spec"] == spec.to_dict()


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "resnet18.a1_in1k", "resnet18.tv_in1k"])
def test_input_spec_is_timms_data_config(name):
    clf = build_classifier(f"timm:{name}", num_classes=2)
    cfg = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
    spec = clf.input_spec
    assert spec.crop == cfg["input_size"][-1]
    assert spec.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    assert spec.interpolation == cfg["interpolation"]
    assert spec.mean == pytest.approx(cfg["mean"]) and spec.std == pytest.approx(cfg["std"])
    timm_transform = timm.data.create_transform(**cfg)  # timm's own eval transform
    # PIL's and torch's bicubic kernels round differently: a few pixels differ by two grey levels.
    diff = (_normalized(spec, im := _image(seed=1)) - timm_transform(im)).abs() * min(cfg["std"]) * 255
    assert diff.max() <= 2.5 and diff.mean() < 0.05


def test_shapes_cnn_sees_the_world_image_size():
    assert build_classifier("shapes_cnn", 3).input_spec == InputSpec(64, 64, "bilinear", SHAPES_MEAN, SHAPES_STD)
    clf = build_classifier("shapes_cnn", 3, image_size=32)
    assert (clf.input_spec.crop, clf.input_spec.resize) == (32, 32)
    assert clf.layer_shapes()["layer4"] == (128, 4, 4)  # at its own input size by default


def test_input_spec_overrides():
    clf = build_classifier("resnet18", 2, image_size=160)  # fine-tuned at 160 px: the preset's 224/256 kept
    assert (clf.input_spec.crop, clf.input_spec.resize, clf.input_spec.interpolation) == (160, 182, "bilinear")
    override = {"crop": 96, "resize": 110, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.2] * 3}
    clf = build_classifier("resnet18", 2, input_spec=override)
    assert clf.input_spec == InputSpec(96, 110, "bicubic", (0.5,) * 3, (0.2,) * 3)
    x = torch.rand(1, 3, 96, 96)
    torch.testing.assert_close(clf.normalize(x), (x - 0.5) / 0.2)
    with pytest.raises(ValueError, match="image_size=64 disagrees with input_spec crop=96"):
        build_classifier("resnet18", 2, image_size=64, input_spec=override)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['size'\]"):
        build_classifier("resnet18", 2, input_spec={"size": 96})


# ---------------------------------------------------------------------- tails and contributions


def _assert_tails_reproduce_logits(clf, x):
    out = clf(x)
    for layer in clf.layers:
        prefix = out.activations.prefix_tokens.get(layer)
        torch.testing.assert_close(clf.tail(layer)(out.activations[layer], prefix), out.logits, msg=layer)


def test_tails_reproduce_the_logits_from_every_layer(vgg16, timm_vit):
    torch.manual_seed(0)
    _assert_tails_reproduce_logits(build_classifier("resnet18", 3), torch.rand(2, 3, 64, 64))
    _assert_tails_reproduce_logits(build_classifier("timm:test_convnext", 3), torch.rand(2, 3, 64, 64))
    _assert_tails_reproduce_logits(vgg16, torch.rand(2, 3, 32, 32))  # VGG-16 at a small input
    _assert_tails_reproduce_logits(timm_vit[1], torch.rand(2, 3, 32, 32))
    tiny_vit = FrozenClassifier(
        _tiny_torchvision_vit(),
        ["encoder.dropout", "encoder.layers.encoder_layer_1", "encoder.ln"],
        input_spec=InputSpec(32, 32),
    )
    _assert_tails_reproduce_logits(tiny_vit, torch.rand(2, 3, 32, 32))
    # The patch embedding's reshape reads the batch size from the image: no tail can start there.
    patch_embedding = FrozenClassifier(_tiny_torchvision_vit(), ["conv_proj"], input_spec=InputSpec(32, 32))
    with pytest.raises(ValueError, match="reads its input again after 'conv_proj'; it cannot be cut there"):
        patch_embedding.tail("conv_proj")


def test_token_tails_need_their_prefix_tokens(timm_vit):
    _, clf, _ = timm_vit
    out = clf(torch.rand(2, 3, 32, 32))
    tail = clf.tail("blocks.2")
    with pytest.raises(ValueError, match=r"'blocks.2' is a token layer.*prefix_tokens\['blocks.2'\]"):
        tail(out.activations["blocks.2"])
    with pytest.raises(ValueError, match=r"prefix tokens of shape \(1, 1, 64\) for 2 map"):
        tail(out.activations["blocks.2"], out.activations.prefix_tokens["blocks.2"][:1])
    cnn = build_classifier("shapes_cnn", 3)
    with pytest.raises(ValueError, match="'layer2' is not a token layer"):
        cnn.tail("layer2")(torch.rand(1, 32, 32, 32), torch.rand(1, 1, 32))


def _token_reference(model, block, normalize, images, z, jac, sl, concepts, target, k, prefix):
    """One full forward pass per masked variant: a hook on ``block`` replaces the ranked channels of the patch
    tokens (not the prefix tokens) by their mean over the patches."""
    result = torch.zeros(concepts.shape)
    for b in range(concepts.shape[0]):
        x = normalize(images[b : b + 1])
        p_y = model(x).softmax(1)[0, target[b]]
        for j in range(concepts.shape[1]):
            top = top_channels(jac[b : b + 1], z[b : b + 1], sl, concepts[b : b + 1, j : j + 1], k)[0, 0]
            drops = []
            for i in range(1, len(top) + 1):

                def hook(module, inputs, output, chans=top[:i]):
                    output = output.clone()
                    patches = output[:, prefix:, chans]
                    output[:, prefix:, chans] = patches.mean(dim=1, keepdim=True).expand_as(patches)
                    return output

                handle = block.register_forward_hook(hook)
                try:
                    p_i = model(x).softmax(1)[0, target[b]]
                finally:
                    handle.remove()
                drops.append((p_y - p_i) / p_y)
            result[b, j] = torch.stack(drops).mean()
    return result


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_contributions_at_a_vit_token_layer_equal_masked_forward_passes(family, timm_vit):
    if family == "torchvision":
        model, layer = _tiny_torchvision_vit(), "encoder.layers.encoder_layer_1"
        clf = FrozenClassifier(model, [layer], input_spec=InputSpec(32, 32))
        block = model.encoder.layers.encoder_layer_1
    else:
        model, clf, _ = timm_vit
        layer, block = "blocks.2", model.blocks[2]
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    out = clf(images)
    z = pool_activations(out.activations, [layer])
    translator = Translator(z.shape[1], 8, [16]).eval()
    scorer = ConceptScorer(torch.randn(4, 8), "clip")
    jac = score_jacobian(translator, scorer, z)
    slices = layer_slices(out.activations, [layer])
    concepts = torch.tensor([[0, 3], [2, 1]])
    target = torch.tensor([1, 4])
    got = concept_contributions(
        clf,
        out.activations,
        out.logits,
        jac,
        z,
        slices,
        concepts,
        torch.zeros(2, 2, dtype=torch.long),
        target=target,
        k=5,
        chunk=3,
    )
    with torch.no_grad():
        expected = _token_reference(
            model, block, clf.normalize, images, z, jac, slices[layer], concepts, target, 5, clf.num_prefix_tokens
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.abs().max() > 0


def _cefam(classifier, n_concepts=5, d=8):
    torch.manual_seed(0)
    in_dim = sum(c for c, _, _ in classifier.layer_shapes().values())
    return CEFAMModule(
        classifier,
        Translator(in_dim, d, [16]),
        ConceptScorer(torch.randn(n_concepts, d), "clip"),
        concept_names=[f"c{i}" for i in range(n_concepts)],
        concept_types=["color"] * n_concepts,
        class_names=[f"k{i}" for i in range(5)],
        optimizer={"name": "adam", "lr": 1e-3},
        scheduler={"name": "none"},
    )


def fit_two_steps(module: CEFAMModule, path) -> CEFAMModule:
    """Train ``module`` for two steps on random 32 px images and 8-d embeddings, save it to ``path`` and return
    the module the checkpoint rebuilds."""
    torch.manual_seed(2)
    samples = [{"image": torch.rand(3, 32, 32), "embedding": torch.randn(8)} for _ in range(8)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(samples, batch_size=4))
    trainer.save_checkpoint(path)
    return CEFAMModule.from_checkpoint(path)


def test_a_vit_cefam_checkpoint_reloads_and_explains(timm_vit, tmp_path):
    module = _cefam(timm_vit[1])
    reloaded = fit_two_steps(module, tmp_path / "vit.ckpt")
    clf = reloaded.classifier
    assert clf.name == "timm:test_vit" and clf.layers == TIMM_VIT_LAYERS
    assert clf.input_spec == timm_vit[1].input_spec and clf.input_spec.crop == 32
    images = torch.rand(2, 3, 32, 32)
    module.eval()
    a = explain_batch(module, images, top_n=3, k=4)
    b = explain_batch(reloaded, images, top_n=3, k=4)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.scores, a.scores)
    torch.testing.assert_close(b.contributions, a.contributions)
    torch.testing.assert_close(b.regions, a.regions)
    assert b.regions.shape == (2, 3, 32, 32) and torch.isfinite(b.contributions).all()


def test_a_shapes_checkpoint_without_a_recorded_input_spec_uses_the_world_size(tmp_path):
    module = _cefam(build_classifier("shapes_cnn", 5, image_size=32, widths=(4, 4, 8, 8)))
    hparams = dict(module.hparams)
    hparams["arch"] = {**hparams["arch"], "classifier": dict(hparams["arch"]["classifier"])}
    del hparams["arch"]["classifier"]["input_spec"]  # as checkpoints written before input specs were recorded
    hparams["config"] = {"world": {"image_size": 32}}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    reloaded = CEFAMModule.from_checkpoint(path)
    assert reloaded.classifier.input_spec == InputSpec(32, 32, "bilinear", SHAPES_MEAN, SHAPES_STD)


def test_contributions_at_the_last_layer_skip_a_vit_layer_its_head_never_reads():
    """A ViT's head reads only the class token, so its last patch tokens (``encoder.ln``) are never read: the
    default ``contribution_layer: last`` measures at the last explained layer the logits do read, and the
    contributions are not all 0. A ResNet-like ``layer4`` is read (through pooling) and stays the last one."""
    layers = ["encoder.layers.encoder_layer_1", "encoder.ln"]
    vit = FrozenClassifier(_tiny_torchvision_vit(), layers, input_spec=InputSpec(32, 32))
    assert vit.unread_layers() == ["encoder.ln"] and "encoder.ln" in vit.mean_invariant_layers()
    module = _cefam(vit).eval()
    torch.manual_seed(3)
    images = torch.rand(2, 3, 32, 32)
    last = explain_batch(module, images, top_n=3, k=4, contribution_layer="last")
    assert (last.contribution_layer_index == 0).all()  # encoder_layer_1, not encoder.ln
    assert last.contributions.abs().max() > 0
    at_ln = explain_batch(module, images, top_n=3, k=4, contribution_layer="encoder.ln")
    torch.testing.assert_close(at_ln.contributions, torch.zeros_like(at_ln.contributions))  # why it is skipped

    only_ln = _cefam(FrozenClassifier(_tiny_torchvision_vit(), ["encoder.ln"], input_spec=InputSpec(32, 32))).eval()
    with pytest.warns(UserWarning, match=r"read none of the explained layers \['encoder.ln'\]"):
        explain_batch(only_ln, images, top_n=3, k=4, contribution_layer="last")

    cnn = build_classifier("shapes_cnn", 5, image_size=32, widths=(4, 4, 8, 8))
    assert cnn.unread_layers() == [] and cnn.mean_invariant_layers() == ["layer4"]
    expl = explain_batch(_cefam(cnn).eval(), images, top_n=3, k=4, contribution_layer="last")
    assert (expl.contribution_layer_index == 3).all()
