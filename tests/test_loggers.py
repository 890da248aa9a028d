"""Experiment loggers: building them from the config, W&B's offline fallback, reading offline runs back."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from cefam_lightning.training import loggers as lg
from cefam_lightning.training.config import ConfigError
from tests.conftest import closed_port
from tests.wandb_offline import read_offline_wandb_run

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"seed": 3, "model": {"lambda_sim": 0.001, "hidden_dims": [8, 4]}, "run_name": "t"}
VERSION = {"commit": "0123abc", "dirty": False, "package_version": "9.9"}
LOGGER_NAME = "cefam_lightning.training.loggers"


pytestmark = pytest.mark.usefixtures("wandb_sandbox")  # conftest: no API key, no network, wandb in tmp


def _offline_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and "offline" in r.getMessage()]


def test_csv_logger_records_config_and_code_version(tmp_path):
    (logger,) = lg.build_loggers({"kinds": ["csv"]}, tmp_path / "run", CONFIG, VERSION)
    assert isinstance(logger, CSVLogger)
    assert Path(logger.log_dir) == tmp_path / "run" / "logs"
    logger.save()
    hparams = yaml.safe_load((tmp_path / "run" / "logs" / "hparams.yaml").read_text())
    assert hparams["model"] == CONFIG["model"] and hparams["seed"] == 3
    assert hparams["code_version"] == VERSION
    links = lg.run_links([logger])
    assert links == {"csv": {"dir": logger.log_dir, "metrics": str(Path(logger.log_dir) / "metrics.csv")}}


def test_no_kinds_gives_no_loggers(tmp_path):
    assert lg.build_loggers({"kinds": []}, tmp_path, CONFIG, VERSION) == []


def test_tensorboard_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(lg, "_tensorboard_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboard"):
        lg.build_loggers({"kinds": ["tensorboard"]}, tmp_path, CONFIG, VERSION)


@pytest.mark.skipif(not lg._tensorboard_available(), reason="neither tensorboard nor tensorboardX is installed")
def test_tensorboard_logger(tmp_path):
    (logger,) = lg.build_loggers({"kinds": ["tensorboard"]}, tmp_path, CONFIG, VERSION)
    assert isinstance(logger, TensorBoardLogger)
    assert Path(logger.log_dir) == tmp_path / "tensorboard"
    assert lg.run_links([logger]) == {"tensorboard": {"dir": logger.log_dir}}


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        ({"kinds": ["csv", "mlflow"]}, ["'mlflow'", "csv, tensorboard, wandb"]),
        ({"kinds": "comet"}, ["'comet'", "csv, tensorboard, wandb"]),
        ({"kinds": ["csv", "csv"]}, ["'csv'", "more than once"]),
        ({"kinds": ["wandb"], "wandb": {"mode": "sometimes"}}, ["logger.wandb.mode", "'sometimes'", "auto, online"]),
        ({"kinds": ["wandb"], "wandb": {"projet": "x"}}, ["'projet'", "project"]),
        ({"kinds": ["wandb"], "wandb": {"log_model": "best"}}, ["logger.wandb.log_model", "'best'"]),
    ],
)
def test_invalid_config_names_the_value(tmp_path, cfg, named):
    with pytest.raises(ConfigError) as err:
        lg.build_loggers(cfg, tmp_path, CONFIG, VERSION)
    for text in named:
        assert text in str(err.value)


def test_wandb_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match="pip install wandb"):
        lg.build_loggers({"kinds": ["wandb"]}, tmp_path, CONFIG, VERSION)


def test_wandb_auto_without_api_key_goes_offline_and_says_so_once(tmp_path, caplog):
    run_dir = tmp_path / "run-a"
    cfg = {"kinds": ["csv", "wandb"], "wandb": {"mode": "auto", "tags": ["t1"]}}
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        loggers = lg.build_loggers(cfg, run_dir, CONFIG, VERSION)
    assert [type(x) for x in loggers] == [CSVLogger, WandbLogger]
    (message,) = _offline_messages(caplog)
    assert "no W&B API key" in message and "WANDB_API_KEY" in message
    assert f"wandb sync {run_dir / 'wandb'}" in message
    links = lg.run_links(loggers)["wandb"]
    assert links["mode"] == "offline"
    assert Path(links["dir"]).parent == run_dir / "wandb" and Path(links["dir"]).name.startswith("offline-run-")
    assert links["sync"] == f"wandb sync {links['dir']}"
    assert loggers[1].experiment.name == "run-a"  # null name: the run folder's


def test_wandb_explicit_offline_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        (logger,) = lg.build_loggers({"kinds": ["wandb"], "wandb": {"mode": "offline"}}, tmp_path, CONFIG, VERSION)
    assert _offline_messages(caplog) == []
    assert lg.run_links([logger])["wandb"]["mode"] == "offline"


def test_resolve_wandb_mode_reasons(monkeypatch):
    mode, why = lg.resolve_wandb_mode()
    assert mode == "offline" and "no W&B API key" in why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key, but the host (a closed port) does not answer
    t0 = time.monotonic()
    mode, why = lg.resolve_wandb_mode(timeout=1.0)
    assert mode == "offline" and "did not answer" in why
    assert time.monotonic() - t0 < 1.5
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert lg.resolve_wandb_mode() == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert lg.resolve_wandb_mode()[0] == "disabled"


def test_resolve_wandb_mode_online_when_key_and_host_answer(monkeypatch):
    with socket.socket() as server:  # a local stand-in for the W&B host: it accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert lg.host_reachable(f"http://127.0.0.1:{port}")
        assert lg.resolve_wandb_mode()[0] == "offline"  # no key yet
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        assert lg.resolve_wandb_mode() == ("online", None)


def test_api_key_sources(wandb_sandbox, monkeypatch):
    url = "http://127.0.0.1:9"
    assert lg.wandb_api_key_source(url) is None
    netrc = wandb_sandbox / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert lg.wandb_api_key_source(url) == f"{netrc} (api.wandb.ai)"
    netrc.unlink()
    settings = wandb_sandbox / "wcfg" / "settings"
    settings.write_text("[default]\napi_key = " + "k" * 40 + f"\nbase_url = {url}\n")
    assert lg.wandb_api_key_source(url) == f"{settings} (api_key)"
    monkeypatch.delenv("WANDB_BASE_URL")
    assert lg.wandb_base_url() == url  # from the settings file
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert lg.wandb_api_key_source(url) == "WANDB_API_KEY"


def test_host_reachable_gives_up_quickly():
    t0 = time.monotonic()
    assert not lg.host_reachable("https://no-such-host.invalid", timeout=1.0)
    assert not lg.host_reachable(f"http://127.0.0.1:{closed_port()}", timeout=1.0)
    assert time.monotonic() - t0 < 2.5


def test_code_version_in_and_outside_git(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    version = lg.code_version(REPO)
    assert version["commit"] == head.stdout.strip()
    assert isinstance(version["dirty"], bool)
    assert version["package_version"] is not None
    outside = lg.code_version(tmp_path)  # tmp_path is not in a git checkout
    assert outside["commit"] is None and outside["dirty"] is None
    assert outside["package_version"] == version["package_version"]


class TwoParameters(L.LightningModule):
    """y = w * x + b, fitted by SGD; keeps every training loss it logs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.b = torch.nn.Parameter(torch.zeros(()))
        self.train_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.mean((self.w * x + self.b - y) ** 2)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.train_losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.mean((self.w * x + self.b - y) ** 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_fit(run_dir: Path, loggers) -> TwoParameters:
    x = torch.linspace(-1, 1, 16)
    data = DataLoader(TensorDataset(x, 2 * x + 1), batch_size=4)
    module = TwoParameters()
    trainer = L.Trainer(
        max_epochs=1,
        logger=loggers,
        log_every_n_steps=1,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    trainer.fit(module, data, data)
    return module


def test_offline_run_read_back(tmp_path):
    import wandb

    run_dir = tmp_path / "run-b"
    big = "x" * 70_000  # a config record longer than two 32 KiB log blocks: read back from FIRST/MIDDLE/LAST chunks
    config = {**CONFIG, "notes": big}
    version = lg.code_version()
    loggers = lg.build_loggers({"kinds": ["wandb"], "wandb": {"mode": "auto"}}, run_dir, config)
    module = _tiny_fit(run_dir, loggers)
    wandb.finish()

    run = read_offline_wandb_run(run_dir, wait_s=20)
    rows = [row for row in run["history"] if "train/loss" in row]
    assert len(module.train_losses) == 4
    assert [row["train/loss"] for row in rows] == pytest.approx(module.train_losses)
    assert [row["trainer/global_step"] for row in rows] == [0, 1, 2, 3]
    assert any("val/loss" in row for row in run["history"])
    assert run["config"]["model"] == CONFIG["model"] and run["config"]["seed"] == 3
    assert run["config"]["notes"] == big
    assert run["config"]["code_version"] == version
    assert run["summary"]["train/loss"] == pytest.approx(module.train_losses[-1])
    assert run["name"] == "run-b" and run["project"] == "cefam-lightning" and run["exit_code"] == 0
    assert "output.log" in run["files"] or "requirements.txt" in run["files"]
    assert Path(run["path"]).parent == Path(lg.run_links(loggers)["wandb"]["dir"])

    # Independent check: wandb's own reader (wandb-core, `wandb leet inspect`), where this wandb has it.
    cli = Path(sys.executable).with_name("wandb")
    res = subprocess.run(
        [str(cli), "leet", "inspect", "--summary", "--json", run["path"]], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        pytest.skip(f"this wandb has no `wandb leet inspect`: {res.stderr.strip()[:200]}")
    theirs = json.loads(res.stdout)
    assert theirs["config"] == run["config"]
    assert theirs["summary"] == run["summary"]


def test_truncated_and_wrong_files(tmp_path):
    import wandb

    loggers = lg.build_loggers({"kinds": ["wandb"], "wandb": {"mode": "offline"}}, tmp_path, CONFIG, VERSION)
    for step in range(5):
        loggers[0].log_metrics({"loss": float(step)}, step=step)
    wandb.finish()
    full = read_offline_wandb_run(tmp_path, wait_s=20)
    assert [row["loss"] for row in full["history"]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    raw = Path(full["path"]).read_bytes()
    cut = tmp_path / "cut" / "run-x.wandb"  # a run still being written: its last record may be incomplete
    cut.parent.mkdir()
    cut.write_bytes(raw[: raw.index(b"loss")])  # inside the first record that has a loss
    assert read_offline_wandb_run(cut)["history"] == []
    counts = []
    for end in range(8, len(raw), max(1, len(raw) // 25)):
        cut.write_bytes(raw[:end])
        rows = read_offline_wandb_run(cut)["history"]
        assert rows == full["history"][: len(rows)]
        counts.append(len(rows))
    assert counts == sorted(counts) and counts[0] == 0

    with pytest.raises(FileNotFoundError, match="offline-run"):
        read_offline_wandb_run(tmp_path / "cut-empty")
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a log at all")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_offline_wandb_run(bad)


def test_accepts_the_omegaconf_block(tmp_path):
    from omegaconf import OmegaConf

    block = OmegaConf.create(
        {
            "kinds": ["csv", "wandb"],
            "wandb": {
                "project": "p",
                "entity": None,
                "name": None,
                "tags": ["a"],
                "group": "g",
                "mode": "offline",
                "log_model": False,
            },
        }
    )
    OmegaConf.set_readonly(block, True)
    csv, wb = lg.build_loggers(block, tmp_path / "run-c", CONFIG, VERSION)
    assert isinstance(csv, CSVLogger) and isinstance(wb, WandbLogger)
    run = wb.experiment
    assert (run.project, run.name, run.group, tuple(run.tags)) == ("p", "run-c", "g", ("a",))


def test_check_logger_config():
    lg.check_logger_config({"kinds": ["csv"], "wandb": {"mode": "auto"}})
    with pytest.raises(ConfigError, match="'sometimes'"):
        lg.check_logger_config({"kinds": ["csv"], "wandb": {"mode": "sometimes"}})
    with pytest.raises(ConfigError, match="'neptune'"):
        lg.check_logger_config({"kinds": ["neptune"]})


def test_finish_loggers_ends_the_wandb_run(tmp_path):
    import wandb

    loggers = lg.build_loggers({"kinds": ["csv", "wandb"], "wandb": {"mode": "offline"}}, tmp_path, CONFIG, VERSION)
    loggers[1].log_metrics({"loss": 1.5}, step=0)
    assert wandb.run is not None
    lg.finish_loggers(loggers, exit_code=3)
    assert wandb.run is None
    run = read_offline_wandb_run(tmp_path, wait_s=20)
    assert run["exit_code"] == 3 and run["history"][0]["loss"] == 1.5
    lg.finish_loggers(loggers)  # a second call, or loggers without a run: nothing happens
    lg.finish_loggers([])


def test_wandb_mode_env_disabled_is_said_and_respected(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        (logger,) = lg.build_loggers({"kinds": ["wandb"], "wandb": {"mode": "auto"}}, tmp_path, CONFIG, VERSION)
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert "disabled" in message and "WANDB_MODE=disabled" in message
    assert lg.run_links([logger])["wandb"] == {"mode": "disabled"}
    assert not (tmp_path / "wandb").exists() or not list((tmp_path / "wandb").glob("offline-run-*"))
