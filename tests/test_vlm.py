"""The open_clip VLM adapter, on tiny randomly initialised models (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cefam_lightning.models.vlm import OpenCLIPVLM, VLMError, cached_weights, hub_offline, register_model_config

TINY_TOWER = {
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # The default SimpleTokenizer (bundled BPE vocabulary, no download): names must not contain "siglip".
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP = "cefam-tiny-clip"
TINY_SIGMOID = "cefam-tiny-sigmoid"  # SigLIP-style: a logit bias, sigmoid scoring


def write_tiny_configs(folder: Path) -> Path:
    """Write the two tiny open_clip configs into ``folder`` and register them; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps({"embed_dim": 16, **TINY_TOWER}))
    (folder / f"{TINY_SIGMOID}.json").write_text(
        json.dumps({"embed_dim": 16, "init_logit_bias": -10.0, "init_logit_scale": math.log(10.0), **TINY_TOWER})
    )
    assert sorted(register_model_config(folder)) == sorted([TINY_CLIP, TINY_SIGMOID])
    return folder


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    return write_tiny_configs(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def clip_vlm(tiny_configs) -> OpenCLIPVLM:
    return OpenCLIPVLM(TINY_CLIP, seed=1)


def test_tiny_clip_encodes_images_and_texts(clip_vlm):
    assert isinstance(open_clip.get_tokenizer(TINY_CLIP), open_clip.SimpleTokenizer)  # no hub tokenizer
    info = clip_vlm.info
    assert (info.name, info.kind, info.pretrained, info.logit_bias) == (TINY_CLIP, "clip", None, 0.0)
    assert info.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # exp of open_clip's initial log(1/0.07)
    assert clip_vlm.embed_dim == 16

    # open_clip's own eval transform: any image size -> 3 x 32 x 32, normalized.
    pics = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (20, 64), (10, 200, 90))]
    batch = torch.stack([clip_vlm.preprocess(p) for p in pics])
    assert batch.shape == (2, 3, 32, 32)
    assert clip_vlm.preprocess_config["size"] == [32, 32]
    emb = clip_vlm.encode_images(batch)
    assert emb.shape == (2, 16) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    with torch.no_grad():
        expected = clip_vlm.model.encode_image(batch)
    torch.testing.assert_close(emb, expected)  # raw: not normalized
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2))

    prompts = ["a photo of a red object", "a photo of a circle", "a photo of an object made of wood"]
    text = clip_vlm.encode_texts(prompts, batch_size=2)  # two batches
    assert text.shape == (3, 16)
    with torch.no_grad():
        expected = clip_vlm.model.encode_text(clip_vlm.tokenizer(prompts))
    torch.testing.assert_close(text, expected)
    with pytest.raises(VLMError, match="at least one prompt"):
        clip_vlm.encode_texts([])


def test_random_weights_follow_the_seed(clip_vlm):
    same = OpenCLIPVLM(TINY_CLIP, seed=1)
    other = OpenCLIPVLM(TINY_CLIP, seed=2)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(same.encode_images(x), clip_vlm.encode_images(x))
    assert not torch.allclose(other.encode_images(x), clip_vlm.encode_images(x))


def test_sigmoid_model_is_siglip_kind_with_bias(tiny_configs):
    vlm = OpenCLIPVLM(TINY_SIGMOID)
    info = vlm.info
    assert (info.kind, info.logit_bias) == ("siglip", -10.0)
    assert info.logit_scale == pytest.approx(10.0, rel=1e-5)
    assert vlm.encode_texts(["a photo of a dog"]).shape == (1, 16)
    # An explicit kind overrides the one read from the model; the bias is still recorded.
    forced = OpenCLIPVLM(TINY_SIGMOID, kind="clip").info
    assert (forced.kind, forced.logit_bias) == ("clip", -10.0)
    with pytest.raises(VLMError, match="kind must be one of"):
        OpenCLIPVLM(TINY_SIGMOID, kind="softmax")


def test_checkpoint_file_loads_its_weights(clip_vlm, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(clip_vlm.model.state_dict(), ckpt)
    loaded = OpenCLIPVLM(TINY_CLIP, str(ckpt), seed=99)  # the seed does not matter with weights
    assert loaded.info.pretrained == str(ckpt.resolve())
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded.encode_images(x), clip_vlm.encode_images(x))
    assert torch.equal(loaded.encode_texts(["a b c"]), clip_vlm.encode_texts(["a b c"]))
    with pytest.raises(VLMError, match=f"checkpoint file not found: {tmp_path / 'nope.pt'}"):
        OpenCLIPVLM(TINY_CLIP, str(tmp_path / "nope.pt"))


