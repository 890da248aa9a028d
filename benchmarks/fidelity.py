"""How far this package's region metrics are from the CE-FAM authors' released evaluation (README: Fidelity to the
authors' code).

The authors' ``evaluate.py`` (MK-cvm/CE-FAM, ``nra_eval`` and ``epg_eval``) ranks pixels by ``np.argsort(map)[::-1]``
and samples the IoU curve: every pixel of the first ``N // 100`` with weight ``1/N``, then every ``N // 100``-th pixel
with weight ``1/100``. Their upper curve uses the 0-based rank ``idx`` where the IoU curve uses ``idx + 1`` pixels.
This package (``cefam_lightning.metrics.functional.region``) takes the exact curve over all ``N`` pixels, with tied
pixels interpolated. Both are re-computed here on the shapes world's masks (every present concept's mask, and the
background, the complement of all objects, for masks covering most of the image) and on CE-FAM-like maps:

- ``cam s``: the mask averaged onto a layer grid (8x8 at 64 px, 7x7 otherwise), plus N(0, s) noise, ReLU,
  upsampled bilinearly: CE-FAM's form, with exact zeros (ties) wherever a grid cell and its neighbours are <= 0;
- ``blur s``: the mask blurred at full resolution plus N(0, s) noise (no ties);
- ``random``: uniform noise; ``random cam``: ReLU(N(0, 1)) on the layer grid, upsampled (half of it tied at 0).

Per map three NRAs: ``ours`` (exact, ties interpolated), ``order`` (exact, every pixel, but ties in the authors'
argsort order) and ``theirs`` (the authors' sampled curve). ``theirs - ours`` splits into ``ties = order - ours``
and ``bins = theirs - order``. Hit rates are NRA > 0.5 for both. EPG: ``theirs`` counts a pair whose NRA is 0 as
EPG 0 (their evaluation only keeps the EPG of a map with NRA > 0) and a constant non-zero map as NaN.

The re-implementation of the authors' formula is checked against a pixel-by-pixel loop of it on a few maps
before anything is printed. Run: ``python benchmarks/fidelity.py`` (``--images``, ``--sizes``; about a minute on 2
CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from cefam_lightning.data.shapes_world import WorldSpec, render_image
from cefam_lightning.metrics.functional.region import auc_high, auc_low, epg, nra

BUCKETS = [(0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.0)]
FAMILIES = ["cam 0.1", "cam 0.3", "cam 1.0", "blur 0.1", "blur 0.3", "random", "random cam"]


# ------------------------------------------------------------------------------------------- the authors' formula
def their_nra_loop(saliency: np.ndarray, mask: np.ndarray) -> float:
    """The authors' sampled NRA, one pixel at a time, as their loop walks it (the reference for the vectorized one)."""
    n = saliency.size
    order = np.argsort(saliency.ravel())[::-1]
    flat = mask.ravel()
    m = int(flat.sum())
    step = n // 100
    tp = fp = 0
    auc = upper = 0.0
    for idx, pixel in enumerate(order):
        if flat[pixel]:
            tp += 1
        else:
            fp += 1
        if idx < step or idx % step == 0:
            weight = 1 / n if idx < step else 1 / 100
            auc += tp / (fp + m) * weight
            upper += (idx / m if idx < m else m / idx) * weight
    low = m / n / 2
    return max(auc - low, 0) / (upper - low)


