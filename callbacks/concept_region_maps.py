"""Overlay the top concepts' region maps on a fixed set of validation images, every few epochs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from callbacks.logging_utils import (
    check_positive,
    figure_to_array,
    fixed_validation_items,
    is_due,
    log_images,
    stack_items,
)
from cefam_lightning.methods.cefam.pipeline import explain_batch


def render_region_maps(
    image: np.ndarray,
    regions: np.ndarray,
    titles: Sequence[str],
    masks: np.ndarray | None = None,
    heading: str = "",
    panel_size: int = 160,
    dpi: int = 100,
    alpha: float = 0.5,
) -> np.ndarray:
    """One figure: the image, then one overlay per concept with its ground-truth mask outlined.

    Args:
        image: ``H x W x 3`` float in ``[0, 1]``.
        regions: ``N x H x W`` region maps (each shown normalized to its own maximum, ``jet``).
        titles: one title per region map.
        masks: ``N x H x W`` bool masks whose outline (white contour) is drawn; ``None`` or an empty mask: none.
        heading: the first panel's title.
        panel_size: pixels per panel (the figure is ``(N + 1) * panel_size`` wide, ``1.25 * panel_size`` high).
        dpi: resolution of the rendering.
        alpha: opacity of the heat map.

    Returns:
        ``H' x W' x 3`` uint8 array.
    """
    from matplotlib.figure import Figure

    n = regions.shape[0]
    fig = Figure(figsize=((n + 1) * panel_size / dpi, 1.25 * panel_size / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    img = np.clip(image, 0.0, 1.0)
    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title(heading, fontsize=6)
    for j in range(n):
        ax = axes[j + 1]
        region = regions[j].astype(np.float32)
        peak = float(region.max())
        ax.imshow(img, interpolation="nearest")
        ax.imshow(region / peak if peak > 0 else region, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        if masks is not None and masks[j].any() and not masks[j].all():
            ax.contour(masks[j].astype(np.float32), levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(titles[j], fontsize=6)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure_to_array(fig)


class ConceptRegionMaps(L.Callback):
    """Every few epochs, log the top concepts' region maps on the same validation images.

    At the end of validation (every ``every_n_epochs`` epochs, not during the sanity check), the first time it
    runs the callback picks ``num_images`` validation images, spread evenly over a map-style validation dataset
    (or the first ones of a stream) and keeps them, so every epoch shows the same images. It explains them with
    :func:`~cefam_lightning.methods.cefam.pipeline.explain_batch`: for each image the ``top_k`` concepts by score,
    each with
    its region map **at its top-1 layer** (the layer of highest relevance, SPEC §2.5), which is where a user
    expects to see it. A figure per image shows the image (titled with its id and predicted class) and one
    overlay per concept titled ``name S=score`` and the layer; where the data have masks, the concept's
    ground-truth mask is outlined in white.

    The figures go to W&B (``log_image``) and TensorBoard (``add_image``) loggers; without either (a CSVLogger,
    or no logger) they are written as PNG files under ``<out_dir>/images/<key>/epoch_XXX_i.png``. Only global
    rank zero explains and writes.

    Args:
        every_n_epochs: log every this many epochs (after epochs ``n, 2n, ...``).
        num_images: how many validation images.
        top_k: concepts per image (by score).
        out_dir: root folder of the PNG files (default ``trainer.default_root_dir``).
        k: channels deleted (relevance) and masked (contribution) at most, SPEC's ``K``.
        select_layers: the layers a concept's top-1 layer is chosen from: ``"auto"`` (not one read only through
            global average pooling), ``"all"`` or a list of names
            (:func:`~cefam_lightning.methods.cefam.relevance.selectable_layers`).
        key: the images' logging key.
        panel_size: pixels per panel of a figure.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 4,
        top_k: int = 3,
        out_dir: str | Path | None = None,
        k: int = 20,
        key: str = "val/region_maps",
        panel_size: int = 160,
        select_layers: str | Sequence[str] = "auto",
    ):
        super().__init__()
        check_positive(every_n_epochs=every_n_epochs, num_images=num_images, top_k=top_k, k=k, panel_size=panel_size)
        self.every_n_epochs, self.num_images, self.top_k, self.k = every_n_epochs, num_images, top_k, k
        self.out_dir, self.key, self.panel_size, self.select_layers = out_dir, key, panel_size, select_layers
        self._data: dict | None = None
        self.sample_ids: list[str] = []  # the fixed images, once chosen
        self.written: list[str] = []  # what log_images wrote, over all epochs

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_due(trainer, self.every_n_epochs) or not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation hooks run under inference mode; the Jacobian (torch.func) needs ordinary tensors.
            with torch.inference_mode(False), torch.no_grad():
                if self._data is None:
                    self._data = stack_items(fixed_validation_items(trainer, self.num_images))
                    self.sample_ids = self._data["id"]
                images = self._data["image"].to(pl_module.device)
                panels = method_panels(pl_module, images, self.top_k, self.k, self.select_layers)
        finally:
            pl_module.train(was_training)
        arrays, captions = self._render(pl_module, panels)
        self.written.extend(log_images(trainer, self.key, arrays, captions, out_dir=self.out_dir) or [])

    def _render(self, pl_module: L.LightningModule, panels: MethodPanels) -> tuple[list[np.ndarray], list[str]]:
        class_names = list(pl_module.hparams["class_names"])
        masks = self._data["masks"]
        arrays, captions = [], []
        for i, sample_id in enumerate(self._data["id"]):
            pred = class_names[int(panels.target[i])] if int(panels.target[i]) < len(class_names) else "?"
            heading = f"{sample_id}\npred: {pred} ({float(panels.prob[i]):.2f})"
            label = int(self._data["label"][i]) if self._data["label"] is not None else -1
            if 0 <= label < len(class_names) and label != int(panels.target[i]):
                heading += f"\ntrue: {class_names[label]}"
            img_masks = None
            if masks is not None and panels.concepts is not None:
                img_masks = masks[i][panels.concepts[i]].numpy()
            image = self._data["image"][i].permute(1, 2, 0).numpy()
            titles = panels.titles[i]
            arrays.append(render_region_maps(image, panels.regions[i], titles, img_masks, heading, self.panel_size))
            captions.append("; ".join([f"{sample_id}: predicted {pred}", *panels.captions[i]]))
        return arrays, captions


