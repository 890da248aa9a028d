"""Concept scores from an embedding (docs/method.md#concept-scores): ``S_c = s * cos(e, t_c) + b``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConceptScorer(nn.Module):
    """Scores embeddings against fixed concept text embeddings.

    Args:
        text_embeddings: ``(num_concepts, d)``; normalized here.
        kind: ``"clip"`` (probabilities by softmax over concepts) or ``"siglip"`` (sigmoid per concept).
        logit_scale: the VLM's ``s`` (already exponentiated).
        logit_bias: the VLM's ``b`` (SigLIP); 0 for CLIP.
    """

    def __init__(
        self, text_embeddings: Tensor, kind: str = "clip", logit_scale: float = 100.0, logit_bias: float = 0.0
    ):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"Concept scoring kind must be 'clip' or 'siglip', got {kind!r}")
        text = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text.ndim != 2:
            raise ValueError(f"text_embeddings must be (num_concepts, d), got shape {tuple(text.shape)}")
        self.register_buffer("text", F.normalize(text, dim=-1))
        self.kind, self.logit_scale, self.logit_bias = kind, float(logit_scale), float(logit_bias)

    @property
    def num_concepts(self) -> int:
        return int(self.text.shape[0])

    def forward(self, embeddings: Tensor, concepts: Tensor | None = None) -> Tensor:
        """Pre-activation scores ``(B, num_concepts)`` for embeddings ``(B, d)`` (raw; normalized here).

        ``concepts``: score only these (indices, ``(C',)``), reading no other concept's text embedding: the scores
        are ``(B, C')``. Each score depends on its own concept's text embedding alone (no normalization across
        concepts; that is :meth:`probabilities`'), so they equal those columns of the full scores.
        """
        e = F.normalize(embeddings.float(), dim=-1)
        text = self.text if concepts is None else self.text.index_select(0, concepts.to(self.text.device))
        return self.logit_scale * e @ text.T + self.logit_bias

    def jacobian(self, embeddings: Tensor) -> Tensor:
        """``dS/de``, ``(B, num_concepts, d)``, in closed form.

        With ``S_c = s * <e/|e|, t_c> + b``: ``dS_c/de = (s/|e|) * (t_c - cos(e, t_c) * e/|e|)``.
        """
        e = embeddings.float()
        norm = e.norm(dim=-1, keepdim=True)
        e_hat = e / norm
        cos = e_hat @ self.text.T  # (B, C)
        return (self.logit_scale / norm)[:, :, None] * (self.text[None] - cos[:, :, None] * e_hat[:, None, :])

    def probabilities(self, scores: Tensor) -> Tensor:
        return scores.softmax(dim=-1) if self.kind == "clip" else scores.sigmoid()
