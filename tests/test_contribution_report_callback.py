"""The ContributionLogger's final report: the ``report`` command's aggregation on the whole validation split at the
end of training, written to ``<run>/report-val/`` and sent to W&B / TensorBoard."""

from __future__ import annotations

import importlib.util
import json
from unittest import mock

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader, IterableDataset

from callbacks import ContributionLogger
from cefam_lightning.config_rules import ConfigError
from cefam_lightning.data.feature_cache import collate_cached
from cefam_lightning.data.report_data import UNLABELED, dataloader_data, shapes_world_data
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule, ShapesWorldDataset
from cefam_lightning.methods.base import load_explainer
from cefam_lightning.reporting.concept_report import ReportSettings, build_report
from cefam_lightning.training.config import load_config
from tests.conftest import TINY_WORLD, tiny_overrides
from tests.test_callbacks import BATCH, EXPLAIN_K, _fit
from tests.test_cefam_module import _module

_HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture
def make(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights):
    """``make()`` -> a fresh (seeded) CE-FAM module and shapes-world DataModule (as in test_callbacks)."""

    def _make():
        torch.manual_seed(0)
        module = _module(tiny_world, tiny_classifier_weights, explain={"k": EXPLAIN_K})
        return module, ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=BATCH)

    return _make


def _same_report(got: dict, expected: dict) -> None:
    """The numbers of two reports: per class the counts and each listed concept's statistics and typical images,
    the concept x class matrix and every misclassified image with its concepts (floats to 1e-5)."""
    assert (got["images"], got["labeled"], got["accuracy"]) == (
        expected["images"],
        expected["labeled"],
        expected["accuracy"],
    )
    assert [r["class"] for r in got["classes"]] == [r["class"] for r in expected["classes"]]
    for g, e in zip(got["classes"], expected["classes"], strict=True):
        assert (g["images"], g["labeled"], g["accuracy"]) == (e["images"], e["labeled"], e["accuracy"])
        for sign in ("positive", "negative"):
            assert [c["concept"] for c in g[sign]] == [c["concept"] for c in e[sign]], (g["class"], sign)
            for gc, ec in zip(g[sign], e[sign], strict=True):
                for key in ("explained", "present_rate", "detected_rate"):
                    assert gc[key] == ec[key], (g["class"], gc["concept"], key)
                for key in ("mean", "share_of_positive", "mean_when_explained"):
                    assert gc[key] == pytest.approx(ec[key], abs=1e-5)
                assert gc["ci95"] == pytest.approx(ec["ci95"], abs=1e-5)
                assert [t["id"] for t in gc["typical"]] == [t["id"] for t in ec["typical"]]
    g, e = np.array(got["matrix"]["values"], dtype=float), np.array(expected["matrix"]["values"], dtype=float)
    np.testing.assert_allclose(g, e, atol=1e-5)
    assert (
        got["errors"]["count"] == expected["errors"]["count"] and got["errors"]["pairs"] == expected["errors"]["pairs"]
    )
    for g, e in zip(got["errors"]["items"], expected["errors"]["items"], strict=True):
        assert (g["id"], g["true"], g["predicted"], g["explained"]) == (
            e["id"],
            e["true"],
            e["predicted"],
            e["explained"],
        )
        for side in ("toward_predicted", "toward_true"):
            assert [c["concept"] for c in g[side]] == [c["concept"] for c in e[side]]
    assert got["findings"] == expected["findings"]


# ---------------------------------------------------------------------- the data


