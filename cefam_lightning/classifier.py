"""A frozen classifier that returns its logits and named activation maps in one forward pass (SPEC §1).

Activations come from torchvision's ``create_feature_extractor`` (an FX graph of the model that returns the
requested nodes), so no hooks exist at all. The wrapper takes images in ``[0, 1]`` and applies the model's own
normalization, freezes every parameter and stays in eval mode whatever ``.train()`` asks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
DEFAULT_LAYERS = {name: ["layer1", "layer2", "layer3", "layer4"] for name in (*TORCHVISION_RESNETS, "shapes_cnn")}


@dataclass
class ClassifierOutput:
    logits: Tensor
    activations: dict[str, Tensor]


class FrozenClassifier(nn.Module):
    """Wrap ``model`` so one call returns logits and the activation maps of ``layers``.

    Args:
        model: any FX-traceable classifier (torchvision models, :class:`ShapesCNN`).
        layers: node names to return, e.g. ``["layer3", "layer4"]``; an unknown name is an error listing the
            valid ones.
        mean, std: the model's input normalization, applied to ``[0, 1]`` images inside ``forward``.
        name: an identity recorded with checkpoints.
        output_node: the node that gives the logits (default: the graph's last node).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str = "classifier",
        output_node: str | None = None,
    ):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if not layers:
            raise ValueError(f"{name}: at least one layer name is needed")
        model.eval()
        _, nodes = get_graph_node_names(model)
        output_node = output_node or nodes[-1]
        valid = valid_layer_names(nodes)
        unknown = [layer for layer in layers if layer not in valid]
        if unknown:
            raise ValueError(
                f"Unknown layer name(s) {unknown} for classifier {name!r}. Valid names: {', '.join(valid)}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"Duplicate layer names in {list(layers)}")
        self.name, self.layers, self.output_node = name, list(layers), output_node
        return_nodes = {layer: layer for layer in self.layers}
        return_nodes[output_node] = "__logits__"
        self.model = create_feature_extractor(model, return_nodes=return_nodes)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._tails: dict[str, nn.Module] = {}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenClassifier:  # noqa: ARG002 - frozen: always eval
        """Ignore ``mode``: BatchNorm statistics and Dropout stay in eval mode while the explainer trains."""
        return super().train(False)

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> ClassifierOutput:
        """``images``: ``(B, 3, H, W)`` in ``[0, 1]``."""
        out = self.model(self.normalize(images))
        logits = out.pop("__logits__")
        return ClassifierOutput(logits=logits, activations={layer: out[layer] for layer in self.layers})

    def tail(self, layer: str) -> nn.Module:
        """The part of the classifier after ``layer``: a module mapping that layer's activation map to logits.

        It is cut from the traced graph, so it shares the classifier's (frozen) parameters and works for any
        traceable model, provided nothing after ``layer`` reads an earlier tensor (a skip connection across
        the cut is an error).
        """
        if layer not in self.layers:
            raise ValueError(f"{layer!r} is not among the wrapped layers {self.layers}")
        if layer not in self._tails:
            self._tails[layer] = _cut_after(self.model, layer)
        return self._tails[layer]

    @torch.no_grad()
    def layer_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """``{layer: (channels, height, width)}`` for square inputs of ``image_size``."""
        device = self.mean.device
        acts = self(torch.zeros(1, 3, image_size, image_size, device=device)).activations
        return {k: tuple(v.shape[1:]) for k, v in acts.items()}


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
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            raise ValueError(f"The classifier reads its input again after {layer!r}; it cannot be cut there")
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
    """Load a state dict from a local file, unwrapping ``state_dict``/``model`` keys and ``module.`` prefixes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Classifier weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{path}: could not be read as a PyTorch weights file ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_classifier(
    name: str,
    num_classes: int,
    layers: Sequence[str] | None = None,
    weights: str | os.PathLike | None = None,
    widths: Sequence[int] = (16, 32, 64, 128),
) -> FrozenClassifier:
    """Build a frozen classifier by name (``shapes_cnn`` or a torchvision ResNet), weights from a local file.

    Args:
        name: ``shapes_cnn``, ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        num_classes: output classes (1000 for ImageNet weights).
        layers: activation maps to return (default ``layer1..layer4``).
        weights: path to a local state-dict file; ``None`` keeps the random initialization.
        widths: stage widths of ``shapes_cnn``.
    """
    layers = list(layers) if layers else DEFAULT_LAYERS.get(name)
    if name == "shapes_cnn":
        from cefam_lightning.components.shapes_cnn import ShapesCNN

        model: nn.Module = ShapesCNN(num_classes=num_classes, widths=widths)
        mean, std = SHAPES_MEAN, SHAPES_STD
    elif name in TORCHVISION_RESNETS:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"Unknown classifier {name!r}; choose from {['shapes_cnn', *TORCHVISION_RESNETS]}")
    if weights is not None:
        state = load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights}: weights do not fit {name} with {num_classes} classes: {e}") from e
    wrapped = FrozenClassifier(model, layers, mean=mean, std=std, name=name)
    # What a checkpoint records to rebuild this classifier.
    wrapped.spec = {"name": name, "num_classes": num_classes, "widths": list(widths), "weights": str(weights or "")}
    return wrapped
