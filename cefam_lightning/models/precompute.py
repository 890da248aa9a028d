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

Many processes (docs/precompute.md): under ``torchrun``/``srun`` or with ``--devices N`` (a process group,
:mod:`cefam_lightning.distributed`), or as the independent jobs of an array (``--shard-index i --num-shards n``),
the images are split into parts, whole tar shards or ranges of the sources' order balanced by count
(:func:`~cefam_lightning.distributed.balanced_parts`), and each process does its own part. The work folder::

    STORE.partial/manifest.json            the settings (and the number of parts), the store's metadata
    STORE.partial/text_embeddings.npy      written by the process of part 0 (computed once)
    STORE.partial/part-0001-of-0004/       that part's chunk-000000.npz, ... and done.json when it is finished
    STORE.partial/part-0001-of-0004.lock   held by the process doing that part: a second one is refused

Rank 0 of a group assembles the store after a barrier; the parts of an array are assembled by
``precompute.py merge STORE.partial --out STORE`` (:func:`merge`), which refuses, naming them, parts missing,
unfinished or made with other settings. The store is the same whatever the number of parts (the embeddings to
the last bits that the batches' composition may change).

Exit status: 0 on success, 1 when images were given but none could be read, 2 for a bad argument (unknown
model, missing file, bad concept file line, a truncated shard, settings that differ from the partial run), on one
``error:`` line.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cefam_lightning.data.concepts import Concept, ConceptFileError, make_concepts, read_concept_file
from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.data.image_sources import ImageRecord, ImageSourceError, WebDataSource, open_image, open_source
from cefam_lightning.distributed import Workers, balanced_parts
from cefam_lightning.errors import CefamError, error_summary, one_line
from cefam_lightning.io_utils import atomic_write_bytes, atomic_write_json, stable_hash
from cefam_lightning.models.vlm import VLMBase

log = logging.getLogger("cefam_lightning")

PARTIAL_SUFFIX = ".partial"
MANIFEST_FILE = "manifest.json"
TEXT_FILE = "text_embeddings.npy"
DONE_FILE = "done.json"
WORK_FORMAT = 2  # bump when the chunk layout changes, so old partial folders are not reused
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PrecomputeError(CefamError):
    """A bad input to precompute (source, concept file, template, output, settings), with a message for the user."""


@dataclass
class PrecomputeResult:
    """What :func:`precompute` did: the written store, how many images it read, skipped and found done (for one part
    of a job array: that part's counts, and no store yet)."""

    store: EmbeddingStore | None
    num_images: int
    num_skipped: int
    chunks_total: int
    chunks_reused: int
    part: int = 0
    parts: int = 1


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


def part_name(index: int, parts: int) -> str:
    """The folder (and lock file stem) of part ``index`` of ``parts`` in the work folder."""
    return f"part-{index:04d}-of-{parts:04d}"


def _chunk_file(part_dir: Path, index: int) -> Path:
    return part_dir / f"chunk-{index:06d}.npz"


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


def _read_chunk(file: Path, record_ids: list[str] | None) -> tuple[list[str], np.ndarray, list[dict], int]:
    """A finished chunk: ``(ids, embeddings, skipped, images read)``; :class:`PrecomputeError` if it is unreadable or
    (``record_ids`` given) holds other images than this run's."""
    try:
        with np.load(file, allow_pickle=False) as z:
            saved = z["record_ids"].tolist()
            ids, emb = z["ids"].tolist(), np.array(z["embeddings"])
            skipped = [json.loads(s) for s in z["skipped"].tolist()]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise PrecomputeError(
            f"{file}: unreadable partial result ({error_summary(e)}); start over with --restart"
        ) from e
    if record_ids is not None and saved != record_ids:
        raise PrecomputeError(
            f"{file}: the images of this chunk differ from the ones the interrupted run read (the sources changed "
            "since); start over with --restart"
        )
    return ids, emb, skipped, len(saved)


def _read_manifest(work: Path) -> dict[str, Any]:
    file = work / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
        manifest["settings"], manifest["key"]  # noqa: B018 - both must be there
    except FileNotFoundError:
        raise PrecomputeError(f"{work}: not the work folder of a precompute run (no {MANIFEST_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrecomputeError(
            f"{work}: an unfinished run left this folder, but its {MANIFEST_FILE} is unreadable "
            f"({type(e).__name__}); start over with --restart"
        ) from e
    return manifest


def _open_work(work: Path, manifest: dict[str, Any], restart: bool) -> None:
    """Create the work folder with its manifest, or check that an existing one was made with the same settings.

    Several processes may get here at once (the ranks of a job, the jobs of an array): the folder is built under a
    temporary name and renamed into place, so exactly one creates it and the others find it complete.
    """
    if restart and work.exists():
        shutil.rmtree(work)
    if not work.exists():
        tmp = work.parent / f".{work.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        try:
            os.rename(tmp, work)  # fails when another process made it first (a non-empty folder is not replaced)
            return
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    old = _read_manifest(work)
    settings, old_settings = manifest["settings"], old["settings"]
    if old.get("format") != WORK_FORMAT or old["key"] != manifest["key"]:
        differ = sorted(
            k for k in set(settings) | set(old_settings) if json_norm(settings.get(k)) != old_settings.get(k)
        )
        raise PrecomputeError(
            f"{work} holds an unfinished run with different settings (differing: {', '.join(differ) or 'format'}); "
            "rerun with the original settings (and number of processes or shards) to resume it, or add --restart "
            "to discard it and start over"
        )


def json_norm(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare settings with a stored manifest."""
    return json.loads(json.dumps(obj, default=str))


@contextlib.contextmanager
def _locked(file: Path, what: str) -> Iterator[None]:
    """Hold the lock ``file`` for the block; another process holding it is a :class:`PrecomputeError`."""
    from filelock import FileLock, Timeout

    lock = FileLock(file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PrecomputeError(
            f"another precompute is writing {what} now (it holds {file}); two runs on one --out are refused: wait "
            "for it to end, or share the work between processes (torchrun, --devices, or --shard-index/--num-shards)"
        ) from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------- images


class DecodedImages(torch.utils.data.Dataset):
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


def image_loader(
    records: list[ImageRecord], preprocess, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """The records decoded and preprocessed in order by ``num_workers`` workers: batches of ``(index, tensor or
    None, error or None)`` (:class:`DecodedImages`)."""
    return torch.utils.data.DataLoader(
        DecodedImages(records, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
    )


def _encode_chunk(
    vlm: VLMBase, records: list[ImageRecord], batch_size: int, num_workers: int, bar
) -> tuple[list[str], np.ndarray, list[dict]]:
    """Embeddings of a chunk's readable images (batches fixed by position in the chunk) and the skipped ones."""
    loader = image_loader(records, vlm.preprocess, batch_size, num_workers)
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


# ---------------------------------------------------------------------- the sources' order and its parts


def _ordered_ids(sources: list[tuple[str, Any]]) -> list[str]:
    """Every sample id of the sources in their fixed order, listed before any image is read (tar shards from their
    headers); a sample id seen twice raises (the store is keyed by id)."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for k, (spec, src) in enumerate(sources):
        ids = [key for keys in src.keys_by_shard() for key in keys] if isinstance(src, WebDataSource) else src.ids
        for sid in ids:
            j = seen.setdefault(sid, k)
            if len(seen) == len(out):  # seen before: in another source, or earlier in this one
                where = spec if j == k else f"{sources[j][0]} and {spec}"
                raise PrecomputeError(
                    f"sample id {sid!r} occurs twice ({where}); a store needs unique ids (write one store per source, "
                    "or use manifests with an 'id' column)"
                )
            out.append(sid)
    return out


def _units(sources: list[tuple[str, Any]]) -> list[tuple[int, int, int]]:
    """The units the images are split into, in the sources' order: ``(source, item, images)``, a whole tar shard
    (``item``: the shard) where the source is sharded, else one image (``item``: its index)."""
    units = []
    for k, (_, src) in enumerate(sources):
        if isinstance(src, WebDataSource):
            units += [(k, s, len(keys)) for s, keys in enumerate(src.keys_by_shard())]
        else:
            units += [(k, i, 1) for i in range(len(src))]
    return units


def _part_records(sources: list[tuple[str, Any]], units: list[tuple[int, int, int]]) -> Iterator[ImageRecord]:
    """The records of ``units``, in order."""
    for k, item, _ in units:
        spec, src = sources[k]
        try:
            if isinstance(src, WebDataSource):
                yield from src.shard_records(item)
            else:
                yield src[item]
        except ImageSourceError as e:
            raise PrecomputeError(str(e)) from e


# ---------------------------------------------------------------------- one part


@dataclass
class _PartRun:
    chunks: int = 0
    reused: int = 0
    images: int = 0
    skipped: int = 0


def _run_part(
    vlm: VLMBase,
    part_dir: Path,
    records: Iterator[ImageRecord],
    count: int,
    batch_size: int,
    chunk_size: int,
    num_workers: int,
    progress: bool,
) -> _PartRun:
    """Walk a part's records chunk by chunk: check the chunks finished before, encode and write the others."""
    from tqdm.auto import tqdm

    part_dir.mkdir(exist_ok=True)
    for stale in part_dir.glob(".*.tmp-*"):  # a chunk whose write was interrupted (this process holds the part)
        stale.unlink(missing_ok=True)
    run = _PartRun()
    with tqdm(total=count, unit="img", disable=not progress, desc="precompute", dynamic_ncols=True) as bar:
        for index in itertools.count():
            chunk = list(itertools.islice(records, chunk_size))
            if not chunk:
                break
            run.chunks, run.images = index + 1, run.images + len(chunk)
            file = _chunk_file(part_dir, index)
            rids = [r.id for r in chunk]
            if file.is_file():
                _, _, skip, _ = _read_chunk(file, rids)
                run.reused += 1
                bar.update(len(chunk))
            else:
                ids, emb, skip = _encode_chunk(vlm, chunk, batch_size, num_workers, bar)
                _write_chunk(file, rids, ids, emb, skip)
            run.skipped += len(skip)
    extra_chunks = [f for f in part_dir.glob("chunk-*.npz") if int(f.stem.split("-")[1]) >= run.chunks]
    if extra_chunks:
        raise PrecomputeError(
            f"{part_dir} holds more chunks than the sources give now (the sources changed since the interrupted run); "
            "start over with --restart"
        )
    return run


# ---------------------------------------------------------------------- assembling the store


def merge(
    work: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, overwrite: bool = False
) -> PrecomputeResult:
    """Assemble the store at ``out`` from the finished parts in the work folder ``work`` (then removed).

    Every part must be done, made with the work folder's settings, from the same images; otherwise a
    :class:`PrecomputeError` names the parts missing or at odds. The store lists the images in the sources' order
    (part 0's, then part 1's, ...), with the skipped images of every part.

    Args:
        work: the work folder (``STORE.partial``).
        out: the store to write.
        dtype: ``float32`` or ``float16``; ``None``: the one the parts were run with (part 0's).
        overwrite: replace an existing store at ``out``.
    """
    work, out = Path(work).expanduser(), Path(out).expanduser()
    if not work.is_dir():
        raise PrecomputeError(f"{work}: no such work folder (a precompute run's STORE{PARTIAL_SUFFIX})")
    if out.exists() and not overwrite:
        raise PrecomputeError(f"output {out} already exists; add --overwrite to replace it")
    manifest = _read_manifest(work)
    if manifest.get("format") != WORK_FORMAT:
        raise PrecomputeError(f"{work}: made by another version of precompute (format {manifest.get('format')})")
    parts = int(manifest["settings"]["parts"])
    with _locked(work / "merge.lock", f"the store of {work}"):
        done, missing = [], []
        for p in range(parts):
            part_dir = work / part_name(p, parts)
            try:
                done.append(json.loads((part_dir / DONE_FILE).read_text()))
            except (OSError, ValueError):
                chunks = len(list(part_dir.glob("chunk-*.npz")))
                missing.append(f"part {p} ({f'unfinished, {chunks} chunks done' if chunks else 'not started'})")
        if missing:
            raise PrecomputeError(
                f"{work}: {len(missing)} of {parts} parts missing: {', '.join(missing)}; run each with the same "
                f"command and --shard-index P --num-shards {parts}, then merge again"
            )
        odd = [f"part {p}" for p, d in enumerate(done) if d.get("key") != manifest["key"]]
        if odd:
            raise PrecomputeError(
                f"{work}: {', '.join(odd)} made with other settings (model, weights, concepts, sources or sizes) than "
                f"{work / MANIFEST_FILE}; rerun those parts with --restart"
            )
        digests = {d["ids_digest"] for d in done}
        if len(digests) > 1:
            raise PrecomputeError(
                f"{work}: the parts were split from different images (the sources changed between the runs); rerun "
                "every part with --restart"
            )
        ids: list[str] = []
        embeddings: list[np.ndarray] = []
        skipped: list[dict] = []
        images = 0
        for p, d in enumerate(done):
            part_dir = work / part_name(p, parts)
            for c in range(d["chunks"]):
                chunk_ids, emb, skip, n = _read_chunk(_chunk_file(part_dir, c), None)
                ids += chunk_ids
                embeddings.append(emb)
                skipped += skip
                images += n
        if images != done[0]["total_images"]:
            raise PrecomputeError(
                f"{work}: the parts hold {images} images, the sources {done[0]['total_images']}; rerun every part "
                "with --restart"
            )
        text_file = work / TEXT_FILE
        if not text_file.is_file():
            raise PrecomputeError(f"{text_file}: missing (part 0's run writes the text embeddings); rerun part 0")
        text = np.load(text_file, allow_pickle=False)
        store_info = manifest["store"]
        dim = text.shape[1]
        emb = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), dtype=np.float32)
        dtype = dtype or done[0].get("dtype", "float32")
        if dtype == "float16" and emb.size and np.abs(emb).max() > _FLOAT16_MAX:
            raise PrecomputeError(
                f"image embeddings reach {float(np.abs(emb).max()):.3g}, beyond float16's range; rerun without "
                f"--float16 (the finished work in {work} is reused)"
            )
        store = EmbeddingStore.write(
            out,
            sample_ids=ids,
            image_embeddings=emb,
            text_embeddings=text,
            concepts=[Concept(**c) for c in store_info["concepts"]],
            vlm=VLMInfo(**store_info["vlm"]),
            dtype=dtype,
            extra={**store_info["extra"], "num_images": images, "num_skipped": len(skipped), "skipped": skipped},
        )
    shutil.rmtree(work, ignore_errors=True)
    return PrecomputeResult(store, images, len(skipped), sum(d["chunks"] for d in done), 0)


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
    workers: Workers | None = None,
    part: tuple[int, int] | None = None,
) -> PrecomputeResult:
    """Encode the images of ``sources`` and the prompts of ``concepts`` with ``vlm`` into a store at ``out``.

    The images are split into parts (:func:`~cefam_lightning.distributed.balanced_parts`: whole tar shards, or
    ranges of the sources' order, balanced by count); each process does its own part into ``out.partial``,
    resumably. Then the store is assembled (:func:`merge`): by rank 0 after the others are done when a process group
    runs (``workers``), by this process when it does all the work, or later by ``precompute.py merge`` when
    ``part`` makes this run one job of an array.

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
        progress: show a tqdm progress bar (rank 0's).
        restart: discard the unfinished work instead of resuming it (with ``part``: that part's only).
        overwrite: replace an existing store at ``out``.
        workers: the process group sharing the work (:func:`~cefam_lightning.distributed.launch`); ``None``: this
            process alone.
        part: ``(index, count)``: do only that part of ``count``, as one independent job of an array (no process
            group); the store is written by :func:`merge` once every part is done.

    Returns:
        a :class:`PrecomputeResult` with the opened store (``store=None`` for one part of an array).
    """
    workers = workers or Workers()
    if dtype not in ("float32", "float16"):
        raise PrecomputeError(f"dtype must be float32 or float16, got {dtype!r}")
    check_sizes(batch_size, chunk_size, num_workers)
    if part is not None and workers.distributed:
        raise PrecomputeError(
            "--shard-index/--num-shards make independent jobs; they do not combine with a process group (torchrun, "
            "srun, --devices)"
        )
    index, parts = part if part is not None else (workers.rank, workers.world_size)
    if parts < 1 or not 0 <= index < parts:
        raise PrecomputeError(f"--shard-index must be in 0..{parts - 1} with --num-shards {parts}, got {index}")
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

    extra: dict[str, Any] = {
        "created_by": "cefam_lightning.cli.precompute",
        "sources": [{"spec": spec, "description": src.describe()} for spec, src in opened],
        "preprocessing": {vlm.library: vlm.preprocess_config, "transform": repr(vlm.preprocess)},
        "settings": {"batch_size": batch_size, "chunk_size": chunk_size, "device": vlm.device.type},
    }
    if vlm.pretrained is None:
        extra["settings"]["random_init_seed"] = vlm.seed
    if not opened:
        if part is not None:
            raise PrecomputeError("--shard-index/--num-shards split images: give --images")
        if workers.is_main:
            text = vlm.encode_texts([c.prompt for c in concepts]).numpy()
            EmbeddingStore.write(
                out,
                sample_ids=[],
                image_embeddings=np.zeros((0, text.shape[1]), dtype=np.float32),
                text_embeddings=text,
                concepts=concepts,
                vlm=vlm.info,
                dtype=dtype,
                extra={**extra, "num_images": 0, "num_skipped": 0, "skipped": []},
            )
        workers.barrier()
        return PrecomputeResult(EmbeddingStore.open(out), 0, 0, 0, 0)

    ids = _ordered_ids(opened)
    units = _units(opened)
    mine = [u for u, p in zip(units, balanced_parts([w for *_, w in units], parts), strict=True) if p == index]
    settings = _settings(vlm, concepts, specs, batch_size, chunk_size, parts)
    manifest = {
        "format": WORK_FORMAT,
        "key": stable_hash(settings),
        "settings": settings,
        "store": {"vlm": asdict(vlm.info), "concepts": [c.to_dict() for c in concepts], "extra": extra},
    }
    job_array = part is not None and parts > 1
    if workers.distributed and restart and workers.is_main:
        shutil.rmtree(work, ignore_errors=True)  # the whole group starts over
    workers.barrier()
    _open_work(work, manifest, restart=restart and not job_array and not workers.distributed)
    part_dir = work / part_name(index, parts)
    with _locked(work / f"{part_name(index, parts)}.lock", f"part {index} of {parts} of {out}"):
        try:
            if job_array and restart:
                shutil.rmtree(part_dir, ignore_errors=True)
            (part_dir / DONE_FILE).unlink(missing_ok=True)
            if index == 0:  # the text embeddings are computed once, by the process that does part 0
                buf = io.BytesIO()
                np.save(buf, vlm.encode_texts([c.prompt for c in concepts]).numpy().astype(np.float32))
                atomic_write_bytes(work / TEXT_FILE, buf.getvalue())
            count = sum(w for *_, w in mine)
            records = _part_records(opened, mine)
            run = _run_part(
                vlm, part_dir, records, count, batch_size, chunk_size, num_workers, progress and workers.is_main
            )
            done = {
                "key": manifest["key"],
                "part": index,
                "parts": parts,
                "images": run.images,
                "skipped": run.skipped,
                "chunks": run.chunks,
                "total_images": len(ids),
                "ids_digest": stable_hash(ids),
                "dtype": dtype,
            }
            atomic_write_json(part_dir / DONE_FILE, done)
        except BaseException:
            if parts == 1 and not any(work.glob("*/chunk-*.npz")):  # nothing finished: no work folder to resume
                shutil.rmtree(work, ignore_errors=True)
            raise
    if run.reused:
        log.info(f"resumed: {run.reused} of {run.chunks} chunks of part {index} were already done in {work}")
    if job_array:
        return PrecomputeResult(None, run.images, run.skipped, run.chunks, run.reused, index, parts)

    # Every part of this job is done (after the barrier): rank 0 assembles the store, the others wait for it.
    workers.barrier()
    reused = sum(workers.all_gather_object(run.reused))
    result, failure = None, None
    if workers.is_main:
        try:
            result = merge(work, out, dtype, overwrite=True)
        except BaseException as e:
            failure = one_line(e) or type(e).__name__
            workers.broadcast_object(failure)
            raise
    failure = workers.broadcast_object(failure)
    if failure is not None:
        raise PrecomputeError(f"rank 0 could not assemble the store: {failure}")
    if result is None:
        store = EmbeddingStore.open(out)
        result = PrecomputeResult(store, store.extra["num_images"], store.extra["num_skipped"], 0, 0)
    result.chunks_reused = reused
    result.parts = parts
    return result


def check_sizes(batch_size: int, chunk_size: int, num_workers: int) -> None:
    if batch_size < 1 or chunk_size < 1 or num_workers < 0:
        raise PrecomputeError(
            f"batch_size and chunk_size must be >= 1 and num_workers >= 0, got {batch_size}, {chunk_size}, "
            f"{num_workers}"
        )


def _settings(
    vlm: VLMBase, concepts: Sequence[Concept], specs: list[str], batch_size: int, chunk_size: int, parts: int
) -> dict[str, Any]:
    """Everything that determines the image embeddings of the chunks (not the storage dtype: chunks are float32),
    and how the images are split into parts."""
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
            "parts": parts,
        }
    )
