"""The run folder ``output_dir/run_name``: named safely, claimed by one run at a time, never reused by accident.

- ``run_name`` is one folder name: it cannot leave ``output_dir`` (no ``/``, ``..``, absolute paths).
- A folder that already holds a run is refused, unless the run resumes (``ckpt_path``) or ``overwrite=true``
  asks for it to be replaced; an auto-named run (a timestamp) takes the next free name instead.
- While a run writes the folder it holds ``<run>/.lock``, an OS file lock (``filelock``): a second run with the
  same name is refused at once, and a run killed with ``kill -9`` leaves no stale lock (the OS releases it).
- Under DDP only the launching process (global rank 0) claims the folder; the ranks Lightning starts by running
  the script again find the name in the environment and write into the same folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout

from cefam_lightning.errors import CefamError

RUN_NAME_ENV = "CEFAM_RUN_NAME"  # the primary process's run name, inherited by the DDP ranks it launches
LOCK_NAME = ".lock"
# Environment variables that say a process is not the job's first one (torchrun, SLURM, Lightning's launcher).
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunFolderError(CefamError):
    """The run folder cannot be used: a bad ``run_name``, a folder in use or holding another run."""


def is_primary_process() -> bool:
    """Whether this process is the job's first (global rank 0 of every launcher this framework meets)."""
    for var in _RANK_VARS:
        value = os.environ.get(var, "0").strip() or "0"
        if value != "0":
            return False
    return True


def check_run_name(run_name: str | None) -> None:
    """``run_name`` is ``None`` or one plain folder name.

    Raises:
        RunFolderError: a name with a path separator, ``.``/``..``, or empty; the message names the value.
    """
    if run_name is None:
        return
    name = str(run_name)
    bad = not name.strip() or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or "\\" in name
    if bad or name.startswith("~"):
        raise RunFolderError(
            f"run_name: {name!r} is not a folder name inside output_dir (no '/', '\\', '..', '~' or empty names)"
        )


def holds_run(path: Path) -> bool:
    """Whether a folder holds anything but a lock file (an earlier run's config, checkpoints or logs)."""
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


@dataclass
class RunFolder:
    """A claimed run folder: ``path``, whether this run ``created`` it, and whether it ``resumes`` one."""

    path: Path
    created: bool
    resumes: bool
    overwrite: bool

    def clear_for_overwrite(self) -> None:
        """``overwrite=true``: remove the earlier run's files (not the lock), once this run is ready to start."""
        if not self.overwrite or self.created:
            return
        for p in self.path.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


@contextlib.contextmanager
def claim_run_folder(
    output_dir: str | os.PathLike, run_name: str | None, resume: bool = False, overwrite: bool = False
) -> Iterator[RunFolder]:
    """Claim ``output_dir/run_name`` for one run, for the duration of the block.

    Args:
        output_dir: the parent of every run folder.
        run_name: the folder's name; ``None``: a timestamp (a free one).
        resume: the run resumes from a checkpoint (``ckpt_path``): an existing folder is expected.
        overwrite: an existing run in the folder is replaced (its files are removed by
            :meth:`RunFolder.clear_for_overwrite` once the run starts).

    Raises:
        RunFolderError: a bad name; the folder holds another run (and neither ``resume`` nor ``overwrite``);
            another run holds its lock.

    A folder this run created and left with nothing in it (the run failed before writing anything) is removed
    again on the way out.
    """
    check_run_name(run_name)
    root = Path(output_dir).expanduser()
    primary = is_primary_process()
    if not primary:  # a launched DDP rank: the primary process has claimed the folder already
        name = run_name or os.environ.get(RUN_NAME_ENV)
        if not name:
            raise RunFolderError(f"a DDP rank without {RUN_NAME_ENV}: the launching process did not name the run")
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        yield RunFolder(path, created=False, resumes=resume, overwrite=False)
        return

    auto = run_name is None
    name = run_name or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = root / name
    if auto:  # two auto-named runs in one second: the second takes the next free name
        n = 2
        while path.exists():
            path, n = root / f"{name}_{n}", n + 1
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(
            f"run folder {path} is in use by another run (it holds {path / LOCK_NAME}); wait for it to finish or "
            "choose another run_name"
        ) from None
    try:
        if not created and holds_run(path) and not (resume or overwrite):
            raise RunFolderError(
                f"run folder {path} already holds a run; resume it with ckpt_path=last, replace it with "
                "overwrite=true, or choose another run_name"
            )
        os.environ[RUN_NAME_ENV] = path.name  # for the DDP ranks this process launches
        yield RunFolder(path, created=created, resumes=resume, overwrite=overwrite)
    finally:
        lock.release()
        if created and not holds_run(path):
            shutil.rmtree(path, ignore_errors=True)
