"""Concept regions for every concept at once, by either gradient rule (docs/method.md#concept-regions).

Per concept ``c`` and layer ``l``: ``beta^c_k = (1/gamma) sum_ij dS_c/dA^l_k(i,j)`` and
``R^l_c = ReLU(sum_k beta^c_k A^l_k)`` (``max(beta, 0)`` in place of ``beta`` with positive region weights).

- ``direct``: the derivative through the layer's own pooled activations only. The translator sees only pooled
  activations, so ``dS_c/dA^l_k(i,j) = (1/(H_l W_l)) dS_c/dz^l_k`` at every pixel, and the weights of all concepts
  come from one Jacobian ``dS/dz`` (``C x dim(z)``) with no backward pass through the classifier: ``dS/de``
  (closed form, :meth:`ConceptScorer.jacobian`) times ``de/dz`` (``d x dim(z)``, by ``torch.func``), so its cost
  grows with the embedding size ``d``, not with the number of concepts.
- ``full`` (the CE-FAM authors'): the total derivative through the rest of the classifier,
  :func:`full_channel_gradients`, from ``min(d, |T|)`` vector-Jacobian products for the concepts ``T`` asked for.

:func:`concept_regions_reference` and :func:`concept_regions_reference_full` run one autograd pass per concept;
they exist to prove in tests that the batched paths give the same maps.
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


GRADIENTS = ("direct", "full")
REGION_WEIGHTS = ("signed", "positive")  # which channel weights draw a region (docs/method.md#concept-regions)


def vjp_channel_sums(
    outputs: Tensor, columns: Sequence[int], inputs: Sequence[Tensor], chunk: int = 16, batched: bool | None = None
) -> Tensor:
    """``sum_ij d outputs[:, col] / d inputs[l][:, k, i, j]`` for every column and input channel: ``(M, B, D)``.

    One vector-Jacobian product per column (a one-hot cotangent on that column of ``outputs``, ``(B, out)``), each
    through the whole graph from ``inputs`` to ``outputs`` (the *total* derivative: every path counts), reduced to
    its spatial sums per channel and concatenated over ``inputs`` (``D = sum_l K_l``, in ``inputs``' order).

    Args:
        outputs: ``(B, out)`` tensor with a graph back to ``inputs``; the rows are independent samples.
        columns: the columns of ``outputs`` to differentiate.
        inputs: ``(B, K_l, H_l, W_l)`` tensors in the graph.
        chunk: cotangents per batched product (bounds memory: each holds gradients of every input).
        batched: run ``chunk`` cotangents at once (``vmap`` over the backward, fast on a GPU); ``None``: batched on
            CUDA, one at a time elsewhere (on a CPU the batched backward is slower than a loop).
    """
    batched = outputs.is_cuda if batched is None else batched
    eye = torch.eye(outputs.shape[1], device=outputs.device, dtype=outputs.dtype)
    sums: list[Tensor] = []
    columns = list(columns)
    step = max(1, chunk) if batched else 1
    for start in range(0, len(columns), step):
        cols = columns[start : start + step]
        cot = eye[cols][:, None, :].expand(len(cols), outputs.shape[0], -1)  # (m, B, out)
        if batched:
            grads = torch.autograd.grad(outputs, list(inputs), cot, retain_graph=True, is_grads_batched=True)
            sums.append(torch.cat([g.float().sum(dim=(3, 4)) for g in grads], dim=2))
        else:
            grads = torch.autograd.grad(outputs, list(inputs), cot[0], retain_graph=True)
            sums.append(torch.cat([g.float().sum(dim=(2, 3)) for g in grads], dim=1)[None])
    return torch.cat(sums) if sums else outputs.new_zeros(0, outputs.shape[0], sum(t.shape[1] for t in inputs))


def full_channel_gradients(
    graph_activations: Sequence[Tensor],
    translator: nn.Module,
    scorer: ConceptScorer,
    concepts: Sequence[int] | None = None,
    chunk: int = 16,
) -> Tensor:
    """The *total* derivative of the concept scores, summed over each channel map: ``(B, C', D)`` float32.

    ``G[b, c, k] = sum_ij dS_c / dA^l_k(i, j)`` through the whole rest of the classifier (``A^l`` reaches ``S``
    through its own pooled ``z^l`` and through every later layer), as the CE-FAM authors' code takes it
    (docs/method.md#concept-regions). It plays the role that ``dS/dz`` plays on the direct path (where
    ``sum_ij dS_c/dA^l_k(i,j) = dS_c/dz^l_k``): region weights are ``G / (H_l W_l)``, channel rankings ``G * z``.

    ``S`` depends on the image only through the embedding ``e`` (``d`` dims), so all concepts come from ``d``
    vector-Jacobian products of ``e`` (``dS/de`` in closed form times them); fewer concepts than ``d`` take one
    product each, with their own cotangents. Every product runs through the classifier from ``graph_activations``.

    Args:
        graph_activations: the explained layers' maps ``(B, K_l, H_l, W_l)``, in ``z``'s order, with their graph
            (the classifier ran with gradients on, in float32).
        translator, scorer: the CE-FAM branch (the translator must be in eval mode).
        concepts: the concepts to compute (default all).
        chunk: products per batched backward (see :func:`vjp_channel_sums`).

    Memory: besides the graph, one product's gradients (``chunk`` products' when batched) live at a time, and the
    products' channel sums (``min(d, C')`` x ``B`` x ``D``) accumulate; the result is ``(B, C', D)``. The number of
    concepts adds only to the result.

    The translator and scorer run in float32 with autocast off, so the weights are those of a float32 run whatever
    the caller's autocast context (the graph is float32 too when it is made as :class:`ExplanationPass` makes it).
    """
    device_type = graph_activations[0].device.type if len(graph_activations) else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        z = torch.cat([a.float().mean(dim=(2, 3)) for a in graph_activations], dim=1)
        e = translator(z).float()
        wanted = list(range(scorer.num_concepts)) if concepts is None else [int(c) for c in concepts]
        if len(wanted) >= e.shape[1]:  # all of them through the d embedding dimensions
            per_dim = vjp_channel_sums(e, range(e.shape[1]), graph_activations, chunk)  # (d, B, D)
            ds_de = scorer.jacobian(e.detach())[:, wanted].float()  # (B, C', d)
            return torch.einsum("bcj,jbk->bck", ds_de, per_dim)
        scores = scorer(e).float()
        return vjp_channel_sums(scores, wanted, graph_activations, chunk).permute(1, 0, 2)  # (B, C', D)


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


def concept_regions_reference_full(
    classifier: nn.Module,
    images: Tensor,
    layers: Sequence[str],
    translator: nn.Module,
    scorer: ConceptScorer,
    concepts: Sequence[int],
) -> dict[str, Tensor]:
    """Regions by the total derivative with one forward and one backward pass per concept, each through the whole
    classifier: what the CE-FAM authors' code does (hooks on each layer's output). Slow; for tests only."""
    translator.eval()
    out: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    for c in concepts:
        with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            result = classifier(images.detach().float().requires_grad_(True))
            acts = [result.activations[layer] for layer in layers]
            scores = scorer(translator(torch.cat([a.float().mean(dim=(2, 3)) for a in acts], dim=1)))
            grads = torch.autograd.grad(scores[:, c].sum(), acts)
        for layer, a, g in zip(layers, acts, grads, strict=True):
            beta = g.float().mean(dim=(2, 3))  # (1/(H W)) sum_ij dS_c/dA_k(i,j)
            out[layer].append(torch.einsum("bk,bkhw->bhw", beta, a.detach().float()).relu())
    return {layer: torch.stack(maps, dim=1) for layer, maps in out.items()}
