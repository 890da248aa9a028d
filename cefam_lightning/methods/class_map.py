"""The class-map family: explainers whose explanation is one map per image of where the evidence for a class is.

L-CAM-Fm and L-CAM-Img are of this family, and so is any method that gives per-class maps at one layer of the
classifier: :class:`ClassMapExplainer` implements everything but the maps themselves (:meth:`~ClassMapExplainer.
class_maps_at_layer`), namely

- the explanation (:class:`ClassMapExplanation`): the explained class's map min-max normalized per image and
  upsampled to the image;
- what ``explain`` writes: the map, and how much of the class it holds (the explained class's probability on the
  image kept where the map is high, 100 / 50 / 15 % of the pixels, and the relative drop from the whole image);
- the maps the region-map callback draws;
- the evaluation on the shapes world (:func:`evaluate_class_maps`): NRA, hit rate and EPG against the key object's
  pixels (:func:`~cefam_lightning.data.shapes_world.key_object_pixels`, the one ground truth of a class map), and
  Average Drop / Increase in Confidence, beside Grad-CAM at the same layer and a random map;
- the evaluation on data (``evaluate --data``, :func:`evaluate_class_maps_on_data`): AD / IC of the predicted class's
  map on any image source or mask dataset, and where the data have class masks (a mask named after one of the
  checkpoint's classes: ImageNet-S's, the folder format's) the region metrics of that class's map against them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cefam_lightning.data.mask_datasets import collate_masks
from cefam_lightning.data.shapes_world import key_object_pixels
from cefam_lightning.distributed import sum_over_ranks
from cefam_lightning.methods.base import (
    EvaluationSettings,
    Evidence,
    ExplainerModule,
    ExplainSettings,
    ImageReport,
    RegionPanels,
)
from cefam_lightning.methods.baselines import image_random_maps
from cefam_lightning.methods.cam_baselines import baseline_names, get_baseline
from cefam_lightning.metrics import ROAD, DeletionInsertion, Faithfulness, RegionMetrics
from cefam_lightning.metrics.functional.faithfulness import DEFAULT_KEEPS, faithfulness_probabilities, setting_name
from cefam_lightning.metrics.functional.maps import minmax_normalize
from cefam_lightning.metrics.functional.perturbation import (
    DEFAULT_PERCENTILES,
    DEFAULT_STEPS,
    deletion_insertion_curves,
    road_available,
    road_probabilities,
)
from cefam_lightning.models.classifier import Activations
from cefam_lightning.reporting import figures
from cefam_lightning.reporting.explanations import class_entry, float16_map, image_title, json_number, region
from cefam_lightning.reporting.tables import markdown_table

KEY_OBJECT = "key object"


def normalize_maps(maps: Tensor, size: Sequence[int] | None = None) -> Tensor:
    """``(B, h, w)`` maps min-max normalized per map to ``[0, 1]`` (constant maps become 0), then upsampled
    bilinearly to ``size`` (which keeps them in ``[0, 1]``)."""
    out = minmax_normalize(maps.float(), dims=2)
    if size is not None and tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return out


def select_class(c: Tensor, classes: Tensor) -> Tensor:
    """``(B, K, h, w)`` maps and ``(B,)`` class indices -> ``(B, h, w)``: each image's map of its class."""
    return c[torch.arange(c.shape[0], device=c.device), classes.to(c.device)]


@dataclass
class ClassMapExplanation:
    """Class maps of ``B`` images: the classifier's logits, the explained class and its map."""

    logits: Tensor  # (B, num_classes), the frozen classifier's
    target: Tensor  # (B,) the explained class (the predicted one unless given)
    class_map: Tensor  # (B, H, W) in [0, 1], at the image size
    layer: str  # the classifier layer the maps come from


