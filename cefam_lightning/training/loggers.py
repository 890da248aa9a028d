"""Experiment loggers from the ``logger`` config block: CSV, TensorBoard and Weights & Biases.

``build_loggers`` turns the block into Lightning loggers writing under the run folder and records the resolved config
and the code version in each. W&B's ``mode: auto`` goes online only when an API key is found and the W&B host answers
within two seconds; otherwise the run is written offline (said once, with the ``wandb sync`` command that uploads it
later), so a run never waits on the network. ``read_offline_wandb_run`` reads an offline run back (history, config,
summary, files) without wandb's service, from its transaction log.

Example::

    loggers = build_loggers(cfg.logger, run_dir, config=to_dict(cfg))
    trainer = L.Trainer(logger=loggers, ...)
    links = run_links(loggers)  # for run.json: the W&B URL or offline folder, the CSV/TensorBoard folders
"""

from __future__ import annotations

import configparser
import csv
import importlib.util
import json
import logging
import netrc
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from cefam_lightning.config_rules import ConfigError
from cefam_lightning.io_utils import atomic_write_bytes

log = logging.getLogger(__name__)

LOGGER_KINDS = ("csv", "tensorboard", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")
WANDB_KEYS = ("project", "entity", "name", "tags", "group", "mode", "log_model")
FALLBACK_WANDB_BASE_URL = "https://api.wandb.ai"  # when wandb does not say its own default
REACHABILITY_TIMEOUT_S = 2.0
PACKAGE = "cefam-lightning"


def build_loggers(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    config: dict[str, Any],
    code_version: dict[str, Any] | None = None,
    resume: bool = False,
) -> list[Logger]:
    """The loggers ``cfg.kinds`` names, writing under ``run_dir``, each told the config and the code version.

    CSV writes ``run_dir/logs/metrics.csv``, TensorBoard ``run_dir/tensorboard/``, W&B ``run_dir/wandb/``. The
    config and ``{"code_version": ...}`` are logged as hyperparameters (on rank zero; Lightning's loggers no-op on
    the other ranks), which starts the W&B run at once.

    Args:
        cfg: The ``logger`` block: ``kinds`` (a list of ``csv``, ``tensorboard``, ``wandb``) and ``wandb`` (``project``,
            ``entity``, ``name`` (null: the run folder's name), ``tags``, ``group``, ``mode`` (``auto``, ``online``,
            ``offline``, ``disabled``), ``log_model``).
        run_dir: The run folder.
        config: The resolved config, recorded by every logger.
        code_version: What ``code_version()`` returns; None computes it.
        resume: the run resumes the run folder's earlier run: CSV rows are appended to its ``metrics.csv`` (which
            Lightning's CSV logger would delete), and W&B continues the same W&B run (its id is kept in
            ``run_dir/wandb/run_id``).

    Returns:
        The loggers in the order of ``cfg.kinds`` (empty when it is empty), for ``lightning.Trainer(logger=...)``.

    Raises:
        ConfigError: An unknown or repeated kind, an unknown ``wandb`` key, or an invalid ``wandb.mode``.
        ModuleNotFoundError: wandb, or both tensorboard and tensorboardX, are needed and not installed (the message
            names the ``pip install`` command).
    """
    kinds = _kinds(cfg)
    run_dir = Path(run_dir)
    wcfg = _wandb_settings(cfg) if "wandb" in kinds else None
    version = code_version if code_version is not None else _code_version()
    loggers: list[Logger] = []
    for kind in kinds:
        if kind == "csv":
            # Rows are written as they are logged (Lightning's default keeps 100 steps in memory), so a run killed
            # with SIGKILL keeps its history up to the kill.
            csv_logger = AppendingCSVLogger if resume else CSVLogger
            loggers.append(csv_logger(run_dir, name="logs", version="", flush_logs_every_n_steps=1))
        elif kind == "tensorboard":
            if not _tensorboard_available():
                raise ModuleNotFoundError(
                    "logger.kinds has 'tensorboard', but neither tensorboard nor tensorboardX is installed: "
                    "pip install tensorboard"
                )
            loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
        else:
            loggers.append(_wandb_logger(wcfg, run_dir, resume))
    for logger in loggers:
        logger.log_hyperparams({**config, "code_version": version})
    return loggers


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``: its rows are kept and new rows
    appended under the same header (widened, old rows kept, when new keys appear)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    """A ``CSVLogger`` that continues an existing ``metrics.csv`` (a resumed run) instead of replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def check_logger_config(cfg: Mapping[str, Any]) -> None:
    """Validate a ``logger`` block without building anything (for ``load_config``).

    Raises:
        ConfigError: An unknown or repeated kind, an unknown ``wandb`` key, or an invalid ``wandb.mode`` or
            ``wandb.log_model``.
    """
    if "wandb" in _kinds(cfg) or cfg.get("wandb") is not None:
        _wandb_settings(cfg)


def finish_loggers(loggers: Sequence[Logger], exit_code: int = 0) -> None:
    """End the W&B run a ``WandbLogger`` started (Lightning leaves it open), so that its log is complete and a later
    run in the same process starts a run of its own. Other loggers are finalized by the trainer; nothing to do.

    Call it on every rank after the last ``trainer.fit``/``trainer.test``; it acts on rank zero only.
    """
    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        run = logger._experiment if isinstance(logger, WandbLogger) else None  # noqa: SLF001 - no run: nothing to end
        if run is not None and hasattr(run, "finish"):
            run.finish(exit_code=exit_code)


def _kinds(cfg: Mapping[str, Any]) -> list[str]:
    kinds = cfg.get("kinds", ["csv"])
    if isinstance(kinds, str):
        kinds = [kinds]
    if kinds is None or not isinstance(kinds, Sequence):
        raise ConfigError(f"logger.kinds must be a list of {LOGGER_KINDS}, got {kinds!r}")
    kinds = list(kinds)
    for kind in kinds:
        if kind not in LOGGER_KINDS:
            raise ConfigError(f"logger.kinds: unknown logger {kind!r}; valid: {', '.join(LOGGER_KINDS)}")
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ConfigError(f"logger.kinds lists {repeated} more than once")
    return kinds


def _wandb_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    wcfg = dict(cfg.get("wandb") or {})
    unknown = sorted(set(wcfg) - set(WANDB_KEYS))
    if unknown:
        raise ConfigError(f"logger.wandb: unknown keys {unknown}; valid: {', '.join(WANDB_KEYS)}")
    mode = wcfg.get("mode", "auto")
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    log_model = wcfg.get("log_model", False)
    if log_model not in (True, False, "all"):
        raise ConfigError(f"logger.wandb.log_model must be true, false or 'all', got {log_model!r}")
    return {"project": "cefam-lightning", "tags": [], **wcfg, "mode": mode, "log_model": log_model}


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of a run folder: kept in ``wandb/run_id`` so that a resumed run continues the same W&B run."""
    path = run_dir / "wandb" / "run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [a-z0-9]
    atomic_write_bytes(path, run_id.encode())
    return run_id


def _wandb_logger(wcfg: dict[str, Any], run_dir: Path, resume: bool = False) -> WandbLogger:
    try:
        import wandb  # noqa: F401 - only to say clearly when it is missing
    except ImportError:
        raise ModuleNotFoundError("logger.kinds has 'wandb', but wandb is not installed: pip install wandb") from None
    mode = wcfg["mode"]
    if mode == "auto" and rank_zero_only.rank == 0:  # only rank zero starts the W&B run
        mode, reason = resolve_wandb_mode()
        where = run_dir / "wandb"
        if mode == "offline":
            log.warning(
                f"W&B: logging offline ({reason}); the run is kept under {where}/offline-run-*; "
                f"upload it later with: wandb sync {where}/offline-run-*"
            )
        elif mode == "disabled":
            log.warning(f"W&B: disabled ({reason}); nothing is logged to W&B")
    elif mode == "auto":
        mode = "offline"  # not used: WandbLogger starts no run off rank zero
    run_dir.mkdir(parents=True, exist_ok=True)  # wandb's `dir` must exist, or wandb falls back to a temp folder
    ids = {"id": _wandb_run_id(run_dir, resume), "resume": "allow"} if rank_zero_only.rank == 0 else {}
    return WandbLogger(
        **ids,
        project=wcfg["project"],
        entity=wcfg.get("entity"),
        name=wcfg.get("name") or run_dir.name,
        tags=list(wcfg.get("tags") or []),
        group=wcfg.get("group"),
        log_model=wcfg["log_model"],
        save_dir=run_dir,
        mode=mode,
    )


def resolve_wandb_mode(timeout: float = REACHABILITY_TIMEOUT_S) -> tuple[str, str | None]:
    """What ``mode: auto`` means here and now: ``("online", None)`` or ``("offline"|"disabled", why)``.

    Offline when ``WANDB_MODE`` says offline (or disabled), when no API key is found (``wandb_api_key_source``), or
    when the W&B host does not accept a TCP connection within ``timeout`` seconds. Never waits longer than that.
    """
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env_mode}"
    if env_mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    base_url = wandb_base_url()
    if wandb_api_key_source(base_url) is None:
        return "offline", (
            f"no W&B API key for {base_url}: set WANDB_API_KEY or run `wandb login`, or set logger.wandb.mode"
        )
    if not host_reachable(base_url, timeout):
        return "offline", f"{base_url} did not answer within {timeout:g} s"
    return "online", None


