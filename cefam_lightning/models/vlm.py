"""A vision-language model from open_clip: image and text encoders plus the scoring constants
(docs/method.md#concept-scores).

:class:`OpenCLIPVLM` wraps any open_clip architecture (``open_clip.list_models()``, a config registered with
:func:`register_model_config`, or a ``local-dir:`` folder) with weights from

- an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ``webli``...), read from the local cache
  (``cache_dir``, else open_clip's/Hugging Face's default cache). Nothing is downloaded unless ``download=True``:
  a tag that is not cached raises :class:`VLMError` at once instead of retrying the network for a minute;
- a local checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, ``.npz``);
- nothing (``pretrained=None``): random weights drawn from ``seed``, for tests and demos only.

It exposes open_clip's own evaluation transform (:attr:`OpenCLIPVLM.preprocess`, PIL image -> normalized
tensor), raw (not normalized) image and text embeddings, and :attr:`OpenCLIPVLM.info`, the
:class:`~cefam_lightning.data.embedding_store.VLMInfo` with the logit scale ``exp(model.logit_scale)`` and bias. The
scoring kind is ``"siglip"`` (sigmoid per concept) when the model has a logit bias, else ``"clip"`` (softmax over
concepts), unless given explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cefam_lightning import devices
from cefam_lightning.data.embedding_store import VLM_KINDS, VLMInfo
from cefam_lightning.errors import CefamError, error_summary

log = logging.getLogger("cefam_lightning")

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy", ".ckpt")
_SCHEMAS = ("hf-hub:", "local-dir:")


def _safe_load(create_model: Any) -> dict[str, Any]:
    """``weights_only=True`` for open_clip's loader where it takes the flag, so a weights file passed in is unpickled
    without running code (an open_clip without it reads with torch's default: weights-only from torch 2.6, which the
    project requires)."""
    import inspect

    return {"weights_only": True} if "weights_only" in inspect.signature(create_model).parameters else {}


class VLMError(CefamError):
    """A VLM that cannot be built as asked (unknown model, missing weights, missing tokenizer), for the user."""


def register_model_config(path: str | os.PathLike) -> list[str]:
    """Make the open_clip model config(s) in ``path`` (a ``NAME.json`` file or a folder of them) known by name.

    Returns the model names it added (file stems). A config needs ``embed_dim``, ``vision_cfg`` and ``text_cfg``
    (open_clip's format, see its ``model_configs`` folder).
    """
    import open_clip
    from open_clip import factory

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise VLMError(f"model config not found: {path}")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    names = []
    for f in files:
        cfg = _read_json(f)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise VLMError(f"{f}: not an open_clip model config (missing {', '.join(missing)})")
        names.append(f.stem)
    if not names:
        raise VLMError(f"{path}: no .json model configs in the folder")
    if path not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(path)
    else:  # re-read: the file may have changed
        factory._rescan_model_configs()
    return names


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VLMError(f"{file}: cannot read the JSON file ({e})") from e
    if not isinstance(data, dict):
        raise VLMError(f"{file}: expected a JSON object")
    return data


def check_model_name(name: str) -> None:
    """Raise :class:`VLMError` naming close matches when ``name`` is not an open_clip architecture."""
    import open_clip

    if name.startswith(_SCHEMAS):
        return
    models = open_clip.list_models()
    if name.replace("/", "-") in models:
        return
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise VLMError(
        f"unknown open_clip model {name!r}{hint} ({len(models)} models are known: python -c "
        f"'import open_clip; print(open_clip.list_models())'; a custom config can be added with --model-config)"
    )


def cached_weights(model_name: str, tag: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The local file open_clip would load for pretrained ``tag`` of ``model_name``, or None if not cached.

    Looks where open_clip's downloader stores it: the Hugging Face hub cache (``cache_dir`` or the default one)
    for tags published there, else ``cache_dir`` (default ``~/.cache/clip``) for tags with a plain URL.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), tag)
    if not cfg:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        candidates = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")) and filename != HF_WEIGHTS_NAME:
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(target) if target.is_file() else None
    return None


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """While active (and ``enabled``), Hugging Face hub calls read the local cache only and fail fast."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def select_device(device: str | torch.device) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device; a bad one is a :class:`VLMError`."""
    return devices.select_device(device, VLMError)


class VLMBase:
    """The interface ``precompute`` reads a VLM through, whatever library reads it (``library``;
    :mod:`cefam_lightning.models.vlm_libraries`), and what every adapter computes alike.

    An adapter provides ``preprocess`` (PIL image -> tensor), ``encode_images`` (raw image embeddings, float32 on
    the CPU), ``preprocess_config`` and ``architecture()`` (JSON-ready), ``weights_file`` and ``seed``, and
    :meth:`_encode_text_batch`; this class gives the scoring constants (:attr:`info`, from the model's
    ``logit_scale`` and an optional ``logit_bias``), :attr:`embed_dim` and batched :meth:`encode_texts`.
    """

    library: str
    model: nn.Module
    name: str
    kind: str
    pretrained: str | None
    weights_file: str | None
    seed: int
    device: torch.device
    _embed_dim: int | None = None

    @staticmethod
    def check_kind(kind: str | None) -> None:
        if kind is not None and kind not in VLM_KINDS:
            raise VLMError(f"VLM kind must be one of {', '.join(VLM_KINDS)}, got {kind!r}")

    def scoring_kind(self, kind: str | None) -> str:
        """``kind`` if given, else ``"siglip"`` (sigmoid scoring) for a model with a logit bias, else ``"clip"``."""
        return kind or ("siglip" if getattr(self.model, "logit_bias", None) is not None else "clip")

    @property
    def info(self) -> VLMInfo:
        """Name, scoring kind, logit scale ``exp(logit_scale)``, logit bias (0 without one) and weights."""
        bias = getattr(self.model, "logit_bias", None)
        return VLMInfo(
            name=self.name,
            kind=self.kind,
            logit_scale=float(self.model.logit_scale.detach().float().exp().reshape(-1)[0]),
            logit_bias=float(bias.detach().float().reshape(-1)[0]) if bias is not None else 0.0,
            pretrained=self.pretrained,
        )

    @property
    def embed_dim(self) -> int:
        """The size of the joint embedding space (of image and text embeddings)."""
        if self._embed_dim is None:
            self._embed_dim = int(self.encode_texts(["a photo"]).shape[1])
        return self._embed_dim

    @torch.inference_mode()
    def encode_texts(self, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Raw (not normalized) text embeddings ``(len(prompts), d)``, float32 on the CPU."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise VLMError("encode_texts needs at least one prompt")
        batches = range(0, len(prompts), batch_size)
        return torch.cat([self._encode_text_batch(prompts[i : i + batch_size]).float().cpu() for i in batches])

    def _encode_text_batch(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError


class OpenCLIPVLM(VLMBase):
    """An open_clip model in eval mode with its tokenizer and evaluation transform (library ``open_clip``; the
    other libraries, :mod:`cefam_lightning.models.vlm_libraries`, share this interface).

    Args:
        model_name: an open_clip architecture (``ViT-B-32``, ``ViT-B-16-SigLIP``...), a name registered with
            :func:`register_model_config`, or ``local-dir:/path`` (config and weights in one folder).
        pretrained: a pretrained tag of that architecture, a checkpoint file, or None for random weights (for
            ``local-dir:``/``hf-hub:`` models: None, the weights come with the model, and ``info.pretrained`` is
            the model name).
        cache_dir: where cached weights are looked up (and downloaded to with ``download=True``).
        download: allow downloading weights/tokenizers that are not cached (needs network access).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a :class:`torch.device`.
        kind: ``"clip"`` or ``"siglip"`` to override the scoring kind read from the model.
        seed: the seed of random weights (``pretrained=None``), so that a rerun gives the same model.
    """

    library = "open_clip"

    def __init__(
        self,
        model_name: str,
        pretrained: str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        device: str | torch.device = "cpu",
        kind: str | None = None,
        seed: int = 0,
    ) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.check_kind(kind)
        check_model_name(model_name)
        self.name = model_name
        self.device = select_device(device)
        self.seed = seed
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.pretrained, self.weights_file = self._resolve_pretrained(pretrained, download)

        with hub_offline(not download), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = open_clip.create_model(
                    model_name,
                    pretrained=None if model_name.startswith(_SCHEMAS) else (self.weights_file or self.pretrained),
                    cache_dir=self.cache_dir,
                    device=self.device,
                    force_preprocess_cfg=self._tag_preprocess(),
                    **_safe_load(open_clip.create_model),
                )
            except (RuntimeError, ValueError, OSError, KeyError) as e:
                hint = "; files not in the local cache need --download (network access)" if not download else ""
                raise VLMError(f"cannot build open_clip model {model_name!r} ({error_summary(e)}){hint}") from e
            try:
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=self.cache_dir)
            except ImportError as e:
                raise VLMError(
                    f"the tokenizer of {model_name!r} needs a package that is not installed ({error_summary(e)}); "
                    "SigLIP-family models need `pip install transformers sentencepiece`"
                ) from e
            except Exception as e:  # hub/sentencepiece errors come in many kinds
                raise VLMError(
                    f"cannot load the tokenizer of {model_name!r} ({error_summary(e)})"
                    + ("; it may need --download once, with network access" if not download else "")
                ) from e
        self.model: nn.Module = model.eval().requires_grad_(False)
        self.preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        self.tokenizer = tokenizer
        self.kind = self.scoring_kind(kind)

    @staticmethod
    def brings_own_weights(model_name: str) -> bool:
        """Whether ``model_name`` comes with its weights (``local-dir:``, ``hf-hub:``), so takes no pretrained tag."""
        return model_name.startswith(_SCHEMAS)

    @staticmethod
    def register_config(path: str | os.PathLike) -> list[str]:
        """:func:`register_model_config`."""
        return register_model_config(path)

    # ------------------------------------------------------------------ weights
    def _resolve_pretrained(
        self, pretrained: str | os.PathLike | None, download: bool
    ) -> tuple[str | None, str | None]:
        """(what ``info.pretrained`` records, the local weights file to load or None for open_clip to resolve)."""
        import open_clip

        if self.name.startswith(_SCHEMAS):
            if pretrained is not None:
                raise VLMError(f"model {self.name!r} brings its own weights; do not give a pretrained tag or file")
            return self.name, None
        if pretrained is None:
            return None, None
        text = str(pretrained)
        path = Path(text).expanduser()
        if path.is_file():
            return str(path.resolve()), str(path.resolve())
        arch = self.name.replace("/", "-")
        if open_clip.get_pretrained_cfg(arch, text):
            if download:
                return text, None
            found = cached_weights(arch, text, self.cache_dir)
            if found is None:
                where = self.cache_dir or "the default cache (~/.cache/huggingface/hub or ~/.cache/clip)"
                raise VLMError(
                    f"weights of {self.name!r} pretrained {text!r} are not in {where}; nothing is downloaded "
                    "without --download (run once with --download where there is network access, or give a "
                    "checkpoint file with --pretrained PATH)"
                )
            return text, found
        if os.sep in text or text.lower().endswith(CHECKPOINT_SUFFIXES):
            raise VLMError(f"checkpoint file not found: {path}")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        listing = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags in open_clip"
        raise VLMError(f"{text!r} is neither a pretrained tag of {self.name!r} ({listing}) nor a checkpoint file")

    def _tag_preprocess(self) -> dict[str, Any]:
        """For a tag loaded from a cached file: the tag's own preprocessing (mean, std, interpolation...)."""
        import open_clip
        from open_clip.transform import PreprocessCfg

        if self.pretrained is None or self.weights_file is None or self.pretrained == self.weights_file:
            return {}
        cfg = open_clip.get_pretrained_cfg(self.name.replace("/", "-"), self.pretrained)
        keys = set(PreprocessCfg.__dataclass_fields__) - {"size"}
        return {k: v for k, v in cfg.items() if k in keys}

    # ------------------------------------------------------------------ description
    @property
    def preprocess_config(self) -> dict[str, Any]:
        """open_clip's preprocessing settings (size, mean, std, interpolation, resize mode), JSON-ready."""
        from open_clip.model import get_model_preprocess_cfg

        return _json_ready(dict(get_model_preprocess_cfg(self.model)))

    def architecture(self) -> dict[str, Any] | None:
        """The open_clip model config (what determines the network), JSON-ready."""
        import open_clip

        name = self.name if self.name.startswith(_SCHEMAS) else self.name.replace("/", "-")
        try:
            with hub_offline():
                cfg = open_clip.get_model_config(name)
        except Exception:  # a hub config that is not cached: the name identifies it
            return None
        return _json_ready(copy.deepcopy(cfg)) if cfg is not None else None

    # ------------------------------------------------------------------ encoders
    @torch.inference_mode()
    def encode_images(self, images: Tensor) -> Tensor:
        """Raw (not normalized) image embeddings ``(B, d)``, float32 on the CPU, of preprocessed images."""
        x = images.to(self.device)
        return self.model.encode_image(x, normalize=False).float().cpu()

    def _encode_text_batch(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens, normalize=False)

    def __repr__(self) -> str:
        return f"OpenCLIPVLM({self.name!r}, pretrained={self.pretrained!r}, kind={self.kind!r}, device={self.device})"


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    return str(obj)