class ClassMapExplainer(ExplainerModule):
    """An explainer whose explanation is a class map at one layer (see the module docstring).

    Subclasses implement :meth:`class_maps_at_layer` and set :attr:`map_layer`.
    """

    # beside its own maps (evaluate --baselines, --curves); evaluate --data
    evaluate_options = frozenset({"baselines", "curves", "data"})

    @property
    def map_layer(self) -> str:
        """The classifier layer the maps are computed at (Grad-CAM is compared at the same layer)."""
        raise NotImplementedError

    def class_maps_at_layer(self, images: Tensor) -> tuple[Any, Tensor]:
        """One frozen classifier pass and the per-class maps at :attr:`map_layer`.

        Returns:
            ``(classifier output, maps)`` with maps ``(B, num_classes, h, w)`` before normalization.
        """
        raise NotImplementedError

    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | None = None, **settings: Any) -> ClassMapExplanation:
        out, c = self.class_maps_at_layer(images)
        logits = out.logits.float()
        target = logits.argmax(dim=1) if target is None else target.to(c.device).long()
        return ClassMapExplanation(
            logits, target, normalize_maps(select_class(c, target), images.shape[-2:]), self.map_layer
        )

    @torch.no_grad()
    def class_maps(self, images: Tensor, target: Tensor | None = None) -> Tensor:
        """The explanation's maps alone: ``(B, H, W)`` in ``[0, 1]``."""
        return self.explain(images, target).class_map

    def image_explainer(self, settings: ExplainSettings, checkpoint: str | None = None) -> ClassMapImageExplainer:
        return ClassMapImageExplainer(self, checkpoint)

    def evidence(
        self,
        images: Tensor,
        target: Tensor | None = None,
        *,
        concepts: Tensor | None = None,
        top_n: int = 8,
        **options: Any,
    ) -> Evidence:
        """The class map of ``target`` (no concepts: the report shows class maps of errors)."""
        expl = self.explain(images, target)
        return Evidence(logits=expl.logits, target=expl.target, class_map=expl.class_map)

    def region_panels(self, images: Tensor, top_k: int) -> RegionPanels:
        expl = self.explain(images)
        probs = expl.logits.softmax(1)
        b = images.shape[0]
        title = f"{self.title} class map\n{self.map_layer}"
        caption = [f"{self.title} class map (at {self.map_layer})"]
        return RegionPanels(
            expl.class_map[:, None].cpu().numpy(),
            [[title]] * b,
            [caption] * b,
            None,
            expl.target.cpu(),
            probs.gather(1, expl.target[:, None])[:, 0].cpu(),
        )

    def evaluate_on_world(self, world: Any, split: str, settings: EvaluationSettings) -> tuple[dict[str, Any], str]:
        results = evaluate_class_maps(self, world, split, settings)
        return results, format_class_map_table(results)

    def evaluate_on_data(
        self, dataset: Any, settings: EvaluationSettings, num_workers: int = 0, **options: Any
    ) -> tuple[dict[str, Any], str]:
        """AD / IC on any image data, and region metrics against its class masks where it has them
        (:func:`evaluate_class_maps_on_data`)."""
        results = evaluate_class_maps_on_data(self, dataset, settings, num_workers)
        return results, format_class_map_table(results)


class ClassMapImageExplainer:
    """``explain``'s reports of a class-map explainer: the map and how much of the class it holds."""

    def __init__(self, module: ClassMapExplainer, checkpoint: str | None = None):
        self.module, self.checkpoint = module, checkpoint
        self.settings: dict[str, Any] = {"layer": module.map_layer}

    def __call__(self, images: Tensor, target: Tensor | None, paths: Sequence[str]) -> list[ImageReport]:
        module = self.module
        expl = module.explain(images, target)
        y, o = faithfulness_probabilities(
            module.classifier, images, expl.class_map, expl.target, DEFAULT_KEEPS, logits=expl.logits
        )
        probs = expl.logits.softmax(dim=1).cpu()
        maps, y, o, tgt = expl.class_map.cpu(), y.cpu(), o.cpu(), expl.target.cpu()
        results = []
        for i, image in enumerate(paths):
            kept = {setting_name(k): json_number(o[i, s]) for s, k in enumerate(DEFAULT_KEEPS)}
            report = {
                "image": image,
                "checkpoint": self.checkpoint,
                "method": module.method,
                **class_entry(probs, i, module.class_names, int(tgt[i])),
                "layer": module.map_layer,
                "class_map": {
                    "region": "regions.npz:class_map",
                    "title": f"{module.title} class map at {module.map_layer}",
                    "probability_kept": kept,
                    "drop_kept": {
                        n: None if v is None or not y[i] else json_number(max(0.0, float(y[i]) - v) / float(y[i]))
                        for n, v in kept.items()
                    },
                },
            }
            results.append(ImageReport(report, {"class_map": float16_map(maps[i])}))
        return results

    @staticmethod
    def render(image: Tensor, result: ImageReport, dpi: int = 110) -> bytes:
        """The image with its prediction, the class map overlaid, and the explained class's probability on the
        whole image and on the image kept where the map is high (100 / 50 / 15 %)."""
        report, maps = result.report, result.maps
        cm = report["class_map"]
        fig, axes = figures.new_figure(3)
        img = figures.tensor_image(image)
        figures.image_panel(axes[0], img, image_title(report))
        figures.overlay(axes[1], img, region(maps, cm["region"]), cm["title"].replace(" at ", "\nat "))
        kept = cm["probability_kept"]
        figures.bars(
            axes[2],
            ["image", *[("image x map" if n == "100%" else f"top {n} of map") for n in kept]],
            [report["explained_probability"], *kept.values()],
            f"p({report['explained_class']})",
            fmt="%.3f",
        )
        return figures.to_png(fig, dpi)


