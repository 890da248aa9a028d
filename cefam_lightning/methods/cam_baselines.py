"""Class-map baselines by name (docs/method.md#class-map-baselines): what every method's evaluation can set beside
its own maps (``evaluate --baselines gradcam,gradcampp,scorecam``).

A baseline is one registration (:func:`register_baseline`), looked up by name (:func:`get_baseline`); nothing that
evaluates branches on a baseline's name. Each gives, for a batch, the explained class's map at each asked layer
of the frozen classifier (or one map for every layer, for those that do not read a layer). Registered here:

- ``gradcam``: the project's own Grad-CAM (:func:`~cefam_lightning.methods.baselines.gradcam_maps`; equal to
  pytorch-grad-cam's ``GradCAM`` to 1e-5, tested);
- pytorch-grad-cam's CAMs, an optional extra (``pip install -e ".[cams]"``): ``gradcampp`` (Grad-CAM++), ``scorecam``,
  ``layercam``, ``eigencam``, ``eigengradcam``, ``xgradcam``, ``hirescam``, ``gradcamelementwise``, ``ablationcam``
  and ``fullgrad`` (all layers' biases: one map for every layer). The library sees the classifier through
  :class:`LayerModel`, which passes the wrapped layer's ``(B, C, h, w)`` map (token layers already reshaped) through
  an identity module for its hooks, so no reshape transform is needed;
- ``rise``: RISE (Petsiuk et al., 2018), a small implementation here (:func:`rise_maps`), since the library has none.

Library maps come back min-max normalized at the image size; the evaluations normalize every map the same way
anyway (:func:`~cefam_lightning.methods.class_map.normalize_maps`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cefam_lightning.errors import CefamError
from cefam_lightning.methods.baselines import gradcam_maps

CAMS_EXTRA = "pip install -e '.[cams]' (pytorch-grad-cam, PyPI name grad-cam)"
LIBRARY = "pytorch_grad_cam"

# maps(classifier, images, output, target, layers) -> {layer: (B, h, w)}
MapsFn = Callable[[Any, Tensor, Any, Tensor, Sequence[str]], dict[str, Tensor]]


class BaselineError(CefamError):
    """An unknown baseline name, or one whose library is not installed; the message names the value and the
    choices."""


@dataclass(frozen=True)
class Baseline:
    """One registered class-map baseline.

    Attributes:
        name: what ``--baselines`` takes and what results are keyed by.
        title: its name for people (table rows).
        maps: ``maps(classifier, images, output, target, layers) -> {layer: (B, h, w)}``; ``images`` in ``[0, 1]``,
            ``output`` the classifier's :class:`~cefam_lightning.models.classifier.ClassifierOutput` on them,
            ``target`` ``(B,)`` the explained classes. Any scale and resolution.
        requires: the module it imports (``None``: nothing beyond the project's dependencies).
        source: where it comes from, for the docs and tables.
    """

    name: str
    title: str
    maps: MapsFn
    requires: str | None = None
    source: str = "cefam-lightning"

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def __call__(self, classifier: Any, images: Tensor, output: Any, target: Tensor, layers: Sequence[str]):
        return self.maps(classifier, images, output, target, layers)


_BASELINES: dict[str, Baseline] = {}


def register_baseline(
    name: str, title: str, maps: MapsFn, *, requires: str | None = None, source: str = "cefam-lightning"
) -> Baseline:
    """Register a class-map baseline under ``name`` (lower-case letters and digits); returns it."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"baseline name {name!r}: use lower-case letters, digits and '_'")
    spec = Baseline(name, title, maps, requires, source)
    _BASELINES[name] = spec
    return spec


def baseline_names() -> list[str]:
    """The registered baselines, in registration order."""
    return list(_BASELINES)


def get_baseline(name: str, where: str = "--baselines") -> Baseline:
    """The registration of ``name``, checked to be usable here.

    Raises:
        BaselineError: an unknown name (naming ``where`` and the choices), or one whose library is missing.
    """
    spec = _BASELINES.get(name)
    if spec is None:
        close = difflib.get_close_matches(str(name), list(_BASELINES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BaselineError(f"{where}: unknown baseline {name!r}{hint} (choices: {', '.join(_BASELINES)})")
    if not spec.available:
        raise BaselineError(f"{where}: baseline {name!r} needs {spec.requires}, which is not installed: {CAMS_EXTRA}")
    return spec


def parse_baselines(value: str | Sequence[str], where: str = "--baselines") -> tuple[str, ...]:
    """``"gradcam,gradcampp"`` (or a list) -> the names, each checked with :func:`get_baseline`, duplicates
    dropped, order kept."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        raise BaselineError(f"{where}: no baseline named (choices: {', '.join(_BASELINES)})")
    for n in names:
        get_baseline(n, where)
    return tuple(names)


# ---------------------------------------------------------------------- the project's own


def _gradcam(classifier: Any, images: Tensor, output: Any, target: Tensor, layers: Sequence[str]):
    return gradcam_maps(classifier, output.activations, target, layers)


@torch.no_grad()
def rise_maps(
    classifier: Callable[[Tensor], Any],
    images: Tensor,
    target: Tensor,
    num_masks: int = 1000,
    cells: int = 8,
    p: float = 0.5,
    seed: int = 0,
    chunk: int = 256,
) -> Tensor:
    """RISE saliency (Petsiuk, Das, Saenko, BMVC 2018): ``S = Σ_i P(target | I ⊙ M_i) M_i / (N p)``.

    Each mask ``M_i`` is a random ``cells x cells`` binary grid (each cell kept with probability ``p``), upsampled
    bilinearly to ``(cells + 1)`` cell sizes and cropped at a random shift of up to one cell, as in the paper.
    The masks are drawn from ``seed`` (the same masks for every image and call).

    Args:
        classifier: ``[0, 1]`` images -> logits (or an object with ``.logits``).
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        target: ``(B,)`` the explained classes.
        num_masks: ``N``.
        cells: the grid's side.
        p: the probability that a cell is kept.
        seed: seed of the masks.
        chunk: masked images per classifier call.

    Returns:
        ``(B, H, W)`` saliency maps.
    """
    b, _, h, w = images.shape
    masks = rise_masks(num_masks, (h, w), cells, p, seed).to(images.device, images.dtype)  # (N, H, W)
    saliency = images.new_zeros(b, h, w)
    per_call = max(1, chunk // max(b, 1))
    for start in range(0, num_masks, per_call):
        m = masks[start : start + per_call]  # (n, H, W)
        masked = (images[:, None] * m[None, :, None]).flatten(0, 1)  # (B * n, 3, H, W)
        result = classifier(masked)
        logits = getattr(result, "logits", result)
        probs = logits.float().softmax(1).view(b, len(m), -1)
        score = probs.gather(2, target.to(probs.device).long()[:, None, None].expand(-1, len(m), 1))[..., 0]
        saliency += torch.einsum("bn,nhw->bhw", score.to(images.dtype), m)
    return saliency / (num_masks * p)


def rise_masks(num_masks: int, size: Sequence[int], cells: int = 8, p: float = 0.5, seed: int = 0) -> Tensor:
    """RISE's ``(N, H, W)`` random masks in ``[0, 1]`` (see :func:`rise_maps`), on the CPU."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(num_masks, 1, cells, cells, generator=g) < p).float()
    ch, cw = -(-h // cells), -(-w // cells)  # cell size, rounded up
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (num_masks,), generator=g)
    dx = torch.randint(0, cw, (num_masks,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]  # (N, 1, W)
    return up[torch.arange(num_masks)[:, None, None], 0, rows, cols]


def _rise(classifier: Any, images: Tensor, output: Any, target: Tensor, layers: Sequence[str]):
    maps = rise_maps(classifier, images, target)
    return dict.fromkeys(layers, maps)  # the same map at every layer: RISE reads no layer


# ---------------------------------------------------------------------- pytorch-grad-cam


class LayerModel(nn.Module):
    """The frozen classifier as pytorch-grad-cam sees it: ``[0, 1]`` images -> logits, with ``layer``'s activation
    map passing through :attr:`target` (an identity module the library hooks) into the rest of the network.

    The map is the wrapper's ``(B, C, h, w)`` form (token layers reshaped, prefix tokens set aside), so the
    library's CAMs work on any wrapped layer without a reshape transform. The gradient reaches the map through the
    classifier's tail after the layer (:meth:`FrozenClassifier.tail`), as the project's Grad-CAM takes it.
    """

    def __init__(self, classifier: Any, layer: str):
        super().__init__()
        self.classifier, self.layer, self.target = classifier, layer, nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        out = self.classifier(images)
        a = out.activations[self.layer]
        if torch.is_grad_enabled():
            a = a.detach().float().requires_grad_(True)  # the classifier is frozen: the map is the leaf
        a = self.target(a)
        return self.classifier.tail(self.layer)(a, out.activations.prefix_tokens.get(self.layer))


class LogitsModel(nn.Module):
    """The frozen classifier as ``[0, 1]`` images -> logits (for FullGrad and ROAD, which need no layer)."""

    def __init__(self, classifier: Any):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images).logits


def _targets(target: Tensor) -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(t)) for t in target.tolist()]


def _library_cam(cls_name: str, quiet: bool = False, per_layer: bool = True) -> MapsFn:
    """pytorch-grad-cam's ``cls_name`` as a baseline: one call per layer (or one for all, ``per_layer=False``)."""

    def maps(classifier: Any, images: Tensor, output: Any, target: Tensor, layers: Sequence[str]):
        import pytorch_grad_cam

        cam_cls = getattr(pytorch_grad_cam, cls_name)
        out = {}
        for layer in layers if per_layer else layers[:1]:
            if per_layer:
                model = LayerModel(classifier, layer)
                cam = cam_cls(model=model, target_layers=[model.target])
            else:
                cam = cam_cls(model=LogitsModel(classifier), target_layers=[])
            if hasattr(cam, "batch_size"):
                cam.batch_size = 256
            # ScoreCAM draws a progress bar per image; the evaluations print their own.
            quiet_ctx = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
            with cam, torch.enable_grad(), quiet_ctx:
                result = cam(input_tensor=images.float(), targets=_targets(target))
            out[layer] = torch.from_numpy(result).to(images.device)
        if not per_layer:
            out = dict.fromkeys(layers, out[layers[0]])
        return out

    return maps


register_baseline("gradcam", "Grad-CAM", _gradcam)
for _name, _cls, _title in (
    ("gradcampp", "GradCAMPlusPlus", "Grad-CAM++"),
    ("scorecam", "ScoreCAM", "Score-CAM"),
    ("layercam", "LayerCAM", "LayerCAM"),
    ("eigencam", "EigenCAM", "EigenCAM"),
    ("eigengradcam", "EigenGradCAM", "EigenGradCAM"),
    ("xgradcam", "XGradCAM", "XGrad-CAM"),
    ("hirescam", "HiResCAM", "HiResCAM"),
    ("gradcamelementwise", "GradCAMElementWise", "Grad-CAM element-wise"),
    ("ablationcam", "AblationCAM", "Ablation-CAM"),
):
    register_baseline(
        _name,
        _title,
        _library_cam(_cls, quiet=_cls in ("ScoreCAM", "AblationCAM")),
        requires=LIBRARY,
        source="pytorch-grad-cam",
    )
register_baseline(
    "fullgrad", "FullGrad", _library_cam("FullGrad", per_layer=False), requires=LIBRARY, source="pytorch-grad-cam"
)
register_baseline("rise", "RISE", _rise)

LIBRARY_CAMS = tuple(n for n, b in _BASELINES.items() if b.requires == LIBRARY)
