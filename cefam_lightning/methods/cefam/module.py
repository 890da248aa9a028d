"""The CE-FAM LightningModule: a frozen classifier plus a trainable translator to a VLM's space
(docs/method.md#ce-fam).

Loss: ``L = MSE(h(z), E_image(x)) + lambda * MSE(S, S_VLM)`` with ``z`` the concatenated globally pooled
activations of the classifier's layers, ``S`` the concept scores of the translated embedding and ``S_VLM`` those
of the VLM's own (precomputed) embedding. ``lambda = 0`` is the concept-free setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cefam_lightning.data.feature_cache import (
    IMAGE_INDEX,
    POOLED_INDEX,
    POOLED_KEY,
    PooledFeatureCache,
    state_dict_digest,
)
from cefam_lightning.errors import CefamError
from cefam_lightning.methods.base import (
    STAGES,
    EvaluationSettings,
    Evidence,
    ExplainerModule,
    ExplainSettings,
    ImageExplainer,
    RegionPanels,
    UnsupportedError,
    constructor_kwargs,
)
from cefam_lightning.methods.cefam.pipeline import BatchExplanation, ExplanationPass, explain_batch
from cefam_lightning.methods.cefam.regions import pool_activations
from cefam_lightning.methods.cefam.relevance import selectable_layers
from cefam_lightning.methods.cefam.rules import LEGACY_RULES, RULE_KEYS, resolve_rules
from cefam_lightning.methods.checkpoints import CheckpointError, read_checkpoint
from cefam_lightning.methods.optim import configure_optimization
from cefam_lightning.metrics import presence_auroc
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ConceptScorer, Translator
from cefam_lightning.models.interop import AUTHORS_CLASS, InteropError, import_authors_translator

IDENTITY_KEY = "cefam_identity"


def checked_holdout(holdout: Sequence[str], concept_names: Sequence[str]) -> list[str]:
    """Held-out concept names (docs/method.md#zero-shot-concepts) checked against the concepts, in concept order.

    Raises:
        ValueError: a name that is not a concept (naming it), a name given twice, or every concept left out
            (nothing would be left to train the concept-score term on).
    """
    names = [str(x) for x in holdout]
    concept_names = [str(x) for x in concept_names]
    unknown = [n for n in names if n not in concept_names]
    if unknown:
        raise ValueError(
            f"unknown concept {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; the store's concepts are {concept_names}"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed more than once")
    if names and len(names) == len(concept_names):
        raise ValueError(
            f"every concept of the store ({len(concept_names)}) is left out; keep at least one to train on "
            "(cefam.lambda_sim=0 trains without concepts)"
        )
    return [n for n in concept_names if n in names]


class CheckpointMismatchError(CefamError):
    """A checkpoint does not fit the classifier, layers, VLM or concept set it is loaded with."""


def identity_differences(
    saved: dict[str, Any], current: dict[str, Any], parts: Sequence[str] | None = None
) -> list[str]:
    """Human-readable differences between two :meth:`CEFAMModule.identity` dicts (``parts``: compare only these)."""
    out = []
    for part in parts or sorted(set(saved) | set(current)):
        a, b = saved.get(part) or {}, current.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{part}.{key}: checkpoint {a.get(key)!r}, this run {b.get(key)!r}")
    return out


@dataclass
class CEFAMStep:
    loss: Tensor
    batch_size: int
    loss_emb: Tensor
    loss_sim: Tensor
    embedding: Tensor  # translated embedding h(z), (B, d)
    scores: Tensor  # concept scores S, (B, C)
    logits: Tensor | None  # the frozen classifier's logits, (B, num_classes); None where z came from a cache


class CEFAMModule(ExplainerModule):
    """Train CE-FAM's translator on a frozen classifier.

    Args:
        classifier: the frozen classifier (never trained; kept in eval mode).
        translator: the MLP ``h``; its input size must equal the summed channels of ``classifier.layers``.
        scorer: concept text embeddings and the VLM's scoring constants.
        concept_names, concept_types: the concept set, in the scorer's order.
        class_names: names of the classifier's classes (for reports).
        lambda_sim: weight of the score-similarity loss (0 allowed).
        optimizer: ``{"name": "sgd"|"adam"|"adamw", "lr", "momentum", "weight_decay", "nesterov"}``.
        scheduler: ``{"name": "plateau"|"cosine"|"none", "factor", "patience", "monitor", "warmup_epochs",
            "warmup_factor"}``.
        auroc_thresholds: ``None`` for exact concept-presence AUROC, or a bin count for constant memory.
        config: the run's resolved configuration, kept in the checkpoint.
        vlm: the VLM's identity (``name``, ``pretrained``, ...: an embedding store's ``VLMInfo`` as a dict),
            recorded in checkpoints so that resuming or fine-tuning in another VLM's space is an error.
        explain: the explanation settings the run was trained with (``k``, ``fill``, ``select_layers``), the
            defaults of ``explain``, ``evaluate`` and the training callbacks for this checkpoint.
        holdout_concepts: zero-shot: names of concepts left out of training (docs/method.md#zero-shot-concepts).
            The concept-score term of the loss sees only the other ("seen") concepts, so a held-out concept's text
            embedding has no influence on the trained weights; the scorer keeps every concept's text embedding, so
            ``explain`` and ``evaluate`` score the held-out ones from their text alone. Recorded as
            ``hparams["holdout_concepts"]``; a checkpoint without it held nothing out.
        method: the registry name the checkpoint records.
    """

    summary_metrics = (
        ("classifier accuracy", "test/classifier_acc"),
        ("concept-presence AUROC", "test/concept_auroc"),
        ("cosine(predicted, VLM) embed.", "test/cosine"),
        ("test loss", "test/loss"),
    )
    explain_options = frozenset({"top_n", "concepts", "store", *RULE_KEYS, "preset"})
    evaluate_options = frozenset(
        {*RULE_KEYS, "preset", "per_layer_contributions", "data", "store", "fit_split", "max_fit_images"}
        | {"baselines", "curves"}
    )

    def __init__(
        self,
        classifier: FrozenClassifier,
        translator: Translator,
        scorer: ConceptScorer,
        concept_names: Sequence[str],
        concept_types: Sequence[str],
        class_names: Sequence[str],
        lambda_sim: float = 0.001,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        auroc_thresholds: int | None = None,
        config: dict[str, Any] | None = None,
        vlm: dict[str, Any] | None = None,
        explain: dict[str, Any] | None = None,
        holdout_concepts: Sequence[str] = (),
        method: str = "cefam",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["classifier", "translator", "scorer", "method"])
        self.record_arch(
            method,
            classifier,
            translator={
                "in_dim": translator.in_dim,
                "out_dim": translator.out_dim,
                "hidden_dims": translator.hidden_dims,
                "activation": translator.activation,
                "input_norm": translator.input_norm,
            },
            scorer={
                "kind": scorer.kind,
                "logit_scale": scorer.logit_scale,
                "logit_bias": scorer.logit_bias,
                "num_concepts": scorer.num_concepts,
                "embed_dim": int(scorer.text.shape[1]),
            },
        )
        if len(concept_names) != scorer.num_concepts or len(concept_types) != scorer.num_concepts:
            raise ValueError(
                f"{len(concept_names)} concept names / {len(concept_types)} types "
                f"for {scorer.num_concepts} text embeddings"
            )
        if translator.out_dim != scorer.text.shape[1]:
            raise ValueError(f"translator output {translator.out_dim} != VLM embedding size {scorer.text.shape[1]}")
        if lambda_sim < 0:
            raise ValueError(f"lambda_sim must be >= 0, got {lambda_sim}")
        names = [str(n) for n in concept_names]
        try:
            held = set(checked_holdout(holdout_concepts, names))
        except ValueError as e:
            raise ValueError(f"holdout_concepts: {e}") from None
        # Seen concepts (trained on) and unseen ones (held out), as scorer indices; without a holdout all are seen.
        self.register_buffer(
            "seen_index",
            torch.tensor([i for i, n in enumerate(names) if n not in held], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "unseen_index",
            torch.tensor([i for i, n in enumerate(names) if n in held], dtype=torch.long),
            persistent=False,
        )
        self.classifier, self.translator, self.scorer = classifier, translator, scorer
        n_classes = len(class_names)
        # ModuleDict keys may not be "train" (an nn.Module attribute), hence the "_" suffix.
        self.cosine = nn.ModuleDict({f"{s}_": MeanMetric() for s in STAGES})
        # Concept-presence AUROC over the seen concepts (all of them without a holdout); with a holdout, the
        # unseen ones' is logged apart ({stage}/concept_auroc_unseen): a report, never a training signal.
        n_seen, n_unseen = len(self.seen_index), len(self.unseen_index)
        self.auroc = nn.ModuleDict({f"{s}_": presence_auroc(n_seen, auroc_thresholds) for s in ("val", "test")})
        self.auroc_unseen = nn.ModuleDict(
            {f"{s}_": presence_auroc(n_unseen, auroc_thresholds) for s in ("val", "test")} if n_unseen else {}
        )
        self.classifier_acc = MulticlassAccuracy(n_classes, average="micro", ignore_index=-1)  # -1: unlabeled
        # {"train": cache, "val": cache}: pooled activations kept across epochs (set by the CachePooledFeatures
        # callback; not part of the checkpoint).
        self.feature_caches: dict[str, PooledFeatureCache] = {}
        self._classifier_digest: str | None = None  # the frozen classifier's never changes: hashed once

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this module must agree with to be resumed: the classifier (name, layers, a digest
        of its frozen weights), the VLM (name, pretrained tag, scoring, embedding size) and the concept set (names,
        types and a digest of their text embeddings)."""
        if self._classifier_digest is None:
            self._classifier_digest = state_dict_digest(self.classifier)
        arch = self.hparams["arch"]
        text = self.scorer.text.detach().float().cpu().contiguous()
        h = hashlib.sha256(json.dumps([list(self.hparams.concept_names), list(self.hparams.concept_types)]).encode())
        h.update(text.numpy().tobytes())
        vlm = dict(self.hparams.get("vlm") or {})
        return {
            "classifier": {
                "name": arch["classifier"].get("name"),
                "layers": list(self.classifier.layers),
                "weights_digest": self._classifier_digest,
            },
            "vlm": {
                "name": vlm.get("name"),
                "pretrained": vlm.get("pretrained"),
                "kind": self.scorer.kind,
                "embed_dim": int(self.scorer.text.shape[1]),
            },
            "concepts": {
                "count": self.scorer.num_concepts,
                "digest": h.hexdigest()[:32],
                # only with a holdout, so that checkpoints written before it was recorded still resume
                **({"holdout": self.holdout_concepts} if self.holdout_concepts else {}),
            },
        }

    @property
    def holdout_concepts(self) -> list[str]:
        """The concepts left out of training, in concept order (``[]``: none, as in checkpoints without it)."""
        names = list(self.hparams["concept_names"])
        return [str(names[i]) for i in self.unseen_index.tolist()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[IDENTITY_KEY] = self.identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``trainer.fit(ckpt_path=...)``) with another classifier, layers, VLM or concept set would load
        weights trained for something else (or fail deep in ``load_state_dict``): say what differs instead."""
        saved = checkpoint.get(IDENTITY_KEY)
        if saved is None:  # written before identities were recorded
            return
        differences = identity_differences(saved, self.identity())
        if differences:
            raise CheckpointMismatchError(
                "The checkpoint was trained with another setup than this run's: "
                + "; ".join(differences)
                + ". Resume with the checkpoint's own classifier, layers, VLM and concepts, or start a new run "
                "from it with cefam.init_from (fine-tuning)."
            )

    # ------------------------------------------------------------------ forward
    def pooled(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen classifier pass: (logits, ``z`` = concatenated globally pooled activations, ``B x dim(z)``)."""
        with torch.no_grad():
            out = self.classifier(images)
        return out.logits, pool_activations(out.activations, self.classifier.layers)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Explain-time forward: logits, embedding, concept scores and probabilities."""
        logits, z = self.pooled(images)
        emb = self.translator(z)
        scores = self.scorer(emb)
        return {"logits": logits, "embedding": emb, "scores": scores, "probs": self.scorer.probabilities(scores)}

    def concept_regions(
        self,
        images: Tensor,
        concepts: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        upsample: bool = True,
    ) -> dict[str, Tensor]:
        """Region maps of all (or the given) concepts at all (or the given) layers (docs/method.md#concept-regions).

        Returns ``{layer: (B, C', H, W)}`` at the image size when ``upsample`` else at each layer's resolution.
        """
        all_layers = self.classifier.layers
        unknown = [layer for layer in layers or () if layer not in all_layers]
        if unknown:
            raise ValueError(f"Layers {unknown} are not among the explained layers {all_layers}")
        with torch.no_grad():
            explained = ExplanationPass(self, images)  # the one pipeline: one forward pass, one Jacobian
            index = torch.arange(self.scorer.num_concepts) if concepts is None else torch.as_tensor(concepts)
            low = explained.layer_regions(index.to(explained.logits.device).long().expand(images.shape[0], -1))
        chosen = list(layers) if layers is not None else list(all_layers)
        return {layer: explained.upsample(low[layer]) if upsample else low[layer] for layer in chosen}

    def batch_pooled(self, batch: dict, stage: str | None = None) -> tuple[Tensor | None, Tensor]:
        """``(logits, z)`` of a batch, from the feature cache of ``stage`` where it holds them.

        Samples the cache already holds come with their ``z`` (``pooled``, served by
        :class:`~cefam_lightning.data.feature_cache.CachedFeatureDataset`) or are read from the cache here; the
        classifier runs only on the others, and their ``z`` is written to the cache. ``logits`` is ``None``
        unless the classifier ran on the whole batch.
        """
        cache = self.feature_caches.get(stage) if stage else None
        if cache is None and POOLED_KEY not in batch:
            return self.pooled(batch["image"])
        n = batch["embedding"].shape[0]
        if POOLED_KEY not in batch:  # a stream: images always come, but the classifier may still be skipped
            rows = cache.rows(batch["id"])
            if cache.is_filled(rows).all():
                return None, cache.read(rows).to(self.device)
            logits, z = self.pooled(batch["image"])
            cache.write(rows, z)
            return logits, z
        z = batch[POOLED_KEY].new_empty(n, batch[POOLED_KEY].shape[1])
        z[batch[POOLED_INDEX]] = batch[POOLED_KEY]
        if "image" in batch:
            index = batch[IMAGE_INDEX]
            _, z_images = self.pooled(batch["image"])
            z[index] = z_images.to(z.dtype)
            if cache is not None:
                cache.write(cache.rows([batch["id"][i] for i in index.tolist()]), z_images)
        return None, z

    def model_step(self, batch: dict, stage: str | None = None) -> CEFAMStep:
        logits, z = self.batch_pooled(batch, stage)
        emb = self.translator(z).float()
        target = batch["embedding"].float()
        loss_emb = F.mse_loss(emb, target)
        # Zero-shot (a holdout): the concept-score term reads the seen concepts' text embeddings alone, so a held-out
        # concept's never enters the loss's graph; every concept's scores are still reported, without a gradient.
        held_out = len(self.unseen_index) > 0
        scores = self.scorer(emb.detach() if held_out else emb)
        if self.hparams.lambda_sim > 0:
            seen = self.seen_index if held_out else None
            trained = self.scorer(emb, seen) if held_out else scores
            loss_sim = F.mse_loss(trained, self.scorer(target, seen))
        else:
            loss_sim = emb.new_zeros(())
        loss = loss_emb + self.hparams.lambda_sim * loss_sim
        return CEFAMStep(loss, int(target.shape[0]), loss_emb, loss_sim, emb, scores, logits)

    # ------------------------------------------------------------------ steps
    def log_step(self, out: CEFAMStep, batch: dict, stage: str) -> None:
        bs = out.batch_size
        self.log(f"{stage}/loss_emb", out.loss_emb, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/loss_sim", out.loss_sim, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.cosine[f"{stage}_"](F.cosine_similarity(out.embedding, batch["embedding"].float(), dim=-1))
        self.log(f"{stage}/cosine", self.cosine[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=stage != "train")
        if stage != "train" and "presence" in batch:
            presence = batch["presence"].long()
            if len(self.unseen_index):
                seen, unseen = self.seen_index, self.unseen_index
                self.auroc_unseen[f"{stage}_"](out.scores[:, unseen], presence[:, unseen])
                metric = self.auroc_unseen[f"{stage}_"]
                self.log(f"{stage}/concept_auroc_unseen", metric, on_step=False, on_epoch=True)
                self.auroc[f"{stage}_"](out.scores[:, seen], presence[:, seen])
            else:
                self.auroc[f"{stage}_"](out.scores, presence)
            self.log(f"{stage}/concept_auroc", self.auroc[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=True)
        if stage == "test":
            if out.logits is None:
                raise RuntimeError("the test stage needs the classifier's logits; do not serve it from a feature cache")
            self.classifier_acc(out.logits, batch["label"])
            self.log("test/classifier_acc", self.classifier_acc, on_step=False, on_epoch=True)

    def validation_metrics(self) -> list[Any]:
        return [self.cosine["val_"], self.auroc["val_"], *([self.auroc_unseen["val_"]] if self.auroc_unseen else [])]

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        rank_zero_info(f"CE-FAM: {sum(p.numel() for p in params):,} trainable parameters (classifier frozen)")
        ocfg = self.hparams.optimizer or {"name": "sgd", "lr": 0.1}
        return configure_optimization(params, ocfg, self.hparams.scheduler, getattr(self._trainer, "max_epochs", None))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_arch(cls, arch: dict[str, Any], classifier: FrozenClassifier, hparams: dict[str, Any]) -> CEFAMModule:
        translator = Translator(**arch["translator"])
        s = arch["scorer"]
        scorer = ConceptScorer(
            torch.zeros(s["num_concepts"], s["embed_dim"]), s["kind"], s["logit_scale"], s["logit_bias"]
        )
        return cls(classifier, translator, scorer, **constructor_kwargs(cls, hparams))

    # ------------------------------------------------------------------ explaining
    def explain_defaults(self) -> dict[str, Any]:
        """The explanation rules of the run that trained this module (:mod:`~cefam_lightning.methods.cefam.rules`).

        Recorded as ``hyper_parameters["explain"]``; a checkpoint written before that takes ``k``, ``fill`` and
        ``select_layers`` from its run's ``evaluation`` config section, where they were kept then, and a rule it
        does not record is what the code computed then (``LEGACY_RULES``).
        """
        recorded = self.hparams.get("explain") or {}
        legacy = ((self.hparams.get("config") or {}).get("evaluation") or {}) if not recorded else {}
        return {**LEGACY_RULES, **{k: legacy[k] for k in LEGACY_RULES if k in legacy}, **recorded}

    def explain_rules(self, preset: str | None = None, **given: Any) -> dict[str, Any]:
        """The rules in effect: the run's (:meth:`explain_defaults`), then ``preset``'s, then the ``given`` ones that
        are not ``None``, checked against this classifier's layers (``ValueError`` names the one at fault)."""
        return resolve_rules(self.explain_defaults(), given, preset, layers=list(self.classifier.layers))

    def selectable(self, select_layers: str | Sequence[str] | None = None) -> list[str]:
        """The layers a concept's layer is chosen from: ``select_layers`` (``None``: the run's), resolved against
        the classifier once per setting (``auto`` probes which layers are read only through global pooling).

        Raises:
            ValueError: a setting that names no explained layer, naming the setting.
        """
        setting = self.explain_defaults()["select_layers"] if select_layers is None else select_layers
        key = setting if isinstance(setting, str) else tuple(setting)
        cache = self.__dict__.setdefault("_selectable", {})
        if key not in cache:
            try:
                cache[key] = selectable_layers(self.classifier, setting)
            except ValueError as e:
                raise ValueError(f"select_layers: {e}") from None
        return list(cache[key])

    def explain(
        self,
        images: Tensor,
        target: Tensor | None = None,
        *,
        concepts: Tensor | None = None,
        top_n: int = 8,
        scorer: ConceptScorer | None = None,
        contributions: bool = True,
        preset: str | None = None,
        **rules: Any,
    ) -> BatchExplanation:
        """CE-FAM's explanation of a batch (what, where, at which layer, how much): the one pipeline every use
        goes through (:func:`~cefam_lightning.methods.cefam.pipeline.explain_batch`). ``rules`` (``k=5``,
        ``gradient="full"``, ...) and ``preset`` change the run's rules (:meth:`explain_rules`); ``scorer``: another
        concept set's (``explain --concepts``)."""
        r = self.explain_rules(preset, **rules)
        return explain_batch(
            self,
            images,
            concepts=concepts,
            top_n=top_n,
            target=target,
            scorer=scorer,
            contributions=contributions,
            **{**r, "select_layers": self.selectable(r["select_layers"])},
        )

    def image_explainer(self, settings: ExplainSettings, checkpoint: str | None = None) -> ImageExplainer:
        from cefam_lightning.methods.cefam.reports import CEFAMImageExplainer

        return CEFAMImageExplainer(self, settings, checkpoint)

    @property
    def evidence_concepts(self) -> list[str]:
        return [str(c) for c in self.hparams["concept_names"]]

    def evidence(
        self,
        images: Tensor,
        target: Tensor | None = None,
        *,
        concepts: Tensor | None = None,
        top_n: int = 8,
        **options: Any,
    ) -> Evidence:
        """The ``top_n`` concepts by score (or ``concepts``), their contributions to ``target`` and their regions at
        their selected layers, by the run's rules (:meth:`explain_defaults`) or those ``options`` give (``preset``,
        ``k``, ``contribution_layer``, ...)."""
        rules = {k: v for k, v in options.items() if v is not None}
        expl = self.explain(images, target, concepts=concepts, top_n=top_n, **rules)
        return Evidence(
            logits=expl.logits,
            target=expl.target,
            concepts=expl.concepts,
            contributions=expl.contributions,
            regions=expl.regions,
        )

    def region_panels(self, images: Tensor, top_k: int) -> RegionPanels:
        """The ``top_k`` concepts by score, each region at its selected layer, titled with score and layer."""
        expl = self.explain(images, top_n=top_k, contributions=False)
        concept_names = list(self.hparams["concept_names"])
        concepts, scores = expl.concepts.cpu(), expl.scores.gather(1, expl.concepts).cpu()
        titles, captions = [], []
        for i in range(images.shape[0]):
            names = [concept_names[int(c)] for c in concepts[i]]
            layers = [expl.layers[int(li)] for li in expl.layer_index[i].cpu()]
            shown = list(zip(names, scores[i].tolist(), layers, strict=True))
            titles.append([f"{n} S={s:.2f}\n{layer}" for n, s, layer in shown])
            captions.append([f"{n} (S={s:.2f} at {layer})" for n, s, layer in shown])
        return RegionPanels(
            expl.regions.cpu().numpy(), titles, captions, concepts, expl.target.cpu(), expl.class_prob.cpu()
        )

    # ------------------------------------------------------------------ evaluating
    def evaluate_on_world(self, world: Any, split: str, settings: EvaluationSettings) -> tuple[dict[str, Any], str]:
        from cefam_lightning.methods.cefam.evaluation import evaluate_on_world, format_table

        results = evaluate_on_world(self, world, split, settings)
        return results, format_table(results)

    def evaluate_on_data(
        self, dataset: Any, settings: EvaluationSettings, store: Any = None, **options: Any
    ) -> tuple[dict[str, Any], str]:
        """Concept regions against a mask dataset's concept masks. ``store``: an embedding store (path or opened)
        with the text embeddings of concepts this checkpoint does not know; ``options``: ``fit_dataset``,
        ``max_fit_images``, ``num_workers`` (:func:`~cefam_lightning.methods.cefam.evaluation.evaluate_on_masks`).

        Raises:
            UnsupportedError: data without concept masks (a plain image source).
        """
        from cefam_lightning.methods.cefam.concept_sets import open_store
        from cefam_lightning.methods.cefam.evaluation import evaluate_on_masks, format_table

        if not dataset.concepts:
            raise UnsupportedError(
                f"{dataset.describe()['root']}: CE-FAM is evaluated against concept masks (a mask dataset: the "
                "folder format, Broden, ImageNet-S); this data has none"
            )
        opened = open_store(store, self.translator.out_dim) if store is not None else None
        results = evaluate_on_masks(self, dataset, settings, store=opened, **options)
        return results, format_table(results)

    def evaluation_headline(self, results: dict[str, Any]) -> dict[str, Any]:
        """Top-1-layer NRA, hit rate and EPG per compared method, the contribution accuracy, the image count."""
        regions = {
            method: {m: per["top1"][f"{m}/mean"] for m in ("nra", "hit_rate", "epg")}
            for method, per in results["regions"].items()
        }
        headline = {"top1_layer": regions, "contribution": results["contribution"], "images": results["images"]}
        if "zero_shot" in results:  # CE-FAM's top-1 region metrics and presence AUROC, seen vs unseen concepts
            zs = results["zero_shot"]
            headline["zero_shot"] = {
                group: {m: zs[group]["regions"]["cefam"][f"{m}/mean"] for m in ("nra", "hit_rate", "epg")}
                | {"presence_auroc": zs[group]["presence_auroc"]}
                for group in ("seen", "unseen")
            }
        return headline


@dataclass
class InitReport:
    """What :func:`init_translator_from` took from a checkpoint."""

    path: str
    loaded: list[str]
    reinitialized: list[str]  # translator tensors whose shape differs (a new classifier or new layers)

    def summary(self) -> str:
        text = f"translator initialized from {self.path}: {len(self.loaded)} tensor(s) loaded"
        if self.reinitialized:
            text += f", {len(self.reinitialized)} trained anew (their shape changed): {', '.join(self.reinitialized)}"
        return text


def init_translator_from(module: CEFAMModule, path: str | Path) -> InitReport:
    """Fine-tuning: start ``module``'s translator from a trained CE-FAM checkpoint's.

    The translator maps pooled activations into the VLM's embedding space, whatever the concepts: a new concept
    vocabulary (zero-shot, text embeddings only) keeps every tensor, and a new domain with the same classifier too.
    A new classifier or new layers change the input width, so the tensors whose shape differs (the input
    standardization and the first linear layer) start fresh and the rest is loaded. The VLM must be the same:
    another VLM's space would make the loaded weights meaningless.

    Raises:
        FileNotFoundError: no such file. CheckpointMismatchError: another VLM (name, tag or embedding size).
        ValueError: not a CE-FAM checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"cefam.init_from: checkpoint not found: {path}")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        if AUTHORS_CLASS not in str(e):
            raise CheckpointError(f"cefam.init_from: {e}") from None
        return _init_from_authors(module, path)  # their published file: read with its own allow-list
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and "hyper_parameters" not in ckpt:  # the authors' layout as a plain state dict
        return _init_from_authors(module, path)
    if "translator" not in (hp.get("arch") or {}) or "state_dict" not in ckpt:
        raise ValueError(f"cefam.init_from: {path} is not a CE-FAM checkpoint (no CE-FAM translator in it)")
    saved = ckpt.get(IDENTITY_KEY) or {
        "vlm": {"embed_dim": hp["arch"]["scorer"]["embed_dim"], "name": (hp.get("vlm") or {}).get("name")}
    }
    current = module.identity()
    saved_vlm = saved.get("vlm", {})
    keys = [k for k in ("name", "pretrained", "embed_dim") if k in saved_vlm]
    differences = identity_differences(
        {"vlm": {k: saved_vlm[k] for k in keys}}, {"vlm": {k: current["vlm"][k] for k in keys}}
    )
    if differences:
        raise CheckpointMismatchError(
            f"cefam.init_from: {path} maps into another VLM's embedding space than this run's: "
            + "; ".join(differences)
        )
    own = module.translator.state_dict()
    state = ckpt["state_dict"]
    translator = {n.removeprefix("translator."): t for n, t in state.items() if n.startswith("translator.")}
    return _load_fitting(module, {k: t for k, t in translator.items() if k in own}, path)


def _init_from_authors(module: CEFAMModule, path: Path) -> InitReport:
    """Fine-tuning from the CE-FAM authors' translator file (README: Start from the authors' weights), read
    without running anything from it; its layer widths, embedding size and scoring kind must fit this run's
    classifier and store. Their translator has no input standardization, so ``cefam.input_norm`` must be false."""
    if module.translator.input_norm:
        raise CheckpointError(
            f"cefam.init_from: {path} is the authors' translator, which reads the pooled activations as they are; "
            "set cefam.input_norm=false to start from it"
        )
    channels = {layer: c for layer, (c, _, _) in module.classifier.layer_shapes().items()}
    try:
        imported = import_authors_translator(
            path,
            channels,
            embed_dim=int(module.scorer.text.shape[1]),
            kind=module.scorer.kind,
            logit_scale=module.scorer.logit_scale,
            logit_bias=module.scorer.logit_bias,
            given="this run's classifier and store",
        )
    except InteropError as e:
        raise CheckpointError(f"cefam.init_from: {e}") from None
    return _load_fitting(module, imported.translator.state_dict(), path)


def _load_fitting(module: CEFAMModule, saved: dict[str, Tensor], path: Path) -> InitReport:
    """Load the translator tensors of ``saved`` whose name and shape fit this run's; the rest stay fresh."""
    own = module.translator.state_dict()
    state = {k: t for k, t in saved.items() if k in own and own[k].shape == t.shape}
    module.translator.load_state_dict(state, strict=False)
    return InitReport(str(path), list(state), [k for k in saved if k not in state])
