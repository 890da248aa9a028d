"""Interoperability with the CE-FAM authors' released translator checkpoints.

The official release stores the translator as a plain state dict with ``fc1``, ``fc2``, ``fc3`` (``Linear``
layers with tanh between them). Its input is the globally pooled activations concatenated in the order
``layer4, layer3, layer2, layer1``; this framework concatenates them in the classifier's layer order
(``layer1..layer4``). :func:`load_official_translator` builds a :class:`Translator` of the same widths and
permutes the first layer's input columns, so that it computes exactly the authors' function on this
framework's ``z``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.models.components import Translator

OFFICIAL_LAYER_ORDER = ("layer4", "layer3", "layer2", "layer1")
_FC_KEY = re.compile(r"^fc(\d+)\.(weight|bias)$")


class InteropError(CefamError):
    """A checkpoint that does not have the expected layout; the message names the file and what is wrong."""


def _unwrap(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The translator's own keys: nested ``state_dict``/``model`` entries and ``module.``/``translator.`` prefixes
    (DataParallel, wrapper modules) are removed."""
    for key in ("state_dict", "model", "translator"):
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
    source: str | os.PathLike | Mapping[str, Tensor],
    layer_channels: Mapping[str, int],
    layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    file_layer_order: Sequence[str] = OFFICIAL_LAYER_ORDER,
    activation: str = "tanh",
) -> Translator:
    """A :class:`Translator` computing the official checkpoint's function on ``z`` concatenated in ``layers`` order.

    Args:
        source: the checkpoint file (``torch.load``-able, loaded with ``weights_only=True``) or its state dict.
        layer_channels: channels of each layer (e.g. ResNet-50: 256, 512, 1024, 2048 for layer1..layer4).
        layers: this framework's layer order (the classifier's ``layers``).
        file_layer_order: the order of the layers in the checkpoint's input (the authors': layer4..layer1).
        activation: the activation between the linear layers (the authors': tanh).

    Raises:
        InteropError: a missing file, unexpected keys, missing or mismatched layers, or an input size that is
            not the sum of the layers' channels.
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    if not isinstance(source, Mapping):
        if not os.path.isfile(source):
            raise InteropError(f"translator checkpoint not found: {source}")
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
            raise InteropError(f"{where}: cannot be read as a state dict ({error_summary(e)})") from None
        if not isinstance(source, Mapping):
            raise InteropError(f"{where}: holds a {type(source).__name__}, not a state dict")
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
