"""Concept regions for every concept at once, by the direct-path gradient (docs/method.md#concept-regions).

Per concept ``c`` and layer ``l``: ``beta^c_k = (1/gamma) sum_ij dS_c/dA^l_k(i,j)`` and
``R^l_c = ReLU(sum_k beta^c_k A^l_k)``. The translator sees only pooled activations, so
``dS_c/dA^l_k(i,j) = (1/(H_l W_l)) dS_c/dz^l_k`` at every pixel, and the weights of all concepts come from one
Jacobian ``dS/dz`` (``C x dim(z)``) with no backward pass through the classifier. That Jacobian is computed as
``dS/de`` (closed form, :meth:`ConceptScorer.jacobian`) times ``de/dz`` (``d x dim(z)``, by ``torch.func``),
so its cost grows with the embedding size ``d``, not with the number of concepts.

:func:`concept_regions_reference` runs one autograd pass per concept; it exists to prove in a test that both
give the same maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cefam_lightning.models.components import ConceptScorer


def pool_activations(activations: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    """``z = concat_l AvgPool(A^l)``: ``(B, sum_l K_l)`` in float32 (docs/method.md#translator)."""
    return torch.cat([activations[layer].float().mean(dim=(2, 3)) for layer in layers], dim=1)


def layer_slices(activations: Mapping[str, Tensor], layers: Sequence[str]) -> dict[str, slice]:
    """Where each layer's channels sit in ``z``."""
    out, start = {}, 0
    for layer in layers:
        k = activations[layer].shape[1]
        out[layer] = slice(start, start + k)
        start += k
    return out


def embedding_jacobian(translator: nn.Module, z: Tensor, out_dim: int) -> Tensor:
    """``de/dz`` per sample, ``(B, d, dim(z))``: reverse mode when ``d <= dim(z)``, forward mode otherwise.

    The translator must be in eval mode (a BatchNorm layer cannot use batch statistics per sample).
    """

    def f(zi: Tensor) -> Tensor:
        return translator(zi[None])[0]

    jac = torch.func.jacrev(f) if out_dim <= z.shape[-1] else torch.func.jacfwd(f)
    return torch.func.vmap(jac)(z)


def score_jacobian(translator: nn.Module, scorer: ConceptScorer, z: Tensor) -> Tensor:
    """``dS/dz`` for all concepts, ``(B, C, dim(z))``, in float32 whatever the autocast context."""
    was_training = translator.training
    translator.eval()
    try:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.detach().float()
            with torch.no_grad():
                e = translator(z)
            j_e = embedding_jacobian(translator, z, e.shape[-1])  # (B, d, D)
            return torch.bmm(scorer.jacobian(e), j_e)  # (B, C, d) @ (B, d, D)
    finally:
        translator.train(was_training)


def concept_regions(
    activations: Mapping[str, Tensor],
    layers: Sequence[str],
    jacobian: Tensor,
    concepts: Tensor | Sequence[int] | None = None,
    select: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Region maps ``R^l_c`` at each layer's own resolution, for all (or the given) concepts.

    Args:
        activations: ``{layer: (B, K_l, H_l, W_l)}``, the maps ``z`` was pooled from.
        layers: the layers in ``z``'s order (all of them: they locate each layer's slice of the Jacobian).
        jacobian: ``dS/dz`` from :func:`score_jacobian`, ``(B, C, dim(z))``.
        concepts: concept indices to keep (default all).
        select: the subset of ``layers`` to compute maps for (default all).

    Returns:
        ``{layer: (B, C', H_l, W_l)}``, non-negative, not upsampled (see :func:`upsample_regions`).
    """
    if concepts is not None:
        jacobian = jacobian[:, torch.as_tensor(concepts, device=jacobian.device, dtype=torch.long)]
    out = {}
    for layer, sl in layer_slices(activations, layers).items():
        if select is not None and layer not in select:
            continue
        a = activations[layer].float()
        h, w = a.shape[-2:]
        # dS/dA_k(i,j) = g_k/(HW) at every pixel; summing over the HW pixels and dividing by gamma = HW
        # leaves beta_k = g_k/(HW).
        beta = jacobian[:, :, sl].float() / (h * w)
        # Under autocast (bf16-mixed, 16-mixed training) einsum would run in half precision: the maps stay float32.
        with torch.autocast(device_type=a.device.type, enabled=False):
            out[layer] = torch.einsum("bck,bkhw->bchw", beta, a).relu_()
    return out


def upsample_regions(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear upsampling of ``(B, C, h, w)`` maps to the image size (in the maps' dtype, also under autocast)."""
    with torch.autocast(device_type=maps.device.type, enabled=False):
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def concept_regions_reference(
    activations: Mapping[str, Tensor],
    layers: Sequence[str],
    translator: nn.Module,
    scorer: ConceptScorer,
    concepts: Sequence[int],
) -> dict[str, Tensor]:
    """Grad-CAM-style regions with one autograd pass per concept. Slow; for tests and benchmarks only."""
    translator.eval()
    acts = {k: v.detach().float().requires_grad_(True) for k, v in activations.items()}
    out: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    for c in concepts:
        scores = scorer(translator(pool_activations(acts, layers)))
        grads = torch.autograd.grad(scores[:, c].sum(), [acts[layer] for layer in layers])
        for layer, g in zip(layers, grads, strict=True):
            h, w = g.shape[-2:]
            beta = g.sum(dim=(2, 3)) / (h * w)
            out[layer].append(torch.einsum("bk,bkhw->bhw", beta, acts[layer].detach()).relu())
    return {layer: torch.stack(maps, dim=1) for layer, maps in out.items()}