# ---------------------------------------------------------------------- evaluation

DEFAULT_BASELINES = ("gradcam",)
COMPARED = ("method", *DEFAULT_BASELINES, "random")


class ClassMapEvaluation(nn.Module):
    """Accumulate region and faithfulness metrics of named class maps (a class-map explainer's, baselines', random
    maps') over batches.

    Args:
        methods: the names of the compared maps (:meth:`update` computes ``"method"``, the registered baselines of
            :mod:`~cefam_lightning.methods.cam_baselines` and ``"random"``; :meth:`update_maps` takes any).
        keeps: kept pixel fractions of the faithfulness metrics.
        seed: seed of the random maps (each image's from this seed and its index in the evaluated images:
            :func:`~cefam_lightning.methods.baselines.image_random_maps`) and of ROAD's imputation noise.
        sync_on_compute: sum the states over DDP ranks in :meth:`compute` (every rank must then call it). When the
            ranks split the images, each sets :attr:`images_seen` to the index of its first image first, so every
            image gets its own random map whatever the split.
        curves: also the deletion / insertion AUC (``steps`` steps) and, where pytorch-grad-cam is installed, ROAD at
            ``percentiles`` (docs/method.md#deletion-insertion-and-road).
    """

    def __init__(
        self,
        methods: Sequence[str] = COMPARED,
        keeps: Sequence[float] = DEFAULT_KEEPS,
        seed: int = 0,
        sync_on_compute: bool = True,
        curves: bool = False,
        steps: int = DEFAULT_STEPS,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ):
        super().__init__()
        self.methods, self.keeps, self.seed = list(methods), list(keeps), seed
        self.steps, self.percentiles = steps, list(percentiles)
        self.region = nn.ModuleDict({m: RegionMetrics([KEY_OBJECT], sync_on_compute=sync_on_compute) for m in methods})
        self.faithfulness = nn.ModuleDict(
            {m: Faithfulness(self.keeps, sync_on_compute=sync_on_compute) for m in methods}
        )
        kw = {"sync_on_compute": sync_on_compute}
        self.deletion = nn.ModuleDict({m: DeletionInsertion(steps, **kw) for m in methods} if curves else {})
        road = curves and bool(self.percentiles) and road_available()
        self.road = nn.ModuleDict({m: ROAD(self.percentiles, **kw) for m in methods} if road else {})
        self.images_seen = 0  # index among the evaluated images of the next batch's first image

    @torch.no_grad()
    def update(self, module: ClassMapExplainer, images: Tensor, key_masks: Tensor) -> None:
        """Score one batch of a class-map explainer (``"method"``) beside the baselines and random maps at its
        layer: ``images`` ``(B, 3, H, W)`` in ``[0, 1]``, ``key_masks`` ``(B, H, W)`` the key object."""
        out, c = module.class_maps_at_layer(images)
        pred = out.logits.argmax(dim=1)
        every = torch.arange(len(images), device=images.device)
        maps = self._maps(module, images, out, c, pred, every)
        self.update_maps(module.classifier, images, key_masks, maps, pred, out.logits)

    def _maps(
        self, module: ClassMapExplainer, images: Tensor, out: Any, c: Tensor, classes: Tensor, image_index: Tensor
    ) -> dict:
        """Each compared method's map of ``classes`` (``(B,)``) on ``images`` (``out``: the classifier's output
        on them, ``c`` the explainer's class maps), at its layer's resolution; ``image_index`` ``(B,)``: each
        image's index in the batch (that seeds its random map)."""
        maps = {"method": select_class(c, classes)} if "method" in self.methods else {}
        maps.update(baseline_maps(self.methods, module.classifier, images, out, classes, module.map_layer))
        if "random" in self.methods:
            index = image_index + self.images_seen
            maps["random"] = image_random_maps(index, images.shape[-2:], self.seed, images.device)
        return maps

    @torch.no_grad()
    def update_with_class_masks(
        self, module: ClassMapExplainer, images: Tensor, masks: Tensor, image_index: Tensor, classes: Tensor
    ) -> None:
        """Score one batch of data: AD / IC (and the curves) of the predicted class's maps, and each class mask
        (``masks`` ``(P, H, W)`` of image ``image_index`` ``(P,)``, class ``classes`` ``(P,)``) against that class's
        maps."""
        out, c = module.class_maps_at_layer(images)
        pred = out.logits.argmax(dim=1)
        if len(image_index):
            self._update_class_masks(module, images, out, c, masks, image_index, classes)
        every = torch.arange(len(images), device=images.device)
        self.update_maps(
            module.classifier, images, None, self._maps(module, images, out, c, pred, every), pred, out.logits
        )

    def _update_class_masks(
        self,
        module: ClassMapExplainer,
        images: Tensor,
        out: Any,
        c: Tensor,
        masks: Tensor,
        image_index: Tensor,
        classes: Tensor,
    ) -> None:
        """The region metrics of each class mask against its class's maps (see :meth:`update_with_class_masks`)."""
        layer = module.map_layer
        rows = Activations(
            {layer: out.activations[layer][image_index]},
            {k: v[image_index] for k, v in out.activations.prefix_tokens.items() if k == layer},
        )
        pairs = SimpleNamespace(activations=rows)
        maps = self._maps(module, images[image_index], pairs, c[image_index], classes, image_index)
        concept_ids = torch.zeros(len(image_index), dtype=torch.long, device=images.device)
        for method, m in maps.items():
            self.region[method].update(normalize_maps(m.to(images.device), images.shape[-2:]), masks, concept_ids)

    @torch.no_grad()
    def update_maps(
        self,
        classifier: Any,
        images: Tensor,
        key_masks: Tensor,
        maps: dict[str, Tensor],
        target: Tensor,
        logits: Tensor | None = None,
        road: bool = True,
    ) -> None:
        """Score given maps (``{name: (B, h, w)}``, any resolution and scale; each normalized per image and
        upsampled here) of the ``target`` classes against ``key_masks`` (``None``: faithfulness only);
        ``road=False`` leaves this batch out of ROAD (the slowest). The batch's images are then counted in
        :attr:`images_seen`."""
        size = images.shape[-2:]
        concept_ids = torch.zeros(len(images), dtype=torch.long, device=images.device)
        for method, m in maps.items():
            m = normalize_maps(m.to(images.device), size)
            if key_masks is not None:
                self.region[method].update(m, key_masks, concept_ids)
            y, o = faithfulness_probabilities(classifier, images, m, target, self.keeps, logits=logits)
            self.faithfulness[method].update(y, o)
            if method in self.deletion:
                self.deletion[method].update(*deletion_insertion_curves(classifier, images, m, target, self.steps))
            if road and method in self.road:
                index = torch.arange(len(images)) + self.images_seen  # each image's own noise, the same per method
                self.road[method].update(
                    *road_probabilities(classifier, images, m, target, self.percentiles, self.seed, index)
                )
        self.images_seen += len(images)

    def compute(self, regions: bool = True) -> dict[str, dict[str, float]]:
        """``{method: {"nra", "epg", "hit_rate", "scored", "ad/100%", "ic/100%", ..., ["deletion", "insertion",
        "road/morf", "road/lerf", "road/combined"]}}`` as plain numbers (``regions=False``: no region metrics, for
        data without masks)."""
        results = {}
        for method in self.methods:
            row = {}
            if regions:
                scores = self.region[method].compute()
                row = {name: float(scores[f"{name}/mean"]) for name in ("nra", "epg", "hit_rate")}
                row["scored"] = int(scores[f"count/{KEY_OBJECT}"])  # images (pairs) with a non-empty mask
            row.update({k: float(v) for k, v in self.faithfulness[method].compute().items()})
            if method in self.deletion:
                row.update({k: float(v) for k, v in self.deletion[method].compute().items() if "/" not in k})
            if method in self.road:
                row.update({k: float(v) for k, v in self.road[method].compute().items()})
            results[method] = row
        return results


