"""Training callbacks: region-map figures, contribution tables and region metrics, with any logger or none."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from callbacks import CachePooledFeatures, ConceptRegionMaps, ContributionLogger, RegionMetricsCallback
from callbacks.concept_region_maps import render_region_maps
from callbacks.contribution_logger import mean_contributions
from callbacks.logging_utils import fixed_validation_items, log_images, log_table
from cefam_lightning.data.feature_cache import PooledFeatureCache, pooled_identity
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule, ShapesWorldDataset
from cefam_lightning.methods.cefam.pipeline import explain_batch
from cefam_lightning.metrics import RegionMetrics
from tests.test_cefam_module import _module

BATCH = 16
EXPLAIN_K = 5  # channels deleted / masked by the callbacks (the module's explanation setting)


def _fit(module, dm, callbacks, root, logger=False, max_epochs=1, **kw) -> L.Trainer:
    settings = {"limit_train_batches": 2, "limit_val_batches": 2, "num_sanity_val_steps": 0, **kw}
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        max_epochs=max_epochs,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.fixture
def make(tiny_world, tiny_spec, cache_dir, tiny_classifier_weights):
    """``make()`` -> a fresh (seeded) CE-FAM module and shapes-world DataModule."""

    def _make(**dm_kwargs):
        torch.manual_seed(0)
        module = _module(tiny_world, tiny_classifier_weights, explain={"k": EXPLAIN_K})  # the callbacks' K
        return module, ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=BATCH, **dm_kwargs)

    return _make


def _val_items(dm, ids):
    """The validation items of ``ids`` (with images and masks), read independently of the callbacks."""
    ds = dm.datasets["val"]
    index = {s: i for i, s in enumerate(ds.split.ids)}
    return [ds[index[s]] for s in ids]


def _png(path) -> tuple[np.ndarray, str]:
    img = Image.open(path)
    return np.asarray(img.convert("RGB")), img.info.get("Description", "")


# ---------------------------------------------------------------------- region maps


def test_region_maps_show_the_same_images_every_n_epochs_as_pngs(make, tmp_path):
    module, dm = make()
    cb = ConceptRegionMaps(every_n_epochs=2, num_images=3, top_k=2, panel_size=120)
    _fit(module, dm, [cb], tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=1)

    folder = tmp_path / "images" / "val" / "region_maps"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"epoch_{e:03d}_{i}.png" for e in (1, 3) for i in range(3)]  # after epochs 2 and 4 only
    assert sorted(cb.written) == sorted(str(folder / n) for n in names)
    val_ids = set(dm.datasets["val"].split.ids)
    concept_names = set(module.hparams["concept_names"])
    captions = {}
    for epoch in (1, 3):
        captions[epoch] = []
        for i in range(3):
            pixels, caption = _png(folder / f"epoch_{epoch:03d}_{i}.png")
            # three panels (image + top_k overlays) of 120 px, 1.25 x 120 px high
            assert abs(pixels.shape[1] - 3 * 120) <= 1 and abs(pixels.shape[0] - 150) <= 1
            assert pixels.std() > 20  # a real drawing, not a blank canvas
            sample_id, _, rest = caption.partition(": predicted ")
            assert sample_id in val_ids
            shown = [part.split(" (S=")[0] for part in rest.split("; ")[1:]]
            assert len(shown) == 2 and set(shown) <= concept_names
            captions[epoch].append(sample_id)
    assert captions[1] == captions[3] == cb.sample_ids and len(set(cb.sample_ids)) == 3


def test_render_outlines_the_ground_truth_mask():
    rng = np.random.default_rng(0)
    image, regions = rng.random((16, 16, 3)), rng.random((2, 16, 16))
    masks = np.zeros((2, 16, 16), dtype=bool)
    plain = render_region_maps(image, regions, ["a", "b"], None)
    assert plain.dtype == np.uint8 and plain.shape[2] == 3
    np.testing.assert_array_equal(render_region_maps(image, regions, ["a", "b"], masks), plain)  # empty: no outline
    masks[1, 4:10, 4:10] = True
    outlined = render_region_maps(image, regions, ["a", "b"], masks)
    changed = np.nonzero((outlined != plain).any(axis=2))[1]
    # the outline is drawn in the second concept's panel only (columns 320..480 of a 160-px panel layout)
    assert changed.size and changed.min() >= 2 * 160 and changed.max() < 3 * 160


# ---------------------------------------------------------------------- contributions


def test_contribution_table_equals_a_direct_computation(make, tmp_path):
    module, dm = make()
    top_n, k, top = 4, EXPLAIN_K, 3
    cb = ContributionLogger(num_images=24, top_n=top_n, top=top, batch_size=10)
    _fit(module, dm, [cb], tmp_path, logger=CSVLogger(tmp_path, name="logs"))

    path = tmp_path / "tables" / "val" / "contributions" / "epoch_000.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    classes, concepts = list(module.hparams["class_names"]), list(module.hparams["concept_names"])
    assert [r["class"] for r in rows] == classes  # one row per class

    # Independently: explain the same images in one batch and average per (predicted class, concept) in Python.
    assert len(set(cb.sample_ids)) == 24
    images = torch.stack([item["image"] for item in _val_items(dm, cb.sample_ids)])
    expl = explain_batch(module, images, top_n=top_n, k=k)
    values, n_images = defaultdict(list), defaultdict(int)
    for i in range(len(images)):
        cls = classes[int(expl.target[i])]
        n_images[cls] += 1
        for c, v in zip(expl.concepts[i].tolist(), expl.contributions[i].tolist(), strict=True):
            values[cls, concepts[c]].append(v)
    means = {key: sum(v) / len(v) for key, v in values.items()}

    negatives_seen = 0
    for row in rows:
        cls = row["class"]
        assert int(row["images"]) == n_images[cls]
        mine = sorted(((m, c) for (k_cls, c), m in means.items() if k_cls == cls), reverse=True)
        expected_pos = [(c, m) for m, c in mine if m > 0][:top]
        expected_neg = [(c, m) for m, c in reversed(mine) if m < 0][:top]
        for sign, expected in (("positive", expected_pos), ("negative", expected_neg)):
            got = [(row[f"{sign}_{i}"], row[f"{sign}_{i}_mean"]) for i in range(1, top + 1)]
            got = [(c, float(m)) for c, m in got if c]
            assert [c for c, _ in got] == [c for c, _ in expected], (cls, sign)
            for (_, m), (_, e) in zip(got, expected, strict=True):
                assert m == pytest.approx(e, abs=1e-5)
                assert (m > 0) if sign == "positive" else (m < 0)
            negatives_seen += len(got) if sign == "negative" else 0
    assert negatives_seen > 0  # the table does show concepts that push against a class (the tiny classifier,
    # barely trained, predicts one class with weak negative contributions: the positive side is covered below)

    chart = tmp_path / "images" / "val" / "contributions_chart" / "epoch_000_0.png"
    pixels, _ = _png(chart)
    assert pixels.shape[0] > 100 and pixels.std() > 10
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").is_file()  # the CSVLogger still logs metrics


def test_table_rows_rank_positive_and_negative_means_per_class():
    # image 0 (class 1): concepts 2 (+0.5), 0 (-0.2); image 1 (class 1): 2 (+0.1), 3 (+0.25);
    # image 2 (class 0): 0 (-0.4), 1 (0.0)
    targets = torch.tensor([1, 1, 0])
    concepts = torch.tensor([[2, 0], [2, 3], [0, 1]])
    contributions = torch.tensor([[0.5, -0.2], [0.1, 0.25], [-0.4, 0.0]])
    means, counts, images = mean_contributions(targets, concepts, contributions, num_classes=3, num_concepts=4)
    assert images.tolist() == [1, 2, 0]
    assert counts[1].tolist() == [1, 0, 2, 1] and means[1, 2].item() == pytest.approx(0.3)
    assert means[1, 1].isnan()  # never explained for class 1
    cb = ContributionLogger(top=2)
    rows = cb._rows(means, images, ["c0", "c1", "c2"], ["a", "b", "c", "d"])
    assert len(cb.columns) == len(rows[0]) == 2 + 2 * 2 * 2
    assert rows[0] == ["c0", 1, None, None, None, None, "a", pytest.approx(-0.4), None, None]  # 0 is neither sign
    assert rows[1] == ["c1", 2, "c", pytest.approx(0.3), "d", pytest.approx(0.25), "a", pytest.approx(-0.2), None, None]
    assert rows[2] == ["c2", 0] + [None] * 8


# ---------------------------------------------------------------------- region metrics


class _ValImages(L.Callback):
    """Records, per validation epoch, whether each batch came with images."""

    def __init__(self):
        self.epochs: list[list[bool]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.epochs[-1].append("image" in batch and "masks" in batch)


def _reference_region_metrics(module, items) -> dict:
    """Independently of the callback: RegionMetrics of explain_batch's (top-1-layer) regions of every concept
    present in the items."""
    present = [item["masks"].flatten(1).any(dim=1).nonzero()[:, 0].tolist() for item in items]
    width = max(len(p) for p in present)
    padded = torch.tensor([p + p[:1] * (width - len(p)) for p in present])  # repeats are explained, not scored
    expl = explain_batch(module, torch.stack([item["image"] for item in items]), concepts=padded, k=EXPLAIN_K)
    reference = RegionMetrics(list(module.hparams["concept_types"]))
    for i, (item, concepts) in enumerate(zip(items, present, strict=True)):
        ids = torch.tensor(concepts)
        reference.update(expl.regions[i, : len(concepts)], item["masks"][ids], ids)
    return reference.compute()


@pytest.mark.parametrize("cached", [False, True], ids=["images", "feature-cache"])
def test_region_metrics_equal_a_direct_computation(make, tiny_world, tmp_path, cached):
    caches = {}
    if cached:
        module, _ = make()
        identity = pooled_identity(module.classifier, "shapes-world")
        dim = module.translator.in_dim
        caches = {
            s: PooledFeatureCache(tmp_path / "features", tiny_world.split(s).ids, dim, {**identity, "split": s})
            for s in ("train", "val")
        }
    module, dm = make(feature_caches=caches)
    spy = _ValImages()
    cb = RegionMetricsCallback()
    callbacks = [spy, cb] + ([CachePooledFeatures(caches)] if cached else [])
    trainer = _fit(module, dm, callbacks, tmp_path, max_epochs=2 if cached else 1)
    if cached:  # the last epoch's validation batches were served from the cache, without images or masks
        assert spy.epochs[-1] == [False, False]

    expected = _reference_region_metrics(module, _val_items(dm, dm.datasets["val"].split.ids[: 2 * BATCH]))
    logged = trainer.callback_metrics
    for name in ("nra/mean", "epg/mean", "hit_rate/mean", "nra/color", "nra/shape", "hit_rate/texture"):
        key = "val/" + name.replace("/", "_")
        assert float(logged[key]) == pytest.approx(float(expected[name]), abs=1e-5), key
    assert 0.0 <= float(logged["val/nra_mean"]) <= 1.0


def test_region_metrics_respect_max_images_and_every_n_epochs(make, tmp_path):
    module, dm = make()
    seen = []

    class Spy(RegionMetricsCallback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if self._active:
                seen.append((trainer.current_epoch, int(self.metric.valid.sum() + self.metric.skipped), self._seen))
            super().on_validation_epoch_end(trainer, pl_module)

    _fit(module, dm, [Spy(every_n_epochs=2, max_images=5)], tmp_path, max_epochs=2)
    assert [(e, n) for e, _, n in seen] == [(1, 5)]  # scored after epoch 2 only, 5 images
    pairs = int(sum(dm.datasets["val"][i]["masks"].flatten(1).any(1).sum() for i in range(5)))
    assert seen[0][1] == pairs


def test_region_metrics_are_skipped_with_one_message_without_masks(make, tiny_world, tmp_path, caplog):
    module, dm = make()
    dm.setup("fit")
    dm.datasets["val"] = ShapesWorldDataset(tiny_world.split("val"), tiny_world.store, with_masks=False)
    with caplog.at_level(logging.INFO):
        trainer = _fit(module, dm, [RegionMetricsCallback()], tmp_path, max_epochs=2)
    assert not any("nra" in key for key in trainer.callback_metrics)
    assert "val/loss" in trainer.callback_metrics
    assert sum("no concept masks" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------- ranks, loggers, helpers


def test_nothing_is_written_on_a_rank_other_than_zero(make, tmp_path, monkeypatch):
    module, dm = make()
    monkeypatch.setattr(SingleDeviceStrategy, "is_global_zero", property(lambda self: False))
    callbacks = [ConceptRegionMaps(num_images=2, top_k=2), ContributionLogger(num_images=8, top_n=3)]
    old = rank_zero_only.rank
    rank_zero_only.rank = 1
    try:
        _fit(module, dm, callbacks, tmp_path)
        trainer = SimpleNamespace(loggers=[], global_step=0, current_epoch=0, default_root_dir=tmp_path)
        assert log_images(trainer, "x", [np.zeros((4, 4, 3), np.uint8)]) is None
        assert log_table(trainer, "t", ["a"], [[1]]) is None
    finally:
        rank_zero_only.rank = old
    assert not (tmp_path / "images").exists() and not (tmp_path / "tables").exists()
    assert all(cb.written == [] for cb in callbacks)


class _Recorder:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, global_step=None, dataformats="CHW"):
        self.calls.append(("image", tag, np.asarray(img).shape, dataformats, global_step))

    def add_text(self, tag, text, global_step=None):
        self.calls.append(("text", tag, text, global_step))


class _FakeTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger whose writer records calls (tensorboard itself need not be installed)."""

    def __init__(self):  # TensorBoardLogger.__init__ would need tensorboard or tensorboardX
        self.recorder = _Recorder()

    @property
    def experiment(self):
        return self.recorder


