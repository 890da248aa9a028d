"""Precompute a VLM's embeddings: images -> image embeddings, a concept file -> text embeddings, in one store.

Usage::

    python precompute.py --images SRC [SRC ...] --concepts FILE --model NAME --pretrained TAG|PATH --out STORE
                         [--float16] [--batch-size 64] [--chunk-size 1024] [--device auto] [--num-workers 0]
                         [--templates FILE] [--template TYPE=TEMPLATE ...] [--default-type object]
                         [--kind clip|siglip] [--cache-dir DIR] [--download] [--model-config FILE]
                         [--library open_clip|transformers]
                         [--random-init [--seed 0]] [--restart] [--overwrite] [--no-progress]

``SRC`` is an image folder (``root/<class>/<image>``), a ``.csv``/``.jsonl`` manifest or WebDataset ``.tar``
shards (see :mod:`cefam_lightning.data.image_sources`; the sample ids written are the ones the training DataModule
looks up). Without ``--images`` only the concepts are encoded (a store with 0 images: a vocabulary for
zero-shot explanation). ``FILE`` lists one concept per line, ``name,type`` (or ``name``, typed
``--default-type``); each prompt comes from its type's template (the defaults of docs/method.md#concept-scores, replaced
by ``--templates`` (a YAML/JSON mapping ``type: template``) and ``--template type=template``; ``{}`` marks the name).

The store (:class:`~cefam_lightning.data.embedding_store.EmbeddingStore`) holds raw (not normalized) image
embeddings of the VLM's own evaluation preprocessing of each image (open_clip's transform, or the image processor
of a ``--library transformers`` folder), float32 (``--float16`` halves the size), and
raw float32 text embeddings. Its ``extra`` metadata lists the sources, the preprocessing, and the images that
could not be read: ``num_skipped`` and ``skipped`` (``[{"id": ..., "error": ...}]``). Unreadable images are
skipped and counted, never silently dropped. A truncated or damaged tar shard is refused before any image is
encoded: the samples past the damage cannot even be listed, so they could not be counted.

Resumable: images are processed in the sources' fixed order in chunks of ``--chunk-size``; each finished chunk
is written atomically into ``STORE.partial/`` with a manifest of the settings that determine the result. Rerun
the same command after an interruption (Ctrl-C, a crash, a killed job) and it continues with the first
unfinished chunk; the store it writes is identical to an uninterrupted run's. A rerun with different settings
stops and says which differ (``--restart`` discards the partial work). The store appears at ``STORE`` only when
complete (written atomically), and the partial folder is removed then.

Exit status: 0 on success, 1 when images were given but none could be read, 2 for a bad argument (unknown
model, missing file, bad concept file line, a truncated shard, settings that differ from the partial run), on one
``error:`` line.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cefam_lightning.data.concepts import Concept, ConceptFileError, make_concepts, read_concept_file
from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.data.image_sources import ImageRecord, ImageSourceError, WebDataSource, open_image, open_source
from cefam_lightning.errors import CefamError, error_summary, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json, stable_hash
from cefam_lightning.models.vlm import VLMBase

log = logging.getLogger("cefam_lightning")

PARTIAL_SUFFIX = ".partial"
MANIFEST_FILE = "manifest.json"
WORK_FORMAT = 1  # bump when the chunk layout changes, so old partial folders are not reused
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PrecomputeError(CefamError):
    """A bad input to precompute (source, concept file, template, output, settings), with a message for the user."""


@dataclass
class PrecomputeResult:
    """What :func:`precompute` did: the written store, how many images it read, skipped and found done."""

    store: EmbeddingStore
    num_images: int
    num_skipped: int
    chunks_total: int
    chunks_reused: int


# ---------------------------------------------------------------------- concepts and templates


def load_concepts(
    path: str | os.PathLike, templates: dict[str, str] | None = None, default_type: str = "object"
) -> list[Concept]:
    """Concepts with prompts from a concept file (``name,type`` lines; a bare ``name`` gets ``default_type``)."""
    try:
        pairs = read_concept_file(path)
    except ConceptFileError as e:
        raise PrecomputeError(str(e)) from e
    return make_concepts([(n, t or default_type) for n, t in pairs], templates)


def check_template(template: Any, where: str) -> str:
    """``template`` if it is a string with one ``{}`` for the concept name; else :class:`PrecomputeError`."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise PrecomputeError(f"{where}: a template must be a string with one '{{}}' for the name, got {template!r}")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise PrecomputeError(f"{where}: bad template {template!r} ({e}); use '{{}}' for the name only") from e
    return template