def baseline_maps(
    names: Sequence[str], classifier: Any, images: Tensor, output: Any, target: Tensor, layer: str
) -> dict[str, Tensor]:
    """``{name: (B, h, w)}``: the maps at ``layer`` of those ``names`` that are registered baselines."""
    registered = set(baseline_names())
    return {n: get_baseline(n)(classifier, images, output, target, [layer])[layer] for n in names if n in registered}


@torch.no_grad()
def evaluate_class_maps(
    module: ClassMapExplainer, world: Any, split: str = "test", settings: EvaluationSettings | None = None
) -> dict[str, Any]:
    """Evaluate a trained class-map explainer on a shapes-world split, beside Grad-CAM at its layer and a random
    map. This process evaluates the whole split by itself (under DDP, call it on one rank), unless ``settings``
    gives it a part (``rank``, ``world_size`` of a process group that every rank calls this in): then it scores its
    own range of images, the metrics are summed over the ranks, and every rank returns the numbers one process
    would.

    Returns:
        ``{"methods": {<the module's method> | "gradcam" | "random": metrics}, "title", "split", "images", "layer",
        "keeps", "seconds"}``.

    Raises:
        ValueError: a split that is not ``train``/``val``/``test``, or a module whose classes are not the world's.
    """
    settings = settings or EvaluationSettings()
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if module.class_names != list(world.class_names):
        raise ValueError(f"the module's classes {module.class_names} are not the world's classes {world.class_names}")
    device = module.device
    module.eval()
    t0 = time.time()
    data = world.split(split)
    n = len(data) if settings.max_images is None else min(settings.max_images, len(data))
    mine = settings.part(n)
    evaluation = _evaluation(settings, mine.start, device)
    for images, masks, labels in data.batches(settings.batch_size, n, device, images=mine):
        evaluation.update(module, images, key_object_pixels(world.spec, masks, labels))
    return _results(module, evaluation, evaluation.compute(), t0, split=split, images=n)


