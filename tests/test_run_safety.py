"""What a run refuses, keeps and survives: checkpoints that would run code, a last.ckpt that is the last epoch and is
written whole or not at all, a run folder claimed by one run at a time and never reused by accident, resumed
history kept, and one-line errors from every command-line tool."""

from __future__ import annotations

import builtins
import csv
import errno
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

from cefam_lightning.cli.evaluate import main as evaluate_main
from cefam_lightning.cli.explain import main as explain_main
from cefam_lightning.cli.train import main as train_main
from cefam_lightning.errors import error_summary, one_line
from cefam_lightning.methods.base import load_explainer
from cefam_lightning.methods.cefam.module import CEFAMModule
from cefam_lightning.methods.checkpoints import CheckpointError, read_checkpoint
from cefam_lightning.methods.lcam.module import LCAMModule
from cefam_lightning.methods.siam.module import SIAMModule
from cefam_lightning.training.run_folder import RunFolderError, claim_run_folder
from tests.cli import cli_error
from tests.conftest import tiny_overrides

QUIET = ["evaluation.enabled=false", "demo.num_figures=0", "callbacks.region_maps.enabled=false"]


def _overrides(cache_dir, out, name, *extra) -> list[str]:
    return [*tiny_overrides(cache_dir, out, name), *QUIET, *extra]


class _WritesAMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a malicious checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def malicious_checkpoint(tmp_path, tiny_checkpoint):
    """A real CE-FAM checkpoint with one object that runs code when unpickled; and the marker file it would write."""
    marker = tmp_path / "code_ran"
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["payload"] = _WritesAMarker(marker)
    path = tmp_path / "malicious.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(
    malicious_checkpoint, tmp_path, cache_dir, tiny_world, capsys
):
    path, marker = malicious_checkpoint
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(tiny_world.split("test").images[0]).save(image)
    said = [
        cli_error(explain_main, ["--checkpoint", str(path), "--out", str(tmp_path / "ex"), str(image)], capsys),
        cli_error(evaluate_main, ["--checkpoint", str(path), "--out", str(tmp_path / "ev")], capsys),
        cli_error(train_main, _overrides(cache_dir, tmp_path, "init", f"cefam.init_from={path}"), capsys),
        cli_error(train_main, _overrides(cache_dir, tmp_path, "resume", f"ckpt_path={path}"), capsys),
    ]
    for line in said:
        assert str(path) in line and "would call code" in line and "nothing from it was run" in line
        assert "weights_only=False" not in line  # torch's advice to load it unsafely is not passed on
    assert said[2].startswith("cefam.init_from: ") and said[3].startswith("ckpt_path: ")
    for load in (read_checkpoint, load_explainer, CEFAMModule.from_checkpoint, LCAMModule.from_checkpoint):
        with pytest.raises(CheckpointError, match="would call code"):
            load(path)
    with pytest.raises(CheckpointError, match="would call code"):
        SIAMModule.from_checkpoint(path)
    assert not marker.exists()
    assert not (tmp_path / "init").exists() and not (tmp_path / "resume").exists()  # nothing left behind