def read_templates(path: str | os.PathLike) -> dict[str, str]:
    """A YAML (``.yaml``/``.yml``) or JSON file mapping concept type to prompt template, checked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PrecomputeError(f"template file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise PrecomputeError(f"{path}: cannot read the template file ({one_line(e)})") from e
    if not isinstance(data, dict) or not data:
        raise PrecomputeError(f"{path}: expected a mapping of concept type to template, e.g. 'color: a {{}} thing'")
    return {str(k): check_template(v, f"{path}: type {k!r}") for k, v in data.items()}


def parse_template_flags(flags: Sequence[str]) -> dict[str, str]:
    """``["color=a {} thing", ...]`` -> ``{"color": "a {} thing"}``."""
    out = {}
    for flag in flags:
        ctype, sep, template = flag.partition("=")
        if not sep or not ctype.strip():
            raise PrecomputeError(f"--template {flag!r}: expected TYPE=TEMPLATE, e.g. 'color=a photo of a {{}} thing'")
        out[ctype.strip()] = check_template(template, f"--template {flag!r}")
    return out


# ---------------------------------------------------------------------- the work folder


def partial_path(out: str | os.PathLike) -> Path:
    """The work folder of an unfinished run writing ``out``: ``out`` with ``.partial`` appended."""
    out = Path(out)
    return out.parent / (out.name + PARTIAL_SUFFIX)


def _chunk_file(work: Path, index: int) -> Path:
    return work / f"chunk-{index:06d}.npz"


def _write_chunk(file: Path, record_ids: list[str], ids: list[str], emb: np.ndarray, skipped: list[dict]) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        record_ids=np.asarray(record_ids, dtype=str),
        ids=np.asarray(ids, dtype=str),
        embeddings=emb.astype(np.float32, copy=False),
        skipped=np.asarray([json.dumps(s, sort_keys=True) for s in skipped], dtype=str),
    )
    atomic_write_bytes(file, buf.getvalue())


def _read_chunk(file: Path, record_ids: list[str]) -> tuple[list[str], np.ndarray, list[dict]]:
    """A finished chunk; :class:`PrecomputeError` if it is unreadable or holds other images than this run's."""
    try:
        with np.load(file, allow_pickle=False) as z:
            saved = z["record_ids"].tolist()
            ids, emb = z["ids"].tolist(), np.array(z["embeddings"])
            skipped = [json.loads(s) for s in z["skipped"].tolist()]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise PrecomputeError(
            f"{file}: unreadable partial result ({error_summary(e)}); start over with --restart"
        ) from e
    if saved != record_ids:
        raise PrecomputeError(
            f"{file}: the images of this chunk differ from the ones the interrupted run read (the sources changed "
            "since); start over with --restart"
        )
    return ids, emb, skipped


