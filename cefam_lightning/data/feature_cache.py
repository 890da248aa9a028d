"""A memory-mapped cache of the frozen classifier's pooled activations, so later epochs skip the classifier.

CE-FAM's translator reads only ``z``, the globally pooled activations (docs/method.md#translator), and the
classifier is frozen. Without augmentation ``z`` of a sample is the same every epoch, so it is computed once: during
the first epoch the module writes each sample's ``z`` to the cache, and from then on the dataset serves the cached
``z`` instead of decoding the image, and the module never runs the classifier for it.

On disk, one folder per identity (``<root>/<key>/``)::

    meta.json      the identity the key was hashed from (classifier, weights digest, layers, input transform,
                   data source, sample ids), written last when the folder is created
    pooled.npy     float32 (num_samples, dim(z)), row i is sample ids[i]
    crc32.npy      uint32 (num_samples,), the CRC-32 of row i's bytes, written with the row
    filled.npy     bool (num_samples,), True once row i and its CRC hold its sample's z

The key covers everything ``z`` depends on, so changing the classifier, its weights, the layers, the transform
or the data (for image sources: absolute paths, sizes and mtimes of the files, see
:func:`~cefam_lightning.data.image_sources.files_fingerprint`) picks a new folder (an old one is never read
for a new setup). A row's flag is set only after its values and CRC are written, so an interrupted epoch leaves
unflagged rows that are simply computed again.

A folder is checked before it is reused (:meth:`PooledFeatureCache.check`, on the process that creates it, before
the others open it): the files' ``.npy`` headers and sizes (a truncated file is never opened writable: numpy's
``r+`` memory map would silently pad it with zeros) and the CRC of every filled row, one sequential read of the
filled part of ``pooled.npy`` at about 3 GB/s of CRC (about what one cached epoch reads, once per run). A damaged
folder is discarded with one warning naming it and what was wrong, and built again; it is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from cefam_lightning.errors import CefamError, one_line
from cefam_lightning.io_utils import atomic_dir, stable_hash

log = logging.getLogger(__name__)

POOLED_KEY = "pooled"  # a batch's cached z, (b, dim(z)), for the rows listed under POOLED_INDEX
POOLED_INDEX = "pooled_index"
IMAGE_INDEX = "image_index"  # positions of the batch's samples that carry an image instead
CHECK_BYTES = 64 << 20  # pooled.npy is checked in blocks of about this many bytes (bounded memory)


class FeatureCacheError(CefamError):
    """A cache folder on disk is inconsistent with what it should hold."""


def state_dict_digest(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def pooled_identity(classifier: torch.nn.Module, transform: Any, **extra: Any) -> dict[str, Any]:
    """What a sample's pooled activations depend on besides the image: the classifier's identity and weights
    (a digest of its state, so a retrained classifier with the same file name is a new cache), its layers, and
    ``transform`` (any JSON-serializable description of how images reach it, e.g. an ``InputSpec`` dict)."""
    spec = dict(getattr(classifier, "spec", {"name": getattr(classifier, "name", type(classifier).__name__)}))
    spec.pop("weights", None)  # a path says nothing about the bytes; the digest does
    input_spec = getattr(classifier, "input_spec", None)
    return {
        "classifier": spec,
        "weights_digest": state_dict_digest(classifier),
        "layers": list(getattr(classifier, "layers", [])),
        "input_spec": input_spec.to_dict() if hasattr(input_spec, "to_dict") else None,
        "transform": transform,
        **extra,
    }


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data_offset)`` of an ``.npy`` file, from its header alone (no mapping)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        return tuple(shape), dtype, bool(fortran), f.tell()


def row_checksums(values: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (``values`` 2-D and C-contiguous), as uint32."""
    values = np.ascontiguousarray(values)
    return np.fromiter((zlib.crc32(v) for v in values), dtype=np.uint32, count=len(values))


