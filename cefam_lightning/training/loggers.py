"""Experiment loggers from the ``logger`` config block: CSV, TensorBoard and Weights & Biases.

``build_loggers`` turns the block into Lightning loggers writing under the run folder and records the resolved config
and the code version in each. W&B's ``mode: auto`` goes online only when an API key is found and the W&B host answers
within two seconds; otherwise the run is written offline (said once, with the ``wandb sync`` command that uploads it
later), so a run never waits on the network.

Example::

    loggers = build_loggers(cfg.logger, run_dir, config=to_dict(cfg))
    trainer = L.Trainer(logger=loggers, ...)
    links = run_links(loggers)  # for run.json: the W&B URL or offline folder, the CSV/TensorBoard folders
"""

from __future__ import annotations

import configparser
import csv
import importlib.util
import logging
import netrc
import os
import socket
import subprocess
import threading
import uuid
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