def their_curves(saliency: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(theirs, order)`` for one map: the authors' sampled NRA, and the exact NRA with their ranking of ties."""
    n = saliency.size
    order = np.argsort(saliency.ravel())[::-1]  # the authors' call: ties in whatever order numpy's sort leaves them
    hits = mask.ravel()[order]
    m = int(hits.sum())
    tp = np.cumsum(hits, dtype=np.float64)
    idx = np.arange(n)
    iou = tp / (idx + 1 - tp + m)
    upper_curve = np.where(idx < m, idx / m, m / np.maximum(idx, 1))
    step = n // 100
    fine, coarse = idx < step, (idx >= step) & (idx % step == 0)
    auc = iou[fine].sum() / n + iou[coarse].sum() / 100
    upper = upper_curve[fine].sum() / n + upper_curve[coarse].sum() / 100
    low = m / n / 2
    theirs = max(auc - low, 0) / (upper - low)
    exact_low, exact_high = float(auc_low(m, n)), float(auc_high(m, n))
    ordered = max(iou.mean() - exact_low, 0) / (exact_high - exact_low) if m < n else math.nan
    return theirs, ordered


def their_epg(saliency: np.ndarray, mask: np.ndarray) -> float:
    """The authors' EPG: 0 for an all-zero map, NaN (0/0) for any other constant map."""
    if saliency.sum() == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    inside = (norm * mask).sum()
    return float(inside / (inside + (norm * ~mask).sum()))


def sampled_width(n: int) -> float:
    """Total weight of the authors' samples: ``N // 100`` pixels at ``1/N`` plus the coarse samples at ``1/100``."""
    step = n // 100
    return step / n + len(range(step, n, step)) / 100


# ------------------------------------------------------------------------------------------------ data
def world_masks(size: int, images: int, seed: int) -> np.ndarray:
    """Every present concept's mask of ``images`` shapes-world images, and each image's background."""
    spec = WorldSpec(image_size=size, seed=seed, n_test=images)
    out = []
    for i in range(images):
        _, masks, _ = render_image(spec, (seed, 2, i))
        present = masks[masks.any(axis=(1, 2))]
        out.extend(present)
        out.append(~masks.any(axis=0))  # the background: most of the image
    return np.stack(out)


def stand_in_maps(family: str, masks: torch.Tensor, grid: int, gen: torch.Generator) -> torch.Tensor:
    n, size = masks.shape[0], masks.shape[-1]
    m = masks.float()[:, None]
    up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    if family.startswith("cam"):
        sigma = float(family.split()[1])
        coarse = F.adaptive_avg_pool2d(m, grid)
        return up((coarse + sigma * torch.randn(coarse.shape, generator=gen)).relu())[:, 0]
    if family.startswith("blur"):
        sigma = float(family.split()[1])
        width = size / 32
        radius = int(3 * width)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * width**2))
        kernel = kernel / kernel.sum()
        blurred = F.conv2d(F.pad(m, (radius,) * 4, mode="replicate"), kernel.view(1, 1, 1, -1))
        blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
        return (blurred + sigma * torch.randn(blurred.shape, generator=gen))[:, 0]
    if family == "random":
        return torch.rand(n, size, size, generator=gen)
    if family == "random cam":
        return up(torch.randn(n, 1, grid, grid, generator=gen).relu())[:, 0]
    raise ValueError(family)


# ------------------------------------------------------------------------------------------------ report
def stats(x: np.ndarray) -> str:
    return f"{x.mean():+.4f} ± {x.std():.4f}" if len(x) else "n/a"


