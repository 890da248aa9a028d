"""Hugging Face ``transformers`` models from a local folder: a VLM adapter (CLIP, SigLIP) for ``precompute``, and
image classifiers (``AutoModelForImageClassification``) as frozen classifiers
(docs/architecture.md#hugging-face-models).

A folder is what ``save_pretrained`` writes (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, the
image processor's and tokenizer's files). Loading is local and safe: ``local_files_only=True`` (nothing is
downloaded), ``trust_remote_code=False`` (no code from the folder runs; transformers reads ``.bin`` weights with
``weights_only=True``), and a folder whose weights leave any parameter of the model uninitialized is refused.
``transformers`` is an optional dependency (``pip install -e ".[hf]"``), imported here only when a folder is loaded.

**VLM** (:class:`TransformersVLM`): a :class:`~cefam_lightning.models.vlm.VLMBase`, as open_clip's adapter. Images
go through the folder's own image processor, prompts through its own tokenizer (padded to the text model's
length, as SigLIP was trained), and the embeddings are ``get_image_features`` / ``get_text_features``, raw (the
store keeps them raw; every reader L2-normalizes them). The scale is ``exp(logit_scale)``; a model with a
``logit_bias`` (SigLIP) scores with a sigmoid and records the bias.

**Classifier** (:func:`hf_image_classifier`): the model is run as embeddings -> blocks -> head, where the blocks
are the modules whose outputs are the model's ``hidden_states`` (a CNN's stages, a vision transformer's
layers). That form is one FX graph with the embeddings and each block as leaves, so
:class:`~cefam_lightning.models.classifier.FrozenClassifier` takes it like any other model: its layers are the
blocks (named as in the model, ``resnet.encoder.stages.3``, ``vit.layers.11``) and its tail runs the later
blocks and the head. The head is the one piece written per architecture (:data:`HEADS`); a model type without
one is refused by name, and every build checks that the blocks' outputs equal the model's own ``hidden_states``
and its logits the model's own, so a head that no longer matches the library raises instead of explaining a
different network.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.models.vlm import VLMBase, VLMError, _json_ready, select_device

INSTALL_HINT = 'pip install -e ".[hf]" (or pip install transformers)'
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors record them


# ---------------------------------------------------------------------- loading


def require_transformers(error: type[CefamError]) -> Any:
    """The ``transformers`` module, or ``error`` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise error(f"Hugging Face models need the transformers package ({error_summary(e)}): {INSTALL_HINT}") from e
    return transformers