def test_dataloader_data_reads_a_map_style_split_as_the_report_command_does(tiny_world):
    """The validation dataset a run trains with, wrapped, gives the batches shapes_world_data gives."""
    dataset = ShapesWorldDataset(tiny_world.split("val"), with_masks=True)
    names = [c.name for c in tiny_world.concepts]
    data = dataloader_data(DataLoader(dataset, batch_size=5), tiny_world.class_names, names)
    direct = shapes_world_data(tiny_world, "val")
    assert data.size == direct.size == TINY_WORLD["n_val"] and data.concepts == direct.concepts == names
    for keep in (None, {0, 7, 8, 31}):
        ours, theirs = list(data.batches(4, keep)), list(direct.batches(4, keep))
        assert all(len(b.ids) <= 4 for b in ours)
        assert [p for b in ours for p in b.positions] == [p for b in theirs for p in b.positions]
        assert [i for b in ours for i in b.ids] == [i for b in theirs for i in b.ids]
        for key in ("images", "labels", "present"):
            assert torch.equal(torch.cat([getattr(b, key) for b in ours]), torch.cat([getattr(b, key) for b in theirs]))
    # without masks (a training split), no presence
    plain = dataloader_data(ShapesWorldDataset(tiny_world.split("val")), tiny_world.class_names, names)
    assert plain.concepts is None and next(plain.batches(4, None)).present is None


class _CachedStream(IterableDataset):
    """Three batches of four items; the second item of each comes from the feature cache, without its image."""

    def __iter__(self):
        for b in range(3):
            items = []
            for i in range(4):
                item = {"id": f"s{b}-{i}", "label": -1 if i == 3 else i % 2, "masks": torch.zeros(2, 3, 3)}
                item["masks"][i % 2, 1, 1] = 1
                if i == 1:
                    item["pooled"] = torch.zeros(5)
                else:
                    item["image"] = torch.full((3, 3, 3), b / 4)
                items.append(item)
            yield collate_cached(items)


def test_dataloader_data_reads_a_stream_in_order_and_again_for_the_kept_positions():
    data = dataloader_data(DataLoader(_CachedStream(), batch_size=None), ["a", "b"], ["c0", "c1"])
    assert data.size is None and data.concepts == ["c0", "c1"]
    batches = list(data.batches(4, None))
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"s{b}-{i}" for b in range(3) for i in (0, 2, 3)]
    assert [p for b in batches for p in b.positions] == list(range(9))
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [0, 0, UNLABELED] * 3
    assert torch.cat([b.present for b in batches]).tolist() == [[True, False], [True, False], [False, True]] * 3
    assert [s["id"] for s in data.skipped] == ["s0-1", "s1-1", "s2-1"]  # counted once, on the first pass
    again = list(data.batches(2, {1, 5, 8}))
    assert [b.positions for b in again] == [[1, 5], [8]]
    assert [b.ids for b in again] == [["s0-2", "s1-3"], ["s2-3"]]
    assert len(data.skipped) == 3


# ---------------------------------------------------------------------- the callback


