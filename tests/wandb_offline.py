"""Read an offline W&B run back (history, config, summary, files) without wandb's service: a test helper.

The tests check what a run logged to W&B offline against the run itself; nothing in the framework reads a W&B run.

Example::

    run = read_offline_wandb_run(run_dir / "wandb", wait_s=20)
    assert run["history"][-1]["val/loss"] == ...
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The transaction log (run-<id>.wandb) is a LevelDB log (github.com/google/leveldb/blob/main/doc/log_format.md)
# behind a 7-byte W&B header; each record is a wandb.proto.wandb_internal_pb2.Record. Read here directly because
# wandb's Python reader (wandb.sdk.internal.datastore) is gone from recent wandb, whose reader is now inside the
# wandb-core binary (`wandb leet inspect --json`, the independent check in the tests).

_WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_WANDB_IDENT, _WANDB_MAGIC = b":W&B", 0xBEE1
_BLOCK = 32768
_CHUNK = struct.Struct("<IHB")  # checksum, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = [zlib.crc32(bytes([t])) for t in range(_LAST + 1)]


def read_offline_wandb_run(path: str | Path, wait_s: float = 0.0) -> dict[str, Any]:
    """Read what an offline W&B run recorded: its history rows, config, summary and saved files.

    Args:
        path: A ``run-*.wandb`` file, or a folder searched for ``offline-run-*/run-*.wandb`` (a run folder of
            this project, its ``wandb/`` folder, or the offline run's own folder). With several runs below it,
            the most recently written is read.
        wait_s: Seconds to wait for the run's last (exit) record. ``wandb.finish()`` can return before wandb's
            service has written the end of the log (seen with wandb 0.31 offline), so reading right after it may
            miss the last rows; 0 reads what is there now.

    Returns:
        ``{"history": [one dict per logged row], "config": {...}, "summary": {...}, "files": [paths relative to the
        run's files/ folder], "run_id", "project", "name", "tags", "exit_code" (None while running), "path"}``.
        The config and summary leave out wandb's own ``_wandb`` entry.

    Raises:
        FileNotFoundError: No offline run under ``path``.
        ValueError: The file is not a W&B transaction log, or a record is corrupt.
    """
    file = _find_offline_run(Path(path))
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_log(file)
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    files = file.parent / "files"
    out["files"] = sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file())
    return out


def _read_log(file: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "files": [], "run_id": None, "project": None}
    out.update({"name": None, "tags": [], "exit_code": None, "path": str(file)})
    for data in _log_records(file):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, project=run.project, name=run.display_name or None, tags=list(run.tags))
            _apply(out["config"], run.config.update, run.config.remove)
            _apply(out["summary"], run.summary.update, run.summary.remove)
        elif kind == "config":
            _apply(out["config"], record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(out["summary"], record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item, [])
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    out["summary"].pop("_wandb", None)
    return out


def _find_offline_run(path: Path) -> Path:
    if path.is_file():
        return path
    found = list(path.glob("run-*.wandb")) or list(path.glob("**/offline-run-*/run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no offline W&B run (offline-run-*/run-*.wandb) under {path}")
    return max(found, key=lambda p: (p.stat().st_mtime, p.name))


def _log_records(file: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log; a last record cut short (a run still writing) is left out."""
    raw = file.read_bytes()
    if len(raw) < _WANDB_HEADER.size:
        raise ValueError(f"{file}: too short to be a W&B transaction log")
    ident, magic, _version = _WANDB_HEADER.unpack_from(raw)
    if ident != _WANDB_IDENT or magic != _WANDB_MAGIC:
        raise ValueError(f"{file}: not a W&B transaction log (header {raw[: _WANDB_HEADER.size]!r})")
    pos, parts = _WANDB_HEADER.size, []
    while pos + _CHUNK.size <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        checksum, length, kind = _CHUNK.unpack_from(raw, pos)
        start = pos + _CHUNK.size
        if checksum == 0 and length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        if start + length > len(raw):
            return
        data = raw[start : start + length]
        if kind > _LAST or zlib.crc32(data, _TYPE_CRC[kind]) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{file}: corrupt record at byte {pos}")
        pos = start + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            parts = [data]
        elif kind == _MIDDLE:
            parts.append(data)
        elif kind == _LAST:
            yield b"".join([*parts, data])
            parts = []


def _apply(target: dict[str, Any], updates: Any, removes: Any) -> None:
    """Apply wandb's item updates (``key`` or ``nested_key`` path, JSON or typed value) and removals to a dict."""
    for item in updates:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _item_value(item)
    for item in removes:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.get(key, {})
        node.pop(keys[-1], None)


def _item_value(item: Any) -> Any:
    try:
        which = item.WhichOneof("value")  # typed values: history items of recent wandb
    except ValueError:
        which = None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    if which is not None:
        return getattr(item, which)
    return json.loads(item.value_json) if item.value_json else None