def model_folder(path: str | os.PathLike, error: type[CefamError]) -> Path:
    """``path`` as an existing model folder (with ``config.json``), or ``error`` naming it."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise error(f"Hugging Face model folder not found: {folder} (a folder written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise error(f"{folder}: no config.json; expected a folder written by save_pretrained")
    return folder


def weights_file(folder: Path) -> Path | None:
    """The weights (or their shard index) a folder holds, in the order transformers prefers them."""
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def load_pretrained(auto_class: Any, folder: Path, error: type[CefamError], what: str) -> Any:
    """``auto_class.from_pretrained`` of a local folder, safely; a failure is ``error`` naming the folder.

    For a model, weights that leave parameters uninitialized (a folder saved from another head, or truncated)
    are refused: explaining a partly random network would give wrong results without a sign.
    """
    is_model = hasattr(auto_class, "from_config")  # AutoModel*, not a processor or tokenizer
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if is_model:
        if weights_file(folder) is None:
            raise error(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")
        # Said here, not left to transformers' default: a pytorch_model.bin a user passes in must not run code.
        kwargs.update(output_loading_info=True, weights_only=True)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per loaded folder would bury the command's own output
    try:
        loaded = auto_class.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, pickle.UnpicklingError) as e:
        raise error(f"{folder}: cannot load the {what} ({error_summary(e)})") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if not is_model:
        return loaded
    model, info = loaded
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(str(k) for k in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise error(f"{folder}: the weights do not cover the {what} {type(model).__name__}: missing {shown}")
    return model.eval().requires_grad_(False)


def processor_input_spec(processor: Any, where: Path, error: type[CefamError]) -> InputSpec:
    """The image processor's eval transform as an :class:`InputSpec` (shorter side resized, center crop).

    ``size`` ``{"height", "width"}`` (ViT, SigLIP): a square resize, read as resize = crop (the same for square
    images; a non-square image is center-cropped here where the processor would stretch it). ``{"shortest_edge"}``
    with ``crop_size`` (CLIP) or ``crop_pct`` (ConvNeXt, ResNet) gives the margin.
    """

    def square(value: Any, key: str) -> int:
        d = dict(value or {})
        h, w = d.get("height"), d.get("width")
        if h is None or h != w:
            raise error(f"{where}: image processor {key}={d}: only square inputs are supported")
        return int(h)

    size = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in size:
        resize = crop = int(size["shortest_edge"])
        crop_pct = getattr(processor, "crop_pct", None)
        if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
            crop = square(processor.crop_size, "crop_size")
        elif crop_pct and resize < 384:  # ConvNeXt's processor: resize to s / crop_pct, crop s
            resize = int(crop / crop_pct)
    elif "height" in size:
        resize = crop = square(size, "size")
    else:
        raise error(f"{where}: image processor size={size}: expected shortest_edge or height/width")
    rescale = float(getattr(processor, "rescale_factor", 1 / 255))
    if getattr(processor, "do_rescale", True) and abs(rescale - 1 / 255) > 1e-9:
        raise error(f"{where}: image processor rescale_factor={processor.rescale_factor}; only 1/255 is supported")
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 2)
    interpolation = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)), "bicubic")
    return InputSpec(crop=crop, resize=max(resize, crop), interpolation=interpolation, mean=mean, std=std)


# ---------------------------------------------------------------------- VLM


class TransformersVLM(VLMBase):
    """A ``transformers`` CLIP or SigLIP model (any model with ``get_image_features``, ``get_text_features`` and
    ``logit_scale``) from a local folder, with the folder's image processor and tokenizer.

    Args:
        model_name: the model folder (what ``save_pretrained`` wrote).
        pretrained: must be None: the weights come with the folder.
        cache_dir, download: not taken (nothing is looked up or downloaded); given, they are an error.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a :class:`torch.device`.
        kind: ``"clip"`` or ``"siglip"`` to override the scoring kind read from the model.
        seed: kept for the common interface (the weights are the folder's).
    """

    library = "transformers"

    def __init__(
        self,
        model_name: str | os.PathLike,
        pretrained: str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        device: str | torch.device = "cpu",
        kind: str | None = None,
        seed: int = 0,
    ) -> None:
        if pretrained is not None:
            raise VLMError(f"a transformers model folder brings its own weights; do not give --pretrained {pretrained}")
        if download or cache_dir is not None:
            raise VLMError(
                "transformers models are read from a local folder only; --download and --cache-dir do not apply"
            )
        self.check_kind(kind)
        transformers = require_transformers(VLMError)
        folder = model_folder(model_name, VLMError)
        self.name = str(folder)
        self.pretrained = str(folder)
        self.seed = seed
        self.device = select_device(device)
        wf = weights_file(folder)
        self.weights_file = str(wf) if wf is not None else None
        model = load_pretrained(transformers.AutoModel, folder, VLMError, "model")
        for attr in ("get_image_features", "get_text_features", "logit_scale"):
            if not hasattr(model, attr):
                raise VLMError(
                    f"{folder}: {type(model).__name__} is not a CLIP-style model (no {attr}); expected CLIP or SigLIP"
                )
        self.model: nn.Module = model.to(self.device)
        self.image_processor = load_pretrained(transformers.AutoImageProcessor, folder, VLMError, "image processor")
        self.tokenizer = load_pretrained(transformers.AutoTokenizer, folder, VLMError, "tokenizer")
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.kind = self.scoring_kind(kind)

    @staticmethod
    def brings_own_weights(model_name: str) -> bool:  # noqa: ARG004 - the common interface
        """A folder always holds its weights (``--pretrained`` and ``--random-init`` do not apply)."""
        return True

    @staticmethod
    def register_config(path: str | os.PathLike) -> list[str]:
        raise VLMError(f"--model-config {path}: a transformers model folder has its own config.json")

    def preprocess(self, image: Any) -> Tensor:
        """A PIL image -> ``(3, H, W)`` float32, by the folder's image processor."""
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    @property
    def preprocess_config(self) -> dict[str, Any]:
        """The image processor's settings, JSON-ready."""
        return _json_ready(self.image_processor.to_dict())

    def architecture(self) -> dict[str, Any]:
        """The model config (what determines the network), JSON-ready."""
        return _json_ready(self.model.config.to_dict())

    @torch.inference_mode()
    def encode_images(self, images: Tensor) -> Tensor:
        """Raw (not normalized) image embeddings ``(B, d)``, float32 on the CPU, of preprocessed images."""
        return _features(self.model.get_image_features(pixel_values=images.to(self.device))).float().cpu()

    def _encode_text_batch(self, prompts: list[str]) -> Tensor:
        """Padded to the text model's length: SigLIP was trained so (CLIP pools at its end token either way)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens))

    def __repr__(self) -> str:
        return f"TransformersVLM({self.name!r}, kind={self.kind!r}, device={self.device})"


def _features(out: Any) -> Tensor:
    """transformers 5 returns the projected features as ``pooler_output`` of a model output; 4 as a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


# ---------------------------------------------------------------------- image classifiers


@dataclass(frozen=True)
class Head:
    """Where an ``...ForImageClassification`` model's hidden states come from and how its logits follow.

    Attributes:
        embeddings: the module giving hidden state 0.
        blocks: the ``ModuleList`` whose outputs are hidden states 1..N.
        logits: ``(model, last hidden state) -> logits``, as the model's own forward computes them.
        prefix_tokens: class/distillation tokens in front of the patch tokens (vision transformers).
    """

    embeddings: str
    blocks: str
    logits: Callable[[nn.Module, Tensor], Tensor]
    prefix_tokens: int = 0


HEADS: dict[str, Head] = {
    # ResNetForImageClassification: classifier(Flatten, Linear) on the pooler's global average.
    "resnet": Head("resnet.embedder", "resnet.encoder.stages", lambda m, h: m.classifier(m.resnet.pooler(h))),
    # ConvNextForImageClassification: classifier on the LayerNorm of the spatial mean.
    "convnext": Head(
        "convnext.embeddings",
        "convnext.encoder.stages",
        lambda m, h: m.classifier(m.convnext.layernorm(h.mean([-2, -1]))),
    ),
    # ViTForImageClassification: classifier on the class token after the final LayerNorm.
    "vit": Head("vit.embeddings", "vit.layers", lambda m, h: m.classifier(m.vit.layernorm(h)[:, 0, :]), 1),
    # DeiTForImageClassification: the same, with a distillation token beside the class token.
    "deit": Head("deit.embeddings", "deit.layers", lambda m, h: m.classifier(m.deit.layernorm(h)[:, 0, :]), 2),
}


class StagedClassifier(nn.Module):
    """An ``...ForImageClassification`` model run as embeddings -> blocks -> head (see the module docstring).

    It holds the model's own top-level modules under their own names, so parameter and layer names are the
    model's. ``fx_tracer_kwargs`` makes the embeddings and the blocks FX leaves (their forwards branch on input
    shapes, which symbolic tracing cannot follow); ``num_prefix_tokens`` tells the frozen classifier how many
    tokens to set aside before a token layer becomes a map.
    """

    def __init__(self, model: nn.Module, head: Head):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.recipe = head
        self.num_prefix_tokens = head.prefix_tokens
        blocks = self.get_submodule(head.blocks)
        leaves = {type(self.get_submodule(head.embeddings)), *(type(b) for b in blocks)}
        self.fx_tracer_kwargs = {"leaf_modules": sorted(leaves, key=lambda t: t.__name__)}
        self.block_names = [f"{head.blocks}.{i}" for i in range(len(blocks))]

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        """Hidden states 0..N (the embeddings' output, then each block's), as the model's own forward makes them."""
        states = [self.get_submodule(self.recipe.embeddings)(pixel_values)]
        for block in self.get_submodule(self.recipe.blocks):
            states.append(block(states[-1]))
        return states

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = self.get_submodule(self.recipe.embeddings)(pixel_values)
        for block in self.get_submodule(self.recipe.blocks):
            h = block(h)
        return self.recipe.logits(self, h)


def hf_image_classifier(
    folder: str | os.PathLike, num_classes: int, crop: int | None, error: type[CefamError] = CefamError
) -> tuple[StagedClassifier, InputSpec, list[str]]:
    """An ``AutoModelForImageClassification`` folder as a traceable model.

    Returns ``(model, input spec, default layers)``: the input spec is the folder's image processor's (``crop``
    given: that crop, the margin scaled alike); the default layers are every block (hidden states 1..N).
    """
    transformers = require_transformers(error)
    path = model_folder(folder, error)
    model = load_pretrained(transformers.AutoModelForImageClassification, path, error, "image classifier")
    model_type = model.config.model_type
    if model_type not in HEADS:
        raise error(
            f"{path}: {type(model).__name__} (model_type {model_type!r}) is not supported as a frozen classifier: "
            f"its layers and the rest of the network after them are known for {', '.join(HEADS)} only"
        )
    if model.config.num_labels != num_classes:
        raise error(f"{path}: the model has {model.config.num_labels} classes (config num_labels), not {num_classes}")
    processor = load_pretrained(transformers.AutoImageProcessor, path, error, "image processor")
    spec = processor_input_spec(processor, path, error)
    if crop is not None and crop != spec.crop:
        spec = InputSpec(
            crop, max(crop, round(spec.resize * crop / spec.crop)), spec.interpolation, spec.mean, spec.std
        )
    staged = StagedClassifier(model, HEADS[model_type])
    _check_decomposition(model, staged, spec.crop, path, error)
    return staged, spec, list(staged.block_names)


@torch.no_grad()
def _check_decomposition(model: nn.Module, staged: StagedClassifier, crop: int, path: Path, error: type) -> None:
    """The blocks' outputs must be the model's ``hidden_states`` and the head's logits the model's logits."""
    x = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    try:
        ref = model(pixel_values=x, output_hidden_states=True)
        states = staged.hidden_states(x)
        logits = staged.recipe.logits(staged, states[-1])
    except (RuntimeError, ValueError) as e:
        raise error(f"{path}: a {crop}x{crop} input does not run through the model ({error_summary(e)})") from e
    ref_states = list(ref.hidden_states)[-len(states) + 1 :]
    same = len(ref_states) == len(states) - 1 and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(states[1:], ref_states, strict=True)
    )
    if not same or not torch.allclose(logits, ref.logits, rtol=1e-4, atol=1e-5):
        what = "hidden states" if not same else "logits"
        raise error(
            f"{path}: {type(model).__name__}'s {what} differ from its blocks run one after the other; this "
            "transformers version computes the model differently from what this package knows, so it is refused"
        )