def wandb_base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL``, else ``base_url`` in wandb's workspace or user settings file, else
    wandb's default."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url.rstrip("/")
    for settings in _wandb_settings_files():
        if url := settings.get("base_url"):
            return url.rstrip("/")
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL

        return DEFAULT_BASE_URL
    except ImportError:
        return FALLBACK_WANDB_BASE_URL


def wandb_api_key_source(base_url: str | None = None) -> str | None:
    """Where wandb would find an API key for ``base_url``, or None when it would find none.

    Looks, as wandb does, at ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``), the netrc file (``NETRC``, else
    ``~/.netrc``) entry for the server's host or api.wandb.ai, and ``api_key`` in wandb's settings files.
    """
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    base_url = base_url or wandb_base_url()
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    if path.is_file():
        try:
            entries = netrc.netrc(path)
        except (netrc.NetrcParseError, OSError):
            entries = None
        for host in (urlsplit(base_url).netloc, urlsplit(FALLBACK_WANDB_BASE_URL).netloc):
            found = entries.authenticators(host) if entries is not None else None
            if found and found[2]:
                return f"{path} ({host})"
    for settings in _wandb_settings_files():
        if settings.get("api_key"):
            return f"{settings['_path']} (api_key)"
    return None


def _wandb_settings_files() -> Iterator[dict[str, str]]:
    """The ``[default]`` sections of wandb's workspace settings (``./wandb/settings``) and user settings
    (``$WANDB_CONFIG_DIR/settings``, else ``~/.config/wandb/settings``), in that order of precedence."""
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    for path in (Path("wandb") / "settings", config_dir / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError):
            continue
        if parser.has_section("default"):
            yield {**parser["default"], "_path": str(path)}