def test_tensorboard_gets_images_and_markdown_tables_and_no_files(tmp_path):
    tb = _FakeTensorBoard()
    trainer = SimpleNamespace(
        loggers=[CSVLogger(tmp_path), tb], global_step=7, current_epoch=2, default_root_dir=tmp_path
    )
    images = [np.full((5, 6, 3), 9, np.uint8), np.zeros((5, 6, 3), np.uint8)]
    out = log_images(trainer, "val/maps", images, ["first", "second"])
    assert out == ["tensorboard:val/maps/0", "tensorboard:val/maps/1"]
    assert ("image", "val/maps/0", (5, 6, 3), "HWC", 7) in tb.recorder.calls
    assert ("text", "val/maps/1/caption", "second", 7) in tb.recorder.calls
    assert log_table(trainer, "val/t", ["class", "mean"], [["a|b", 0.5], ["c", None]], step=3) == ["tensorboard:val/t"]
    _, tag, text, step = tb.recorder.calls[-1]
    assert (tag, step) == ("val/t", 3)
    assert text.splitlines() == ["| class | mean |", "|---|---|", "| a\\|b | 0.5 |", "| c |  |"]
    assert not (tmp_path / "images").exists() and not (tmp_path / "tables").exists()


def test_real_tensorboard_event_file_holds_the_image_tag(make, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module, dm = make()
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(module, dm, [ConceptRegionMaps(num_images=2, top_k=2)], tmp_path, logger=logger)
    events = EventAccumulator(logger.log_dir).Reload()
    assert {"val/region_maps/0", "val/region_maps/1"} <= set(events.Tags()["images"])


def test_wandb_offline_run_holds_the_images_and_the_table(make, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    module, dm = make()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="cefam-test")
    callbacks = [ConceptRegionMaps(num_images=2, top_k=2), ContributionLogger(num_images=8, top_n=3)]
    try:
        _fit(module, dm, callbacks, tmp_path, logger=logger)
    finally:
        logger.experiment.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in (run / "files" / "media" / "images").rglob("*.png"))
    tables = sorted(p.name for p in (run / "files" / "media" / "table").rglob("*.table.json"))
    assert sum(n.startswith("region_maps") for n in images) == 2
    assert any(n.startswith("contributions_chart") for n in images)
    assert any(n.startswith("contributions") for n in tables)
    assert not (tmp_path / "images").exists()  # nothing fell back to files


