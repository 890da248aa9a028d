"""Region baselines that CE-FAM is evaluated against, side by side on the same images (issue 3,
docs/method.md#ce-fam-evaluation).

- **Grad-CAM** of the class score at a layer: one class map per image, used for every concept of that image.
- **Single channel** (in the spirit of CLIP-Dissect): each concept is tied to the one channel, per layer,
  whose pooled activation best tracks the concept's presence on the training split (Pearson correlation with
  the presence label); its map is that channel's activation map. Its own best layer is the one where that
  correlation is highest.
- **Random**: i.i.d. uniform noise at the image size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from cefam_lightning.methods.cefam.regions import pool_activations
from cefam_lightning.metrics.functional.seeding import image_seed
from cefam_lightning.models.classifier import FrozenClassifier


def gradcam_maps(
    classifier: FrozenClassifier, activations: Mapping[str, Tensor], target: Tensor, layers: Sequence[str]
) -> dict[str, Tensor]:
    """Grad-CAM of the ``target`` class logit at each layer: ``ReLU(sum_k mean_ij(dy/dA_k) A_k)``, ``(B, h, w)``.

    The gradient flows only through the classifier's tail after each layer (:meth:`FrozenClassifier.tail`).
    """
    out = {}
    for layer in layers:
        a = activations[layer].detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = classifier.tail(layer)(a, getattr(activations, "prefix_tokens", {}).get(layer))
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        out[layer] = (weights * a.detach()).sum(dim=1).relu()
    return out


class SingleChannelBaseline:
    """Per concept and layer, the channel whose pooled activation correlates best with the concept's presence.

    Args:
        layers: the classifier's explained layers, in ``z``'s order.
        channels: ``{layer: (C,)}`` chosen channel per concept.
        scores: ``{layer: (C,)}`` its correlation (NaN-free; ``-1`` where a concept never or always occurs).
    """

    def __init__(self, layers: Sequence[str], channels: Mapping[str, Tensor], scores: Mapping[str, Tensor]):
        self.layers = list(layers)
        self.channels = {k: v.long() for k, v in channels.items()}
        self.scores = dict(scores)
        self.best_layer = torch.stack([self.scores[layer] for layer in self.layers]).argmax(dim=0)  # (C,)

    @classmethod
    @torch.no_grad()
    def fit(cls, classifier: FrozenClassifier, batches: Iterable[tuple[Tensor, Tensor]]) -> SingleChannelBaseline:
        """Fit on ``(images, presence)`` batches of the training split (``presence``: ``(B, C)`` 0/1)."""
        zs, ps, sizes = [], [], {}
        device = classifier.mean.device
        for images, presence in batches:
            activations = classifier(images.to(device)).activations
            sizes = {layer: a.shape[1] for layer, a in activations.items()}
            zs.append(pool_activations(activations, classifier.layers).double().cpu())
            ps.append(presence.double().cpu())
        if not zs:
            raise ValueError("the single-channel baseline needs at least one training batch")
        return cls.from_pooled(classifier.layers, sizes, torch.cat(zs), torch.cat(ps))

    @classmethod
    def from_pooled(
        cls, layers: Sequence[str], sizes: Mapping[str, int], z: Tensor, presence: Tensor
    ) -> SingleChannelBaseline:
        """Fit from pooled activations ``z`` (``(N, sum_l K_l)``, layers in order) and ``(N, C)`` presence."""
        z, p = z.double(), presence.double()
        zc, pc = z - z.mean(0), p - p.mean(0)
        denom = zc.norm(dim=0)[:, None] * pc.norm(dim=0)[None, :]  # (D, C)
        # A constant channel, or a concept that never (or always) occurs, has no correlation: -1.
        corr = torch.where(denom > 0, (zc.T @ pc) / denom.clamp_min(1e-300), torch.tensor(-1.0, dtype=z.dtype))
        channels, scores, start = {}, {}, 0
        for layer in layers:
            best = corr[start : start + sizes[layer]].max(dim=0)  # over the layer's channels
            channels[layer], scores[layer] = best.indices, best.values.float()
            start += sizes[layer]
        return cls(layers, channels, scores)

    def best_layer_among(self, layers: Sequence[str]) -> Tensor:
        """``(C,)`` index into :attr:`layers` of each concept's best layer among ``layers`` (a non-empty subset)."""
        allowed = torch.tensor([layer in layers for layer in self.layers])
        scores = torch.stack([self.scores[layer] for layer in self.layers])  # (L, C)
        return scores.masked_fill(~allowed[:, None], -torch.inf).argmax(dim=0)

    def maps(self, activations: Mapping[str, Tensor], concepts: Tensor, layer: str) -> Tensor:
        """``(B, N)`` concept indices -> ``(B, N, h, w)``: each concept's channel map at ``layer``."""
        a = activations[layer].float()
        ch = self.channels[layer].to(a.device)[concepts]  # (B, N)
        return a.gather(1, ch[:, :, None, None].expand(-1, -1, *a.shape[-2:])).relu()


def random_maps(shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """I.i.d. uniform maps (the random baseline), drawn on the CPU from ``generator`` for reproducibility."""
    return torch.rand(*shape, generator=generator).to(device)


def image_random_maps(
    image_index: Tensor, size: Sequence[int], seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """I.i.d. uniform maps ``(P, *size)``, one per pair, drawn on the CPU from a generator seeded by ``seed`` and the
    pair's image (its index ``image_index`` in the evaluated split): the same maps whatever the batches, or the
    processes the images are split across."""
    index = image_index.cpu()
    out = torch.empty(len(index), *size)
    for image in index.unique().tolist():
        rows = (index == image).nonzero()[:, 0]
        generator = torch.Generator().manual_seed(image_seed(seed, image))
        out[rows] = torch.rand(len(rows), *size, generator=generator)
    return out.to(device)
