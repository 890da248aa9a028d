"""A frozen classifier that returns its logits and named activation maps in one forward pass
(docs/method.md#frozen-classifier-and-activation-maps).

Families (:func:`build_classifier`): the shapes world's ``shapes_cnn``; torchvision's ``resnet18/34/50/101``,
``vgg16``, ``vgg16_bn`` and ``vit_b_16``; and any timm model as ``timm:<name>`` (``timm:resnet50.a1_in1k``: a tag
selects that pretrained configuration's input transform); and a Hugging Face ``AutoModelForImageClassification``
folder as ``hf:<folder>`` (:mod:`cefam_lightning.models.hf`: its blocks, the modules giving its hidden states, are
the layers). Weights always come from a local file or folder.

**How activations are taken: one FX graph for every family.** The model is traced with torchvision's
``create_feature_extractor`` using timm's tracer settings (its non-traceable leaf modules and auto-wrapped
functions, exactly what timm's own FX feature extractor, ``features_only=True, feature_cls="fx"``, uses). The
graph returns the requested layers *and* the logits, so one pass gives both, no hooks exist, and the same graph
can be cut after any layer into the rest of the network (:meth:`FrozenClassifier.tail`), which contributions
(docs/method.md#contribution) and Grad-CAM need. timm's ``forward_intermediates`` was the alternative; it returns
intermediates and final features in one pass but offers no way to run the network *from* an intermediate layer, so a
tail would need per-architecture code. timm models' default layers are their ``feature_info`` module names, the same
maps ``features_only`` returns.

**What a layer returns.** Every layer is delivered as a ``(B, C, H, W)`` map:

- 4-D outputs are NCHW maps, except for models whose ``output_fmt`` is ``NHWC`` (timm's Swin family), whose
  4-D outputs are permuted from NHWC.
- 3-D outputs are tokens ``(B, N, D)`` (vision transformers). The model's prefix tokens (class and register
  tokens: timm's ``num_prefix_tokens``, torchvision ViT's class token) are dropped from the map and kept in
  :attr:`Activations.prefix_tokens`; the remaining ``N - P`` tokens must form a square grid and become a
  ``(B, D, h, w)`` map (row-major, as patch embeddings flatten them). A layer before the prefix tokens join
  (``N`` itself square, ``N - P`` not: the patch embedding) has none. Regions and relevance use the map; the
  tail of a token layer puts the prefix tokens back in front of the (masked) map's tokens, because the layers
  after the cut read them. (A ViT's head reads only the class token, so masking the map of its *last* layer,
  e.g. ViT-B/16's ``encoder.ln``, cannot change the logits: contributions there are 0 by construction.)

The wrapper takes images in ``[0, 1]`` and applies the model's own normalization (:attr:`FrozenClassifier.
input_spec`), freezes every parameter and stays in eval mode whatever ``.train()`` asks.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cefam_lightning.data.transforms import INTERPOLATIONS, InputSpec
from cefam_lightning.errors import CefamError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)
SHAPES_IMAGE_SIZE = 64
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
TORCHVISION_VGGS = ("vgg16", "vgg16_bn")
TORCHVISION_VITS = ("vit_b_16",)
TORCHVISION_MODELS = (*TORCHVISION_RESNETS, *TORCHVISION_VGGS, *TORCHVISION_VITS)
CLASSIFIER_NAMES = ("shapes_cnn", *TORCHVISION_MODELS)
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
TORCHVISION_DEFAULT_PRESET = "IMAGENET1K_V1"


class ClassifierError(CefamError):
    """A classifier that cannot be built or cut as asked: a bad name, layer or weights file (named)."""


class Activations(dict):
    """``{layer: (B, C, H, W)}`` activation maps, plus what token layers leave out of their maps.

    Attributes:
        prefix_tokens: ``{token layer: (B, P, D)}``, the prefix (class/register) tokens of each token layer whose
            model has any; :meth:`FrozenClassifier.tail` needs them (indexed like the maps) to run the network on.
    """

    def __init__(self, maps: Mapping[str, Tensor] | None = None, prefix_tokens: Mapping[str, Tensor] | None = None):
        super().__init__(maps or {})
        self.prefix_tokens: dict[str, Tensor] = dict(prefix_tokens or {})


@dataclass
class ClassifierOutput:
    logits: Tensor
    activations: Activations


class LayerTail(nn.Module):
    """The classifier after one layer: its ``(B, C, H, W)`` activation map (and prefix tokens) -> logits.

    Args:
        graph: the FX graph from the layer's raw output to the logits.
        layer, classifier: names for error messages.
        kind: the raw output's form: ``"nchw"``, ``"nhwc"`` or ``"tokens"``.
        num_prefix: prefix tokens the graph expects in front of the map's tokens (``"tokens"`` only).
    """

    def __init__(self, graph: nn.Module, layer: str, classifier: str, kind: str, num_prefix: int = 0):
        super().__init__()
        self.graph, self.layer, self.classifier, self.kind, self.num_prefix = graph, layer, classifier, kind, num_prefix

    def forward(self, activation: Tensor, prefix_tokens: Tensor | None = None) -> Tensor:
        """``activation``: ``(B, C, H, W)``; ``prefix_tokens``: ``(B, P, C)`` for a token layer with prefix tokens
        (from :attr:`Activations.prefix_tokens` of the same images), else ``None``."""
        if self.kind != "tokens":
            if prefix_tokens is not None:
                raise ClassifierError(
                    f"{self.classifier}: {self.layer!r} is not a token layer; it takes no prefix tokens"
                )
            return self.graph(activation.permute(0, 2, 3, 1).contiguous() if self.kind == "nhwc" else activation)
        tokens = activation.flatten(2).transpose(1, 2)
        if self.num_prefix:
            if prefix_tokens is None:
                raise ClassifierError(
                    f"{self.classifier}: {self.layer!r} is a token layer; the rest of the network also reads its "
                    f"{self.num_prefix} prefix (class/register) token(s), which the map leaves out. Pass them, "
                    f"indexed like the maps, from ClassifierOutput.activations.prefix_tokens[{self.layer!r}]"
                )
            if prefix_tokens.shape[0] != tokens.shape[0] or prefix_tokens.shape[1] != self.num_prefix:
                raise ClassifierError(
                    f"{self.classifier}: prefix tokens of shape {tuple(prefix_tokens.shape)} for {tokens.shape[0]} "
                    f"map(s) at {self.layer!r}; expected ({tokens.shape[0]}, {self.num_prefix}, {tokens.shape[2]})"
                )
            tokens = torch.cat([prefix_tokens.to(tokens.dtype), tokens], dim=1)
        return self.graph(tokens.contiguous())


class FrozenClassifier(nn.Module):
    """Wrap ``model`` so one call returns logits and the activation maps of ``layers``.

    Args:
        model: any classifier torchvision's FX feature extraction can trace (torchvision models, timm models,
            :class:`ShapesCNN`).
        layers: node or module names to return, e.g. ``["layer3", "layer4"]``; an unknown name is an error
            listing the valid ones.
        mean, std: input normalization overriding ``input_spec``'s (kept for direct use; default: its own).
        name: an identity recorded with checkpoints.
        output_node: the node that gives the logits (default: the graph's last node).
        input_spec: the model's input geometry and normalization (default: ImageNet's 224 px crop of 256).
        prefix_tokens: prefix tokens in front of the patch tokens of a token layer; default: timm's
            ``num_prefix_tokens``, 1 for a model with a ``class_token`` (torchvision's ViT), else 0.
        channels_last: read 4-D outputs as NHWC; default: the model's ``output_fmt == "NHWC"`` (timm's Swin).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "classifier",
        output_node: str | None = None,
        input_spec: InputSpec | None = None,
        prefix_tokens: int | None = None,
        channels_last: bool | None = None,
    ):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if not layers:
            raise ClassifierError(f"{name}: at least one layer name is needed")
        model.eval()
        tracer_kwargs = _tracer_kwargs(model)
        _, nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs, suppress_diff_warning=True)
        output_node = output_node or nodes[-1]
        valid = valid_layer_names(nodes)
        unknown = [layer for layer in layers if layer not in valid]
        if unknown:
            raise ClassifierError(
                f"Unknown layer name(s) {unknown} for classifier {name!r}. Valid names: {', '.join(valid)}"
            )
        if len(set(layers)) != len(layers):
            raise ClassifierError(f"Duplicate layer names in {list(layers)}")
        spec = input_spec or InputSpec(crop=224, resize=256)
        if mean is not None or std is not None:
            spec = replace(spec, mean=tuple(mean or spec.mean), std=tuple(std or spec.std))
        self.name, self.layers, self.output_node, self.input_spec = name, list(layers), output_node, spec
        self.num_prefix_tokens = _num_prefix_tokens(model) if prefix_tokens is None else int(prefix_tokens)
        self.channels_last = _is_channels_last(model) if channels_last is None else bool(channels_last)
        return_nodes = {layer: layer for layer in self.layers}
        return_nodes[output_node] = "__logits__"
        self.model = create_feature_extractor(
            model, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs, suppress_diff_warning=True
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._tails: dict[str, LayerTail] = {}
        # {layer: (form, prefix tokens)}, form "nchw" | "nhwc" | "tokens", learnt from the first forward pass.
        self._forms: dict[str, tuple[str, int]] = {}
        self._mean_invariant: list[str] | None = None  # see mean_invariant_layers()
        self._unread: list[str] | None = None  # see unread_layers()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenClassifier:  # noqa: ARG002 - frozen: always eval
        """Ignore ``mode``: BatchNorm statistics and Dropout stay in eval mode while the explainer trains."""
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        self._tails.clear()  # tails are rebuilt lazily from the moved/cast graph
        return super()._apply(fn, recurse)

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> ClassifierOutput:
        """``images``: ``(B, 3, H, W)`` in ``[0, 1]``."""
        out = self.model(self.normalize(images))
        logits = out.pop("__logits__")
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ClassifierError(
                f"{self.name}: output node {self.output_node!r} gives {shape}, not (B, classes) logits"
            )
        acts = Activations()
        for layer in self.layers:
            acts[layer], prefix = self._to_map(layer, out[layer])
            if prefix is not None:
                acts.prefix_tokens[layer] = prefix
        return ClassifierOutput(logits=logits, activations=acts)

    def _to_map(self, layer: str, raw: Any) -> tuple[Tensor, Tensor | None]:
        """A layer's raw output as ``(B, C, H, W)``, and the prefix tokens a token layer leaves out (or None)."""
        if not isinstance(raw, Tensor) or raw.ndim not in (3, 4):
            what = f"a {tuple(raw.shape)} tensor" if isinstance(raw, Tensor) else f"a {type(raw).__name__}"
            raise ClassifierError(
                f"Layer {layer!r} of classifier {self.name!r} gives {what}, not an activation map (B, C, H, W) "
                "or tokens (B, N, D); choose another layer"
            )
        if raw.ndim == 4:
            self._forms[layer] = ("nhwc" if self.channels_last else "nchw", 0)
            return (raw.permute(0, 3, 1, 2).contiguous() if self.channels_last else raw), None
        b, n, d = raw.shape
        p = self.num_prefix_tokens
        if not _is_square(n - p) and _is_square(n):
            p = 0  # a layer before the prefix tokens join (a ViT's patch embedding)
        self._forms[layer] = ("tokens", p)
        side = math.isqrt(max(n - p, 0))
        if not _is_square(n - p):
            raise ClassifierError(
                f"Layer {layer!r} of classifier {self.name!r} returns {n} tokens; without its {p} prefix "
                f"(class/register) token(s) the {n - p} others do not form a square grid, so they cannot be "
                "reshaped to a map (square inputs only; the prefix count is FrozenClassifier(prefix_tokens=...))"
            )
        grid = raw[:, p:].transpose(1, 2).reshape(b, d, side, side)
        return grid, (raw[:, :p] if p else None)

    def tail(self, layer: str) -> LayerTail:
        """The part of the classifier after ``layer``: a module mapping that layer's activation map to logits.

        It is cut from the traced graph, so it shares the classifier's (frozen) parameters and works for any
        traceable model, provided nothing after ``layer`` reads an earlier tensor (a skip connection across
        the cut is an error). For a token layer it also takes the prefix tokens (see :class:`LayerTail`).
        """
        if layer not in self.layers:
            raise ClassifierError(f"{layer!r} is not among the wrapped layers {self.layers}")
        if layer not in self._tails:
            if layer not in self._forms:
                self._probe()
            form, num_prefix = self._forms[layer]
            self._tails[layer] = LayerTail(_cut_after(self.model, layer), layer, self.name, form, num_prefix)
        return self._tails[layer]

    @torch.no_grad()
    def _probe(self) -> None:
        """One pass on a blank image of the input size, to learn each layer's output form."""
        crop = self.input_spec.crop
        self(torch.zeros(1, 3, crop, crop, device=self.mean.device))

    @torch.no_grad()
    def mean_invariant_layers(self) -> list[str]:
        """The wrapped layers where replacing every channel map by its spatial mean leaves the logits unchanged.

        That is a layer the rest of the network reads only through global average pooling (a ResNet's or the shapes
        CNN's ``layer4``, a ViT's last tokens when its head reads the class token): the contribution
        (docs/method.md#contribution), which masks channels with their spatial means, is 0 there for every concept.
        Found once, on a seeded random image of the input size, by running each layer's :meth:`tail` on its own maps
        and on their spatial means.
        """
        self._probe_layers()
        return list(self._mean_invariant)

    @torch.no_grad()
    def unread_layers(self) -> list[str]:
        """The wrapped layers whose maps the logits do not read at all: replacing a map by zeros leaves them
        unchanged (a ViT's last tokens when its head reads only the class token). Masking concept channels there
        moves nothing under any fill, so contributions measured at "the last layer" skip them
        (docs/method.md#contribution). Found by the same probe as :meth:`mean_invariant_layers`."""
        self._probe_layers()
        return list(self._unread)

    def _probe_layers(self) -> None:
        if self._mean_invariant is None:
            crop = self.input_spec.crop
            g = torch.Generator().manual_seed(0)
            images = torch.rand(2, 3, crop, crop, generator=g).to(device=self.mean.device)
            # In full precision even when called under bf16/fp16 autocast (a callback in mixed-precision training):
            # half-precision rounding would hide an exact invariance.
            with torch.autocast(device_type=images.device.type, enabled=False):
                self._mean_invariant, self._unread = self._find_invariant(images)

    def _find_invariant(self, images: Tensor) -> tuple[list[str], list[str]]:
        acts = self(images).activations
        mean_invariant, unread = [], []
        for layer in self.layers:
            a, prefix = acts[layer], acts.prefix_tokens.get(layer)
            try:
                tail = self.tail(layer)
            except ValueError:  # no tail to run (a skip connection across the cut): contributions fail anyway
                continue
            same = tail(a, prefix).float()
            tolerance = 1e-3 * (same.abs().max() + 1e-6)
            meaned = tail(a.mean(dim=(2, 3), keepdim=True).expand_as(a).contiguous(), prefix).float()
            if (meaned - same).abs().max() <= tolerance:
                mean_invariant.append(layer)
                if (tail(torch.zeros_like(a), prefix).float() - same).abs().max() <= tolerance:
                    unread.append(layer)
        return mean_invariant, unread

    @torch.no_grad()
    def layer_shapes(self, image_size: int | None = None) -> dict[str, tuple[int, int, int]]:
        """``{layer: (channels, height, width)}`` for square inputs of ``image_size`` (default the input crop)."""
        size = image_size or self.input_spec.crop
        acts = self(torch.zeros(1, 3, size, size, device=self.mean.device)).activations
        return {k: tuple(v.shape[1:]) for k, v in acts.items()}


def _tracer_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The model's own FX settings (``fx_tracer_kwargs``: a Hugging Face model's leaf blocks), timm's (modules and
    functions it marks as not traceable) for a timm model, else none."""
    own = getattr(model, "fx_tracer_kwargs", None)
    if isinstance(own, dict):
        return own
    if not type(model).__module__.startswith("timm."):
        return None  # importing timm costs a second; torchvision models and ShapesCNN trace without it
    from timm.layers import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def _num_prefix_tokens(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", None)  # timm's vision transformers: class + register tokens
    if isinstance(n, int):
        return n
    class_token = getattr(model, "class_token", None)  # torchvision's VisionTransformer: (1, 1, D)
    return int(class_token.shape[1]) if isinstance(class_token, Tensor) and class_token.ndim == 3 else 0


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _is_channels_last(model: nn.Module) -> bool:
    return str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")


def _cut_after(gm: torch.fx.GraphModule, layer: str) -> torch.fx.GraphModule:
    """A GraphModule computing the logits node of ``gm`` from the node returned under ``layer``."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = output.args[0]
    start, logits = returned[layer], returned["__logits__"]
    needed: set[torch.fx.Node] = set()
    stack = [logits]
    while stack:  # everything the logits depend on, back to the cut
        node = stack.pop()
        if node in needed or node is start:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    graph = torch.fx.Graph()
    env = {start: graph.placeholder("activation")}
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node is image:
            raise ClassifierError(f"The classifier reads its input again after {layer!r}; it cannot be cut there")
        # Other inputs of the model's forward (timm ViT's attn_mask=None) keep their defaults.
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[logits])
    return torch.fx.GraphModule(gm, graph)


