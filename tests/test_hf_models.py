"""Hugging Face ``transformers`` models from a local folder: CLIP and SigLIP for ``precompute``, image classifiers
as frozen classifiers. Every model is a tiny random config saved with ``save_pretrained`` here (no download)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip(
    "transformers", reason='transformers is not installed (pip install -e ".[hf]"); its adapters are untested'
)

from cefam_lightning.cli.precompute import main as precompute_main  # noqa: E402
from cefam_lightning.data.embedding_store import EmbeddingStore  # noqa: E402
from cefam_lightning.methods.cefam.module import CEFAMModule  # noqa: E402
from cefam_lightning.methods.cefam.pipeline import explain_batch  # noqa: E402
from cefam_lightning.models.classifier import ClassifierError, build_classifier  # noqa: E402
from cefam_lightning.models.hf import TransformersVLM  # noqa: E402
from cefam_lightning.models.vlm import VLMError  # noqa: E402
from tests.cli import cli_error  # noqa: E402
from tests.test_classifier import _assert_tails_reproduce_logits, _cefam, fit_two_steps  # noqa: E402
from tests.test_image_datamodule import _train_overrides, source_ids, write_store  # noqa: E402
from tests.test_image_sources import CLASSES, folder_id, make_images, write_folder, write_manifest  # noqa: E402
from tests.test_precompute import concept_file, make_folder  # noqa: E402

WORDS = ["a", "photo", "of", "an", "object", "made", "on", "red", "striped", "wood", "dog", "beach", "tail"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
TEXT = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12
)
VISION = dict(
    image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
)


def save_tokenizer(folder: Path):
    """A word-level tokenizer over :data:`WORDS` that wraps each prompt in ``[BOS] ... [EOS]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(folder)
    return vocab


def save_vlm(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    vocab = save_tokenizer(folder)
    text = {**TEXT, "vocab_size": len(vocab), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": vocab["[EOS]"]}
    if kind == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8)
        )
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4]
        )
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=VISION))
        with torch.no_grad():  # transformers initializes both at 0: give them values the store must carry
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-3.0)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_vlms")
    return {kind: save_vlm(root / kind, kind) for kind in ("clip", "siglip")}


