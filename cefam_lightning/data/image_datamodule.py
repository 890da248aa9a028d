"""Training data from real images: a source of images joined by sample id with what the explainer reads besides
them: the VLM embeddings of a store (CE-FAM), an attribute table or a target table (SIAM;
:mod:`cefam_lightning.data.attributes`).

Batches are dicts like the shapes world's (:mod:`cefam_lightning.data.shapes_datamodule`): ``image`` (``B x 3 x crop
x crop`` in ``[0, 1]``, the classifier's own resize and center crop,
:func:`~cefam_lightning.data.transforms.image_transform`), ``label`` (``-1`` for an unlabeled image), ``id``, and as
given ``embedding`` (the VLM's raw image embedding, float32), ``attributes`` and ``target`` (float32 table rows).
Plain image data has no ``presence`` or ``masks``. Images without an embedding or without a row of a table are an
error that counts and lists them; table rows that match no image are counted in a logged line
(:attr:`ImageDataModule.unmatched`).

- A folder or a manifest is a map-style dataset: every id is checked against the store at setup, and under DDP
  Lightning's ``DistributedSampler`` splits it.
- WebDataset shards are streamed with ``webdataset``: the shard list is split by rank, then by DataLoader
  worker, and training shuffles each worker's shards and adds a shuffle buffer. Each rank x worker must get at
  least one shard: fewer shards than ranks is an error, and a rank with fewer shards than workers uses fewer
  workers (with a logged line). The shards' sample keys are read from the tar headers at setup, so missing
  embeddings (and truncated shards, :func:`~cefam_lightning.data.image_sources.shard_keys`) are found before training
  starts and every rank knows how many samples each rank streams. Every sample is seen once per epoch across
  ranks; for training, a rank whose shards hold fewer samples than another's repeats some of its own (like
  ``DistributedSampler``'s padding) so that all ranks take the same number of optimizer steps.
- The training order of every source is a function of (seed, epoch) only (:mod:`cefam_lightning.data.order`):
  different in each epoch, the same for the same seed, and a run resumed from a checkpoint sees the batches an
  uninterrupted run sees.
- A last training batch of a single image is dropped (the translator's BatchNorm cannot train on one image); with
  shuffling it is a different image each epoch. Validation and test batches keep every image.

Images that ``precompute`` could not read are listed in the store's metadata (``extra["skipped"]``, a list of
``{"id", "error"}``); they are left out of every split, with one logged line giving the count. An image that
cannot be decoded during training raises :class:`~cefam_lightning.data.image_sources.ImageSourceError` naming its id and
file or shard.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from cefam_lightning.data.attributes import IdTable, read_table
from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.data.feature_cache import CachedFeatureDataset, PooledFeatureCache, collate_cached
from cefam_lightning.data.image_sources import (
    ImageRecord,
    ImageSource,
    WebDataSource,
    iter_shard_samples,
    open_image,
    open_source,
    record_from_sample,
    shard_error,
)
from cefam_lightning.data.order import EpochStreamLoader, SharedEpoch, epoch_sampler, trainer_epoch
from cefam_lightning.data.transforms import InputSpec, image_transform
from cefam_lightning.errors import CefamError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
ATTRIBUTE_SPLITS = {"attr_train": "train", "attr_val": "val"}  # the second data set of the two-data-set setting
# The two-data-set setting's batches: {TARGET_BATCH: a batch of the target data, ATTRIBUTE_BATCH: one of the
# attribute data}, either None where that data set ran out (validation, test).
TARGET_BATCH, ATTRIBUTE_BATCH = "target_data", "attribute_data"


class EmbeddingJoinError(CefamError):
    """Images of a source have no embedding in the store (or the store's list of skipped images is malformed)."""


# ---------------------------------------------------------------------------------------------------- helpers
class _LazyStore:
    """An embedding store opened on first use in each process (memory maps are not sent to DataLoader workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._store: EmbeddingStore | None = None

    def embedding(self, row: int) -> torch.Tensor:
        if self._store is None:
            self._store = EmbeddingStore.open(self.path)
        return torch.from_numpy(np.array(self._store.image_embeddings[row], dtype=np.float32))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_store": None}


def skipped_ids(store: EmbeddingStore) -> set[str]:
    """Ids that ``precompute`` could not read (``store.extra["skipped"]``: a list of ``{"id", "error"}``)."""
    entries = store.extra.get("skipped", [])
    where = f"{store.path / 'meta.json'}: extra.skipped"
    if not isinstance(entries, list):
        raise EmbeddingJoinError(f"{where} must be a list of {{'id', 'error'}} objects, got {type(entries).__name__}")
    out = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise EmbeddingJoinError(f"{where}[{i}] must be an object with a string 'id', got {entry!r}")
        out.add(entry["id"])
    return out


def _missing_error(split: str, source: ImageSource, store: EmbeddingStore, n: int, total: int, first: str) -> str:
    return (
        f"{split} data ({source.describe()}): {n} of {total} images have no embedding in the store {store.path} "
        f"(first: {first}). Compute the store from this source (precompute), or point data.store at the store "
        f"that was."
    )


def _rank_world(trainer: L.Trainer | None) -> tuple[int, int]:
    """This process's rank and the number of ranks: the trainer's, else webdataset's reading of the environment."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    from webdataset.utils import pytorch_worker_info

    rank, world, _, _ = pytorch_worker_info()
    return rank, world


class SampleJoin:
    """What a sample id brings to its item beside the image and label: its embedding (the store's row, as
    ``embedding``) and its rows of the id tables (``{batch key: table}``, e.g. ``attributes``, ``target``).

    Args:
        store: the store's folder (``None``: no embeddings).
        rows: ``{id: store row}`` (with a store).
        tables: ``{batch key: IdTable}``; every id served must have a row in each.
    """

    def __init__(
        self,
        store: str | os.PathLike | None = None,
        rows: dict[str, int] | None = None,
        tables: dict[str, IdTable] | None = None,
    ):
        self.store = _LazyStore(store) if store is not None else None
        self.path = None if store is None else Path(store)
        self.rows = rows or {}
        self.tables = {key: (t.index, t.values) for key, t in (tables or {}).items()}

    def has_embedding(self, sample_id: str) -> bool:
        return self.store is None or sample_id in self.rows

    def __call__(self, sample_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.store is not None:
            out["embedding"] = self.store.embedding(self.rows[sample_id])
        for key, (index, values) in self.tables.items():
            out[key] = torch.from_numpy(values[index[sample_id]].copy())
        return out


def _item(record: ImageRecord, transform: Callable, join: SampleJoin) -> dict[str, Any]:
    return {
        "image": transform(open_image(record)),
        "label": -1 if record.label is None else int(record.label),
        "id": record.id,
        **join(record.id),
    }


# ---------------------------------------------------------------------------------------------------- map-style
class ImageDataset(Dataset):
    """Map-style dataset of records joined with their embeddings and table rows.

    Args:
        records: the images.
        join: what each record's id brings (:class:`SampleJoin`).
        transform: PIL image -> tensor.
    """

    def __init__(self, records: Sequence[ImageRecord], join: SampleJoin, transform: Callable):
        self.records, self.join, self.transform = list(records), join, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _item(self.records[i], self.transform, self.join)

    def item_without_image(self, i: int) -> dict[str, Any]:
        """Item ``i`` without decoding its image (what a feature cache serves)."""
        record = self.records[i]
        label = -1 if record.label is None else int(record.label)
        return {"label": label, "id": record.id, **self.join(record.id)}


# ---------------------------------------------------------------------------------------------------- streaming
class _SplitByRank:
    """``webdataset.split_by_node`` with the rank fixed when the loader is built (so it is the same in workers)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        yield from itertools.islice(src, self.rank, None, self.world_size)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _NotSkipped:
    def __init__(self, skipped: set[str]):
        self.skipped = frozenset(skipped)

    def __call__(self, sample: dict) -> bool:
        return sample["__key__"] not in self.skipped


class _PadStream:
    """Pass a worker's samples through, then repeat its own samples (re-read from its shards) up to ``targets[w]``.

    Under DDP the train streams of all ranks must give the same number of batches; the targets per worker index
    are the largest count any rank's worker of that index holds.
    """

    def __init__(self, shards: Sequence[str], rank: int, world_size: int, targets: Sequence[int], skipped: set[str]):
        self.shards, self.rank, self.world_size = list(shards), rank, world_size
        self.targets, self.keep = list(targets), _NotSkipped(skipped)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker, num_workers = _worker()
        n = 0
        for sample in src:
            n += 1
            yield sample
        deficit = self.targets[worker] - n
        if deficit <= 0:
            return
        mine = self.shards[self.rank :: self.world_size][worker::num_workers]
        while deficit > 0:
            again = 0
            for sample in filter(self.keep, iter_shard_samples(mine)):
                if deficit <= 0:
                    break
                again += 1
                deficit -= 1
                yield sample
            if again == 0:
                raise EmbeddingJoinError(f"shards {mine}: no usable samples to pad rank {self.rank}'s stream with")


class _WorkerShards:
    """``webdataset.split_by_worker``, then (for training) this worker's shards in an order seeded by
    (seed, epoch, rank, worker).

    The epoch is read from the shared epoch when a pass begins (see :mod:`cefam_lightning.data.order`), never
    counted by the process, so a resumed run reads its shards in the order an uninterrupted run does.
    """

    def __init__(self, seed: int, rank: int, epoch: SharedEpoch | None):
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        import webdataset as wds

        shards = list(wds.split_by_worker(src))
        if self.epoch is not None:
            worker, _ = _worker()
            random.Random(f"shards-{self.seed}-{self.epoch.get()}-{self.rank}-{worker}").shuffle(shards)
        yield from shards


class _EpochShuffle:
    """A ``webdataset`` shuffle buffer seeded by (seed, epoch, rank, worker).

    The epoch is read from the shared epoch when a pass begins, in the process that iterates (the main process or
    a worker, persistent ones included), so runs with the same seed and worker count shuffle identically in each
    epoch, successive epochs differently, and a resumed run like an uninterrupted one.
    """

    def __init__(self, bufsize: int, seed: int, rank: int, epoch: SharedEpoch):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        import webdataset as wds

        worker, _ = _worker()
        rng = random.Random(f"{self.seed}-{self.epoch.get()}-{self.rank}-{worker}")
        return wds.filters.shuffle(self.bufsize, self.bufsize, rng=rng)(src)


class _SampleToItem:
    """Decode a ``webdataset`` sample, apply the transform and join its embedding and table rows by ``__key__``."""

    def __init__(self, join: SampleJoin, transform: Callable, class_names: list[str] | None):
        self.join, self.transform, self.class_names = join, transform, class_names

    def __call__(self, sample: dict) -> dict[str, Any]:
        record = record_from_sample(sample, self.class_names)
        if not self.join.has_embedding(record.id):
            raise EmbeddingJoinError(
                f"sample {record.id!r} of shard {record.origin} has no embedding in the store {self.join.path}"
            )
        return _item(record, self.transform, self.join)


def num_batches(n: int, batch_size: int, train: bool) -> int:
    """Batches ``n`` samples make; training drops a last batch of a single sample."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and not train) else 0)


class _MoreThanOne:
    def __call__(self, batch: dict) -> bool:
        return len(batch["id"]) > 1


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    # webdataset's map stage copies ``__key__`` into each result; the batch has the same keys as map-style data.
    return default_collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in samples])