class _Stream(IterableDataset):
    """Pre-batched items without random access, as a streamed source yields them."""

    def __iter__(self):
        for b in range(3):
            ids = [f"s{b}-{i}" for i in range(4)]
            yield {"image": torch.full((4, 3, 2, 2), float(b)), "id": ids, "label": torch.arange(4)}


def test_fixed_items_from_a_stream_and_a_map_style_dataset(make, tmp_path):
    trainer = SimpleNamespace(datamodule=None, val_dataloaders=DataLoader(_Stream(), batch_size=None))
    items = fixed_validation_items(trainer, 6)
    assert [it["id"] for it in items] == ["s0-0", "s0-1", "s0-2", "s0-3", "s1-0", "s1-1"]
    assert items[5]["image"].shape == (3, 2, 2) and int(items[5]["label"]) == 1

    _, dm = make()
    dm.setup("fit")
    trainer = SimpleNamespace(datamodule=dm, val_dataloaders=None)
    items = fixed_validation_items(trainer, 3)
    ids = dm.datasets["val"].split.ids
    assert [it["id"] for it in items] == [ids[0], ids[math.floor(len(ids) / 2)], ids[-1]]
    assert {"image", "masks"} <= set(items[0])


def test_bad_options_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        ConceptRegionMaps(every_n_epochs=0)
    with pytest.raises(ValueError, match="top_k"):
        ConceptRegionMaps(top_k=-1)
    with pytest.raises(ValueError, match="max_images"):
        RegionMetricsCallback(max_images=0)
    with pytest.raises(ValueError, match="hit_threshold"):
        RegionMetricsCallback(hit_threshold=2.0)
    trainer = SimpleNamespace(loggers=[], global_step=0, current_epoch=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        log_images(trainer, "x", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="row 0"):
        log_table(trainer, "t", ["a", "b"], [[1]])
    assert log_table(trainer, "../t", ["a", "b"], [[1, None]]) == [str(tmp_path / "tables" / "t" / "epoch_000.csv")]
    assert (tmp_path / "tables" / "t" / "epoch_000.csv").read_text().splitlines() == ["a,b", "1,"]


@pytest.mark.slow  # about 20 s on 2 CPU cores (two spawned processes)
def test_two_process_ddp_syncs_region_metrics_and_writes_figures_once(make, tmp_path):
    """Each rank scores its half of the validation images; the logged NRA is that of all of them."""
    module, dm = make()
    callbacks = [RegionMetricsCallback(), ConceptRegionMaps(num_images=2, top_k=2)]
    trainer = _fit(module, dm, callbacks, tmp_path, devices=2, strategy="ddp_spawn", limit_train_batches=1)
    assert trainer.world_size == 2
    dm.setup("fit")  # it ran in the spawned processes only
    # 1 validation batch of 16 per rank: all 32 images; ddp_spawn has loaded rank 0's weights back into `module`
    expected = float(_reference_region_metrics(module, _val_items(dm, dm.datasets["val"].split.ids))["nra/mean"])
    assert float(trainer.callback_metrics["val/nra_mean"]) == pytest.approx(expected, abs=1e-5)
    assert len(list((tmp_path / "images" / "val" / "region_maps").iterdir())) == 2  # written by rank 0 only