def _fake_hub_cache(cache: Path, repo: str, state_dict: dict) -> Path:
    """A Hugging Face hub cache holding ``open_clip_model.safetensors`` of ``repo`` (what a download leaves)."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    file = root / "snapshots" / commit / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(file))
    return file


def test_pretrained_tag_is_read_from_the_cache_without_network(clip_vlm, tmp_path, monkeypatch):
    from open_clip import pretrained as oc_pretrained

    tag_cfg = oc_pretrained._pcfg(hf_hub="cefam-test/tiny-clip/", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY_CLIP, {"tinytag": tag_cfg})
    cache = tmp_path / "hub"
    assert cached_weights(TINY_CLIP, "tinytag", cache) is None
    with pytest.raises(VLMError, match="'tinytag' are not in .*hub.*--download"):
        OpenCLIPVLM(TINY_CLIP, "tinytag", cache_dir=cache)

    file = _fake_hub_cache(cache, "cefam-test/tiny-clip", clip_vlm.model.state_dict())
    assert cached_weights(TINY_CLIP, "tinytag", cache) == str(file)
    vlm = OpenCLIPVLM(TINY_CLIP, "tinytag", cache_dir=cache, seed=5)
    assert vlm.info.pretrained == "tinytag" and vlm.weights_file == str(file)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(vlm.encode_images(x), clip_vlm.encode_images(x))
    # The tag's own preprocessing (here: its mean and std) is used, as open_clip does for a downloaded tag.
    assert vlm.preprocess_config["mean"] == [0.5, 0.5, 0.5] and vlm.preprocess_config["std"] == [0.25, 0.25, 0.25]
    pic = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.allclose(vlm.preprocess(pic), torch.full((3, 32, 32), 2.0))  # (1 - 0.5) / 0.25


def test_real_model_tag_not_cached_fails_fast(tmp_path):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(VLMError, match=r"'ViT-B-32' pretrained 'openai' are not in .*--download"):
        OpenCLIPVLM("ViT-B-32", "openai", cache_dir=tmp_path)
    assert time.monotonic() - start < 5  # no network retries
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


def test_bad_names_and_tags_are_explained(tiny_configs, tmp_path):
    with pytest.raises(VLMError, match="unknown open_clip model 'ViT-B-33'; did you mean .*ViT-B-32"):
        OpenCLIPVLM("ViT-B-33")
    with pytest.raises(VLMError, match="'laion9b' is neither a pretrained tag of 'ViT-B-32' .*laion2b_s34b_b79k"):
        OpenCLIPVLM("ViT-B-32", "laion9b")
    with pytest.raises(VLMError, match="no pretrained tags"):
        OpenCLIPVLM(TINY_CLIP, "openai")
    with pytest.raises(VLMError, match="unknown device"):
        OpenCLIPVLM(TINY_CLIP, device="gpu0")
    with pytest.raises(VLMError, match="model config not found"):
        register_model_config(tmp_path / "missing.json")
    bad = tmp_path / "bad-model.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(VLMError, match="bad-model.json: not an open_clip model config .*vision_cfg"):
        register_model_config(bad)
    bad.write_text("{not json")
    with pytest.raises(VLMError, match="bad-model.json: cannot read"):
        register_model_config(bad)


def test_architecture_and_preprocessing_are_json_ready(clip_vlm):
    arch = clip_vlm.architecture()
    assert arch["embed_dim"] == 16 and arch["vision_cfg"]["image_size"] == 32
    json.dumps(arch)
    cfg = clip_vlm.preprocess_config
    assert json.loads(json.dumps(cfg)) == cfg
    assert np.allclose(cfg["mean"], open_clip.OPENAI_DATASET_MEAN)


def test_local_dir_model_brings_config_and_weights(clip_vlm, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "my-vlm"
    folder.mkdir()
    cfg = {"embed_dim": 16, **TINY_TOWER}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    weights = {k: v.contiguous() for k, v in clip_vlm.model.state_dict().items()}
    save_file(weights, folder / "open_clip_model.safetensors")
    vlm = OpenCLIPVLM(f"local-dir:{folder}")
    assert vlm.info.pretrained == f"local-dir:{folder}" and vlm.info.kind == "clip"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(vlm.encode_images(x), clip_vlm.encode_images(x))
    assert vlm.architecture()["embed_dim"] == 16
    with pytest.raises(VLMError, match="brings its own weights"):
        OpenCLIPVLM(f"local-dir:{folder}", "openai")