def valid_layer_names(nodes: Sequence[str]) -> list[str]:
    """Graph nodes plus the modules that contain them (a module name selects its last operation)."""
    out: dict[str, None] = {}
    for node in nodes:
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            out.setdefault(".".join(parts[:i]), None)
    return list(out)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict from a local file (PyTorch or ``.safetensors``), unwrapping ``state_dict``/``model``
    keys and ``module.`` prefixes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Classifier weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        raise ClassifierError(f"{path}: could not be read as a PyTorch weights file ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ClassifierError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ---------------------------------------------------------------------- input presets


@dataclass(frozen=True)
class _Preset:
    """A model family's own eval transform: ``resize`` (torchvision) or ``crop_pct`` (timm) sets the margin."""

    crop: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    crop_pct: float | None = None

    def spec(self, crop: int | None = None) -> InputSpec:
        """The preset at its own crop, or scaled to another ``crop`` keeping its crop fraction (as timm does)."""
        if crop is None or crop == self.crop:
            crop = self.crop
            resize = self.resize if self.resize is not None else math.floor(crop / self.crop_pct)
        else:
            pct = self.crop_pct if self.crop_pct is not None else self.crop / self.resize
            resize = math.floor(crop / pct)
        return InputSpec(crop, max(resize, crop), self.interpolation, self.mean, self.std)


def as_input_spec(value: InputSpec | Mapping[str, Any]) -> InputSpec:
    """An :class:`InputSpec` from itself or its ``to_dict()`` form (as checkpoints record it)."""
    if isinstance(value, InputSpec):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"input_spec must be an InputSpec or a mapping, got {type(value).__name__}")
    known = {"crop", "resize", "interpolation", "mean", "std"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ClassifierError(f"input_spec: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    if "crop" not in value:
        raise ClassifierError("input_spec: 'crop' is required")
    kwargs = dict(value)
    kwargs.setdefault("resize", kwargs["crop"])
    for key in ("mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return InputSpec(**kwargs)


# ---------------------------------------------------------------------- families


def _shapes_model(num_classes: int, widths: Sequence[int]) -> tuple[nn.Module, _Preset, list[str]]:
    from cefam_lightning.models.components.shapes_cnn import ShapesCNN

    preset = _Preset(SHAPES_IMAGE_SIZE, "bilinear", SHAPES_MEAN, SHAPES_STD, resize=SHAPES_IMAGE_SIZE)
    return ShapesCNN(num_classes=num_classes, widths=widths), preset, ["layer1", "layer2", "layer3", "layer4"]


def _torchvision_model(name: str, num_classes: int, crop: int | None) -> tuple[nn.Module, _Preset, list[str]]:
    """A torchvision model and the eval transform of its weights (``name.TAG``; default ``IMAGENET1K_V1``).

    Default layers: ResNets ``layer1..layer4``. VGG-16: the last ReLU of conv blocks 2 to 5 (``features.8``,
    ``.15``, ``.22``, ``.29``; ``vgg16_bn``: ``.12``, ``.22``, ``.32``, ``.42``), i.e. each block's output before
    its max-pool: four maps at strides 2-16 like a ResNet's four stages, each at its block's full resolution
    (``features.29`` is ``features[:30]``, the map L-CAM and Grad-CAM use, docs/method.md#l-cam); block 1 runs at
    the input resolution and is left out (low-level and memory-heavy). ViT-B/16: ``encoder.ln``, the last block's tokens
    after the encoder's final LayerNorm (docs/method.md#frozen-classifier-and-activation-maps).
    """
    import torchvision

    base, _, tag = name.partition(".")
    presets = torchvision.models.get_model_weights(base)
    tag = tag or TORCHVISION_DEFAULT_PRESET
    try:
        weights = presets[tag]
    except KeyError:
        raise ClassifierError(
            f"Unknown torchvision weights preset {tag!r} for {base}; choose from {', '.join(p.name for p in presets)}"
        ) from None
    t = weights.transforms()
    preset = _Preset(
        int(t.crop_size[0]), t.interpolation.value, tuple(t.mean), tuple(t.std), resize=int(t.resize_size[0])
    )
    kwargs: dict[str, Any] = {"image_size": crop or preset.crop} if base in TORCHVISION_VITS else {}
    model = getattr(torchvision.models, base)(weights=None, num_classes=num_classes, **kwargs)
    if base in TORCHVISION_RESNETS:
        layers = ["layer1", "layer2", "layer3", "layer4"]
    elif base in TORCHVISION_VGGS:
        feats = list(model.features.named_children())
        before_pool = [feats[i - 1][0] for i, (_, m) in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        layers = [f"features.{i}" for i in before_pool[1:]]
    else:
        layers = ["encoder.ln"]
    return model, preset, layers


def _timm_model(name: str, num_classes: int, crop: int | None) -> tuple[nn.Module, _Preset, list[str]]:
    """A timm model (random init), its data config (``resolve_model_data_config``) and ``feature_info`` layers.

    A model with a fixed input size (vision transformers) is built for ``crop`` when that differs from its own.
    """
    import timm

    arch = name.removeprefix(TIMM_PREFIX)
    if ":" in arch:
        raise ClassifierError(
            f"{name!r}: only timm architecture names are supported (no hub or URL sources; nothing is downloaded); "
            "give the weights as a local file instead"
        )
    base = arch.partition(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=6, cutoff=0.6)
        raise ClassifierError(
            f"Unknown timm model {base!r} (classifier {name!r}); close matches: {', '.join(close) or 'none'} "
            "(timm.list_models() lists them all)"
        )
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
        raise ClassifierError(f"{name!r}: {e} Tags of {base}: {', '.join(tags) or 'none'}") from e
    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if h != w:
        raise ClassifierError(
            f"{name!r}: timm's input size is {h}x{w}; only square inputs are supported (pass input_spec)"
        )
    interpolation = cfg["interpolation"]
    if interpolation not in INTERPOLATIONS:
        log.warning(f"{name}: timm's interpolation {interpolation!r} is not supported here; using bicubic")
        interpolation = "bicubic"
    if cfg.get("crop_mode", "center") != "center":
        log.warning(
            f"{name}: timm's eval transform uses crop_mode={cfg['crop_mode']!r}; this framework resizes the "
            "shorter side and center-crops (pass input_spec to choose the geometry)"
        )
    preset = _Preset(h, interpolation, tuple(cfg["mean"]), tuple(cfg["std"]), crop_pct=float(cfg["crop_pct"]))
    if crop is not None and crop != h and model.pretrained_cfg.get("fixed_input_size", False):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=crop)
    info = getattr(model, "feature_info", None)
    layers = [f["module"] for f in info] if isinstance(info, list) else []
    return model, preset, layers


def brings_own_weights(name: str) -> bool:
    """Whether classifier ``name`` comes with its weights (``hf:<folder>``), so takes no weights file."""
    return name.startswith(HF_PREFIX)


def build_classifier(
    name: str,
    num_classes: int,
    layers: Sequence[str] | None = None,
    weights: str | os.PathLike | None = None,
    widths: Sequence[int] = (16, 32, 64, 128),
    *,
    image_size: int | None = None,
    input_spec: InputSpec | Mapping[str, Any] | None = None,
) -> FrozenClassifier:
    """Build a frozen classifier by name, weights from a local file, with its own input transform.

    Input transforms (:attr:`FrozenClassifier.input_spec`): torchvision models use the eval preset of their
    weights (``IMAGENET1K_V1`` unless the name says ``resnet50.IMAGENET1K_V2``: ResNets, VGG-16 and ViT-B/16 V1 all
    resize to 256, crop 224, bilinear, ImageNet mean/std); timm models use ``timm.data.resolve_model_data_config``
    (input size, ``resize = floor(crop / crop_pct)``, interpolation, mean, std; a ``timm:name.tag`` picks that
    tag's configuration); ``shapes_cnn`` sees the shapes world's images as they are (crop = resize =
    ``image_size``, 64 by default).

    Args:
        name: ``shapes_cnn``, ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``vgg16``, ``vgg16_bn``,
            ``vit_b_16`` (each optionally ``.<torchvision weights preset>``), ``timm:<timm model name>``, or
            ``hf:<folder>`` (a Hugging Face image classifier saved with ``save_pretrained``; no ``weights``).
        num_classes: output classes (1000 for ImageNet weights).
        layers: activation maps to return (default per family: see :func:`_torchvision_model`; timm: its
            ``feature_info`` modules; ``shapes_cnn``: ``layer1..layer4``).
        weights: path to a local state-dict file (``.pth``/``.pt``/``.bin`` or ``.safetensors``); ``None`` keeps
            the random initialization.
        widths: stage widths of ``shapes_cnn``.
        image_size: the crop the model sees, when it was trained or fine-tuned at another resolution than its
            preset (the resize keeps the preset's crop fraction; vision transformers are built for it).
        input_spec: the whole input transform, overriding the preset (an :class:`InputSpec` or its dict form).
    """
    override = as_input_spec(input_spec) if input_spec is not None else None
    if override is not None and image_size is not None and override.crop != image_size:
        raise ClassifierError(f"image_size={image_size} disagrees with input_spec crop={override.crop}")
    crop = override.crop if override is not None else image_size
    if crop is not None and (not isinstance(crop, int) or crop <= 0):
        raise ClassifierError(f"image_size must be a positive integer, got {crop!r}")
    if name == "shapes_cnn":
        model, preset, default_layers = _shapes_model(num_classes, widths)
        preset = replace(preset, crop=crop or preset.crop, resize=crop or preset.resize)
    elif name.partition(".")[0] in TORCHVISION_MODELS:
        model, preset, default_layers = _torchvision_model(name, num_classes, crop)
    elif name.startswith(TIMM_PREFIX):
        model, preset, default_layers = _timm_model(name, num_classes, crop)
    elif brings_own_weights(name):
        if weights is not None:
            raise ClassifierError(f"{name!r}: a Hugging Face model folder brings its own weights; give no weights file")
        from cefam_lightning.models.hf import hf_image_classifier

        folder = name.removeprefix(HF_PREFIX)
        model, own, default_layers = hf_image_classifier(folder, num_classes, crop, ClassifierError)
        preset = _Preset(own.crop, own.interpolation, own.mean, own.std, resize=own.resize)
    else:
        raise ClassifierError(
            f"Unknown classifier {name!r}; choose from {', '.join(CLASSIFIER_NAMES)}, timm:<model name> for any "
            "timm model (e.g. timm:resnet18, timm:vit_tiny_patch16_224), or hf:<folder> for a Hugging Face "
            "AutoModelForImageClassification folder"
        )
    spec = override or preset.spec(crop)
    if weights is not None:
        state = load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ClassifierError(f"{weights}: weights do not fit {name} with {num_classes} classes: {e}") from e
    layers = list(layers) if layers else default_layers
    if not layers:
        raise ClassifierError(f"{name}: no default layers are known for this model; pass layers=[...]")
    wrapped = FrozenClassifier(model, layers, name=name, input_spec=spec)
    # What a checkpoint records to rebuild this classifier.
    wrapped.spec = {
        "name": name,
        "num_classes": num_classes,
        "widths": list(widths),
        "weights": str(weights or ""),
        "input_spec": spec.to_dict(),
    }
    return wrapped