@dataclass
class MethodPanels:
    """What one method shows for a batch: per image its panels' maps, titles, and the concepts whose masks to
    outline (``None``: no concept masks apply, as for a class map)."""

    regions: np.ndarray  # (B, N, H, W)
    titles: list[list[str]]
    captions: list[list[str]]  # per image, one text per panel
    concepts: Tensor | None  # (B, N) concept indices, or None
    target: Tensor  # (B,) explained (predicted) class
    prob: Tensor  # (B,) its probability


def method_panels(
    pl_module: L.LightningModule,
    images: Tensor,
    top_k: int,
    k: int = 20,
    select_layers: str | Sequence[str] = "auto",
) -> MethodPanels:
    """The maps each method explains with, on ``images``: CE-FAM the ``top_k`` concepts' regions at their top-1
    layer; L-CAM the class map of the predicted class; SIAM the ``top_k`` attributes' maps by contribution."""
    from cefam_lightning.methods.lcam.module import LCAMModule
    from cefam_lightning.methods.siam.module import SIAMModule

    b = images.shape[0]
    if isinstance(pl_module, LCAMModule):
        out = pl_module.classifier(images)
        probs = out.logits.float().softmax(1)
        target = probs.argmax(1)
        maps = pl_module.class_maps(images, target)[:, None].cpu().numpy()
        title = f"L-CAM-{pl_module.variant.capitalize()} class map\n{pl_module.layer}"
        caption = [f"L-CAM-{pl_module.variant.capitalize()} class map (at {pl_module.layer})"]
        return MethodPanels(maps, [[title]] * b, [caption] * b, None, target.cpu(), probs.max(1).values.cpu())
    if isinstance(pl_module, SIAMModule):
        ex = pl_module.explain(images)
        n = min(top_k, ex["contributions"].shape[1])
        top = ex["contributions"].topk(n, dim=1).indices
        names = list(pl_module.hparams["attribute_names"])
        contrib = ex["contributions"].gather(1, top).cpu()
        regions = ex["maps"].gather(1, top[:, :, None, None].expand(-1, -1, *ex["maps"].shape[-2:]))
        titles = [
            [f"{names[int(a)]} c={float(c):.2f}\nattribute map" for a, c in zip(top[i].cpu(), contrib[i], strict=True)]
            for i in range(b)
        ]
        captions = [
            [f"{names[int(a)]} (contribution {float(c):.2f})" for a, c in zip(top[i].cpu(), contrib[i], strict=True)]
            for i in range(b)
        ]
        probs = ex["logits"].float().softmax(1)
        target = ex["target"]
        prob = probs.gather(1, target[:, None])[:, 0]
        return MethodPanels(regions.cpu().numpy(), titles, captions, top.cpu(), target.cpu(), prob.cpu())
    expl = explain_batch(pl_module, images, top_n=top_k, k=k, select_layers=select_layers)
    concept_names = list(pl_module.hparams["concept_names"])
    concepts, scores = expl.concepts.cpu(), expl.scores.gather(1, expl.concepts).cpu()
    titles, captions = [], []
    for i in range(b):
        names = [concept_names[int(c)] for c in concepts[i]]
        layers = [expl.layers[int(li)] for li in expl.layer_index[i].cpu()]
        shown = list(zip(names, scores[i].tolist(), layers, strict=True))
        titles.append([f"{n} S={s:.2f}\n{layer}" for n, s, layer in shown])
        captions.append([f"{n} (S={s:.2f} at {layer})" for n, s, layer in shown])
    regions = expl.regions.cpu().numpy()
    return MethodPanels(regions, titles, captions, concepts, expl.target.cpu(), expl.class_prob.cpu())