def _open_work(work: Path, settings: dict[str, Any], restart: bool) -> None:
    """Create the work folder with its manifest, or check that an existing one was made with ``settings``."""
    if restart and work.exists():
        shutil.rmtree(work)
    manifest = {"format": WORK_FORMAT, "key": stable_hash(settings), "settings": settings}
    if work.exists():
        file = work / MANIFEST_FILE
        try:
            old = json.loads(file.read_text())
            old_settings, old_key = old["settings"], old["key"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrecomputeError(
                f"{work}: an unfinished run left this folder, but its {MANIFEST_FILE} is unreadable "
                f"({type(e).__name__}); start over with --restart"
            ) from e
        if old.get("format") != WORK_FORMAT or old_key != manifest["key"]:
            differ = sorted(
                k for k in set(settings) | set(old_settings) if json_norm(settings.get(k)) != old_settings.get(k)
            )
            raise PrecomputeError(
                f"{work} holds an unfinished run with different settings (differing: {', '.join(differ) or 'format'}); "
                "rerun with the original settings to resume it, or add --restart to discard it and start over"
            )
        for stale in work.glob(".*.tmp-*"):  # a chunk whose write was interrupted
            stale.unlink(missing_ok=True)
        return
    work.mkdir(parents=True)
    atomic_write_json(work / MANIFEST_FILE, manifest)


def json_norm(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare settings with a stored manifest."""
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------- images


class _ChunkImages(torch.utils.data.Dataset):
    """The records of one chunk, decoded and preprocessed; an unreadable image gives its error instead."""

    def __init__(self, records: list[ImageRecord], preprocess):
        self.records, self.preprocess = records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = open_image(self.records[i])
        except ImageSourceError as e:
            return i, None, one_line(e)
        return i, self.preprocess(image), None


def _as_list(batch):
    return batch


def _encode_chunk(
    vlm: VLMBase, records: list[ImageRecord], batch_size: int, num_workers: int, bar
) -> tuple[list[str], np.ndarray, list[dict]]:
    """Embeddings of a chunk's readable images (batches fixed by position in the chunk) and the skipped ones."""
    loader = torch.utils.data.DataLoader(
        _ChunkImages(records, vlm.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    ids: list[str] = []
    embs: list[np.ndarray] = []
    skipped: list[dict] = []
    for batch in loader:
        good = []
        for i, x, err in batch:
            if x is None:
                log.warning(f"skipped: {err}")
                skipped.append({"id": records[i].id, "error": err})
            else:
                good.append((i, x))
        if good:
            embs.append(vlm.encode_images(torch.stack([x for _, x in good])).numpy())
            ids.extend(records[i].id for i, _ in good)
        bar.update(len(batch))
    emb = np.concatenate(embs) if embs else np.zeros((0, vlm.embed_dim), dtype=np.float32)
    return ids, emb, skipped


def _records(sources: list[tuple[str, Any]]) -> Iterator[ImageRecord]:
    """Every source's records in order; a sample id seen twice raises (the store is keyed by id)."""
    seen: dict[str, int] = {}
    for k, (spec, src) in enumerate(sources):
        try:
            for rec in src:
                if rec.id in seen:
                    where = spec if seen[rec.id] == k else f"{sources[seen[rec.id]][0]} and {spec}"
                    raise PrecomputeError(
                        f"sample id {rec.id!r} occurs twice ({where}); a store needs unique ids (write one store "
                        "per source, or use manifests with an 'id' column)"
                    )
                seen[rec.id] = k
                yield rec
        except ImageSourceError as e:
            raise PrecomputeError(str(e)) from e


def _check_listed_ids(sources: list[tuple[str, Any]]) -> None:
    """Catch a sample id repeated across the sources that list their records up front, before any work."""
    listed = [(spec, src) for spec, src in sources if hasattr(src, "__len__")]
    if len(listed) > 1:
        for _ in _records(listed):
            pass


def _count(sources: list[tuple[str, Any]]) -> int | None:
    try:
        return sum(len(src) for _, src in sources)
    except TypeError:  # a streaming source (tar shards) does not know its length up front
        return None


@dataclass
class _ChunkRun:
    ids: list[str]
    embeddings: list[np.ndarray]
    skipped: list[dict]
    chunks: int
    reused: int
    images: int


def _run_chunks(
    vlm: VLMBase,
    work: Path,
    sources: list[tuple[str, Any]],
    batch_size: int,
    chunk_size: int,
    num_workers: int,
    progress: bool,
) -> _ChunkRun:
    """Walk the sources chunk by chunk: read the chunks finished before, encode and write the others."""
    from tqdm.auto import tqdm

    run = _ChunkRun([], [], [], 0, 0, 0)
    records = _records(sources)
    with tqdm(total=_count(sources), unit="img", disable=not progress, desc="precompute", dynamic_ncols=True) as bar:
        for index in itertools.count():
            chunk = list(itertools.islice(records, chunk_size))
            if not chunk:
                break
            run.chunks, run.images = index + 1, run.images + len(chunk)
            file = _chunk_file(work, index)
            rids = [r.id for r in chunk]
            if file.is_file():
                ids, emb, skip = _read_chunk(file, rids)
                run.reused += 1
                bar.update(len(chunk))
            else:
                ids, emb, skip = _encode_chunk(vlm, chunk, batch_size, num_workers, bar)
                _write_chunk(file, rids, ids, emb, skip)
            run.ids += ids
            run.embeddings.append(emb)
            run.skipped += skip
    return run


# ---------------------------------------------------------------------- precompute


def precompute(
    vlm: VLMBase,
    out: str | os.PathLike,
    concepts: Sequence[Concept],
    sources: Sequence[str | os.PathLike] = (),
    *,
    dtype: str = "float32",
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 0,
    progress: bool = False,
    restart: bool = False,
    overwrite: bool = False,
) -> PrecomputeResult:
    """Encode the images of ``sources`` and the prompts of ``concepts`` with ``vlm`` into a store at ``out``.

    Args:
        vlm: the VLM (its weights, device and preprocessing determine the embeddings).
        out: the store folder to write. It must not exist unless ``overwrite`` (or an unfinished run of the same
            settings is being resumed).
        concepts: the concepts (with prompts) whose text embeddings the store holds.
        sources: image sources (folders, manifests, tar shards); none: a store of text embeddings only.
        dtype: ``"float32"`` or ``"float16"`` storage of the image embeddings (computed in float32 either way).
        batch_size: images encoded together (part of the settings: it may change the last bits).
        chunk_size: images per resumable unit written to ``out.partial``.
        num_workers: DataLoader workers decoding images.
        progress: show a tqdm progress bar.
        restart: discard an unfinished run's work folder instead of resuming it.
        overwrite: replace an existing store at ``out``.

    Returns:
        a :class:`PrecomputeResult` with the opened store.
    """
    if dtype not in ("float32", "float16"):
        raise PrecomputeError(f"dtype must be float32 or float16, got {dtype!r}")
    check_sizes(batch_size, chunk_size, num_workers)
    if not concepts:
        raise PrecomputeError("no concepts: a store needs at least one concept")
    out = Path(out).expanduser()
    work = partial_path(out)
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"output {out} exists and is not a folder")
    if out.exists() and not overwrite and not work.exists():
        raise PrecomputeError(f"output {out} already exists; add --overwrite to replace it")

    specs = [str(Path(s).expanduser().resolve()) if Path(s).expanduser().exists() else str(s) for s in sources]
    try:
        opened = [(spec, open_source(spec, labels=False)) for spec in specs]  # embeddings need no labels
        for _, src in opened:
            if isinstance(src, WebDataSource):
                # Every shard is checked whole before any work: a truncated one is refused, since the samples
                # after the cut cannot even be listed (so not counted as skipped either), see shard_keys.
                src.keys_by_shard()
    except ImageSourceError as e:
        raise PrecomputeError(str(e)) from e

    text = vlm.encode_texts([c.prompt for c in concepts]).numpy()
    extra: dict[str, Any] = {
        "created_by": "cefam_lightning.cli.precompute",
        "sources": [{"spec": spec, "description": src.describe()} for spec, src in opened],
        "preprocessing": {vlm.library: vlm.preprocess_config, "transform": repr(vlm.preprocess)},
        "settings": {"batch_size": batch_size, "chunk_size": chunk_size, "device": vlm.device.type},
    }
    if vlm.pretrained is None:
        extra["settings"]["random_init_seed"] = vlm.seed
    if not opened:
        store = EmbeddingStore.write(
            out,
            sample_ids=[],
            image_embeddings=np.zeros((0, text.shape[1]), dtype=np.float32),
            text_embeddings=text,
            concepts=concepts,
            vlm=vlm.info,
            dtype=dtype,
            extra={**extra, "num_images": 0, "num_skipped": 0, "skipped": []},
        )
        return PrecomputeResult(store, 0, 0, 0, 0)

    _check_listed_ids(opened)
    settings = _settings(vlm, concepts, specs, batch_size, chunk_size)
    _open_work(work, settings, restart)

    try:
        run = _run_chunks(vlm, work, opened, batch_size, chunk_size, num_workers, progress)
    except BaseException:
        if not any(work.glob("chunk-*.npz")):  # nothing finished: no work folder to resume from
            shutil.rmtree(work, ignore_errors=True)
        raise
    extra_chunks = [f for f in work.glob("chunk-*.npz") if int(f.stem.split("-")[1]) >= run.chunks]
    if extra_chunks:
        raise PrecomputeError(
            f"{work} holds more chunks than the sources give now (the sources changed since the interrupted run); "
            "start over with --restart"
        )
    if run.reused:
        log.info(f"resumed: {run.reused} of {run.chunks} chunks were already done in {work}")

    emb = np.concatenate(run.embeddings) if run.embeddings else np.zeros((0, text.shape[1]), dtype=np.float32)
    if dtype == "float16" and emb.size and np.abs(emb).max() > _FLOAT16_MAX:
        raise PrecomputeError(
            f"image embeddings reach {float(np.abs(emb).max()):.3g}, beyond float16's range; rerun without --float16 "
            f"(the finished work in {work} is reused)"
        )
    store = EmbeddingStore.write(
        out,
        sample_ids=run.ids,
        image_embeddings=emb,
        text_embeddings=text,
        concepts=concepts,
        vlm=vlm.info,
        dtype=dtype,
        extra={**extra, "num_images": run.images, "num_skipped": len(run.skipped), "skipped": run.skipped},
    )
    shutil.rmtree(work, ignore_errors=True)
    return PrecomputeResult(store, run.images, len(run.skipped), run.chunks, run.reused)


def check_sizes(batch_size: int, chunk_size: int, num_workers: int) -> None:
    if batch_size < 1 or chunk_size < 1 or num_workers < 0:
        raise PrecomputeError(
            f"batch_size and chunk_size must be >= 1 and num_workers >= 0, got {batch_size}, {chunk_size}, "
            f"{num_workers}"
        )


def _settings(
    vlm: VLMBase, concepts: Sequence[Concept], specs: list[str], batch_size: int, chunk_size: int
) -> dict[str, Any]:
    """Everything that determines the image embeddings of the chunks (not the storage dtype: chunks are float32)."""
    weights = None
    if vlm.weights_file is not None and os.path.isfile(vlm.weights_file):
        st = os.stat(vlm.weights_file)
        weights = {"file": vlm.weights_file, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return json_norm(
        {
            "model": vlm.name,
            "architecture": vlm.architecture(),
            "pretrained": vlm.pretrained,
            "weights": weights,
            "seed": vlm.seed if vlm.pretrained is None else None,
            "preprocessing": vlm.preprocess_config,
            "device": vlm.device.type,
            "sources": specs,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            "concepts": [c.to_dict() for c in concepts],
        }
    )


# ---------------------------------------------------------------------- command line
