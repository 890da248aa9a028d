"""Interoperability with the CE-FAM authors' released translator checkpoints.

The authors' ``train.py`` publishes ``best_converter_ckpt.pth`` as ``torch.save({'net': model, 'loss': ...,
'epoch': ...})`` where ``model`` is the whole translator object (``MapConverter`` of their ``converter.py``):
``fc1``, ``fc2``, ``fc3`` (``Linear`` layers with tanh between them) plus the VLM scoring constants (``scale``,
``bias``, ``model_type``) and its sizes (``concept_dim``, ``layer_dim1..4``, ``single_layer``).
:func:`read_authors_file` reads that format (and plain state dicts) without running anything from the file and
without the authors' modules; :func:`import_authors_translator` checks it against a classifier and an embedding
store and keeps its scoring constants.

The translator's input is the globally pooled activations concatenated in the order ``layer4, layer3, layer2,
layer1`` (``layer4`` alone for a single-layer translator); this framework concatenates them in the classifier's
layer order (``layer1..layer4``). :func:`load_official_translator` builds a :class:`Translator` of the same widths
and permutes the first layer's input columns, so that it computes exactly the authors' function on this
framework's ``z``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.models.components import ConceptScorer, Translator

OFFICIAL_LAYER_ORDER = ("layer4", "layer3", "layer2", "layer1")
_FC_KEY = re.compile(r"^fc(\d+)\.(weight|bias)$")


class InteropError(CefamError):
    """A checkpoint that does not have the expected layout; the message names the file and what is wrong."""


# --- The authors' file format ------------------------------------------------------------------------------------
# Their train.py saves ``{'net': model, 'loss': ..., 'epoch': ...}`` where ``model`` is the whole ``MapConverter``
# object of their ``converter.py``. Unpickling that normally imports ``converter`` and lets the file call anything.
# Here the file is read by torch's weights-only unpickler with an allow-list: each class the object graph may
# name is mapped, by its module and class name, to a data-only stand-in that keeps the pickled attributes and
# cannot be called; tensors are rebuilt by torch's own rebuild functions. Any other global is refused before
# anything is unpickled, so nothing the file names runs and none of the authors' modules is needed.

AUTHORS_CLASS = "converter.MapConverter"
_ALLOWED_LAYERS = (
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.LeakyReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.activation.Softmax",
)


class _StandIn:
    """What a pickled module held, as plain attributes. The file can only fill one in (pickle's BUILD); calling
    the class (pickle's REDUCE, a constructor with arguments) is refused."""

    origin = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise InteropError(f"calls {self.origin}(...), which would run code")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        if not isinstance(state, dict):
            raise InteropError(f"{self.origin} holds a {type(state).__name__}, not an attribute dict")
        self.__dict__.update(state)


_STAND_INS = {
    name: type(name.rsplit(".", 1)[1], (_StandIn,), {"origin": name}) for name in (AUTHORS_CLASS, *_ALLOWED_LAYERS)
}


def _allow_list() -> list[tuple[type, str]]:
    return [(cls, name) for name, cls in _STAND_INS.items()]


@dataclass
class AuthorsFile:
    """A translator file as read by :func:`read_authors_file`.

    ``state``: the translator's tensors (``fc1.weight``, ...). ``attributes``: the plain values the authors'
    object carried (``scale``, ``bias``, ``model_type``, ``concept_dim``, ``concept_num``, ``single_layer``,
    ``layer_dim1..4``, ...); empty for a file holding only a state dict. ``extra``: the other top-level entries
    (``epoch``, ``loss``, ...).
    """

    path: str
    state: dict[str, Tensor]
    attributes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_object(self) -> bool:
        return bool(self.attributes)


def _stand_in_state(obj: _StandIn, prefix: str = "") -> dict[str, Tensor]:
    """The ``state_dict`` of a pickled module graph: parameters, persistent buffers, then children's."""
    data = vars(obj)
    out: dict[str, Tensor] = {}
    skip = data.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (data.get(group) or {}).items():
            if isinstance(value, Tensor) and name not in skip:
                out[prefix + name] = value.detach()
    for name, child in (data.get("_modules") or {}).items():
        if isinstance(child, _StandIn):
            out.update(_stand_in_state(child, f"{prefix}{name}."))
    return out


def _plain_attributes(obj: _StandIn) -> dict[str, Any]:
    plain = (bool, int, float, str)
    out = {}
    for key, value in vars(obj).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, Tensor) and value.numel() == 1:  # a constant saved as a tensor
            value = value.item()
        if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):
            out[key] = value
    return out


