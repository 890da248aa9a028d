"""Concept regions for 1000 concepts by both gradient rules, against per-concept loops (docs/method.md#concept-regions).

ResNet-50 (random init), 224 px, batch 8, 1000 concepts, layers layer1..layer4, translator 3840-2048-1024-512,
all timed in one run:

    (a) one forward pass of the frozen classifier (no gradients)
    (b) direct rule, all concepts: regions at all 4 layers from one Jacobian dS/dz (no backward pass through the
        classifier)
    (c) full rule, all concepts: a float32 classifier forward that keeps its graph, ``full_channel_gradients``
        for every concept (``d`` = 512 vector-Jacobian products through the classifier, one per embedding
        dimension) and the region maps
    (d) full rule, top-8: the same for each image's 8 top-scoring concepts only (one product per concept in the
        union of the images' top-8, as ``ExplanationPass`` does)
    (e) full rule, per-concept autograd loop: one forward and one backward pass through classifier and translator
        per concept (``concept_regions_reference_full``, what the CE-FAM authors' code does)
    (f) pytorch-grad-cam's GradCAM with a concept-score target, one call per concept (forward and backward through
        the whole classifier each time); skipped when pytorch-grad-cam is not installed
    (g) direct rule, per-concept autograd loop (one backward pass through the translator per concept)

(e), (f) and (g) are timed on a subset of concepts and scaled to all of them. ``--full-products N`` times (c) with
only N of its ``d`` products and scales the products' time to ``d`` (the products are identical in cost: each is one
backward pass through the classifier; the combination and the maps still run on all ``d`` rows, zeros for the
products left out, so memory is that of the whole computation). ``--memory`` prints the peak memory of (c):
on CUDA ``torch.cuda.max_memory_allocated``, on Linux the peak resident set size (VmHWM, reset before (c)) above the
resident size when (c) began.

Run: ``python benchmarks/concept_regions.py`` (``pip install -e ".[bench]"`` for (f)); a small run:
``--arch resnet18 --image-size 64 --batch 2 --concepts 20 --embed-dim 8``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from cefam_lightning.methods.cefam.regions import (
    concept_regions,
    concept_regions_reference,
    concept_regions_reference_full,
    full_channel_gradients,
    pool_activations,
    score_jacobian,
    vjp_channel_sums,
)
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ConceptScorer, Translator

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call unless ``warmup`` is false)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block above what was in use when it began (``delta`` bytes; ``how`` says what is counted).

    CUDA: allocated tensor memory (``torch.cuda.max_memory_allocated``). CPU on Linux: the resident set's
    high-water mark (VmHWM, reset through ``/proc/self/clear_refs``) minus the resident size before the block.
    Elsewhere: ``ru_maxrss``'s growth, a lower bound when the process had peaked higher before.
    """

    def __init__(self, device: torch.device):
        self.device, self.delta, self.base, self.how = device, 0, 0, ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base, self.how = torch.cuda.memory_allocated(self.device), "CUDA allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            self.base, self.how = _proc_status_kib("VmRSS") * 1024, "resident set (VmHWM)"
        except (OSError, TypeError):
            kib = 1 if sys.platform != "darwin" else 1 / 1024
            self.base, self.how = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib * 1024), "ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.how == "CUDA allocated":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.how.startswith("resident"):
            self.peak = _proc_status_kib("VmHWM") * 1024
        else:
            kib = 1 if sys.platform != "darwin" else 1 / 1024
            self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib * 1024)
        self.delta = max(0, self.peak - self.base)


class ConceptScoreNet(nn.Module):
    """Image -> concept scores through the ResNet's real modules, so GradCAM can hook them."""

    def __init__(self, resnet: nn.Module, translator: nn.Module, scorer: ConceptScorer):
        super().__init__()
        self.resnet, self.translator, self.scorer = resnet, translator, scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        pooled = []
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
            pooled.append(x.mean(dim=(2, 3)))
        return self.scorer(self.translator(torch.cat(pooled, dim=1)))