class StreamPlan:
    """The shards of one split, their usable sample keys, and how they divide among ranks and workers.

    Args:
        source: the shards.
        skipped: ids to leave out.
    """

    def __init__(self, source: WebDataSource, skipped: set[str]):
        self.source = source
        self.shards = [str(s) for s in source.shards]
        self.keys = [[k for k in keys if k not in skipped] for keys in source.keys_by_shard()]
        self.counts = [len(k) for k in self.keys]

    def workers_for(self, world_size: int, num_workers: int) -> int:
        """Workers each rank can use so that every worker has at least one shard (0 stays 0: the main process)."""
        if len(self.shards) < world_size:
            raise ValueError(
                f"{self.source.describe()}: {len(self.shards)} shard(s) for {world_size} ranks; every rank needs at "
                f"least one shard so that each sample is seen once per epoch. Write the data as at least "
                f"{world_size} shards (better: many more, of similar size)."
            )
        return min(num_workers, len(self.shards) // world_size)

    def worker_counts(self, rank: int, world_size: int, num_workers: int) -> list[int]:
        """Samples each worker of ``rank`` streams, as ``webdataset.split_by_node``/``split_by_worker`` divide."""
        idx = list(range(len(self.shards)))[rank::world_size]
        n = max(num_workers, 1)
        return [sum(self.counts[i] for i in idx[w::n]) for w in range(n)]

    def pad_targets(self, world_size: int, num_workers: int) -> list[int]:
        """Per worker index, the most samples any rank's worker of that index streams."""
        per_rank = [self.worker_counts(r, world_size, num_workers) for r in range(world_size)]
        return [max(c[w] for c in per_rank) for w in range(max(num_workers, 1))]


def shard_stream(
    plan: StreamPlan,
    *,
    join: SampleJoin,
    transform: Callable,
    class_names: list[str] | None,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    train: bool,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skipped: set[str] | None = None,
    epoch: SharedEpoch | None = None,
):
    """A ``webdataset`` pipeline over ``plan``'s shards for one rank: split by rank and worker, (for training)
    padded to the common length, shard order and samples shuffled; decoded, transformed, joined, batched.

    For training the order is a function of (``seed``, ``epoch``, rank, worker), read from ``epoch`` at the start
    of each pass (iterate it with :class:`~cefam_lightning.data.order.EpochStreamLoader`). Its ``len`` is this
    rank's number of batches (the same on every rank for training).
    """
    import webdataset as wds

    skipped = set(skipped or ())
    if train and epoch is None:
        epoch = SharedEpoch()
    ds = wds.WebDataset(
        plan.shards,
        nodesplitter=_SplitByRank(rank, world_size),
        # Shards are shuffled here, by epoch, instead of by webdataset's detshuffle, which counts the passes this
        # process made (a resumed run would restart that count at 0).
        workersplitter=_WorkerShards(seed, rank, epoch if train else None),
        shardshuffle=False,
        empty_check=False,
        handler=shard_error,  # a shard that cannot be read (changed since setup checked it) is named
    )
    if skipped:
        ds = ds.select(_NotSkipped(skipped))
    if train:
        counts = plan.pad_targets(world_size, num_workers)
        if world_size > 1:
            ds = ds.compose(_PadStream(plan.shards, rank, world_size, counts, skipped))
        if shuffle_buffer > 0:
            ds = ds.compose(_EpochShuffle(shuffle_buffer, seed, rank, epoch))
    else:
        counts = plan.worker_counts(rank, world_size, num_workers)
    ds = ds.map(_SampleToItem(join, transform, class_names))
    ds = ds.batched(batch_size, collation_fn=_collate, partial=True)
    if train:  # a one-image batch cannot train BatchNorm; all ranks drop theirs alike (equal per-worker counts)
        ds = ds.select(_MoreThanOne())
    return ds.with_length(sum(num_batches(c, batch_size, train) for c in counts), silent=True)


# ---------------------------------------------------------------------------------------------------- datamodule
class ImageDataModule(L.LightningDataModule):
    """Images from folders, manifests or tar shards, joined by sample id with what the explainer needs besides the
    images and labels: a store's VLM embeddings, an attribute table, a target table.

    Args:
        train, val, test: source specs (see :func:`~cefam_lightning.data.image_sources.open_source`) or opened sources;
            ``test=None`` tests on the validation data.
        store: the embedding store folder (its concepts, text embeddings and VLM constants define CE-FAM);
            ``None``: batches carry no ``embedding`` (L-CAM, SIAM).
        attributes: an attribute table (:mod:`cefam_lightning.data.attributes`; a CSV path or read): batches carry
            ``attributes`` ``(B, n_attr)`` in ``[0, 1]``.
        targets: a target table: batches carry ``target`` ``(B, n_targets)`` (regression).
        attribute_train, attribute_val: the authors' two-data-set setting (SIAM): image sources whose images have
            the attribute rows, while ``train``/``val``/``test`` give the target and need none. Each batch is then
            ``{TARGET_BATCH: batch, ATTRIBUTE_BATCH: batch}``, one batch of each data set (training: an epoch is the
            longer data set once, the shorter one cycled; validation and test: every batch of both, ``None`` for the
            one that ran out). The attribute batches' labels are not the target's and are not used as targets.
        input_spec: the classifier's input geometry; images become ``3 x crop x crop`` in ``[0, 1]``.
        batch_size: per-device batch size.
        num_workers: DataLoader workers (persistent when > 0).
        shuffle_buffer: samples held by the shuffle buffer of streamed training data (0: shard order only).
        seed: seed of the training data order (map-style sampler, shard order, shuffle buffer).
        class_names: the class list; ``None``: the training source's (folder names, manifest labels).
        feature_caches: ``{split: PooledFeatureCache}`` for train/val (see :mod:`cefam_lightning.data.feature_cache`):
            map-style sources then serve a cached sample's pooled activations instead of its image; streamed ones
            still decode images, but the module skips the classifier for cached samples.
    """

    def __init__(
        self,
        train: str | os.PathLike | ImageSource,
        val: str | os.PathLike | ImageSource,
        test: str | os.PathLike | ImageSource | None = None,
        *,
        store: str | os.PathLike | None,
        input_spec: InputSpec,
        attributes: str | os.PathLike | IdTable | None = None,
        targets: str | os.PathLike | IdTable | None = None,
        attribute_train: str | os.PathLike | ImageSource | None = None,
        attribute_val: str | os.PathLike | ImageSource | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        feature_caches: dict[str, PooledFeatureCache] | None = None,
    ):
        super().__init__()
        self.feature_caches = dict(feature_caches or {})
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0; got {batch_size}, {num_workers}, "
                f"{shuffle_buffer}"
            )
        if (attribute_train is None) != (attribute_val is None):
            raise ValueError("the two-data-set setting needs both attribute_train and attribute_val")
        if attribute_train is not None and attributes is None:
            raise ValueError("attribute_train / attribute_val need an attribute table (attributes)")
        self.specs = {"train": train, "val": val, "test": test}
        self.specs.update(attr_train=attribute_train, attr_val=attribute_val)
        self.store_path = Path(store).expanduser() if store is not None else None
        self.input_spec = input_spec
        self.tables_given = {"attributes": attributes, "target": targets}
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self._class_names = list(class_names) if class_names is not None else None
        self.store: EmbeddingStore | None = None
        self.tables: dict[str, IdTable] = {}
        self.sources: dict[str, ImageSource] = {}
        self.datasets: dict[str, ImageDataset] = {}
        self.plans: dict[str, tuple[StreamPlan, SampleJoin]] = {}
        self.skipped: set[str] = set()
        self.unmatched: dict[str, int] = {}  # per table: its rows that match no image of any split
        self._ids: dict[str, list[str]] = {}  # per split: its images' ids (the skipped ones left out)
        self._ready = False

    @property
    def two_datasets(self) -> bool:
        """The two-data-set setting: attributes from ``attribute_train``/``attribute_val``, targets from the rest."""
        return self.specs["attr_train"] is not None

    @property
    def attribute_names(self) -> list[str] | None:
        """The attribute table's columns (``None``: no table)."""
        table = self.tables.get("attributes")
        return None if table is None else list(table.names)

    @property
    def target_names(self) -> list[str] | None:
        """The target table's columns (``None``: no table)."""
        table = self.tables.get("target")
        return None if table is None else list(table.names)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Open the store, the tables and the sources and join them (once; later calls return at once).

        Raises:
            EmbeddingJoinError: images without an embedding, counted and listed.
            TableError: a malformed table, or images without a row in it (counted and listed).
            ImageSourceError: a malformed source.
        """
        if self._ready:
            return
        store = EmbeddingStore.open(self.store_path) if self.store_path is not None else None
        self.skipped = skipped_ids(store) if store is not None else set()
        for key, given in self.tables_given.items():
            if given is not None:
                self.tables[key] = given if isinstance(given, IdTable) else read_table(given, _TABLE_KIND[key])
        transform = image_transform(self.input_spec)
        for split in self.specs:
            spec = self.specs[split]
            if spec is None:
                continue
            source = spec if isinstance(spec, ImageSource) else open_source(spec, self._class_names)
            if self._class_names is None and split == "train":
                self._class_names = source.class_names
            self.sources[split] = source
            self._ids[split] = self._ids_of(source)
            join = self._join_tables(split, source, store)
            if isinstance(source, WebDataSource):
                self.plans[split] = self._join_stream(split, source, store, join)
            else:
                self.datasets[split] = self._join_map(split, source, store, join, transform)
        self._report_unmatched()
        self.store = store
        self._ready = True

    def _tables_of(self, split: str) -> dict[str, IdTable]:
        """The tables whose rows ``split``'s images carry: in the two-data-set setting the attribute table goes
        with the attribute splits only, and the target table with the others."""
        if not self.two_datasets:
            return dict(self.tables)
        wanted = {"attributes"} if split in ATTRIBUTE_SPLITS else {"target"}
        return {k: t for k, t in self.tables.items() if k in wanted}

    def _join_tables(self, split: str, source: ImageSource, store: EmbeddingStore | None) -> SampleJoin:
        tables = self._tables_of(split)
        where = f"the {split} data ({source.describe()})"
        for table in tables.values():
            table.rows_for(self._ids[split], where)
        rows = self._index(store) if store is not None else None
        return SampleJoin(store.path if store is not None else None, rows, tables)

    def _ids_of(self, source: ImageSource) -> list[str]:
        if isinstance(source, WebDataSource):
            return [k for keys in source.keys_by_shard() for k in keys if k not in self.skipped]
        return [r.id for r in source if r.id not in self.skipped]

    def _report_unmatched(self) -> None:
        """Count each table's rows that match no image of the splits that read it, and say so (never dropped in
        silence)."""
        if not self.tables:
            return
        for key, table in self.tables.items():
            ids = {i for split, split_ids in self._ids.items() if key in self._tables_of(split) for i in split_ids}
            extra = table.unmatched(ids)
            self.unmatched[key] = len(extra)
            if extra and rank_zero_only.rank == 0:
                first = ", ".join(repr(i) for i in extra[:5])
                log.info(
                    f"{table.path}: {len(extra)} of {len(table.ids)} rows match no image of the data given "
                    f"(first: {first}); they are not used"
                )

    def _join_map(
        self,
        split: str,
        source: ImageSource,
        store: EmbeddingStore | None,
        join: SampleJoin,
        transform: Callable,
    ) -> ImageDataset:
        records = list(source)
        kept = [r for r in records if r.id not in self.skipped]
        self._log_skipped(split, source, len(records) - len(kept))
        if store is not None:
            missing = [r.id for r in kept if not join.has_embedding(r.id)]
            if missing:
                raise EmbeddingJoinError(
                    _missing_error(split, source, store, len(missing), len(kept), str(missing[:5]))
                )
        if not kept:
            raise EmbeddingJoinError(f"{split} data ({source.describe()}): no images left to train with")
        return ImageDataset(kept, join, transform)

    def _join_stream(
        self, split: str, source: WebDataSource, store: EmbeddingStore | None, join: SampleJoin
    ) -> tuple[StreamPlan, SampleJoin]:
        plan = StreamPlan(source, self.skipped)
        total = sum(len(k) for k in source.keys_by_shard())
        self._log_skipped(split, source, total - sum(plan.counts))
        if store is not None:
            pairs = zip(plan.shards, plan.keys, strict=True)
            missing = [(k, s) for s, keys in pairs for k in keys if not join.has_embedding(k)]
            if missing:
                first = ", ".join(f"{k!r} ({Path(s).name})" for k, s in missing[:5])
                raise EmbeddingJoinError(_missing_error(split, source, store, len(missing), sum(plan.counts), first))
        if not any(plan.counts):
            raise EmbeddingJoinError(f"{split} data ({source.describe()}): no images left to train with")
        return plan, join

    @staticmethod
    def _index(store: EmbeddingStore) -> dict[str, int]:
        return {str(s): i for i, s in enumerate(store.sample_ids.tolist())}

    def _log_skipped(self, split: str, source: ImageSource, n: int) -> None:
        if n and rank_zero_only.rank == 0:
            log.info(
                f"{split}: {n} image(s) of {source.describe()} left out: precompute could not read them "
                f"(listed under extra.skipped in {self.store_path / 'meta.json'})"
            )

    # ------------------------------------------------------------------ properties
    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    @property
    def concepts(self):
        if not self._ready:
            raise RuntimeError("ImageDataModule.setup() has not run yet")
        if self.store is None:
            raise RuntimeError("ImageDataModule: no embedding store given, so no concepts")
        return self.store.concepts

    def sample_ids(self, split: str) -> list[str]:
        """The ids of ``split``'s images (after leaving out the skipped ones), in source order."""
        if split in self.datasets:
            return [r.id for r in self.datasets[split].records]
        return [k for keys in self.plans[split][0].keys for k in keys]

    def num_samples(self, split: str) -> int:
        """Images of ``split`` after leaving out the skipped ones (all ranks together)."""
        if split in self.datasets:
            return len(self.datasets[split])
        return sum(self.plans[split][0].counts)

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self._ready:
            self.setup()
        cache = self.feature_caches.get(split) if split in ("train", "val") else None
        if split == "test" and "test" not in self.sources:
            if rank_zero_only.rank == 0:
                log.info("no test data given: testing on the validation data")
            split = "val"
        rank, world = _rank_world(self.trainer)
        if split in self.datasets:
            # DistributedSampler gives each rank ceil(n / world) indices; a last training batch of one is dropped.
            per_rank = math.ceil(len(self.datasets[split]) / world)
            drop_last = train and per_rank % self.batch_size == 1
            if drop_last:
                self._log_single(split, rank)
            dataset, collate = self.datasets[split], None
            if cache is not None:
                dataset, collate = CachedFeatureDataset(dataset, cache, self.sample_ids(split)), collate_cached
            # The order is a function of (seed, epoch), so a resumed run sees the batches an uninterrupted one does.
            sampler = epoch_sampler(dataset, self.seed, self.trainer) if train else None
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                collate_fn=collate,
                shuffle=train and sampler is None,
                sampler=sampler,
                drop_last=drop_last,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        plan, join = self.plans[split]
        workers = plan.workers_for(world, self.num_workers)
        if workers < self.num_workers and rank == 0:
            log.info(
                f"{split}: {len(plan.shards)} shards for {world} rank(s): using {workers} DataLoader worker(s) per "
                f"rank instead of {self.num_workers}, so that every worker reads at least one shard"
            )
        if train and any(c % self.batch_size == 1 for c in plan.pad_targets(world, workers)):
            self._log_single(split, rank)
        epoch = SharedEpoch() if train else None
        dataset = shard_stream(
            plan,
            join=join,
            transform=image_transform(self.input_spec),
            class_names=self._class_names,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            num_workers=workers,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            skipped=self.skipped,
            epoch=epoch,
        )
        kwargs = {
            "batch_size": None,
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if not train:
            return DataLoader(dataset, **kwargs)
        epoch_of = trainer_epoch(self.trainer) if self.trainer is not None else None
        return EpochStreamLoader(dataset, epoch, epoch_of, **kwargs)

    @staticmethod
    def _log_single(split: str, rank: int) -> None:
        if rank == 0:
            log.info(
                f"{split}: a last batch would hold a single image (BatchNorm cannot train on one); it is dropped, "
                f"a different image each epoch when shuffled"
            )

    def _paired(self, split: str, train: bool) -> Any:
        """Without attribute splits, ``split``'s loader; with them (the two-data-set setting), a Lightning
        ``CombinedLoader`` of ``{TARGET_BATCH: split's batches, ATTRIBUTE_BATCH: the attribute split's}``
        (Lightning puts its distributed sampler into each under DDP)."""
        loader = self._loader(split, train)
        if not self.two_datasets:
            return loader
        from lightning.pytorch.utilities import CombinedLoader

        attributes = self._loader("attr_train" if train else "attr_val", train)
        mode = "max_size_cycle" if train else "max_size"
        return CombinedLoader({TARGET_BATCH: loader, ATTRIBUTE_BATCH: attributes}, mode)

    def train_dataloader(self) -> Any:
        return self._paired("train", train=True)

    def val_dataloader(self) -> Any:
        return self._paired("val", train=False)

    def test_dataloader(self) -> Any:
        return self._paired("test", train=False)


_TABLE_KIND = {"attributes": "attribute", "target": "target"}