@torch.no_grad()
def evaluate_class_maps_on_data(
    module: ClassMapExplainer, dataset: Any, settings: EvaluationSettings | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Evaluate a class-map explainer on image data (``evaluate --data``), beside the baselines at its layer and a
    random map: AD / IC of the predicted class's map on every image, and NRA, hit rate and EPG of a class's map
    against each class mask, a mask whose concept is named like one of the checkpoint's classes (ImageNet-S's masks,
    the folder format's; none in a plain image source).

    Args:
        module: the explainer.
        dataset: a mask dataset or an image source dataset (:mod:`cefam_lightning.data.evaluation_data`).
        settings: batch size, image limit, random-map seed, baselines, curves; ``rank`` and ``world_size`` of a
            process group that splits the images (as :func:`evaluate_class_maps`).
        num_workers: DataLoader workers.

    Returns:
        ``{"methods": {<method> | <baseline> | "random": metrics}, "title", "data", "images", "class_masks",
        "regions_against", "layer", "keeps", "baselines", "seconds"}``; without class masks the rows hold no region
        metrics.
    """
    from torch.utils.data import DataLoader, Subset

    settings = settings or EvaluationSettings()
    device = module.device
    module.eval()
    t0 = time.time()
    class_of = {name: i for i, name in enumerate(module.class_names)}
    concept_class = torch.tensor([class_of.get(c.name, -1) for c in dataset.concepts] or [-1], dtype=torch.long)
    n = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))
    if n < 1:
        raise ValueError(f"no images to evaluate in {dataset.describe()['root']}")
    mine = settings.part(n)
    data = dataset if mine == range(len(dataset)) else Subset(dataset, mine)
    loader = DataLoader(data, batch_size=settings.batch_size, collate_fn=collate_masks, num_workers=num_workers)
    evaluation = _evaluation(settings, mine.start, device)
    pairs = 0
    for batch in loader:
        classes = concept_class[batch.concepts] if len(batch.concepts) else batch.concepts
        keep = classes >= 0  # the masks of the checkpoint's classes
        pairs += int(keep.sum())
        evaluation.update_with_class_masks(
            module,
            batch.images.to(device),
            batch.masks[keep].to(device),
            batch.image_index[keep].to(device),
            classes[keep].to(device),
        )
    pairs = int(sum_over_ranks(torch.tensor(pairs, device=device), settings.world_size))  # every rank's part
    rows = evaluation.compute(regions=pairs > 0)  # no class masks: region metrics have nothing to score
    return _results(
        module,
        evaluation,
        rows,
        t0,
        data=dataset.describe(),
        split=dataset.split or "all",
        images=n,
        class_masks=pairs,
        regions_against=f"{pairs} class masks" if pairs else None,
    )


def _evaluation(settings: EvaluationSettings, first_image: int, device: Any) -> ClassMapEvaluation:
    """The evaluation the settings ask for: the explainer, the baselines, a random map; summed over the ranks of a
    process group; ``first_image``: the index of this rank's first image (the random maps are seeded by it)."""
    evaluation = ClassMapEvaluation(
        ("method", *(settings.baselines or DEFAULT_BASELINES), "random"),
        DEFAULT_KEEPS,
        settings.seed,
        sync_on_compute=settings.world_size > 1,
        curves=settings.curves,
    ).to(device)
    evaluation.images_seen = first_image
    return evaluation


def _results(
    module: ClassMapExplainer, evaluation: ClassMapEvaluation, rows: dict[str, Any], t0: float, **where: Any
) -> dict[str, Any]:
    """The results of an evaluation: the explainer's row under its method's name, then the compared maps'."""
    road = evaluation.percentiles if len(evaluation.road) else None  # None: pytorch-grad-cam is not installed
    return {
        "methods": {module.method: rows.pop("method"), **rows},
        "title": module.title,
        **where,
        "layer": module.map_layer,
        "keeps": list(DEFAULT_KEEPS),
        "baselines": [m for m in evaluation.methods if m not in ("method", "random")],
        **({"curves": {"steps": evaluation.steps, "road_percentiles": road}} if len(evaluation.deletion) else {}),
        "seconds": round(time.time() - t0, 1),
    }


CURVE_COLUMNS = (
    ("deletion", "deletion AUC ↓", "{:.3f}"),
    ("insertion", "insertion AUC ↑", "{:.3f}"),
    ("road/morf", "ROAD MoRF ↓", "{:.3f}"),
    ("road/lerf", "ROAD LeRF ↑", "{:.3f}"),
)


def format_class_map_table(results: dict[str, Any]) -> str:
    """A Markdown table: NRA, hit rate, EPG against the key object's pixels (the shapes world) or the class masks
    (data), where there are any, and AD/IC per kept fraction (and the deletion / insertion AUC and ROAD where
    evaluated)."""
    names = [setting_name(k) for k in results.get("keeps", DEFAULT_KEEPS)]
    explainer = next(iter(results["methods"]))
    curves = [c for c in CURVE_COLUMNS if c[0] in results["methods"][explainer]]
    regions = "nra" in results["methods"][explainer]
    head = ["method", *(["NRA", "hit rate", "EPG"] if regions else [])]
    head += [*[f"AD {n} ↓" for n in names], *[f"IC {n} ↑" for n in names]]
    head += [title for _, title, _ in curves]
    titles = {explainer: results.get("title", explainer), "random": "random map"}
    titles.update({n: get_baseline(n).title for n in results["methods"] if n in baseline_names() and n != explainer})
    rows = []
    for method, row in results["methods"].items():
        cells = [f"{row['nra']:.3f}", f"{row['hit_rate']:.3f}", f"{row['epg']:.3f}"] if regions else []
        cells += [f"{row[f'ad/{n}']:.2f}" for n in names] + [f"{row[f'ic/{n}']:.1f}" for n in names]
        cells += [fmt.format(row[key]) for key, _, fmt in curves]
        rows.append([titles.get(method, method), *cells])
    compared = [titles[n] for n in results.get("baselines", DEFAULT_BASELINES)]
    against = results.get("regions_against", "the key object's pixels")
    where = f"{results.get('split')} images" if "data" not in results else f"images of {results['data']['root']}"
    title = (
        f"{titles[explainer]} at {results.get('layer')} vs {', '.join(compared)} at the same layer, "
        f"{results.get('images')} {where} "
        + (f"(regions: {against})" if against else "(no class masks: faithfulness only)")
    )
    return markdown_table(head, rows, title=title) + "\n"