def test_final_report_covers_the_validation_split_and_reaches_the_loggers(make, tiny_world, tmp_path):
    module, dm = make()
    wandb = mock.create_autospec(WandbLogger, instance=True)
    tensorboard = TensorBoardLogger(tmp_path, name="tb") if _HAS_TENSORBOARD else None
    n = TINY_WORLD["n_val"]
    cb = ContributionLogger(num_images=n, top_n=4, top=3, batch_size=8, final_report=True)
    # one validation batch of 16 per epoch: the report still reads all 32 images
    _fit(module, dm, [cb], tmp_path, logger=[wandb, tensorboard] if tensorboard else [wandb], limit_val_batches=1)

    folder = tmp_path / "report-val"
    assert sorted(p.name for p in folder.iterdir()) == ["figures", "report.html", "report.json", "report.md"]
    report = json.loads((folder / "report.json").read_text())
    assert report["images"] == report["labeled"] == TINY_WORLD["n_val"]
    assert sum(r["images"] for r in report["classes"]) == TINY_WORLD["n_val"]
    assert report["presence"] == "ground truth" and report["method"] == "cefam"
    assert not (tmp_path / "tables").exists()  # the periodic table went to the loggers

    # The report command's aggregation, run directly on the same split with the same settings and weights.
    settings = ReportSettings(top_n=4, top=3, batch_size=8)
    module.eval()
    expected, _ = build_report(module, shapes_world_data(tiny_world, "val"), settings, "cpu", progress=False)
    _same_report(report, expected)  # findings included: the world's class definitions reached them
    assert report["errors"]["count"] > 0 and any(r["negative"] for r in report["classes"])

    tables = {c.kwargs["key"]: c.kwargs for c in wandb.log_table.call_args_list}
    assert "val/report/classes" in tables
    classes = tables["val/report/classes"]
    assert classes["columns"][:3] == ["class", "sign", "rank"]
    assert {row[0] for row in classes["data"]} <= set(module.class_names) and classes["data"]
    images = [c.kwargs["key"] for c in wandb.log_image.call_args_list]
    assert "val/report/heatmap" in images
    if tensorboard is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = EventAccumulator(tensorboard.log_dir).Reload().Tags()
        assert "val/report/classes/text_summary" in tags["tensors"] and "val/report/heatmap/0" in tags["images"]
    assert str(folder) in cb.written and "wandb:val/report/classes" in cb.written
    assert cb.report["global_step"] == 2 and cb.report["images"] == TINY_WORLD["n_val"]  # 2 training batches

    # The periodic table, here on every validation image with the same weights, agrees with the report where they
    # overlap: its images per class, and its mean of a concept is the report's mean_when_explained.
    assert "val/contributions" in tables
    listed = {}
    for r in report["classes"]:
        for sign in ("positive", "negative"):
            listed.update({(r["class"], sign, c["concept"]): c for c in r[sign]})
    overlap = 0
    for row in cb.last_rows:
        assert row[1] == next(r["images"] for r in report["classes"] if r["class"] == row[0])
        for s, sign in enumerate(("positive", "negative")):
            cells = row[2 + 2 * 3 * s : 2 + 2 * 3 * (s + 1)]
            for concept, mean in zip(cells[::2], cells[1::2], strict=True):
                if (row[0], sign, concept) in listed:
                    assert mean == pytest.approx(listed[row[0], sign, concept]["mean_when_explained"], abs=1e-5)
                    overlap += 1
    assert overlap > 0


def test_no_final_report_by_default(make, tmp_path):
    module, dm = make()
    cb = ContributionLogger(every_n_epochs=5)
    _fit(module, dm, [cb], tmp_path, limit_val_batches=1)
    assert not cb.final_report and cb.report is None and not (tmp_path / "report-val").exists()


def test_config_final_report_is_off_by_default_and_needs_the_logger(tmp_path):
    assert load_config().callbacks.contributions.final_report is False
    with pytest.raises(ConfigError, match="final_report=true needs callbacks.contributions.enabled=true"):
        load_config(overrides=["callbacks.contributions.enabled=false", "callbacks.contributions.final_report=true"])


def test_train_run_writes_the_final_report_of_the_report_command(cache_dir, tiny_world, tmp_path):
    """``train.py callbacks.contributions.final_report=true``: ``<run>/report-val/`` holds the report the
    ``report`` command makes from the run's checkpoint on the validation split (one epoch: its weights are the
    last ones)."""
    from cefam_lightning.cli.train import main

    overrides = [*tiny_overrides(cache_dir, tmp_path / "runs", "final"), "callbacks.contributions.final_report=true"]
    metrics = main(overrides)
    report = json.loads((tmp_path / "runs" / "final" / "report-val" / "report.json").read_text())
    assert report["images"] == TINY_WORLD["n_val"] and report["data"].startswith("validation split")

    cfg = load_config(overrides=overrides).callbacks.contributions
    settings = ReportSettings(top_n=cfg.top_n, top=cfg.top, batch_size=16)  # the callback's default batch size
    module = load_explainer(metrics["best_checkpoint"])
    expected, _ = build_report(module, shapes_world_data(tiny_world, "val"), settings, "cpu", progress=False)
    _same_report(report, expected)
