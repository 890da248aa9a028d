"""Concept regions for 1000 concepts: batched Jacobian vs per-concept loops (docs/method.md#concept-regions, issue 3).

ResNet-50 (random init), 224 px, batch 8, 1000 concepts, layers layer1..layer4, translator 3840-2048-1024-512.

    (a) one forward pass of the frozen classifier
    (b) regions for all concepts at all 4 layers from one Jacobian (this framework)
    (c) the per-concept autograd loop (one backward pass through the translator per concept)
    (d) pytorch-grad-cam's GradCAM with a concept-score target, one call per concept (forward and backward
        through the whole classifier each time)

(c) and (d) are timed on a subset of concepts and scaled to 1000. Run: ``python benchmarks/concept_regions.py``
(``pip install -e ".[bench]"`` for (d)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from cefam_lightning.methods.cefam.regions import (
    concept_regions,
    concept_regions_reference,
    pool_activations,
    score_jacobian,
)
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ConceptScorer, Translator

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--loop-subset", type=int, default=20, help="concepts timed for (c)")
    p.add_argument("--gradcam-subset", type=int, default=2, help="concepts timed for (d)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    classifier = FrozenClassifier(resnet, LAYERS, name="resnet50")
    translator = Translator(3840, 512).eval()
    scorer = ConceptScorer(torch.randn(args.concepts, 512), "clip")
    images = torch.rand(args.batch, 3, 224, 224)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.concepts} concepts")

    with torch.no_grad():
        t_a = timed(lambda: classifier(images), args.repeats)
        acts = classifier(images).activations

    def batched():
        jac = score_jacobian(translator, scorer, pool_activations(acts, LAYERS))
        return concept_regions(acts, LAYERS, jac)

    t_b = timed(batched, args.repeats)
    sub = list(range(args.loop_subset))
    t_c = timed(lambda: concept_regions_reference(acts, LAYERS, translator, scorer, sub), 1) * args.concepts / len(sub)

    t_d = None
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("(d) skipped: pytorch-grad-cam is not installed (pip install -e '.[bench]')")
    else:
        net = ConceptScoreNet(resnet, translator, scorer).eval()
        for prm in net.parameters():
            prm.requires_grad_(True)  # GradCAM needs gradients to flow to the hooked layers
        with GradCAM(model=net, target_layers=[resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]) as cam:

            def per_concept():
                for c in range(args.gradcam_subset):
                    cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * args.batch)

            t_d = timed(per_concept, 1) * args.concepts / args.gradcam_subset

    print(f"(a) classifier forward                 {t_a:8.3f} s")
    print(f"(b) batched regions, all concepts      {t_b:8.3f} s")
    print(f"(c) per-concept autograd loop          {t_c:8.3f} s  (timed on {len(sub)} concepts, scaled)")
    if t_d is not None:
        print(f"(d) pytorch-grad-cam, one call/concept {t_d:8.3f} s  (timed on {args.gradcam_subset}, scaled)")
    print(
        f"ratio (b)/(a) = {t_b / t_a:.2f}   (c)/(b) = {t_c / t_b:.1f}"
        + (f"   (d)/(b) = {t_d / t_b:.0f}" if t_d else "")
    )


if __name__ == "__main__":
    main()
