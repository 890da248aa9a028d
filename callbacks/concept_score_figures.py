"""Render, for the first test images, the image and its top concepts with their scores."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from cefam_lightning.io_utils import atomic_write_bytes


class ConceptScoreFigures(L.Callback):
    """After testing, write one PNG per image: the image, the predicted class, and the top-k concepts.

    Bars show the pre-activation concept scores ``S``, with the probability (softmax for CLIP-style, sigmoid
    for SigLIP-style VLMs) printed beside each; a concept present in the ground truth is drawn in green.

    Args:
        out_dir: folder for the PNG files.
        num_images: how many test images (taken from the first test batches).
        top_k: how many concepts per image.
        class_names: names of the classifier's classes.
        concept_names: names of the concepts, in score order.
    """

    def __init__(
        self, out_dir: str | Path, num_images: int, top_k: int, class_names: list[str], concept_names: list[str]
    ):
        super().__init__()
        self.out_dir, self.num_images, self.top_k = Path(out_dir), num_images, top_k
        self.class_names, self.concept_names = class_names, concept_names
        self._rows: list[dict] = []
        self.written: list[Path] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        need = self.num_images - len(self._rows)
        if need <= 0 or not trainer.is_global_zero:
            return
        out = pl_module(batch["image"][:need])
        for i in range(min(need, batch["image"].shape[0])):
            self._rows.append(
                {
                    "image": batch["image"][i].permute(1, 2, 0).cpu().numpy(),
                    "label": int(batch["label"][i]),
                    "pred": int(out["logits"][i].argmax()),
                    "scores": out["scores"][i].cpu(),
                    "probs": out["probs"][i].cpu(),
                    "presence": batch["presence"][i].cpu() if "presence" in batch else None,
                    "id": batch["id"][i],
                }
            )

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        for n, row in enumerate(self._rows):
            k = min(self.top_k, len(self.concept_names))
            top = row["scores"].topk(k).indices.tolist()
            fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(7.5, 3.2), gridspec_kw={"width_ratios": [1, 1.4]})
            ax_img.imshow(row["image"])
            ax_img.set_axis_off()
            ok = "correct" if row["pred"] == row["label"] else f"true: {self.class_names[row['label']]}"
            ax_img.set_title(f"{row['id']}\npredicted: {self.class_names[row['pred']]} ({ok})", fontsize=8)
            names = [self.concept_names[c] for c in top][::-1]
            scores = [float(row["scores"][c]) for c in top][::-1]
            present = [row["presence"] is not None and bool(row["presence"][c] > 0) for c in top][::-1]
            ax_bar.barh(names, scores, color=["tab:green" if p else "tab:gray" for p in present])
            for y, c in enumerate(top[::-1]):
                ax_bar.text(scores[y], y, f" p={float(row['probs'][c]):.2f}", va="center", fontsize=7)
            lo, hi = min(0.0, min(scores)), max(scores)
            ax_bar.set_xlim(lo, hi + 0.25 * (hi - lo + 1e-6))
            ax_bar.set_xlabel("concept score S (green: present in the ground truth; p: probability)", fontsize=8)
            ax_bar.set_title(f"top-{k} concepts", fontsize=9)
            fig.tight_layout()
            path = self.out_dir / f"test_{n:02d}.png"
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            atomic_write_bytes(path, buf.getbuffer())
            plt.close(fig)
            self.written.append(path)