def _refused_global(e: BaseException) -> str | None:
    found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"unrecognized function (\S+)", str(e))
    return found.group(1) if found else None


def read_authors_file(path: str | os.PathLike) -> AuthorsFile:
    """Read a translator file in any of the authors' layouts, running nothing from it.

    Accepted: the published ``{'net': MapConverter object, 'loss': ..., 'epoch': ...}``, a bare ``MapConverter``
    object, a plain state dict, and a dict whose ``net`` (or ``state_dict`` / ``model``) entry is a state dict.
    The authors' module is not imported (it need not exist).

    Raises:
        InteropError: a missing file; a file naming any global outside the allow-list (the message names it);
            a file that is not a translator.
    """
    where = str(path)
    if not os.path.isfile(path):
        raise InteropError(f"translator checkpoint not found: {where}")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise InteropError(f"{where}: reading translator files safely needs torch >= 2.6, this is {torch.__version__}")
    refuse = "refused to read it: unpickling it would call {}, which a translator file never needs; nothing was run"
    with torch.serialization.safe_globals(_allow_list()):
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - not a zip checkpoint (legacy format): the loader below still refuses
            unsafe = []
        if unsafe:
            raise InteropError(f"{where}: {refuse.format(', '.join(unsafe))}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except InteropError as e:
            raise InteropError(f"{where}: refused to read it: {e}; nothing was run") from None
        except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
            name = _refused_global(e)
            if name:
                raise InteropError(f"{where}: {refuse.format(name)}") from None
            raise InteropError(f"{where}: cannot be read as a translator file ({error_summary(e)})") from None
    extra: dict[str, Any] = {}
    if isinstance(loaded, Mapping):
        for key in ("net", "model", "state_dict", "translator"):
            if key in loaded and isinstance(loaded[key], (_StandIn, Mapping)):
                extra = {k: v for k, v in loaded.items() if k != key and not isinstance(v, (Tensor, _StandIn))}
                loaded = loaded[key]
                break
    if isinstance(loaded, _StandIn):
        if loaded.origin != AUTHORS_CLASS:
            raise InteropError(f"{where}: holds a {loaded.origin}, not the authors' {AUTHORS_CLASS}")
        return AuthorsFile(where, _stand_in_state(loaded), _plain_attributes(loaded), extra)
    if isinstance(loaded, Mapping) and all(isinstance(v, Tensor) for v in loaded.values()):
        return AuthorsFile(where, dict(loaded), {}, extra)
    raise InteropError(f"{where}: holds a {type(loaded).__name__}, neither the authors' translator nor a state dict")


def _unwrap(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The translator's own keys: nested ``state_dict``/``model`` entries and ``module.``/``translator.`` prefixes
    (DataParallel, wrapper modules) are removed."""
    for key in ("state_dict", "model", "net", "translator"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "translator.", "net."):
            key = key.removeprefix(prefix)
        out[key] = value
    unknown = sorted(k for k in out if not _FC_KEY.match(k))
    if unknown:
        raise InteropError(f"{where}: unexpected keys {unknown}; an official translator has only fc1, fc2, ... keys")
    if not out:
        raise InteropError(f"{where}: no fc1/fc2/... weights found")
    return out


def load_official_translator(
    source: str | os.PathLike | Mapping[str, Tensor] | AuthorsFile,
    layer_channels: Mapping[str, int],
    layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    file_layer_order: Sequence[str] = OFFICIAL_LAYER_ORDER,
    activation: str = "tanh",
) -> Translator:
    """A :class:`Translator` computing the official checkpoint's function on ``z`` concatenated in ``layers`` order.

    Args:
        source: the checkpoint file (any layout :func:`read_authors_file` reads, running nothing from it), a file
            already read, or a state dict.
        layer_channels: channels of each layer (e.g. ResNet-50: 256, 512, 1024, 2048 for layer1..layer4).
        layers: this framework's layer order (the classifier's ``layers``).
        file_layer_order: the order of the layers in the checkpoint's input (the authors': layer4..layer1).
        activation: the activation between the linear layers (the authors': tanh).

    Raises:
        InteropError: a missing file, unexpected keys, missing or mismatched layers, or an input size that is
            not the sum of the layers' channels.
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    if isinstance(source, AuthorsFile):
        where, source = source.path, source.state
    elif not isinstance(source, Mapping):
        source = read_authors_file(source).state
    state = _unwrap(source, where)
    if sorted(layers) != sorted(file_layer_order):
        raise InteropError(f"{where}: layers {list(layers)} are not the checkpoint's layers {list(file_layer_order)}")
    missing = [layer for layer in layers if layer not in layer_channels]
    if missing:
        raise InteropError(f"no channel count given for layers {missing}")

    n = max(int(_FC_KEY.match(k).group(1)) for k in state)
    needed = [f"fc{i}.{p}" for i in range(1, n + 1) for p in ("weight", "bias")]
    absent = [k for k in needed if k not in state]
    if absent:
        raise InteropError(f"{where}: missing {absent}")
    weights = [state[f"fc{i}.weight"] for i in range(1, n + 1)]
    in_dim = sum(layer_channels[layer] for layer in file_layer_order)
    if weights[0].shape[1] != in_dim:
        sizes = ", ".join(f"{layer} {layer_channels[layer]}" for layer in file_layer_order)
        raise InteropError(
            f"{where}: fc1 takes {weights[0].shape[1]} inputs, but the layers' channels ({sizes}) sum to {in_dim}"
        )
    for i in range(1, n):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise InteropError(
                f"{where}: fc{i + 1} takes {weights[i].shape[1]} inputs, fc{i} gives {weights[i - 1].shape[0]}"
            )

    translator = Translator(
        in_dim, weights[-1].shape[0], [w.shape[0] for w in weights[:-1]], activation=activation, input_norm=False
    )
    # Column j of our fc1 reads feature j of our z; find where that feature sits in the file's input.
    starts, offset = {}, 0
    for layer in file_layer_order:
        starts[layer] = offset
        offset += layer_channels[layer]
    columns = torch.cat([torch.arange(layer_channels[layer]) + starts[layer] for layer in layers])
    with torch.no_grad():
        for i in range(1, n + 1):
            fc = getattr(translator.net, f"fc{i}")
            w = state[f"fc{i}.weight"].float()
            fc.weight.copy_(w[:, columns] if i == 1 else w)
            fc.bias.copy_(state[f"fc{i}.bias"].float())
    return translator


@dataclass
class ImportedTranslator:
    """An authors' translator made this framework's: the :class:`Translator` (input in ``layers`` order) and the
    VLM scoring constants it was trained with (from the file; from the embedding store for a bare state dict)."""

    translator: Translator
    layers: list[str]
    kind: str
    logit_scale: float
    logit_bias: float
    source: AuthorsFile

    @property
    def embed_dim(self) -> int:
        return self.translator.out_dim

    def scorer(self, text_embeddings: Tensor) -> ConceptScorer:
        """A :class:`ConceptScorer` with the file's constants over ``text_embeddings`` ``(num_concepts, d)``."""
        return ConceptScorer(text_embeddings, self.kind, self.logit_scale, self.logit_bias)

    def summary(self) -> str:
        shape = "single-layer" if len(self.layers) == 1 else f"{len(self.layers)}-layer"
        return (
            f"{self.source.path}: {shape} translator on {', '.join(self.layers)} -> {self.embed_dim}-d {self.kind} "
            f"space (scale {self.logit_scale:g}, bias {self.logit_bias:g})"
        )


def _file_widths(attrs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The four layer widths the authors' object records (``layer_dim1..4``, else ``inplanes``)."""
    if all(f"layer_dim{i}" in attrs for i in range(1, 5)):
        return tuple(int(attrs[f"layer_dim{i}"]) for i in range(1, 5))
    planes = attrs.get("inplanes")
    return tuple(int(c) for c in planes) if isinstance(planes, tuple) and len(planes) == 4 else None


def import_authors_translator(
    source: str | os.PathLike | AuthorsFile,
    layer_channels: Mapping[str, int],
    embed_dim: int | None = None,
    kind: str | None = None,
    logit_scale: float | None = None,
    logit_bias: float | None = None,
    given: str = "given",
) -> ImportedTranslator:
    """The authors' translator file as this framework's translator and scoring constants, checked against what
    it will run with.

    Args:
        source: the file (any layout :func:`read_authors_file` reads) or the file already read.
        layer_channels: the classifier's layers, in its order, and their channels (``layer1..layer4`` of a
            ResNet; a ViT's ``encoder``). A single-layer file uses the last of them.
        embed_dim, kind: the embedding store's embedding size and scoring kind (``clip``/``siglip``); ``None``:
            not checked.
        logit_scale, logit_bias: the store's constants, used only when the file does not record its own (a bare
            state dict); the file's always win.
        given: what the caller's values are, for messages (e.g. ``"classifier resnet50, store emb/"``).

    Raises:
        InteropError: a file that cannot be read safely, or that does not fit: layer widths, the number of
            layers, the embedding size or the scoring kind differ; one line saying what the file has and what
            was given.
    """
    f = source if isinstance(source, AuthorsFile) else read_authors_file(source)
    attrs, where = f.attributes, f.path
    names = list(layer_channels)
    if not names:
        raise InteropError(f"{where}: no classifier layers given")
    state = _unwrap(f.state, where)  # fc1..fcN, without module./net. prefixes
    fc1 = state.get("fc1.weight")
    if "single_layer" in attrs:
        single = bool(attrs["single_layer"])
    else:  # a bare state dict: single-layer when fc1 reads the last layer alone
        single = len(names) == 1 or (fc1 is not None and fc1.ndim == 2 and fc1.shape[1] == layer_channels[names[-1]])
    layers = names[-1:] if single else names
    if not single and len(layers) != 4:
        raise InteropError(
            f"{where}: the file's translator reads 4 layers, but {given} has {len(layers)} ({', '.join(layers)})"
        )
    widths = _file_widths(attrs)
    if widths is not None:
        have = widths[-1:] if single else widths
        want = tuple(int(layer_channels[layer]) for layer in layers)
        if have != want:
            raise InteropError(
                f"{where}: the file's translator reads layer widths {list(have)}"
                f"{' (single layer)' if single else ''}, but {given} has {list(want)} ({', '.join(layers)})"
            )
    file_dim = attrs.get("concept_dim")
    out = state.get(f"fc{max(int(_FC_KEY.match(k).group(1)) for k in state)}.weight")
    file_dim = int(file_dim) if file_dim is not None else (int(out.shape[0]) if out is not None else None)
    if embed_dim is not None and file_dim is not None and file_dim != int(embed_dim):
        raise InteropError(
            f"{where}: the file's translator gives {file_dim}-d embeddings, but {given} has {embed_dim}-d"
        )
    file_kind = attrs.get("model_type")
    if file_kind is not None and file_kind not in ("clip", "siglip"):
        raise InteropError(f"{where}: the file's model_type is {file_kind!r}, neither 'clip' nor 'siglip'")
    if kind is not None and file_kind is not None and file_kind != kind:
        raise InteropError(f"{where}: the file's translator was trained on {file_kind} scores, but {given} has {kind}")
    scale = attrs.get("scale", logit_scale)
    bias = attrs.get("bias", logit_bias)
    if scale is None or (file_kind or kind) is None:
        raise InteropError(f"{where}: holds no scoring constants (a bare state dict); give the embedding store's")
    if not float(scale) > 0:
        raise InteropError(f"{where}: the file's scale is {scale}, not a positive logit scale")
    translator = load_official_translator(
        f, {layer: layer_channels[layer] for layer in layers}, layers=layers, file_layer_order=layers[::-1]
    )
    return ImportedTranslator(translator, layers, str(file_kind or kind), float(scale), float(bias or 0.0), f)
