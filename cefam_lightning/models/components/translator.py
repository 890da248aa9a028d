"""CE-FAM's translator ``h`` (docs/method.md#translator): an MLP from pooled multi-layer activations to the VLM
space."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def default_hidden_dims(in_dim: int) -> list[int]:
    """The authors' widths: 2048, 1024 for multi-layer ResNet-50 (3840 inputs); otherwise 1024 first."""
    return [2048, 1024] if in_dim == 3840 else [1024, 1024]


class Translator(nn.Module):
    """``Linear-act-...-Linear``. Linear layers are named ``fc1..fcN`` as in the authors' checkpoints.

    ``input_norm=True`` standardizes each input feature with running statistics first (``BatchNorm1d`` without
    affine parameters; an affine map at eval time). Pooled activations of different layers differ in scale by
    an order of magnitude, and standardizing them makes the MLP converge in far fewer epochs. The authors'
    translator has no such layer (``input_norm=False``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dims: Sequence[int] | None = None,
        activation: str = "tanh",
        input_norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown translator activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        hidden = list(default_hidden_dims(in_dim) if hidden_dims is None else hidden_dims)
        dims = [in_dim, *hidden, out_dim]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if input_norm:
            layers["input_norm"] = nn.BatchNorm1d(in_dim, affine=False)
        for i in range(len(dims) - 1):
            layers[f"fc{i + 1}"] = nn.Linear(dims[i], dims[i + 1])
            if i < len(dims) - 2:
                layers[f"act{i + 1}"] = ACTIVATIONS[activation]()
        self.net = nn.Sequential(layers)
        self.in_dim, self.out_dim, self.hidden_dims, self.activation = in_dim, out_dim, hidden, activation
        self.input_norm = input_norm

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
