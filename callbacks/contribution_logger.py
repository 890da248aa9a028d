"""Per class, the concepts that push its score up and down the most (docs/method.md#contribution), on fixed
validation images; and, at the end of training, the ``report`` command's dataset report on the whole validation
split."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from callbacks.logging_utils import (
    _root,
    _val_dataset,
    check_positive,
    fixed_validation_items,
    is_due,
    log_images,
    log_table,
    stack_items,
)
from cefam_lightning.data.report_data import ReportData, dataloader_data, world_definitions
from cefam_lightning.reporting.concept_report import ReportSettings, build_report
from cefam_lightning.reporting.figures import to_array
from cefam_lightning.reporting.report_pages import log_report, write_report

REPORT_FOLDER = "report-val"  # the final report's folder, under out_dir


def mean_contributions(
    targets: Tensor, concepts: Tensor, contributions: Tensor, num_classes: int, num_concepts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean contribution per (class, concept) over the images explained for that class.

    Args:
        targets: ``(B,)`` explained class of each image.
        concepts: ``(B, N)`` explained concepts of each image.
        contributions: ``(B, N)`` their contributions to the image's explained class.
        num_classes, num_concepts: the table's size.

    Returns:
        ``(means, counts, images)``: ``(num_classes, num_concepts)`` means (NaN where a concept was never
        explained for the class) and counts, and ``(num_classes,)`` images per class.
    """
    sums = torch.zeros(num_classes, num_concepts, dtype=torch.float64, device=contributions.device)
    counts = torch.zeros(num_classes, num_concepts, dtype=torch.long, device=contributions.device)
    rows = targets[:, None].expand_as(concepts)
    sums.index_put_((rows, concepts), contributions.double(), accumulate=True)
    counts.index_put_((rows, concepts), torch.ones_like(concepts), accumulate=True)
    return sums / counts, counts, torch.bincount(targets, minlength=num_classes)


