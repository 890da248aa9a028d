"""Training data order as a function of the seed and the epoch only, for every kind of data.

A run resumed from a checkpoint must see the batches an uninterrupted run sees, or its weights drift away from
the uninterrupted run's. A ``DataLoader(shuffle=True)`` draws its order from a generator (its own, or the global
one) that advances once per epoch *this process* ran and is not saved in a checkpoint: a run resumed at epoch ``k``
replays epoch 0's order. So both DataModules take their order from Lightning's epoch counter, which a checkpoint
restores:

- **Map-style data** (the shapes world, image folders, manifests): :func:`epoch_sampler`, a
  ``DistributedSampler`` over one replica whose permutation is a function of ``(seed, epoch)``; Lightning calls
  its ``set_epoch`` before every training epoch. Under DDP Lightning puts in its own ``DistributedSampler``
  (seeded by ``seed_everything``'s seed, the one ``train.py`` also gives the DataModules) and sets its epoch the
  same way.
- **Streamed data** (tar shards, an ``IterableDataset``): Lightning has no sampler to set the epoch on, so
  :class:`EpochStreamLoader` reads the trainer's epoch at the start of every pass and writes it into a
  :class:`SharedEpoch`, which the stream's shuffling stages read in whichever process iterates: the main process,
  or each DataLoader worker (persistent ones included, which keep their own copy of the dataset).

Code that iterates a loader itself (tests, benchmarks) calls :func:`set_epoch` before each pass, as Lightning does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset


def epoch_sampler(dataset: Dataset, seed: int, trainer: Any | None) -> DistributedSampler | None:
    """The training sampler of a map-style dataset: its order is a function of ``(seed, epoch)``.

    Args:
        dataset: the training dataset.
        seed: the order's seed.
        trainer: the Lightning trainer the DataModule is attached to (``None``: used on its own).

    Returns:
        a shuffling ``DistributedSampler`` over one replica, or ``None`` under DDP, where Lightning replaces the
        loader's sampler with its own distributed one (a ``DistributedSampler`` given here would stop it from
        splitting the data across ranks). The loader is then built with ``shuffle=True``.
    """
    if trainer is not None and trainer.world_size > 1:
        return None
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=False)


def trainer_epoch(trainer: Any) -> Callable[[], int]:
    """The epoch Lightning hands to ``set_epoch`` of samplers (restored from the checkpoint on resume)."""

    def epoch() -> int:
        return int(trainer.fit_loop.epoch_progress.current.processed)

    return epoch


class SharedEpoch:
    """An epoch number in shared memory: set in the main process, read in DataLoader workers.

    A persistent worker keeps the copy of the dataset it received when it started, so a plain attribute set in the
    main process would never reach it; a shared-memory tensor is the same memory in every process (inherited on
    fork, passed as a shared handle on spawn).

    Args:
        epoch: the starting epoch.
    """

    def __init__(self, epoch: int = 0):
        self._value = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))

    def get(self) -> int:
        return int(self._value.item())


class EpochStreamLoader(DataLoader):
    """A ``DataLoader`` over an iterable dataset whose order depends on the epoch held by ``epoch``.

    Before each pass it sets ``epoch`` to ``epoch_of()`` (:func:`trainer_epoch`: the trainer's epoch), so that a
    pass's order never depends on how many passes this process made before. Without ``epoch_of`` the epoch is what
    :meth:`set_epoch` last set (0 at first).

    Args:
        dataset: the iterable dataset; its shuffling stages read ``epoch``.
        epoch: the shared epoch those stages read.
        epoch_of: the current epoch, asked at the start of each pass.
        **kwargs: ``DataLoader`` arguments.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        epoch: SharedEpoch,
        epoch_of: Callable[[], int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(dataset, **kwargs)
        self.epoch, self.epoch_of = epoch, epoch_of

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order for the next pass (what Lightning's ``set_epoch`` does for a sampler)."""
        self.epoch.set(epoch)

    def __iter__(self):
        # Set before the iterator starts (or resumes) the workers: they read the epoch when their pass begins.
        if self.epoch_of is not None:
            self.set_epoch(self.epoch_of())
        return super().__iter__()


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a training loader's order, as Lightning does before each epoch (for code without a trainer).

    Works for a loader with an epoch sampler (:func:`epoch_sampler`, or Lightning's distributed sampler) and for an
    :class:`EpochStreamLoader`.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        method = getattr(obj, "set_epoch", None)
        if callable(method):
            method(epoch)