def host_reachable(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether ``url``'s host accepts a TCP connection (port 443 for https, 80 for http) within ``timeout`` s.

    Name resolution is included in the time limit: the connection is tried in a daemon thread that is abandoned if
    it has not finished.
    """
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        return False
    port = parts.port or (80 if parts.scheme == "http" else 443)
    ok = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, name="cefam-wandb-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()


def code_version(root: str | Path | None = None) -> dict[str, Any]:
    """The code that runs: ``{"commit": git HEAD or None, "dirty": bool or None, "package_version": str or None}``.

    Args:
        root: A folder inside the git checkout; None: this package's folder. Outside a checkout (an installed
            package, no git) the commit and dirty flag are None.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit is not None else None
    try:
        package_version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        package_version = None
    return {"commit": commit, "dirty": None if status is None else bool(status), "package_version": package_version}


_code_version = code_version  # build_loggers' argument of the same name hides it there


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_links(loggers: Sequence[Logger]) -> dict[str, Any]:
    """Where each logger's record of the run is, for the run folder's ``run.json``.

    W&B: ``{"mode", "url"}`` online, ``{"mode", "dir", "sync"}`` offline (the run folder and the ``wandb sync``
    command); it reports a W&B run only once started (``build_loggers`` starts it) and only on rank zero. CSV:
    ``{"dir", "metrics"}``; TensorBoard: ``{"dir"}``; another logger: ``{"dir"}`` under its class name.
    """
    links: dict[str, Any] = {}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            links["wandb"] = _wandb_links(logger)
        elif isinstance(logger, CSVLogger):
            links["csv"] = {"dir": logger.log_dir, "metrics": str(Path(logger.log_dir) / "metrics.csv")}
        elif isinstance(logger, TensorBoardLogger):
            links["tensorboard"] = {"dir": logger.log_dir}
        else:
            links[type(logger).__name__] = {"dir": logger.log_dir}
    return links


def _wandb_links(logger: WandbLogger) -> dict[str, Any]:
    run = logger._experiment  # noqa: SLF001 - `.experiment` would start a run just to describe it
    if run is None or rank_zero_only.rank != 0:
        return {"mode": None}
    if getattr(run, "disabled", False) or type(run).__name__ == "RunDisabled":
        return {"mode": "disabled"}
    offline = getattr(run, "offline", None)
    if offline is None:
        offline = getattr(run.settings, "mode", "") in ("offline", "dryrun")
    if not offline:
        return {"mode": "online", "url": run.url, "id": run.id}
    run_folder = str(Path(run.dir).parent)  # run.dir is <run folder>/files
    return {"mode": "offline", "dir": run_folder, "id": run.id, "sync": f"wandb sync {run_folder}"}


# --- reading an offline W&B run ---------------------------------------------------------------------------------
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