def reference_features(
    folder: Path, images: list[Image.Image], prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own normalized ``get_image_features`` / ``get_text_features``, with its own processor."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        tokens = tokenizer(
            prompts, padding="max_length", max_length=TEXT["max_position_embeddings"], return_tensors="pt"
        )
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image, text = (getattr(t, "pooler_output", t) for t in (image, text))
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_precompute_with_a_transformers_folder_writes_the_models_own_embeddings(vlm_folders, kind, tmp_path, capsys):
    folder = vlm_folders[kind]
    images = make_folder(tmp_path / "images", 5, bad=1)
    concepts = concept_file(tmp_path / "concepts.txt")
    out = tmp_path / "store"
    argv = ["--library", "transformers", "--model", str(folder), "--images", str(images), "--concepts", str(concepts)]
    precompute_main([*argv, "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert "wrote" in capsys.readouterr().out

    store = EmbeddingStore.open(out)
    assert store.num_samples == 5 and store.extra["num_skipped"] == 1
    assert store.vlm.name == str(folder) and store.vlm.kind == kind
    files = sorted(images.rglob("0*.jpg"))
    ids = [f.relative_to(images).as_posix() for f in files]
    want_image, want_text = reference_features(folder, [Image.open(f).convert("RGB") for f in files],
                                               [c.prompt for c in store.concepts])  # fmt: skip
    rows = np.asarray(store.image_embeddings[store.rows_for(ids)], dtype=np.float32)
    got_image = F.normalize(torch.from_numpy(rows), dim=-1)
    torch.testing.assert_close(got_image, want_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F.normalize(torch.from_numpy(store.text_embeddings), dim=-1), want_text)
    assert (want_text @ want_text.T).triu(1).abs().max() < 0.999  # the prompts are told apart
    if kind == "clip":
        scale = transformers.CLIPModel.from_pretrained(folder).logit_scale.exp().item()
        assert store.vlm.logit_scale == pytest.approx(scale) and store.vlm.logit_bias == 0.0
    else:
        assert store.vlm.logit_scale == pytest.approx(10.0) and store.vlm.logit_bias == pytest.approx(-3.0)
    mean = store.extra["preprocessing"]["transformers"]["image_mean"]
    assert mean[0] == pytest.approx(0.4 if kind == "clip" else 0.5)


def test_vlm_adapter_matches_the_open_clip_interface(vlm_folders):
    vlm = TransformersVLM(vlm_folders["clip"])
    x = vlm.preprocess(Image.new("RGB", (48, 40), "red"))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert vlm.encode_images(x[None]).shape == (1, 8) and vlm.embed_dim == 8
    assert vlm.encode_texts(["a photo of a dog"] * 3, batch_size=2).shape == (3, 8)
    json.dumps(vlm.architecture()), json.dumps(vlm.preprocess_config)  # JSON-ready
    assert TransformersVLM(vlm_folders["siglip"], kind="clip").kind == "clip"  # --kind overrides


def test_bad_transformers_vlm_inputs_are_one_error_line(vlm_folders, tmp_path, capsys):
    concepts = concept_file(tmp_path / "concepts.txt")
    base = ["--library", "transformers", "--concepts", str(concepts), "--out", str(tmp_path / "s"), "--model"]
    assert "folder not found" in cli_error(precompute_main, [*base, str(tmp_path / "nope")], capsys)
    msg = cli_error(precompute_main, [*base, str(vlm_folders["clip"]), "--pretrained", "x.pt"], capsys)
    assert "brings its own weights; do not give --pretrained x.pt" in msg
    msg = cli_error(precompute_main, [*base, str(vlm_folders["clip"]), "--model-config", "m.json"], capsys)
    assert msg == "--model-config m.json: a transformers model folder has its own config.json"
    msg = cli_error(precompute_main, [*base, str(vlm_folders["clip"]), "--random-init"], capsys)
    assert "--random-init excludes --pretrained and a model that brings its weights" in msg
    assert "--download" in cli_error(precompute_main, [*base, str(vlm_folders["clip"]), "--download"], capsys)
    resnet = save_classifier(tmp_path / "resnet", "resnet")
    assert "not a CLIP-style model (no get_image_features)" in cli_error(precompute_main, [*base, str(resnet)], capsys)
    (vlm_folders["clip"] / "model.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        assert "no weights" in cli_error(precompute_main, [*base, str(vlm_folders["clip"])], capsys)
    finally:
        (tmp_path / "moved.safetensors").rename(vlm_folders["clip"] / "model.safetensors")
    with pytest.raises(VLMError, match="cache-dir"):
        TransformersVLM(vlm_folders["clip"], cache_dir=tmp_path)


# ---------------------------------------------------------------------- image classifiers

CLASSIFIERS = {
    "resnet": (
        lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1]),
        lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
        ["resnet.encoder.stages.0", "resnet.encoder.stages.1", "resnet.encoder.stages.2", "resnet.encoder.stages.3"],
    ),
    "convnext": (
        lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
        lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
        ["convnext.encoder.stages.0", "convnext.encoder.stages.1"],
    ),
    "vit": (
        lambda: transformers.ViTConfig(**{**VISION, "num_hidden_layers": 2}),
        lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
        ["vit.layers.0", "vit.layers.1"],
    ),
    "deit": (
        lambda: transformers.DeiTConfig(**VISION),
        lambda: transformers.DeiTImageProcessor(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
        ),
        ["deit.layers.0"],
    ),
}


def save_classifier(folder: Path, arch: str, num_labels: int = 5) -> Path:
    config, processor, _ = CLASSIFIERS[arch]
    torch.manual_seed(0)
    cfg = config()
    cfg.num_labels = num_labels
    model_class = getattr(transformers, f"{type(cfg).__name__.removesuffix('Config')}ForImageClassification")
    model_class(cfg).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_hidden_states_are_the_layers_and_tails_reproduce_the_logits(arch, tmp_path):
    folder = save_classifier(tmp_path / arch, arch)
    clf = build_classifier(f"hf:{folder}", 5)
    assert clf.layers == CLASSIFIERS[arch][2] and clf.input_spec.crop == 32
    images = torch.rand(2, 3, 32, 32)
    out = clf(images)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(pixel_values=clf.normalize(images), output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits)
    prefix = clf.num_prefix_tokens
    for layer, state in zip(clf.layers, ref.hidden_states[1:], strict=True):  # hidden state 0: the embeddings
        if state.ndim == 3:  # tokens: the patch tokens as a grid, the class (and distillation) token aside
            side = math.isqrt(state.shape[1] - prefix)
            state = state[:, prefix:].transpose(1, 2).reshape(2, -1, side, side)
        torch.testing.assert_close(out.activations[layer], state, msg=layer)
    _assert_tails_reproduce_logits(clf, images)


def test_input_spec_is_the_folders_image_processor(tmp_path):
    clf = build_classifier(f"hf:{save_classifier(tmp_path / 'r', 'resnet')}", 5)
    spec = clf.input_spec  # ConvNeXt's processor: shortest edge 32 / 0.875, center crop 32, bicubic, 0.5 / 0.5
    assert (spec.crop, spec.resize, spec.interpolation) == (32, 36, "bicubic") and spec.mean == (0.5, 0.5, 0.5)
    assert build_classifier(f"hf:{tmp_path / 'r'}", 5, image_size=64).input_spec.resize == 72


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_cefam_trains_explains_and_reloads_on_a_hf_classifier(arch, tmp_path):
    clf = build_classifier(f"hf:{save_classifier(tmp_path / arch, arch)}", 5)
    module = _cefam(clf)
    reloaded = fit_two_steps(module, tmp_path / "m.ckpt")
    assert reloaded.classifier.name == f"hf:{tmp_path / arch}" and reloaded.classifier.layers == clf.layers
    images = torch.rand(2, 3, 32, 32)
    module.eval()
    # A middle layer for contributions: a ViT's head reads only the class token, so the last one gives 0.
    a = explain_batch(module, images, top_n=3, k=4, contribution_layer=clf.layers[0])
    b = explain_batch(reloaded, images, top_n=3, k=4, contribution_layer=clf.layers[0])
    assert a.regions.shape == (2, 3, 32, 32) and torch.isfinite(a.regions).all() and a.regions.abs().sum() > 0
    torch.testing.assert_close(b.regions, a.regions)
    torch.testing.assert_close(b.contributions, a.contributions)
    assert a.contributions.abs().sum() > 0


def test_train_py_takes_a_hf_folder_as_the_classifier(tmp_path, capsys):
    from cefam_lightning.cli.train import main

    items = make_images(12, seed=2, size=(48, 40), formats=("jpg",))
    write_folder(tmp_path / "images", items)
    rows = [{"path": folder_id(it), "label": it["cls"]} for it in items]
    train = write_manifest(tmp_path / "images" / "train.csv", rows[:8])
    val = write_manifest(tmp_path / "images" / "val.jsonl", rows[8:])
    write_store(tmp_path / "store", source_ids(train) + source_ids(val))
    folder = save_classifier(tmp_path / "resnet", "resnet", num_labels=len(CLASSES))
    overrides = _train_overrides(tmp_path, train, val, tmp_path / "store", "hf")
    overrides = [o for o in overrides if not o.startswith("classifier.")]  # no weights, no allow_random_init
    layers = "classifier.layers=[resnet.encoder.stages.2,resnet.encoder.stages.3]"
    metrics = main([*overrides, f"classifier.name=hf:{folder}", layers])
    assert "keeps its random initialization" not in capsys.readouterr().out
    assert np.isfinite(metrics["test"]["test/cosine"])
    module = CEFAMModule.from_checkpoint(metrics["best_checkpoint"])
    assert module.classifier.name == f"hf:{folder}" and module.classifier.input_spec.crop == 32


def test_unsupported_or_mismatched_classifiers_are_refused_by_name(tmp_path):
    folder = save_classifier(tmp_path / "r", "resnet")
    with pytest.raises(ClassifierError, match="the model has 5 classes"):
        build_classifier(f"hf:{folder}", 7)
    with pytest.raises(ClassifierError, match="brings its own weights"):
        build_classifier(f"hf:{folder}", 5, weights=tmp_path / "w.pth")
    with pytest.raises(ClassifierError, match="folder not found"):
        build_classifier(f"hf:{tmp_path / 'nope'}", 5)
    torch.manual_seed(0)
    swin = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], num_labels=5)
    transformers.SwinForImageClassification(swin).save_pretrained(tmp_path / "swin")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "swin")
    with pytest.raises(ClassifierError, match=r"model_type 'swin'\) is not supported.*resnet, convnext, vit, deit"):
        build_classifier(f"hf:{tmp_path / 'swin'}", 5)
    # Weights of another head (a ViTModel saved without the classifier) would leave the head random.
    transformers.ViTModel(transformers.ViTConfig(**VISION)).save_pretrained(tmp_path / "bare")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "bare")
    with pytest.raises(ClassifierError, match=r"do not cover the image classifier .*missing classifier"):
        build_classifier(f"hf:{tmp_path / 'bare'}", 2)
    vit = save_classifier(tmp_path / "v", "vit")
    with pytest.raises(ClassifierError, match="a 48x48 input does not run through the model"):
        build_classifier(f"hf:{vit}", 5, image_size=48)  # a ViT's position embeddings fix its input size


class _RunsCode:
    """What a malicious ``pytorch_model.bin`` holds: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_code_running_pytorch_model_bin_is_refused_before_it_runs(tmp_path):
    folder = save_classifier(tmp_path / "r", "resnet")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"resnet.embedder.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ClassifierError, match=rf"{folder}: cannot load the"):
        build_classifier(f"hf:{folder}", 5)
    assert not marker.exists()