class ContributionLogger(L.Callback):
    """Every few epochs, log per class the concepts with the largest positive and negative mean contributions.

    The first time it runs, the callback picks ``num_images`` validation images (spread evenly over a map-style
    validation dataset, or the first ones of a stream) and keeps them. At the end of validation (every
    ``every_n_epochs`` epochs, not during the sanity check) the CE-FAM module explains them
    (:meth:`~cefam_lightning.methods.cefam.module.CEFAMModule.explain`, with the run's ``k``, ``fill`` and
    ``select_layers``): the ``top_n`` concepts by score per image, each masked at its selected layer, contributing
    to the predicted class (``docs/method.md#contribution``). Contributions are averaged per
    (predicted class, concept) over the images of that class where the concept was explained. For each class the
    ``top`` concepts with the largest positive means and the ``top`` with the most negative means are logged:

    - a table with one row per class: ``class``, ``images``, ``positive_1`` .. (concept names),
      ``positive_1_mean`` .., ``negative_1`` .., ``negative_1_mean`` .. (empty cells where fewer exist), to W&B
      (``log_table``), TensorBoard (Markdown through ``add_text``), else a CSV file under
      ``<out_dir>/tables/<key>/epoch_XXX.csv``;
    - a bar chart (one panel per class, at most ``chart_classes`` classes, those with the most images) under
      ``<key>_chart``, routed like images (PNG files without an image-capable logger).

    With ``final_report``, at the end of training (``on_train_end``: the weights of the last epoch, not
    necessarily those of the best checkpoint) it also makes the ``report`` command's dataset report
    (:func:`~cefam_lightning.reporting.concept_report.build_report`, the same aggregation, with this callback's
    ``top_n``, ``top`` and ``batch_size``) on the **whole** validation split (every image, whatever
    ``limit_val_batches``; a map-style dataset is read through itself, unwrapped from a feature cache, a stream
    through one pass of its loader), writes it to ``<out_dir>/report-val/`` (``report.json``, ``report.md``,
    ``report.html``, ``figures/``) and sends its tables and figures to the run's W&B / TensorBoard loggers under
    ``<report_key>/...`` (:func:`~cefam_lightning.reporting.report_pages.log_report`). On the shapes world the
    ground-truth presence comes from the masks and the findings check each class's definition. The table's mean
    of a (class, concept) is the report's ``mean_when_explained``; the report ranks its concepts by the mean per
    image of the class instead (an image where the concept was not explained counts 0), so a concept explained
    for few of a class's images ranks lower there.

    Only global rank zero explains and writes. (Under DDP the final report is rank zero's alone: the other ranks
    go on meanwhile, and a streamed validation source gives it rank zero's share of the images only.)

    Args:
        every_n_epochs: log every this many epochs (after epochs ``n, 2n, ...``).
        num_images: how many validation images are explained.
        top_n: concepts explained per image (by score).
        top: concepts listed per class and sign.
        batch_size: images explained at once (bounds memory: the Jacobian is ``batch x concepts x dim(z)``).
        key: the table's logging key (the chart's is ``<key>_chart``).
        chart_classes: classes drawn in the bar chart at most (0: no chart).
        out_dir: root folder of the CSV/PNG files and of ``report-val/`` (default ``trainer.default_root_dir``).
        final_report: make the dataset report on the whole validation split at the end of training.
        report_key: the final report's logging key prefix.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 64,
        top_n: int = 8,
        top: int = 3,
        batch_size: int = 16,
        key: str = "val/contributions",
        chart_classes: int = 12,
        out_dir: str | Path | None = None,
        final_report: bool = False,
        report_key: str = "val/report",
    ):
        super().__init__()
        check_positive(
            every_n_epochs=every_n_epochs, num_images=num_images, top_n=top_n, top=top, batch_size=batch_size
        )
        if chart_classes < 0:
            raise ValueError(f"chart_classes must be >= 0, got {chart_classes!r}")
        self.every_n_epochs, self.num_images, self.top_n, self.top = every_n_epochs, num_images, top_n, top
        self.batch_size, self.key, self.chart_classes, self.out_dir = batch_size, key, chart_classes, out_dir
        self.final_report, self.report_key = bool(final_report), report_key
        self.report: dict | None = None  # the final report, once made
        self._images: Tensor | None = None
        self.sample_ids: list[str] = []  # the fixed images, once chosen
        self.columns: list[str] = ["class", "images"]
        for sign in ("positive", "negative"):
            self.columns += [f"{sign}_{i}{suffix}" for i in range(1, top + 1) for suffix in ("", "_mean")]
        self.last_rows: list[list] = []  # the last table logged
        self.written: list[str] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_due(trainer, self.every_n_epochs) or not trainer.is_global_zero:
            return
        class_names = list(pl_module.hparams["class_names"])
        concept_names = list(pl_module.hparams["concept_names"])
        targets, concepts, contributions = self._explain(trainer, pl_module)
        # A classifier with more outputs than named classes: the others are named by their index.
        class_names += [str(i) for i in range(len(class_names), int(targets.max()) + 1)]
        means, _, images = mean_contributions(targets, concepts, contributions, len(class_names), len(concept_names))
        self.last_rows = self._rows(means.cpu(), images.cpu(), class_names, concept_names)
        self.written.extend(log_table(trainer, self.key, self.columns, self.last_rows, out_dir=self.out_dir) or [])
        if self.chart_classes:
            chart = self._chart(self.last_rows)
            if chart is not None:
                self.written.extend(log_images(trainer, f"{self.key}_chart", [chart], out_dir=self.out_dir) or [])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_end: by then the strategy's teardown has moved the module to the CPU.
        if self.final_report and trainer.is_global_zero:
            self.make_report(trainer, pl_module)

    def report_data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ReportData:
        """The whole validation split as the report reads it."""
        dataset, loader = _val_dataset(trainer)
        world = getattr(getattr(trainer, "datamodule", None), "world", None)
        return dataloader_data(
            dataset if dataset is not None else loader,
            pl_module.class_names,
            pl_module.evidence_concepts,
            definitions=world_definitions(world) if world is not None else None,
        )

    def make_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Make the final report (see the class docstring), write and log it; returns its folder."""
        settings = ReportSettings(top_n=self.top_n, top=self.top, batch_size=self.batch_size)
        data = self.report_data(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():  # as in _explain: the Jacobian needs plain tensors
                report, pictures = build_report(pl_module, data, settings, pl_module.device, progress=False)
        finally:
            pl_module.train(was_training)
        report["global_step"] = trainer.global_step
        out = _root(trainer, self.out_dir) / REPORT_FOLDER
        figures = write_report(out, report, pictures)
        self.written.append(str(out))
        self.written.extend(log_report(trainer.loggers, report, figures, self.report_key, step=trainer.global_step))
        self.report = report
        return out

    def _explain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        was_training = pl_module.training
        pl_module.eval()
        targets, concepts, contributions = [], [], []
        try:
            # Validation hooks run under inference mode; the Jacobian (torch.func) needs ordinary tensors.
            with torch.inference_mode(False), torch.no_grad():
                if self._images is None:
                    data = stack_items(fixed_validation_items(trainer, self.num_images))
                    self._images, self.sample_ids = data["image"], data["id"]
                for start in range(0, self._images.shape[0], self.batch_size):
                    images = self._images[start : start + self.batch_size].to(pl_module.device)
                    expl = pl_module.explain(images, top_n=self.top_n)
                    targets.append(expl.target)
                    concepts.append(expl.concepts)
                    contributions.append(expl.contributions)
        finally:
            pl_module.train(was_training)
        return torch.cat(targets), torch.cat(concepts), torch.cat(contributions)

    def _rows(self, means: Tensor, images: Tensor, class_names: list[str], concept_names: list[str]) -> list[list]:
        rows = []
        for ci, name in enumerate(class_names):
            m = means[ci]
            pos = [int(c) for c in m.nan_to_num(-math.inf).argsort(descending=True, stable=True) if m[c] > 0][
                : self.top
            ]
            neg = [int(c) for c in m.nan_to_num(math.inf).argsort(stable=True) if m[c] < 0][: self.top]
            row: list = [name, int(images[ci])]
            for chosen in (pos, neg):
                for i in range(self.top):
                    if i < len(chosen):
                        row += [concept_names[chosen[i]], float(m[chosen[i]])]
                    else:
                        row += [None, None]
            rows.append(row)
        return rows

    def _chart(self, rows: list[list]) -> np.ndarray | None:
        from matplotlib.figure import Figure

        shown = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])[: self.chart_classes]
        if not shown:
            return None
        ncols = min(len(shown), 4)
        nrows = math.ceil(len(shown) / ncols)
        fig = Figure(figsize=(3.2 * ncols, 0.35 * 2 * self.top * nrows + 0.6 * nrows), dpi=100, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, row in zip(axes, shown, strict=False):
            cells = row[2:]
            pairs = [(cells[2 * i], cells[2 * i + 1]) for i in range(2 * self.top) if cells[2 * i] is not None]
            names, values = [p[0] for p in pairs], [p[1] for p in pairs]
            if values:
                ypos = np.arange(len(values))
                ax.barh(ypos, values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
                ax.set_yticks(ypos, names, fontsize=7)
                ax.invert_yaxis()
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{row[0]} ({row[1]} images)", fontsize=8)
        for ax in axes[len(shown) :]:
            ax.set_visible(False)
        fig.suptitle("mean contribution to the predicted class", fontsize=9)
        return to_array(fig)
