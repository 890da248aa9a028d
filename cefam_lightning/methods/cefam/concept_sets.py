"""The concept set a CE-FAM explanation scores: the checkpoint's own, or names given by the user.

A given name in the checkpoint's set takes its text embedding; a new name needs an embedding store made with the
checkpoint's VLM (``--store``), which holds its text embedding (zero-shot concepts: the translator maps into the
VLM's space whatever the concepts are). Used by ``explain`` (``--concepts``) and by ``evaluate --data`` (a mask
dataset's concepts).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cefam_lightning.data.concepts import ConceptFileError, read_concept_file
from cefam_lightning.data.embedding_store import EmbeddingStore, EmbeddingStoreError
from cefam_lightning.errors import one_line
from cefam_lightning.reporting.explanations import ExplainError, listing

log = logging.getLogger("cefam_lightning")

CONCEPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")


@dataclass(frozen=True)
class ConceptSet:
    """The concepts an explanation scores: names, types and (normalized) text embeddings, in one order."""

    names: list[str]
    types: list[str]
    text: Tensor  # (num_concepts, embed_dim)
    source: str  # "checkpoint" (the checkpoint's own set) or "given"


def read_concepts(spec: str | os.PathLike | Sequence[str | tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Parse a concept list into ``(name, type or None)`` pairs.

    ``spec`` is a path to a concept file (one concept per line, ``name`` or ``name,type``, also tab-separated;
    blank lines and ``#`` comments ignored), a comma-separated string of names, or a sequence of names or
    ``(name, type)`` pairs. A string is read as a file when such a file exists (or it ends like one).
    """
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and (Path(spec).is_file() or spec.lower().endswith(CONCEPT_FILE_SUFFIXES))
    ):
        try:
            return read_concept_file(Path(spec))
        except ConceptFileError as e:
            raise ExplainError(str(e)) from e
    if isinstance(spec, str):
        items: list[tuple[str, str | None]] = [(name.strip(), None) for name in spec.split(",")]
    else:
        items = [(s.strip(), None) if isinstance(s, str) else (s[0].strip(), s[1]) for s in spec]
    items = [(n, t) for n, t in items if n]
    dups = sorted(n for n, count in Counter(n for n, _ in items).items() if count > 1)
    if dups:
        raise ExplainError(f"duplicate concept name(s) in the concept list: {', '.join(map(repr, dups))}")
    if not items:
        raise ExplainError(f"no concept names in {spec!r}")
    return items


def open_store(path: str | os.PathLike | EmbeddingStore, embed_dim: int) -> EmbeddingStore:
    """Open (or check) an embedding store whose text embeddings must have the translator's output size."""
    if isinstance(path, EmbeddingStore):
        store = path
    else:
        try:
            store = EmbeddingStore.open(path)
        except EmbeddingStoreError as e:
            raise ExplainError(f"cannot use the embedding store: {one_line(e)}") from e
    if store.embed_dim != embed_dim:
        raise ExplainError(
            f"embedding store {store.path}: text embedding size {store.embed_dim} differs from the checkpoint's "
            f"translator output size {embed_dim}; the store must come from the VLM the checkpoint was trained for"
        )
    return store


def resolve_concepts(
    module: Any,
    requested: Sequence[tuple[str, str | None]] | None = None,
    store: EmbeddingStore | None = None,
) -> ConceptSet:
    """The concept set to explain: the checkpoint's (``requested`` is None) or the requested names.

    A requested name in the checkpoint's concept set takes its text embedding; otherwise ``store`` must hold
    it. An unknown name raises :class:`ExplainError` naming it and the available concepts. A requested type
    replaces the known one.
    """
    ck_names = [str(n) for n in module.hparams["concept_names"]]
    ck_types = [str(t) for t in module.hparams["concept_types"]]
    ck_text = module.scorer.text.detach().cpu().float()
    if requested is None:
        return ConceptSet(ck_names, ck_types, ck_text, "checkpoint")
    ck_index = {n: i for i, n in enumerate(ck_names)}
    st_index = {n: i for i, n in enumerate(store.concept_names)} if store is not None else {}
    unknown = [n for n, _ in requested if n not in ck_index and n not in st_index]
    if unknown:
        listed = ", ".join(map(repr, unknown))
        msg = f"unknown concept{'s' if len(unknown) > 1 else ''} {listed}: not in the checkpoint's concept set "
        msg += f"({listing(ck_names)})"
        if store is not None:
            msg += f" nor in the embedding store {store.path} ({listing(store.concept_names)})"
        msg += (
            ". New concepts need the VLM's text encoder or an embedding store that holds them "
            "(--store STORE_DIR, made with the checkpoint's VLM)"
        )
        raise ExplainError(msg)
    names, types, rows = [], [], []
    for name, ctype in requested:
        if name in ck_index:
            i = ck_index[name]
            known_type, row = ck_types[i], ck_text[i]
        else:
            assert store is not None
            i = st_index[name]
            known_type, row = store.concepts[i].type, torch.from_numpy(np.array(store.text_embeddings[i]))
        names.append(name)
        types.append(ctype or known_type)
        rows.append(row.float())
    if store is not None and any(n not in ck_index for n in names):
        s = module.scorer
        if (store.vlm.kind, store.vlm.logit_scale, store.vlm.logit_bias) != (s.kind, s.logit_scale, s.logit_bias):
            log.warning(
                f"warning: embedding store {store.path} was made with VLM {store.vlm.name!r} "
                f"({store.vlm.kind}, scale {store.vlm.logit_scale}, bias {store.vlm.logit_bias}); the checkpoint "
                f"scores with ({s.kind}, scale {s.logit_scale}, bias {s.logit_bias}). Check it is the same VLM."
            )
    return ConceptSet(names, types, torch.stack(rows), "given")
