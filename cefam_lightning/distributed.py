"""Running one command on many processes: ``torchrun``, ``srun`` or ``--devices N [--num-nodes M]`` (Lightning Fabric).

:func:`launch` starts (or joins) the process group through Lightning Fabric and returns a :class:`Workers`: this
process's rank, the number of processes, its device, and the few collective operations the tools need (a barrier,
gathering Python objects, a broadcast). One process (no launcher, no ``--devices``) gets a :class:`Workers` of
size 1 whose collectives do nothing, so the tools run the same code either way.

- ``torchrun --nproc-per-node N`` (any number of nodes): the process group is read from the environment torchrun
  sets (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``); no option is needed.
- ``srun`` (SLURM): give ``--devices`` (tasks per node) and ``--num-nodes`` as for a Lightning ``Trainer``; Fabric
  reads the rest from SLURM's environment.
- ``--devices N`` on one machine without a launcher: Fabric starts the other ``N - 1`` processes itself.

On CPUs the backend is ``gloo``, on GPUs ``nccl``. :func:`balanced_parts` splits an ordered list of work units
into contiguous parts balanced by their weights (:func:`part_range`: equal units): every process computes the same
split from the same list. :func:`sum_over_ranks` sums plain counts (those outside a torchmetrics metric) over the
processes that split a job.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from cefam_lightning.devices import select_device

# Ranks wait at a barrier for the slowest one: a long part (a large shard on a slow disk) must not time it out.
GROUP_TIMEOUT = timedelta(hours=12)


@dataclass
class Workers:
    """This process's place in a group of processes that share one job (a group of one without a launcher)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    fabric: Any = None  # lightning.fabric.Fabric when a process group runs

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Process ``src``'s ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


def launched_world_size() -> int:
    """The number of processes a launcher (``torchrun``) started for this job, from its environment (1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch(
    device: str = "auto", devices: int | None = None, num_nodes: int | None = None, error: type[Exception] = ValueError
) -> Workers:
    """Join (or start) the process group this command runs in, and pick this process's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` (``cuda:1`` only for one process: each rank of a group takes its own GPU).
        devices: processes per node (``--devices``); ``None``: ``torchrun``'s, or one process.
        num_nodes: nodes (``--num-nodes``); ``None``: ``torchrun``'s, or 1.
        error: the calling command's error type, raised for a bad value.

    Returns:
        the :class:`Workers` of this process (a group of one without a launcher and without ``devices``).
    """
    world = launched_world_size()
    if devices is None and num_nodes is None and world <= 1:
        return Workers(device=select_device(device, error))
    if devices is not None and devices < 1 or num_nodes is not None and num_nodes < 1:
        raise error(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if devices is None:  # torchrun: its own layout (Fabric checks that devices x nodes matches the world size)
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        num_nodes = num_nodes or max(1, world // devices)
    num_nodes = num_nodes or 1
    if devices * num_nodes == 1:
        return Workers(device=select_device(device, error))
    dev = select_device(device, error)
    if dev.index is not None:
        raise error(f"--device {device}: with several processes each takes its own GPU; give --device cuda")
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    try:
        fabric = Fabric(
            accelerator=dev.type, devices=devices, num_nodes=num_nodes, strategy=DDPStrategy(timeout=GROUP_TIMEOUT)
        )
        fabric.launch()
    except (ValueError, RuntimeError) as e:  # devices x nodes that do not match the launcher's, no free GPU, ...
        raise error(f"cannot start {devices} x {num_nodes} processes: {e}") from e
    # Leave the process group before the interpreter exits: a group left standing lets gloo's threads be torn down
    # with the process, which aborted a finished rank now and then ("terminate called without an active exception").
    atexit.register(_leave_process_group)
    return Workers(fabric.global_rank, fabric.world_size, fabric.device, fabric)


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def balanced_parts(weights: Sequence[int], n: int) -> list[int]:
    """Split ordered units of work into ``n`` contiguous parts of about equal total weight: each unit's part.

    A unit goes to the part its middle falls in (cumulative weight), so parts are contiguous runs in the given
    order, and units of weight 1 split into ranges whose sizes differ by at most one. A part may be empty when there
    are fewer units than parts.

        >>> balanced_parts([1] * 5, 2)
        [0, 0, 1, 1, 1]
        >>> balanced_parts([10, 10, 10, 1], 2)
        [0, 0, 1, 1]
    """
    if n < 1:
        raise ValueError(f"the number of parts must be >= 1, got {n}")
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    parts, start = [], 0
    for w in weights:
        parts.append(min(n - 1, (2 * start + w) * n // (2 * total)))
        start += w
    return parts


def part_range(n: int, index: int, parts: int) -> range:
    """The items of part ``index`` when ``n`` items of equal weight are split into ``parts``
    (:func:`balanced_parts`): a range of ``range(n)``.

        >>> [part_range(5, p, 2) for p in (0, 1)]
        [range(0, 2), range(2, 5)]
    """
    owner = balanced_parts([1] * n, parts)
    mine = [i for i, p in enumerate(owner) if p == index]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def sum_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """``values`` summed over the ``world_size`` processes that split one job (each passes its own; every process
    gets the sums), or unchanged for a job of one process (``world_size`` 1, even inside a process group: one rank
    evaluating alone must not wait for the others). ``values`` must be on this process's device (``nccl``: a GPU)."""
    if world_size <= 1:
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values