def report_size(size: int, images: int, seed: int) -> None:
    masks_np = world_masks(size, images, seed)
    masks = torch.from_numpy(masks_np)
    coverage = masks_np.mean(axis=(1, 2))
    grid = 8 if size == 64 else 7
    gen = torch.Generator().manual_seed(seed)
    rows = []  # (family, coverage, ours, order, theirs, epg_ours, epg_theirs)
    for family in FAMILIES:
        maps = stand_in_maps(family, masks, grid, gen)
        ours = nra(maps, masks).numpy()
        epg_ours = epg(maps, masks).numpy()
        maps_np = maps.numpy()
        for i in range(len(maps_np)):
            theirs, order = their_curves(maps_np[i], masks_np[i])
            e = their_epg(maps_np[i], masks_np[i]) if theirs > 0 else 0.0
            rows.append((family, coverage[i], ours[i], order, theirs, epg_ours[i], e))
    fam = np.array([r[0] for r in rows])
    cov, ours, order, theirs, epg_o, epg_t = (np.array([r[k] for r in rows], dtype=np.float64) for k in range(1, 7))

    n = size * size
    print(
        f"\n== {size}x{size} px: {len(masks_np)} masks x {len(FAMILIES)} map kinds; their samples' total width "
        f"{sampled_width(n):.4f} (exact: 1)"
    )
    header = (
        f"{'':>14} {'pairs':>6} {'NRA ours':>9} {'NRA theirs':>10} {'theirs-ours (mean ± sd)':>24} "
        f"{'ties (mean ± sd)':>18} {'bins':>8} {'max |diff|':>10} {'hit ours':>8} {'hit theirs':>10}"
    )
    print(header)

    def line(label: str, sel: np.ndarray) -> None:
        d = theirs[sel] - ours[sel]
        print(
            f"{label:>14} {int(sel.sum()):>6} {ours[sel].mean():>9.4f} {theirs[sel].mean():>10.4f} {stats(d):>24} "
            f"{stats(order[sel] - ours[sel]):>18} {(theirs[sel] - order[sel]).mean():>+8.4f} "
            f"{np.abs(d).max():>10.4f} {(ours[sel] > 0.5).mean():>8.3f} {(theirs[sel] > 0.5).mean():>10.3f}"
        )

    for lo, hi in BUCKETS:
        sel = (cov > lo) & (cov <= hi) & (cov < 1)
        if sel.any():
            line(f"cover {lo:.0%}-{hi:.0%}", sel)
    for family in FAMILIES:
        line(family, fam == family)
    line("all", cov < 1)
    no_ties = np.isin(fam, ["blur 0.1", "blur 0.3", "random"])
    print(f"  ties only (order - ours) on maps without ties: max |diff| {np.abs(order - ours)[no_ties].max():.1e}")
    print(f"  NRA theirs > 1: {(theirs > 1).mean():.1%} of pairs, largest {theirs.max():.4f} (ours <= 1 by design)")
    zero = theirs == 0
    print(
        f"  EPG ours {np.nanmean(epg_o):.4f}, theirs {np.nanmean(epg_t):.4f} (mean); {zero.mean():.1%} of pairs have "
        f"their NRA 0 and count as EPG 0 there, by kind: "
        + ", ".join(f"{f} {(np.nanmean(epg_t[fam == f]) - np.nanmean(epg_o[fam == f])):+.4f}" for f in FAMILIES)
    )


