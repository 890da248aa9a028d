"""The on-disk store of what a VLM gives: image embeddings by sample id, concept text embeddings, metadata.

Layout of a store folder (every array is a plain ``.npy`` file, so it can be memory-mapped)::

    meta.json              format version, VLM identity (name, kind, logit scale, bias), concepts
                           (name, type, prompt), embedding size, number of samples, dtype, extra metadata
    image_embeddings.npy   float16/float32, (num_samples, embed_dim), raw (not normalized)
    sample_ids.npy         unicode strings, (num_samples,), unique; row i of image_embeddings belongs to id i
    text_embeddings.npy    float32, (num_concepts, embed_dim), one per concept in meta.json order

A store is written into a temporary folder and renamed into place, so a reader never sees a partial store,
and it is validated on open: any mismatch raises :class:`EmbeddingStoreError` naming the file at fault. NaN or
infinite embeddings are refused too (on write and on open), naming the rows: one would make every loss NaN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cefam_lightning.data.concepts import Concept
from cefam_lightning.errors import CefamError
from cefam_lightning.io_utils import atomic_dir

FORMAT_VERSION = 1
META_FILE = "meta.json"
IMAGE_FILE = "image_embeddings.npy"
IDS_FILE = "sample_ids.npy"
TEXT_FILE = "text_embeddings.npy"
VLM_KINDS = ("clip", "siglip")
_ALLOWED_DTYPES = ("float16", "float32")
# Rows read at a time by the finiteness scan: memory stays bounded however large the memory-mapped store is.
_SCAN_BYTES = 64 * 2**20
_SHOWN_ROWS = 5  # offending rows named in an error
# Files already scanned in this process, by identity (path, inode, size, mtime): opening a store again, or in a
# forked DataLoader worker (which inherits this), does not read it all again; a rewritten file is scanned anew.
_FINITE_FILES: set[tuple[str, int, int, int]] = set()


class EmbeddingStoreError(CefamError):
    """A store on disk is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class VLMInfo:
    """Identity and scoring constants of the VLM that produced a store (docs/method.md#concept-scores).

    ``kind`` is ``"clip"`` (softmax over concepts) or ``"siglip"`` (sigmoid per concept, with a bias).
    """

    name: str
    kind: str = "clip"
    logit_scale: float = 100.0
    logit_bias: float = 0.0
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in VLM_KINDS:
            raise ValueError(f"VLM kind must be one of {VLM_KINDS}, got {self.kind!r}")
        if not self.logit_scale > 0:
            raise ValueError(f"VLM logit_scale must be > 0, got {self.logit_scale}")


