"""Overlay each method's own maps on a fixed set of validation images, every few epochs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from callbacks.logging_utils import check_positive, fixed_validation_items, is_due, log_images, stack_items
from cefam_lightning.methods.base import RegionPanels
from cefam_lightning.reporting.figures import render_region_maps


class ConceptRegionMaps(L.Callback):
    """Every few epochs, log the explainer's maps on the same validation images, whatever the method.

    At the end of validation (every ``every_n_epochs`` epochs, not during the sanity check), the first time it
    runs the callback picks ``num_images`` validation images, spread evenly over a map-style validation dataset
    (or the first ones of a stream) and keeps them, so every epoch shows the same images. The module draws what
    it explains with (:meth:`~cefam_lightning.methods.base.ExplainerModule.region_panels`): CE-FAM the ``top_k``
    concepts' regions at their selected layer (titled with score and layer, with the run's explanation settings),
    L-CAM its class map, SIAM the ``top_k`` attributes' maps by contribution. A figure per image shows the image
    (titled with its id and predicted class) and one overlay per map; where the data have masks, a concept's
    ground-truth mask is outlined in white.

    The figures go to W&B (``log_image``) and TensorBoard (``add_image``) loggers; without either (a CSVLogger,
    or no logger) they are written as PNG files under ``<out_dir>/images/<key>/epoch_XXX_i.png``. Only global
    rank zero explains and writes.

    Args:
        every_n_epochs: log every this many epochs (after epochs ``n, 2n, ...``).
        num_images: how many validation images.
        top_k: maps per image at most.
        out_dir: root folder of the PNG files (default ``trainer.default_root_dir``).
        key: the images' logging key.
        panel_size: pixels per panel of a figure.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 4,
        top_k: int = 3,
        out_dir: str | Path | None = None,
        key: str = "val/region_maps",
        panel_size: int = 160,
    ):
        super().__init__()
        check_positive(every_n_epochs=every_n_epochs, num_images=num_images, top_k=top_k, panel_size=panel_size)
        self.every_n_epochs, self.num_images, self.top_k = every_n_epochs, num_images, top_k
        self.out_dir, self.key, self.panel_size = out_dir, key, panel_size
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
                panels = pl_module.region_panels(images, self.top_k)
        finally:
            pl_module.train(was_training)
        arrays, captions = self._render(pl_module, panels)
        self.written.extend(log_images(trainer, self.key, arrays, captions, out_dir=self.out_dir) or [])

    def _render(self, pl_module: L.LightningModule, panels: RegionPanels) -> tuple[list[np.ndarray], list[str]]:
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
