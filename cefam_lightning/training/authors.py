"""The authors' published translator as a CE-FAM checkpoint of this framework (README: Start from the authors'
weights).

:func:`authors_checkpoint` reads the file safely (:func:`~cefam_lightning.models.interop.read_authors_file`),
checks it against the classifier and the embedding store (layer widths, embedding size, scoring kind), and builds
the CE-FAM module a training run with the same classifier and store would build, with the authors' translator in
it and their scoring constants. :func:`write_authors_checkpoint` saves it where ``explain.py`` and ``evaluate.py``
read it as they read a trained one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.io_utils import atomic_write_bytes
from cefam_lightning.methods.cefam.method import build
from cefam_lightning.methods.cefam.module import IDENTITY_KEY, CEFAMModule
from cefam_lightning.methods.registry import BuildContext, get_method
from cefam_lightning.models.classifier import build_classifier
from cefam_lightning.models.interop import (
    ImportedTranslator,
    InteropError,
    import_authors_translator,
    read_authors_file,
)
from cefam_lightning.training.config import load_config


def authors_checkpoint(
    file: str | os.PathLike,
    classifier: str,
    store: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int = 1000,
    layers: Sequence[str] | None = None,
    image_size: int | None = None,
) -> tuple[CEFAMModule, ImportedTranslator]:
    """The CE-FAM module of the authors' translator ``file`` on ``classifier`` (with ``weights``) and ``store``.

    ``layers``: the classifier's layers the file reads (default: the classifier's default layers; a single-layer
    file reads the last of them). ``class_names``: the classifier's classes (default ``0..num_classes-1``).

    Raises:
        InteropError: the file cannot be read safely or does not fit the classifier or the store (one line).
    """
    authors = read_authors_file(file)  # first: a file that is refused stops before anything is built
    names = [str(c) for c in class_names] if class_names else [str(i) for i in range(num_classes)]
    clf = build_classifier(classifier, len(names), layers, weights, image_size=image_size)
    channels = {layer: c for layer, (c, _, _) in clf.layer_shapes().items()}
    opened = EmbeddingStore.open(store)
    given = f"classifier {classifier} and store {store}"
    imported = import_authors_translator(
        authors,
        channels,
        embed_dim=opened.embed_dim,
        kind=opened.vlm.kind,
        logit_scale=opened.vlm.logit_scale,
        logit_bias=opened.vlm.logit_bias,
        given=given,
    )
    if imported.layers != list(clf.layers):  # a single-layer file: the classifier returns that layer only
        clf = build_classifier(classifier, len(names), imported.layers, weights, image_size=image_size)
    # The file's scoring constants, not the store's: the translator was trained to reproduce those scores.
    vlm = VLMInfo(
        **{
            **opened.vlm.__dict__,
            "kind": imported.kind,
            "logit_scale": imported.logit_scale,
            "logit_bias": imported.logit_bias,
        }
    )
    opened = replace(opened, vlm=vlm)
    t = imported.translator
    cfg = load_config(
        None,
        [
            "method=cefam",
            f"cefam.hidden_dims=[{','.join(str(h) for h in t.hidden_dims)}]",
            f"cefam.activation={t.activation}",
            "cefam.input_norm=false",
        ],
    )
    # What a training run on these images would record (load_config would ask for its image sources too).
    recorded = {
        "data.source": "images",
        "data.store": str(Path(store).expanduser().resolve()),
        "data.class_names": names,
        "classifier.name": classifier,
        "classifier.layers": list(imported.layers),
        "classifier.num_classes": len(names),
        "classifier.weights": str(Path(weights).expanduser().resolve()) if weights is not None else None,
        "classifier.image_size": image_size,
    }
    OmegaConf.set_readonly(cfg, False)
    for key, value in recorded.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.set_readonly(cfg, True)
    ctx = BuildContext(cfg, clf, names, opened, clf.input_spec.crop)
    module = build(ctx, get_method("cefam"))
    module.hparams["config"].pop("world", None)  # not a shapes-world run: evaluate.py needs --data
    module.hparams["config"]["imported_from"] = str(file)
    module.translator.load_state_dict(t.state_dict())
    return module.eval(), imported


def write_authors_checkpoint(module: CEFAMModule, out: str | os.PathLike) -> Path:
    """Save ``module`` as a checkpoint ``explain.py`` / ``evaluate.py`` / ``cefam.init_from`` read (atomically)."""
    import lightning

    out = Path(out).expanduser()
    if out.is_dir():
        raise InteropError(f"--out {out} is a folder; give the checkpoint file to write (e.g. {out / 'model.ckpt'})")
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    ckpt[IDENTITY_KEY] = module.identity()
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out