@dataclass
class EmbeddingStore:
    """An opened (validated, memory-mapped) embedding store. Use :meth:`open` and :meth:`write`."""

    path: Path
    image_embeddings: np.ndarray
    sample_ids: np.ndarray
    text_embeddings: np.ndarray
    concepts: list[Concept]
    vlm: VLMInfo
    extra: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.image_embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.text_embeddings.shape[1])

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def rows_for(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; raises :class:`KeyError` that counts and shows the ids that are missing."""
        if self._index is None:
            self._index = {str(s): i for i, s in enumerate(self.sample_ids.tolist())}
        rows, missing = [], []
        for s in ids:
            r = self._index.get(str(s))
            if r is None:
                missing.append(str(s))
            else:
                rows.append(r)
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(ids)} sample ids have no embedding in store {self.path} (first: {missing[:5]})"
            )
        return np.asarray(rows, dtype=np.int64)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def write(
        path: str | os.PathLike,
        *,
        sample_ids: Sequence[str],
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        concepts: Sequence[Concept],
        vlm: VLMInfo,
        dtype: str = "float32",
        extra: dict[str, Any] | None = None,
    ) -> EmbeddingStore:
        """Validate the arrays, write a store atomically to ``path`` (replacing one there) and open it."""
        if dtype not in _ALLOWED_DTYPES:
            raise EmbeddingStoreError(f"dtype must be one of {_ALLOWED_DTYPES}, got {dtype!r}")
        ids = np.asarray([str(s) for s in sample_ids])
        if ids.size == 0:
            ids = ids.astype("U1")
        img = np.asarray(image_embeddings)
        txt = np.asarray(text_embeddings, dtype=np.float32)
        if img.ndim != 2 or img.shape[0] != len(ids):
            raise EmbeddingStoreError(
                f"image_embeddings must have shape (num_samples={len(ids)}, embed_dim), got {img.shape}"
            )
        if txt.ndim != 2 or txt.shape != (len(concepts), img.shape[1]):
            raise EmbeddingStoreError(
                f"text_embeddings must have shape (num_concepts={len(concepts)}, embed_dim={img.shape[1]}), "
                f"got {txt.shape}"
            )
        if len(set(ids.tolist())) != len(ids):
            raise EmbeddingStoreError("sample_ids contain duplicates")
        _check_finite(img, f"image_embeddings for {path}", ids)
        with np.errstate(over="ignore"):  # checked below: values beyond float16's range become infinite
            stored = img.astype(dtype, copy=False)
        if stored is not img:
            _check_finite(stored, f"image_embeddings for {path} as {dtype}", ids)
        _check_finite(txt, f"text_embeddings for {path}", [c.name for c in concepts], label="concept")
        meta = {
            "format_version": FORMAT_VERSION,
            "vlm": asdict(vlm),
            "concepts": [c.to_dict() for c in concepts],
            "embed_dim": int(img.shape[1]),
            "num_samples": int(len(ids)),
            "dtype": dtype,
            "extra": extra or {},
        }
        with atomic_dir(path) as tmp:
            np.save(tmp / IMAGE_FILE, stored)
            np.save(tmp / IDS_FILE, ids)
            np.save(tmp / TEXT_FILE, txt)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return EmbeddingStore.open(path)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def open(path: str | os.PathLike, mmap: bool = True) -> EmbeddingStore:
        """Open and validate the store at ``path``; arrays are memory-mapped unless ``mmap=False``."""
        path = Path(path)
        if not path.is_dir():
            raise EmbeddingStoreError(f"{path}: not an embedding store (no such folder)")
        meta = _read_meta(path / META_FILE)
        mode = "r" if mmap else None
        img = _load_array(path / IMAGE_FILE, mode)
        ids = _load_array(path / IDS_FILE, mode)
        txt = _load_array(path / TEXT_FILE, None)

        n, d = meta["num_samples"], meta["embed_dim"]
        if img.ndim != 2 or img.shape != (n, d):
            raise EmbeddingStoreError(
                f"{path / IMAGE_FILE}: shape {img.shape}, but {META_FILE} says ({n}, {d}) (num_samples, embed_dim)"
            )
        if str(img.dtype) != meta["dtype"]:
            raise EmbeddingStoreError(f"{path / IMAGE_FILE}: dtype {img.dtype}, but {META_FILE} says {meta['dtype']}")
        if ids.shape != (n,) or ids.dtype.kind != "U":
            raise EmbeddingStoreError(
                f"{path / IDS_FILE}: expected {n} unicode ids, got shape {ids.shape} dtype {ids.dtype}"
            )
        if len(np.unique(ids)) != n:
            raise EmbeddingStoreError(f"{path / IDS_FILE}: sample ids are not unique")
        c = len(meta["concepts"])
        if txt.shape != (c, d) or txt.dtype != np.float32:
            raise EmbeddingStoreError(
                f"{path / TEXT_FILE}: shape {txt.shape} dtype {txt.dtype}, expected ({c}, {d}) float32 "
                f"({c} concepts in {META_FILE})"
            )
        _check_finite(txt, str(path / TEXT_FILE), [cd["name"] for cd in meta["concepts"]], label="concept")
        _check_finite_file(img, path / IMAGE_FILE, ids)
        concepts = [Concept(**cd) for cd in meta["concepts"]]
        return EmbeddingStore(
            path=path,
            image_embeddings=img,
            sample_ids=ids,
            text_embeddings=np.asarray(txt),
            concepts=concepts,
            vlm=VLMInfo(**meta["vlm"]),
            extra=meta.get("extra", {}),
        )


def _read_meta(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise EmbeddingStoreError(f"{file}: missing (every store has a {META_FILE})")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise EmbeddingStoreError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise EmbeddingStoreError(f"{file}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EmbeddingStoreError(
            f"{file}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    required = {"vlm": dict, "concepts": list, "embed_dim": int, "num_samples": int, "dtype": str}
    for key, typ in required.items():
        if key not in meta:
            raise EmbeddingStoreError(f"{file}: missing key {key!r}")
        if not isinstance(meta[key], typ):
            raise EmbeddingStoreError(f"{file}: key {key!r} should be {typ.__name__}, got {type(meta[key]).__name__}")
    if meta["dtype"] not in _ALLOWED_DTYPES:
        raise EmbeddingStoreError(f"{file}: dtype {meta['dtype']!r} not in {_ALLOWED_DTYPES}")
    for i, cd in enumerate(meta["concepts"]):
        if not isinstance(cd, dict) or set(cd) != {"name", "type", "prompt"}:
            raise EmbeddingStoreError(
                f"{file}: concepts[{i}] must have exactly the keys name, type, prompt; got {cd!r}"
            )
    names = [cd["name"] for cd in meta["concepts"]]
    if len(set(names)) != len(names):
        raise EmbeddingStoreError(f"{file}: concept names are not unique")
    try:
        VLMInfo(**meta["vlm"])
    except (TypeError, ValueError) as e:
        raise EmbeddingStoreError(f"{file}: bad 'vlm' entry: {e}") from e
    return meta


def non_finite_rows(array: np.ndarray, limit: int = _SHOWN_ROWS) -> tuple[int, list[int]]:
    """Rows of a 2-D array that hold a NaN or an infinite value: ``(count, the first `limit` row numbers)``.

    The array is read in slices of about 64 MiB, so a memory-mapped array is scanned without loading it whole.
    """
    n = int(array.shape[0])
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    step = max(1, _SCAN_BYTES // row_bytes)
    count, first = 0, []
    for start in range(0, n, step):
        chunk = np.asarray(array[start : start + step])
        bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + start
            count += int(rows.size)
            first.extend(rows[: max(0, limit - len(first))].tolist())
    return count, first


def _check_finite(array: np.ndarray, where: str, names: Sequence[str], label: str = "id") -> None:
    """Raise :class:`EmbeddingStoreError` naming ``where``, how many rows hold NaN or infinite values and the first
    of them with their ``names`` (sample ids or concept names)."""
    count, rows = non_finite_rows(array)
    if count:
        shown = ", ".join(f"{r} ({label} {str(names[r])!r})" for r in rows) + (", ..." if count > len(rows) else "")
        raise EmbeddingStoreError(
            f"{where}: {count} of {len(array)} rows hold NaN or infinite values (rows {shown}); training on them "
            "would make every loss NaN: recompute those embeddings"
        )


def _check_finite_file(array: np.ndarray, file: Path, names: Sequence[str]) -> None:
    """:func:`_check_finite` of an array read from ``file``, once per version of the file in this process."""
    try:
        st = file.stat()
        key: tuple[str, int, int, int] | None = (str(file.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _FINITE_FILES:
        return
    _check_finite(array, str(file), names)
    if key is not None:
        _FINITE_FILES.add(key)


def _load_array(file: Path, mmap_mode: str | None) -> np.ndarray:
    if not file.is_file():
        raise EmbeddingStoreError(f"{file}: missing")
    try:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingStoreError(f"{file}: not a readable .npy array ({e})") from e
