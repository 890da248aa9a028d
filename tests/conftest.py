"""Shared fixtures: a tiny shapes world and classifier, built once per test session in a temporary cache."""

from __future__ import annotations

import socket
import sys

import pytest

from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec
from cefam_lightning.training.classifier_fit import FitSettings, fit_shapes_classifier

TINY_WORLD = {"image_size": 32, "n_train": 64, "n_val": 32, "n_test": 32, "seed": 3}


def tiny_overrides(cache_dir, output_dir, run_name: str = "test", method: str = "cefam") -> list[str]:
    """Config overrides that shrink the demo to seconds: tiny world, 1 epoch, CPU, no progress bar (and, for
    ``method``, its own section's: a small translator for CE-FAM)."""
    own = {"cefam": ["cefam.hidden_dims=[64]"]}.get(method, [])
    return [
        f"method={method}",
        *own,
        f"cache_dir={cache_dir}",
        f"output_dir={output_dir}",
        f"run_name={run_name}",
        *[f"world.{k}={v}" for k, v in TINY_WORLD.items()],
        "classifier.fit.epochs=1",
        "classifier.fit.batch_size=32",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "demo.num_figures=2",
    ]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_spec() -> WorldSpec:
    return WorldSpec(**TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_world(tiny_spec, cache_dir) -> ShapesWorld:
    return ShapesWorld.build(tiny_spec, cache_dir)


@pytest.fixture(scope="session")
def tiny_classifier_weights(tiny_world, tiny_spec, cache_dir):
    path, _ = fit_shapes_classifier(
        tiny_spec, cache_dir, FitSettings(epochs=1, batch_size=32), progress_bar=False, accelerator="cpu"
    )
    return path


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory) -> dict:
    """A tiny training run (1 epoch), shared by tests that need a trained checkpoint: its metrics.json dict."""
    from cefam_lightning.cli.train import main

    return main(tiny_overrides(cache_dir, tmp_path_factory.mktemp("runs"), "tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> str:
    """Path of the tiny run's best CE-FAM checkpoint."""
    return tiny_run["best_checkpoint"]


@pytest.fixture(scope="session")
def tiny_method_run(cache_dir, tmp_path_factory):
    """``tiny_method_run(method)``: a tiny 1-epoch ``train.py method=...`` run (region maps rendered every
    epoch), trained once per session and shared: its metrics.json dict."""
    from cefam_lightning.cli.train import main

    runs: dict[str, dict] = {}
    out = tmp_path_factory.mktemp("method_runs")

    def get(method: str) -> dict:
        if method not in runs:
            cb = "callbacks.region_maps.every_n_epochs=1"
            runs[method] = main([*tiny_overrides(cache_dir, out, method, method=method), cb])
        return runs[method]

    return get


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    """No API key, no network (the W&B host is a closed local port), every wandb folder in tmp, cwd in tmp."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    folders = {"WANDB_DIR": "w", "WANDB_CACHE_DIR": "wc", "WANDB_CONFIG_DIR": "wcfg", "WANDB_DATA_DIR": "wd"}
    for var, sub in folders.items():
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    wandb = sys.modules.get("wandb")  # None where a test hid it
    if wandb is not None and wandb.run is not None:
        wandb.finish()