def report_extremes(size: int) -> None:
    """Full masks, constant maps and the upsampling."""
    full = np.ones((size, size), dtype=bool)
    rng = np.random.default_rng(0)
    theirs_full = [their_curves(rng.random((size, size)).astype(np.float32), full)[0] for _ in range(3)]
    ours_full = nra(torch.rand(3, size, size), torch.ones(3, size, size, dtype=torch.bool))
    print(
        f"\n== {size}x{size} px, a mask covering the whole image: NRA ours {ours_full[0].item()} (left out), "
        f"theirs {np.mean(theirs_full):.4f} whatever the map"
    )
    const = np.full((size, size), 0.5, dtype=np.float32)
    for name, rows in (("top", slice(0, size // 2)), ("bottom", slice(size // 2, size))):
        half = np.zeros((size, size), dtype=bool)
        half[rows] = True
        t_const, t_half = torch.from_numpy(const), torch.from_numpy(half)
        print(
            f"   a constant map, mask the {name} half: EPG ours {epg(t_const, t_half).item():.4f}, theirs "
            f"{their_epg(const, half)}; NRA ours {nra(t_const, t_half).item():.4f}, theirs "
            f"{their_curves(const, half)[0]:.4f} (ties in argsort order)"
        )
    try:
        import cv2
    except ImportError:
        print("   upsampling: cv2 not installed, not measured")
        return
    grid = torch.rand(20, 7, 7)
    ours_up = F.interpolate(grid[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    theirs_up = np.stack([cv2.resize(g.numpy(), (size, size), interpolation=cv2.INTER_LINEAR) for g in grid])
    print(
        f"   upsampling 7x7 -> {size}: cv2 INTER_LINEAR vs torch bilinear align_corners=False: max |diff| "
        f"{np.abs(ours_up - theirs_up).max():.1e} (maps in [0, 1])"
    )


@torch.no_grad()
def report_procedures(seed: int) -> None:
    """Layer relevance and contributions against the authors' procedures re-written (``region_cefam``'s deletion in
    the translator's input, ``ResNet.mask_predict``'s fill), given the same channel ranking: random ResNet-18 at
    64 px, random translator and CLIP-style scorer (the procedures, not the trained weights, are compared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of single-image passes: one thread is the fastest (and not slowed by load)
    try:
        _procedures(seed)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _procedures(seed: int) -> None:
    import torchvision

    from cefam_lightning.methods.cefam.contributions import concept_contributions
    from cefam_lightning.methods.cefam.regions import layer_slices, pool_activations, score_jacobian
    from cefam_lightning.methods.cefam.relevance import layer_relevance, top_channels
    from cefam_lightning.models.classifier import FrozenClassifier
    from cefam_lightning.models.components import ConceptScorer, Translator

    torch.manual_seed(seed)
    layers, k = ["layer1", "layer2", "layer3", "layer4"], 20
    model = torchvision.models.resnet18(weights=None).eval()
    clf = FrozenClassifier(model, layers, name="resnet18")
    images = torch.rand(2, 3, 64, 64)
    out = clf(images)
    z = pool_activations(out.activations, layers)
    slices = layer_slices(out.activations, layers)
    translator, scorer = Translator(z.shape[1], 64).eval(), ConceptScorer(torch.randn(30, 64), "clip")
    jac = score_jacobian(translator, scorer, z)
    concepts = torch.tensor([[0, 7, 19], [3, 11, 29]])
    ours = layer_relevance(z, jac, slices, translator, scorer, concepts, k)

    def prob(zz: torch.Tensor, c: int) -> float:
        return scorer.probabilities(scorer(translator(zz[None])))[0, c].item()

    worst = 0.0
    for b in range(2):
        for j, c in enumerate(concepts[b].tolist()):
            base = prob(z[b], c)
            for li, sl in enumerate(slices.values()):
                top = top_channels(jac, z, sl, concepts, k)[b, j]
                score = 0.0
                for ti in range(k + 1):  # ti = 0 deletes nothing; the sum is divided by k
                    zz = z[b].clone()
                    zz[sl][top[:ti]] = z[b, sl].mean()
                    score += (base - prob(zz, c)) / base / k
                worst = max(worst, abs(score - ours[b, j, li].item()))
    print(f"\n== layer relevance (deletion in the translator's input, mean fill): max |ours - theirs| {worst:.1e}")

    pooled = set(clf.mean_invariant_layers())
    logits = out.logits
    target = logits.argmax(1)
    p_y = logits.softmax(1)[torch.arange(2), target]
    x = clf.normalize(images)
    for li, layer in enumerate(layers):
        chosen = torch.full_like(concepts, li)
        ours_c = concept_contributions(
            clf, out.activations, logits, jac, z, slices, concepts, chosen, k=k, pooled_only=pooled
        )
        worst = 0.0
        for b in range(2):
            for j in range(concepts.shape[1]):
                top = top_channels(jac, z, slices[layer], concepts, k)[b, j]
                score = 0.0
                for ti in range(k + 1):

                    def hook(module, inputs, output, chans=top[:ti], last=(li == 3)):
                        output = output.clone()
                        fill = output.mean() if last else output[:, chans].mean(dim=(2, 3), keepdim=True)
                        output[:, chans] = fill
                        return output

                    handle = getattr(model, layer).register_forward_hook(hook)
                    p = model(x[b : b + 1]).softmax(1)[0, target[b]].item()
                    handle.remove()
                    score += (p_y[b].item() - p) / p_y[b].item() / k
                worst = max(worst, abs(score - ours_c[b, j].item()))
        fill = "whole-tensor mean" if layer in pooled else "spatial mean per channel"
        print(f"   contribution at {layer} ({fill}): max |ours - theirs| {worst:.1e}")


def check_reimplementation() -> None:
    """The vectorized authors' NRA equals the loop on a few maps (with and without ties)."""
    rng = np.random.default_rng(1)
    for k in range(4):
        side = 32 + 8 * k
        mask = rng.random((side, side)) < (0.1 + 0.25 * k)
        saliency = rng.random((side, side)).astype(np.float32)
        if k % 2:
            saliency = np.maximum(saliency - 0.5, 0)  # ties at 0
        fast, loop = their_curves(saliency, mask)[0], their_nra_loop(saliency, mask)
        assert abs(fast - loop) < 1e-12, (fast, loop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=30, help="shapes-world images per size")
    p.add_argument(
        "--sizes",
        type=str,
        default="64,112,224",
        help="image sizes (the shapes world, Broden's 112 px masks, ImageNet-S's 224 px crops)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    check_reimplementation()
    print("authors' NRA re-implemented: vectorized = pixel loop (to 1e-12) on 4 maps")
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        report_size(size, args.images, args.seed)
    for size in sizes:
        report_extremes(size)
    report_procedures(args.seed)
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