class PooledFeatureCache:
    """Cached pooled activations ``z`` of a fixed, ordered set of sample ids.

    Args:
        root: parent folder; the cache lives in ``root/<key>``.
        ids: the sample ids, in the order of the rows.
        dim: ``dim(z)``.
        identity: everything ``z`` depends on besides the image (JSON-serializable); hashed into the key.

    The arrays are memory-mapped on first use in each process (a pickled cache, e.g. in a DataLoader worker,
    maps the files again rather than carrying a copy), so all processes of a node share one set of files. Under
    DDP one process per node creates the folder (checking, and if need be discarding, an existing one) and the
    others open it after a barrier (:meth:`open_or_create`).
    """

    def __init__(self, root: str | os.PathLike, ids: Sequence[str], dim: int, identity: dict[str, Any]):
        self.ids = [str(i) for i in ids]
        if len(set(self.ids)) != len(self.ids):
            raise FeatureCacheError("sample ids of a feature cache must be unique")
        self.dim = int(dim)
        self.identity = {
            **identity,
            "dim": self.dim,
            "num_samples": len(self.ids),
            "ids_digest": hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:32],
        }
        self.key = stable_hash(self.identity)
        self.path = Path(root).expanduser() / self.key
        self._row = {s: i for i, s in enumerate(self.ids)}
        self._pooled: np.ndarray | None = None
        self._crc: np.ndarray | None = None
        self._filled: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pooled": None, "_crc": None, "_filled": None}

    # ------------------------------------------------------------------ files
    def _layouts(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Each array file's dtype and shape."""
        n = len(self.ids)
        return {
            "pooled.npy": (np.dtype(np.float32), (n, self.dim)),
            "crc32.npy": (np.dtype(np.uint32), (n,)),
            "filled.npy": (np.dtype(bool), (n,)),
        }

    def _read_meta(self) -> None:
        """Check that meta.json exists and hashes to the folder name."""
        meta = self.path / "meta.json"
        if not meta.is_file():
            raise FeatureCacheError(f"{self.path}: no feature cache here (missing meta.json)")
        try:
            stored = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeatureCacheError(f"{meta}: not valid JSON ({e})") from e
        if stable_hash(stored) != self.key:
            raise FeatureCacheError(f"{meta}: the identity stored there does not hash to the folder name {self.key}")

    def _map(self, name: str, mode: str) -> np.memmap:
        """Memory-map one array file after checking its header and size.

        The size is checked before mapping because ``np.memmap`` (and ``np.load``) in mode ``r+`` extends a short
        file with zeros: a truncated cache would come back whole, its lost rows zeros still flagged as filled.
        """
        dtype, shape = self._layouts()[name]
        path = self.path / name
        try:
            found_shape, found_dtype, fortran, offset = _npy_layout(path)
            size = path.stat().st_size
        except FileNotFoundError:
            raise FeatureCacheError(f"{path}: missing") from None
        except (OSError, ValueError, EOFError, SyntaxError) as e:
            raise FeatureCacheError(f"{path}: unreadable .npy header ({one_line(e, 200)})") from e
        if found_shape != shape or found_dtype != dtype or fortran:
            raise FeatureCacheError(
                f"{path}: holds {found_dtype} of shape {found_shape}{' (Fortran order)' if fortran else ''}, "
                f"expected {dtype} of shape {shape}"
            )
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if size != expected:
            raise FeatureCacheError(f"{path}: {size} bytes, expected {expected} (truncated or appended to)")
        return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)

    def check(self) -> str | None:
        """What is wrong with the cache folder on disk, or ``None`` when it can be reused.

        Checks meta.json, each array's header and file size, that the flags are 0 or 1, and the CRC-32 of every
        filled row (read-only maps; one sequential read of the filled rows, in blocks of about ``CHECK_BYTES``).
        """
        try:
            self._read_meta()
            pooled, crc, filled = (self._map(name, "r") for name in ("pooled.npy", "crc32.npy", "filled.npy"))
            flags = np.asarray(filled).view(np.uint8)
            if flags.size and flags.max() > 1:
                return f"{self.path / 'filled.npy'}: flags other than 0 and 1"
            rows = np.flatnonzero(flags)
            block = max(1, CHECK_BYTES // max(1, self.dim * 4))
            bad: list[np.ndarray] = []
            for start in range(0, len(rows), block):
                sel = rows[start : start + block]
                bad.append(sel[row_checksums(np.asarray(pooled[sel])) != np.asarray(crc[sel])])
            del pooled, crc, filled
        except FeatureCacheError as e:
            return str(e)
        except OSError as e:
            return f"{e.filename or self.path}: {e.strerror or e}"
        bad_rows = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
        if len(bad_rows):
            first = int(bad_rows[0])
            return (
                f"{self.path / 'pooled.npy'}: {len(bad_rows)} of {len(rows)} filled rows do not match their CRC-32 "
                f"in crc32.npy (first: row {first}, sample {self.ids[first]!r})"
            )
        return None

    def create(self) -> None:
        """Create the (empty) cache folder atomically; an existing folder is kept if :meth:`check` finds it sound.

        A damaged folder is discarded with one warning line (the folder and what is wrong) and created again empty,
        so its rows are computed again rather than served.
        """
        if self.path.exists():
            problem = self.check()
            if problem is None:
                return
            log.warning(f"feature cache {self.path} is damaged, discarded and built again: {one_line(problem)}")
            self._pooled = self._crc = self._filled = None
        n = len(self.ids)
        with atomic_dir(self.path) as tmp:  # replaces a damaged folder only once the new one is complete
            np.lib.format.open_memmap(tmp / "pooled.npy", mode="w+", dtype=np.float32, shape=(n, self.dim))
            np.save(tmp / "crc32.npy", np.zeros(n, dtype=np.uint32))
            np.save(tmp / "filled.npy", np.zeros(n, dtype=bool))
            (tmp / "meta.json").write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")

    def open(self) -> PooledFeatureCache:
        """Memory-map an existing cache folder read-write; it must match this cache's identity and sizes.

        Raises:
            FeatureCacheError: naming the file at fault (missing, not this identity, wrong header or size). The
                row checksums are not read here (:meth:`check` does, on the creating process).
        """
        self._read_meta()
        self._pooled, self._crc, self._filled = (
            self._map(name, "r+") for name in ("pooled.npy", "crc32.npy", "filled.npy")
        )
        return self

    @property
    def pooled(self) -> np.ndarray:
        if self._pooled is None:
            self.open()
        return self._pooled

    @property
    def crc(self) -> np.ndarray:
        if self._crc is None:
            self.open()
        return self._crc

    @property
    def filled(self) -> np.ndarray:
        if self._filled is None:
            self.open()
        return self._filled

    def open_or_create(self, barrier=None, creator: bool = True) -> PooledFeatureCache:
        """Create (if ``creator``; an existing folder is checked and, if damaged, rebuilt), wait at ``barrier``
        (a callable, e.g. the strategy's), then open."""
        if creator:
            self.create()
        if barrier is not None:
            barrier()
        return self.open()

    def flush(self) -> None:
        """Write memory-mapped changes to disk (values and checksums before flags)."""
        if self._pooled is not None:
            self._pooled.flush()
            self._crc.flush()
            self._filled.flush()

    # ------------------------------------------------------------------ rows
    def rows(self, ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self._row[str(s)] for s in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise FeatureCacheError(f"sample id {e.args[0]!r} is not among the {len(self.ids)} cached ids") from None

    def is_filled(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.filled[rows], dtype=bool)

    @property
    def num_filled(self) -> int:
        return int(np.count_nonzero(self.filled))

    def read(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(self.pooled[rows], dtype=np.float32))

    def write(self, rows: np.ndarray, z: Tensor) -> None:
        """Store ``z`` (``(len(rows), dim)``) and its row checksums for ``rows``, then flag them (flags last)."""
        values = np.ascontiguousarray(z.detach().to("cpu", torch.float32).numpy())
        if values.shape != (len(rows), self.dim):
            raise FeatureCacheError(f"expected z of shape ({len(rows)}, {self.dim}), got {values.shape}")
        self.pooled[rows] = values
        self.crc[rows] = row_checksums(values)
        self.filled[rows] = True


class CachedFeatureDataset(Dataset):
    """Serve a sample's cached ``z`` instead of its image once the cache holds it.

    ``dataset[i]`` is a dict with ``id``; ``item_without_image(i)`` of the wrapped dataset returns the same dict
    without decoding the image (label, id, embedding, ...). Items from the cache carry ``pooled`` instead of
    ``image``; :func:`collate_cached` batches a mix of both.
    """

    def __init__(self, dataset: Dataset, cache: PooledFeatureCache, ids: Sequence[str]):
        if not hasattr(dataset, "item_without_image"):
            raise TypeError(f"{type(dataset).__name__} has no item_without_image(i); it cannot serve cached features")
        self.dataset, self.cache = dataset, cache
        self.rows = cache.rows(ids)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if self.cache.filled[row]:
            item = self.dataset.item_without_image(i)
            item[POOLED_KEY] = torch.from_numpy(np.array(self.cache.pooled[row], dtype=np.float32))
            return item
        return self.dataset[i]


def collate_cached(items: list[dict]) -> dict:
    """Collate items of which some carry ``image`` and some ``pooled``.

    Keys every item has are collated as usual; ``image`` and ``pooled`` are stacked over the items that have
    them, with their positions in the batch under ``image_index`` and ``pooled_index``.
    """
    with_image = [i for i, it in enumerate(items) if "image" in it]
    cached = [i for i, it in enumerate(items) if POOLED_KEY in it]
    if len(cached) == 0:
        return default_collate(items)
    common = set(items[0]).intersection(*items[1:]) - {"image", POOLED_KEY}
    batch = default_collate([{k: it[k] for k in common} for it in items])
    batch[POOLED_KEY] = torch.stack([items[i][POOLED_KEY] for i in cached])
    batch[POOLED_INDEX] = torch.tensor(cached, dtype=torch.long)
    if with_image:
        batch["image"] = torch.stack([items[i]["image"] for i in with_image])
        batch[IMAGE_INDEX] = torch.tensor(with_image, dtype=torch.long)
    return batch


def items_with_images(batch: dict) -> list[dict]:
    """A collated batch (plain, or :func:`collate_cached`'s mix) back into items: one dict per row that carries an
    image, with that row's value of every per-sample key (the cached ``pooled`` features left out). Rows served
    from the cache without their image are not among them."""
    if "image" not in batch:
        return []
    size = len(batch["id"]) if "id" in batch else batch["image"].shape[0]  # the whole batch, cached rows included
    rows = batch[IMAGE_INDEX].tolist() if IMAGE_INDEX in batch else list(range(batch["image"].shape[0]))
    items = []
    for j, row in enumerate(rows):
        item = {"image": batch["image"][j]}
        for k, v in batch.items():
            if k in ("image", IMAGE_INDEX, POOLED_KEY, POOLED_INDEX):
                continue
            if (isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == size) or (
                isinstance(v, (list, tuple)) and len(v) == size
            ):
                item[k] = v[row]
        items.append(item)
    return items
