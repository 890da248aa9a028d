"""Concept contributions: masked variants batched through the layers after the mask vs one forward pass
from the input per masked variant (docs/method.md#contribution, issue 3).

ResNet-50 (random init), 224 px. Each (image, concept) pair has K masked variants. The per-variant baseline is
timed on a subset of variants and scaled. Run: ``python benchmarks/contributions.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from cefam_lightning.methods.cefam.contributions import concept_contributions
from cefam_lightning.methods.cefam.regions import layer_slices, pool_activations, score_jacobian
from cefam_lightning.methods.cefam.relevance import top_channels
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ConceptScorer, Translator

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--concepts", type=int, default=4, help="concepts explained per image")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--loop-subset", type=int, default=8, help="variants timed for the per-variant baseline")
    args = p.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    clf = FrozenClassifier(model, LAYERS, name="resnet50")
    images = torch.rand(args.batch, 3, 224, 224)
    with torch.no_grad():
        out = clf(images)
    z = pool_activations(out.activations, LAYERS)
    translator, scorer = Translator(z.shape[1], 512).eval(), ConceptScorer(torch.randn(100, 512), "clip")
    jac = score_jacobian(translator, scorer, z)
    slices = layer_slices(out.activations, LAYERS)
    concepts = torch.arange(args.concepts).repeat(args.batch, 1)
    n_variants = args.batch * args.concepts * args.k
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batch} images x {args.concepts} "
        f"concepts x K={args.k} = {n_variants} masked variants per layer"
    )

    for li, layer in [(2, "layer3"), (3, "layer4")]:
        layers = torch.full_like(concepts, li)
        clf.tail(layer)  # build the tail once, outside the timing
        start = time.perf_counter()
        concept_contributions(clf, out.activations, out.logits, jac, z, slices, concepts, layers, k=args.k)
        batched = time.perf_counter() - start

        top = top_channels(jac, z, slices[layer], concepts, args.k)[0, 0]
        x = clf.normalize(images[:1])
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(1, args.loop_subset + 1):

                def hook(module, inputs, output, chans=top[:i]):
                    output = output.clone()
                    output[:, chans] = output[:, chans].mean(dim=(2, 3), keepdim=True)
                    return output

                handle = getattr(model, layer).register_forward_hook(hook)
                model(x).softmax(1)
                handle.remove()
        loop = (time.perf_counter() - start) * n_variants / args.loop_subset
        print(
            f"{layer}: batched {batched:7.2f} s   one pass from the input per variant {loop:7.2f} s "
            f"(timed on {args.loop_subset}, scaled)   ratio {loop / batched:6.1f}x"
        )


if __name__ == "__main__":
    main()