def graph_forward(classifier: FrozenClassifier, images: torch.Tensor) -> list[torch.Tensor]:
    """The full rule's forward, as ``ExplanationPass(gradient="full")`` makes it: float32, gradients on from the
    input, the explained layers' maps kept with their graph."""
    with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
        out = classifier(images.detach().float().requires_grad_(True))
    return [out.activations[layer] for layer in LAYERS]


def maps_from_weights(graph: list[torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Region maps at every layer from channel weights ``(B, C', D)`` (the full rule's channel sums)."""
    acts = {layer: a.detach() for layer, a in zip(LAYERS, graph, strict=True)}
    return concept_regions(acts, LAYERS, weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["resnet50", "resnet18"], default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--embed-dim", type=int, default=512, help="translator output size d")
    p.add_argument("--top", type=int, default=8, help="concepts per image for (d)")
    p.add_argument("--full-products", type=int, default=0, help="products timed for (c), scaled to d (0: all d)")
    p.add_argument("--loop-subset", type=int, default=2, help="concepts timed for (e), the full-rule loop")
    p.add_argument("--gradcam-subset", type=int, default=2, help="concepts timed for (f)")
    p.add_argument("--direct-loop-subset", type=int, default=20, help="concepts timed for (g)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of (a), (b) and (d) (median)")
    p.add_argument("--memory", action="store_true", help="print the peak memory of (c)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, args.arch)(weights=None).eval().to(device)
    classifier = FrozenClassifier(resnet, LAYERS, name=args.arch)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        acts = classifier(images).activations
    in_dim = sum(acts[layer].shape[1] for layer in LAYERS)
    translator = Translator(in_dim, args.embed_dim).eval().to(device)
    scorer = ConceptScorer(torch.randn(args.concepts, args.embed_dim), "clip").to(device)
    d = args.embed_dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.arch} "
        f"{args.image_size} px, batch {args.batch}, {args.concepts} concepts, translator {in_dim}-...-{d}"
    )

    # (a) the classifier alone
    with torch.no_grad():
        t_a = timed(lambda: classifier(images), args.repeats, device)

    # (b) direct rule, all concepts
    def direct_all():
        jac = score_jacobian(translator, scorer, pool_activations(acts, LAYERS))
        return concept_regions(acts, LAYERS, jac)

    t_b = timed(direct_all, args.repeats, device)

    # (c) full rule, all concepts: d products (or --full-products of them, scaled)
    products = d if args.full_products <= 0 else min(args.full_products, d)
    product_time = [0.0]

    def full_all():
        graph = graph_forward(classifier, images)
        if products >= d:
            weights = full_channel_gradients(graph, translator, scorer)
        else:  # full_channel_gradients' all-concept branch with only `products` of its d products run
            z = torch.cat([a.float().mean(dim=(2, 3)) for a in graph], dim=1)
            e = translator(z).float()
            sync(device)
            t = time.perf_counter()
            per_dim = vjp_channel_sums(e, range(products), graph)
            sync(device)
            product_time[0] = time.perf_counter() - t
            per_dim = torch.cat([per_dim, per_dim.new_zeros(d - products, *per_dim.shape[1:])])
            weights = torch.einsum("bcj,jbk->bck", scorer.jacobian(e.detach()), per_dim)
        return maps_from_weights(graph, weights)

    memory = PeakMemory(device)
    with memory:
        t_c = timed(full_all, 1, device, warmup=False)
    t_c += product_time[0] * (d / products - 1)

    # (d) full rule, each image's top concepts (the union's products, each image's own rows)
    def full_top():
        graph = graph_forward(classifier, images)
        with torch.no_grad():
            scores = scorer(translator(torch.cat([a.detach().mean(dim=(2, 3)) for a in graph], dim=1)))
        top = scores.topk(min(args.top, args.concepts), dim=1).indices  # (B, N)
        union, columns = torch.unique(top, return_inverse=True)
        rows = full_channel_gradients(graph, translator, scorer, union.tolist())  # (B, U, D)
        weights = rows.gather(1, columns[:, :, None].expand(-1, -1, rows.shape[2]))
        return maps_from_weights(graph, weights), union.numel()

    union_size = full_top()[1]
    t_d = timed(full_top, args.repeats, device, warmup=False)

    # (e) full rule, one forward and backward pass per concept
    sub_e = list(range(min(args.loop_subset, args.concepts)))
    t_e = timed(
        lambda: concept_regions_reference_full(classifier, images, LAYERS, translator, scorer, sub_e), 1, device, False
    )
    t_e *= args.concepts / len(sub_e)

    # (f) pytorch-grad-cam, one call per concept
    t_f = None
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("(f) skipped: pytorch-grad-cam is not installed (pip install -e '.[bench]')")
    else:
        net = ConceptScoreNet(resnet, translator, scorer).eval()
        for prm in net.parameters():
            prm.requires_grad_(True)  # GradCAM needs gradients to flow to the hooked layers
        sub_f = min(args.gradcam_subset, args.concepts)
        with GradCAM(model=net, target_layers=[resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]) as cam:

            def per_concept():
                for c in range(sub_f):
                    cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * args.batch)

            t_f = timed(per_concept, 1, device, warmup=False) * args.concepts / sub_f
        for prm in net.parameters():
            prm.requires_grad_(False)

    # (g) direct rule, one backward pass through the translator per concept
    sub_g = list(range(min(args.direct_loop_subset, args.concepts)))
    t_g = timed(lambda: concept_regions_reference(acts, LAYERS, translator, scorer, sub_g), 1, device, False)
    t_g *= args.concepts / len(sub_g)

    n = args.concepts
    scaled_c = f"({products} of {d} products timed, scaled)" if products < d else f"({d} products)"
    rows = [
        ("(a) classifier forward", t_a, ""),
        (f"(b) direct rule, all {n} concepts", t_b, ""),
        (f"(c) full rule, all {n} concepts", t_c, scaled_c),
        (f"(d) full rule, top-{args.top} per image", t_d, f"({union_size} concepts in the union)"),
        ("(e) full rule, per-concept autograd loop", t_e, f"(timed on {len(sub_e)} concepts, scaled)"),
    ]
    if t_f is not None:
        rows.append(("(f) pytorch-grad-cam, one call per concept", t_f, f"(timed on {sub_f}, scaled)"))
    rows.append(("(g) direct rule, per-concept autograd loop", t_g, f"(timed on {len(sub_g)} concepts, scaled)"))
    for label, seconds, note in rows:
        print(f"{label:<44}{seconds:10.3f} s  {note}".rstrip())

    def check(name: str, value: float, op: str, floor: float) -> str:
        ok = value >= floor if op == ">=" else value <= floor
        return f"{name} = {value:8.2f}   floor {op} {floor:<4g} {'PASS' if ok else 'MISS'}"

    print(check("(e)/(c)", t_e / t_c, ">=", 2))
    print(check("(d)/(a)", t_d / t_a, "<=", 10))
    print(f"(b)/(a) = {t_b / t_a:8.2f}   (c)/(a) = {t_c / t_a:.1f}   (c)/(b) = {t_c / t_b:.1f}", end="")
    print(f"   (g)/(b) = {t_g / t_b:.1f}")
    if t_f is not None:
        print(f"(f)/(c) = {t_f / t_c:8.2f}   (f)/(b) = {t_f / t_b:.0f}")
    if args.memory:
        print(
            f"peak memory of (c): {memory.delta / 2**30:.2f} GiB above the {memory.base / 2**30:.2f} GiB in use "
            f"before it ({memory.how})"
        )


if __name__ == "__main__":
    main()