def test_last_ckpt_is_the_last_epoch_when_val_loss_stops_improving(cache_dir, tmp_path):
    # An LR of 1e-30 changes no weight (and without input standardization there are no running statistics):
    # val/loss is the same every epoch, so the best stays the first epoch.
    flat = ["trainer.max_epochs=3", "optimizer.lr=1e-30", "cefam.input_norm=false"]
    metrics = train_main(_overrides(cache_dir, tmp_path, "flat", *flat))
    folder = tmp_path / "flat" / "checkpoints"
    assert metrics["epochs_trained"] == 3
    assert read_checkpoint(folder / "best.ckpt")["epoch"] == 0
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 2  # Lightning's save_last kept epoch 0 here
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_failed_checkpoint_write_leaves_the_previous_last_ckpt_intact(cache_dir, tmp_path, monkeypatch, capsys):
    train_main(_overrides(cache_dir, tmp_path, "full_disk", "trainer.max_epochs=1"))
    folder = tmp_path / "full_disk" / "checkpoints"
    before = (folder / "last.ckpt").read_bytes()

    # The disk that holds the run is full: every file opened for writing there fails at its first write (after
    # open() has truncated it). The system temp folder lies on another disk, as /tmp often does (tmpfs), which is
    # where Lightning's fsspec writer stages a checkpoint before copying it over the old one.
    other_disk = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    if other_disk is not None and os.stat(other_disk).st_dev != os.stat(tmp_path).st_dev:
        monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(dir=other_disk))
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and Path(file).parent == folder and ("w" in mode or "a" in mode):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    line = cli_error(
        train_main, _overrides(cache_dir, tmp_path, "full_disk", "trainer.max_epochs=2", "ckpt_path=last"), capsys
    )
    monkeypatch.setattr(builtins, "open", real_open)
    assert "No space left on device" in line
    assert (folder / "last.ckpt").read_bytes() == before  # the previous last.ckpt, whole
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial temporary file
    resumed = train_main(_overrides(cache_dir, tmp_path, "full_disk", "trainer.max_epochs=2", "ckpt_path=last"))
    assert resumed["epochs_trained"] == 2


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def test_a_run_folder_holding_a_run_is_reused_only_to_resume_or_overwrite(cache_dir, tmp_path, capsys):
    run = tmp_path / "named"
    train_main(_overrides(cache_dir, tmp_path, "named", "trainer.max_epochs=1"))
    config, history = (run / "config.yaml").read_text(), _rows(run / "logs" / "metrics.csv")
    assert history

    # Rerunning the name (even with a setting that then fails) is refused, and nothing in the folder changes.
    for extra in ([], ["classifier.layers=[layer9]"]):
        line = cli_error(train_main, _overrides(cache_dir, tmp_path, "named", *extra), capsys)
        assert re.search(rf"run folder {re.escape(str(run))} already holds a run; resume it with ckpt_path=last", line)
    assert (run / "config.yaml").read_text() == config and _rows(run / "logs" / "metrics.csv") == history

    # Resuming keeps the earlier history: its rows stay, the resumed epoch's rows follow; the earlier config too.
    train_main(_overrides(cache_dir, tmp_path, "named", "trainer.max_epochs=2", "ckpt_path=last"))
    rows = _rows(run / "logs" / "metrics.csv")
    assert rows[: len(history)] == history and len(rows) > len(history)
    assert {r["epoch"] for r in rows if "val/loss" in r} == {"0", "1"}
    assert (run / "config.1.yaml").read_text() == config and "max_epochs: 2" in (run / "config.yaml").read_text()

    # overwrite=true replaces the earlier run whole, but only once the new run starts: a failing one changes nothing.
    (run / "stale.txt").write_text("from the earlier run")
    failing = _overrides(cache_dir, tmp_path, "named", "overwrite=true", "cefam.activation=x")
    assert "activation" in cli_error(train_main, failing, capsys)
    assert (run / "stale.txt").exists() and (run / "config.1.yaml").exists()
    train_main(_overrides(cache_dir, tmp_path, "named", "overwrite=true"))
    assert not (run / "stale.txt").exists() and not (run / "config.1.yaml").exists()
    assert {r["epoch"] for r in _rows(run / "logs" / "metrics.csv") if "val/loss" in r} == {"0"}


def test_a_run_folder_in_use_is_refused(cache_dir, tmp_path, capsys):
    with claim_run_folder(tmp_path, "busy"):
        line = cli_error(train_main, _overrides(cache_dir, tmp_path, "busy"), capsys)
        assert f"run folder {tmp_path / 'busy'} is in use by another run" in line
        with pytest.raises(RunFolderError, match="in use"), claim_run_folder(tmp_path, "busy", overwrite=True):
            pass
    assert not (tmp_path / "busy").exists()  # the claim that wrote nothing leaves nothing
    with claim_run_folder(tmp_path, "busy") as folder:  # released: claimable again
        assert folder.path == tmp_path / "busy"


def test_auto_named_runs_get_distinct_folders(tmp_path):
    with claim_run_folder(tmp_path, None) as a:
        (a.path / "config.yaml").write_text("a")
        with claim_run_folder(tmp_path, None) as b:
            assert a.path != b.path and b.path.parent == tmp_path


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", "~user"])
def test_run_name_may_not_leave_output_dir(name, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    line = cli_error(train_main, [*_overrides(cache_dir, out, "x"), f"run_name={name}"], capsys)
    assert line.startswith("run_name: ") and "is not a folder name inside output_dir" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside output_dir or beside it


def test_explain_and_evaluate_give_one_line_for_an_unwritable_out(tiny_checkpoint, tiny_world, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(tiny_world.split("test").images[0]).save(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder's parent should be")
    out = blocker / "out"
    line = cli_error(explain_main, ["--checkpoint", tiny_checkpoint, "--out", str(out), str(image)], capsys)
    assert str(blocker) in line
    line = cli_error(evaluate_main, ["--checkpoint", tiny_checkpoint, "--max-images", "4", "--out", str(out)], capsys)
    assert str(blocker) in line
    with pytest.raises(OSError):  # --debug: the exception itself, with its traceback
        explain_main(["--debug", "--checkpoint", tiny_checkpoint, "--out", str(out), str(image)])


def test_one_line_folds_cuts_and_keeps_a_workers_own_message():
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 600) == "x" * 497 + "..."
    assert one_line("x y " * 10, limit=9) == "x y x ..."
    assert one_line("x\n" * 600, limit=None) == " ".join(["x"] * 600)  # uncut, for a caller that cuts later
    relayed = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    relayed += '  File "w.py", line 1\nValueError: bad.png: cannot read the image\n'
    assert one_line(relayed) == "bad.png: cannot read the image"
    assert error_summary(KeyError("k")) == "KeyError: 'k'" and error_summary(EOFError()) == "EOFError"
    assert error_summary(ValueError("v" * 500)) == "ValueError: " + "v" * 397 + "..."  # the message cut to 400
