"""ImageDataModule: images joined with store embeddings by id; streamed shards split by rank and worker."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from cefam_lightning.data.concepts import make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.data.feature_cache import PooledFeatureCache
from cefam_lightning.data.image_datamodule import EmbeddingJoinError, ImageDataModule, SampleJoin, _SampleToItem
from cefam_lightning.data.image_sources import (
    ImageSourceError,
    TruncatedShardError,
    iter_shard_samples,
    open_image,
    open_source,
)
from cefam_lightning.data.order import set_epoch
from cefam_lightning.data.transforms import InputSpec, image_transform
from tests.cli import cli_error
from tests.test_image_sources import CLASSES, folder_id, make_images, write_folder, write_manifest, write_shards

SPEC = InputSpec(crop=12, resize=14)
DIM = 8


def write_store(path: Path, ids: list[str], seed: int = 0, skipped: list[dict] | None = None) -> EmbeddingStore:
    rng = np.random.default_rng(seed)
    concepts = make_concepts([("red", "color"), ("striped", "texture"), ("wheel", "part")])
    return EmbeddingStore.write(
        path,
        sample_ids=ids,
        image_embeddings=rng.normal(size=(len(ids), DIM)).astype(np.float32),
        text_embeddings=rng.normal(size=(len(concepts), DIM)),
        concepts=concepts,
        vlm=VLMInfo(name="test-vlm"),
        extra={"skipped": skipped} if skipped is not None else None,
    )


def source_ids(spec) -> list[str]:
    return [r.id for r in open_source(spec, class_names=CLASSES)]


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in batch["id"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images as a folder with a manifest beside it, and as 5 shards of uneven size (4, 4, 4, 4, 3 samples)."""
    root = tmp_path_factory.mktemp("images")
    items = make_images(19, seed=1)
    write_folder(root / "folder", items)
    manifest = write_manifest(root / "folder" / "m.csv", [{"path": folder_id(it), "label": it["cls"]} for it in items])
    shards = write_shards(root / "shards", items, per_shard=4)
    store = root / "store"
    write_store(store, source_ids(manifest) + source_ids(shards))
    return {"items": items, "manifest": manifest, "shards": shards, "store": store, "root": root}


def make_dm(train, val=None, test=None, store=None, **kw) -> ImageDataModule:
    kw = {"input_spec": SPEC, "batch_size": 4, "class_names": CLASSES, **kw}
    dm = ImageDataModule(train, val if val is not None else train, test, store=store, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_batches_join_images_with_their_embeddings(data, kind):
    dm = make_dm(data[kind], store=data["store"])
    store = EmbeddingStore.open(data["store"])
    transform = image_transform(SPEC)
    records = {r.id: r for r in open_source(data[kind], class_names=CLASSES)}
    batches = list(dm.val_dataloader())
    assert sum(len(b["id"]) for b in batches) == 19 and len(batches) == len(dm.val_dataloader())
    batch = batches[0]
    assert set(batch) == {"image", "label", "id", "embedding"}
    assert batch["image"].shape == (4, 3, 12, 12) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["embedding"].shape == (4, DIM) and batch["embedding"].dtype == torch.float32
    for i, sid in enumerate(batch["id"]):
        rec = records[sid]
        torch.testing.assert_close(batch["image"][i], transform(open_image(rec)))
        assert batch["label"][i] == rec.label
        expected = store.image_embeddings[store.rows_for([sid])[0]]
        np.testing.assert_array_equal(batch["embedding"][i].numpy(), expected)
    # Unshuffled splits keep the source's order; the test split falls back to validation data.
    assert ids_of(batches) == list(records)
    assert ids_of(dm.test_dataloader()) == list(records)
    assert dm.class_names == CLASSES and [c.name for c in dm.concepts] == ["red", "striped", "wheel"]


def test_folder_source_and_unlabeled_manifest(data, tmp_path):
    folder = data["manifest"].parent
    write_store(tmp_path / "fstore", source_ids(folder))
    dm = make_dm(folder, store=tmp_path / "fstore", class_names=None)
    assert dm.class_names == CLASSES and dm.num_samples("train") == 19
    assert sorted(ids_of(dm.train_dataloader())) == sorted(source_ids(folder))
    rows = [{"path": folder_id(it)} for it in data["items"][:3]]
    unlabeled = write_manifest(folder / "unlabeled.jsonl", rows)
    write_store(tmp_path / "ustore", source_ids(unlabeled))
    batch = next(iter(make_dm(unlabeled, store=tmp_path / "ustore").val_dataloader()))
    assert batch["label"].tolist() == [-1, -1, -1]  # no label: -1


def epochs_of(loader, epochs) -> list[list[str]]:
    """The ids of each epoch of ``loader``, its epoch set before each pass as Lightning does."""
    out = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        out.append(ids_of(loader))
    return out


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_seeded_shuffle_is_reproducible_and_changes_the_order(data, kind):
    def epochs(seed: int, n: int = 2) -> list[list[str]]:
        loader = make_dm(data[kind], store=data["store"], seed=seed, shuffle_buffer=8).train_dataloader()
        return epochs_of(loader, range(n))

    first, again, other = epochs(0), epochs(0), epochs(1)
    ordered = source_ids(data[kind])
    assert first == again  # the same seed gives the same order, epoch by epoch
    for epoch in first + other:
        assert sorted(epoch) == sorted(ordered)  # every sample once per epoch
        assert epoch != ordered
    assert first[0] != first[1]  # each epoch is shuffled anew
    assert first[0] != other[0]  # another seed, another order


@pytest.mark.parametrize(("kind", "workers"), [("manifest", 0), ("manifest", 2), ("shards", 0), ("shards", 2)])
def test_the_order_of_an_epoch_does_not_depend_on_the_epochs_the_process_ran(data, kind, workers):
    """A loader started at epoch 2 (a resumed run) gives epoch 2's order, also from persistent workers, which read
    the epoch the trainer sets before each pass."""

    class Trainer:  # what the DataModule reads of a Lightning trainer
        global_rank, world_size = 0, 1
        fit_loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=0)))

    def loader(trainer=None):
        dm = make_dm(data[kind], store=data["store"], shuffle_buffer=8, num_workers=workers)
        dm.trainer = trainer
        return dm.train_dataloader()

    straight = epochs_of(loader(), range(3))
    assert straight[0] != straight[2]
    assert epochs_of(loader(), [2]) == straight[2:]
    trainer = Trainer()
    with_trainer = loader(trainer)
    for epoch in (0, 1, 2, 2):  # the epoch comes from the trainer, not from counting passes
        trainer.fit_loop.epoch_progress.current.processed = epoch
        if kind == "manifest":  # Lightning sets the sampler's epoch; a stream asks the trainer itself
            set_epoch(with_trainer, epoch)
        assert ids_of(with_trainer) == straight[epoch]


def test_shuffle_buffer_zero_shuffles_whole_shards_only(data):
    got = ids_of(make_dm(data["shards"], store=data["store"], shuffle_buffer=0).train_dataloader())
    shards = {ks[0]: ks for ks in open_source(data["shards"], class_names=CLASSES).keys_by_shard()}
    pos, used = 0, []
    while pos < len(got):  # the epoch is whole shards, each in its own order, one after the other
        keys = shards[got[pos]]
        assert got[pos : pos + len(keys)] == keys
        used.append(keys[0])
        pos += len(keys)
    assert sorted(used) == sorted(shards)


def _per_rank(monkeypatch, dm_factory, world: int, split: str) -> list[list[list[str]]]:
    """For each simulated rank (webdataset reads RANK/WORLD_SIZE), the id lists of its batches."""
    out = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        loader = getattr(dm_factory(), f"{split}_dataloader")()
        batches = [list(b["id"]) for b in loader]
        assert len(batches) == len(loader), "the loader's length must be its real number of batches"
        out.append(batches)
    return out


def test_two_ranks_two_workers_see_every_sample_exactly_once(data, monkeypatch):
    everything = source_ids(data["shards"])
    for split in ("val", "test"):
        per_rank = _per_rank(monkeypatch, lambda: make_dm(data["shards"], store=data["store"], num_workers=2), 2, split)
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(seen) == sorted(everything) and set(seen.values()) == {1}, split
        # Rank 0 reads shards 0, 2, 4 (12 + ... samples), rank 1 shards 1, 3: the ranks differ in size.
        assert [sum(len(b) for b in batches) for batches in per_rank] == [11, 8]


def test_training_streams_give_every_rank_the_same_number_of_batches(data, monkeypatch):
    """Shards of 4, 4, 4, 4, 3 samples over 2 ranks x 2 workers: the shorter rank repeats a few of its own."""
    per_rank = _per_rank(monkeypatch, lambda: make_dm(data["shards"], store=data["store"], num_workers=2), 2, "train")
    assert len(per_rank[0]) == len(per_rank[1])
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == sorted(source_ids(data["shards"]))  # every sample at least once
    rank1 = Counter(i for b in per_rank[1] for i in b)
    # Rank 0's workers hold shards {0, 4} (7 samples) and {2} (4); rank 1's {1} (4) and {3} (4): worker 0 of rank 1
    # repeats 3 of its samples.
    assert sum(rank1.values()) == 11 and sum(v - 1 for v in rank1.values()) == 3
    assert all(seen[i] == 1 for b in per_rank[0] for i in b)


def test_shards_too_few_for_ranks_or_workers(data, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"5 shard\(s\) for 6 ranks; every rank needs at least one shard"):
        make_dm(data["shards"], store=data["store"]).train_dataloader()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="cefam_lightning"):
        loader = make_dm(data["shards"], store=data["store"], num_workers=3).val_dataloader()
    assert loader.num_workers == 2
    assert "5 shards for 2 rank(s): using 2 DataLoader worker(s) per rank instead of 3" in caplog.text


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_missing_embeddings_are_counted_and_listed(data, kind, tmp_path):
    ids = source_ids(data[kind])
    write_store(tmp_path / "partial", ids[3:])
    with pytest.raises(EmbeddingJoinError) as err:
        make_dm(data[kind], store=tmp_path / "partial")
    msg = str(err.value)
    assert "train data" in msg and f"3 of 19 images have no embedding in the store {tmp_path / 'partial'}" in msg
    for sid in ids[:3]:
        assert repr(sid) in msg
    if kind == "shards":
        assert "shard-000.tar" in msg


def test_a_missing_embedding_while_streaming_names_the_id_and_shard(data):
    sample = next(iter_shard_samples(open_source(data["shards"]).shards))
    to_item = _SampleToItem(SampleJoin(data["store"], {}), image_transform(SPEC), CLASSES)
    with pytest.raises(EmbeddingJoinError, match=r"sample 'dog/img001' of shard .*shard-000.tar has no embedding"):
        to_item({**sample, "__key__": "dog/img001"})


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_images_precompute_skipped_are_left_out_with_a_count(data, kind, tmp_path, caplog):
    ids = source_ids(data[kind])
    skipped = [{"id": ids[0], "error": "cannot decode"}, {"id": ids[5], "error": "truncated"}]
    write_store(tmp_path / "s", [i for i in ids if i not in {ids[0], ids[5]}], skipped=skipped)
    with caplog.at_level(logging.INFO, logger="cefam_lightning"):
        dm = make_dm(data[kind], store=tmp_path / "s", batch_size=5)
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("train: 2 image(s) of") and lines[1].startswith("val: 2 image(s)")
    assert "precompute could not read them" in lines[0]
    assert dm.num_samples("train") == 17
    got = ids_of(dm.val_dataloader())
    assert got == [i for i in ids if i not in {ids[0], ids[5]}]
    assert sorted(ids_of(dm.train_dataloader())) == sorted(got)


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_a_last_training_batch_of_one_image_is_dropped(data, kind, tmp_path, caplog):
    """19 images in batches of 6: training gives 3 batches (BatchNorm cannot train on one image), eval 4."""
    with caplog.at_level(logging.INFO, logger="cefam_lightning"):
        dm = make_dm(data[kind], store=data["store"], batch_size=6, shuffle_buffer=4)
        train = dm.train_dataloader()
    assert "a last batch would hold a single image" in caplog.text
    batches = list(train)
    assert len(train) == len(batches) == 3 and [len(b["id"]) for b in batches] == [6, 6, 6]
    assert [len(b["id"]) for b in dm.val_dataloader()] == [6, 6, 6, 1]


def test_malformed_skipped_list_is_an_error(data, tmp_path):
    write_store(tmp_path / "s", source_ids(data["manifest"]), skipped=["img000"])
    with pytest.raises(EmbeddingJoinError, match=r"meta.json: extra.skipped\[0\] must be an object with a string 'id'"):
        make_dm(data["manifest"], store=tmp_path / "s")


def test_an_undecodable_image_during_training_names_the_id_and_file(data, tmp_path):
    it = data["items"][0]
    (tmp_path / "good.png").write_bytes(data["items"][3]["bytes"])
    (tmp_path / "bad.png").write_bytes(it["bytes"][:30])
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "good.png", "id": "ok"}, {"path": "bad.png", "id": "b"}])
    write_store(tmp_path / "s", ["ok", "b"])
    dm = make_dm(manifest, store=tmp_path / "s", class_names=None)
    with pytest.raises(ImageSourceError, match=r"cannot decode image 'b' \(.*bad.png \(m.csv:3\)\)"):
        list(dm.train_dataloader())


def test_a_truncated_shard_stops_training_naming_it(data, tmp_path, capsys):
    """At setup (every shard is checked whole), and while streaming a shard damaged after that check."""
    from tests.test_image_sources import truncate_shard

    shards = tmp_path / "shards"
    shutil.copytree(Path(data["shards"]).parent, shards)
    spec = str(shards / Path(data["shards"]).name)
    truncate_shard(shards / "shard-002.tar", tmp_path / "cut.tar", "between_samples")
    whole = (shards / "shard-002.tar").read_bytes()
    (tmp_path / "cut.tar").replace(shards / "shard-002.tar")
    with pytest.raises(TruncatedShardError, match=rf"{re.escape(str(shards / 'shard-002.tar'))}: truncated"):
        make_dm(spec, store=data["store"])
    (shards / "shard-002.tar").write_bytes(whole)
    dm = make_dm(spec, store=data["store"])
    truncate_shard(shards / "shard-002.tar", tmp_path / "cut.tar", "mid_data").replace(shards / "shard-002.tar")
    with pytest.raises(ImageSourceError, match=rf"{re.escape(str(shards / 'shard-002.tar'))}: cannot read the tar"):
        list(dm.train_dataloader())


# ---------------------------------------------------------------------------------------------------- train.py
ROOT = Path(__file__).resolve().parents[1]


def _train_overrides(tmp_path: Path, train: str, val: str, store: Path, run: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'out'}",
        f"run_name={run}",
        f"cache_dir={tmp_path / 'cache'}",
        "data.source=images",
        f"data.train={train}",
        f"data.val={val}",
        f"data.store={store}",
        "data.batch_size=4",
        "classifier.name=resnet18",
        "classifier.allow_random_init=true",
        "classifier.image_size=32",
        "classifier.layers=[layer3,layer4]",
        "cefam.hidden_dims=[32]",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """JPEG images (48x40) as a manifest (train/val) and as tar shards (train: 6, 6, 4 images; val: 4, 4), and a
    store of both id sets."""
    root = tmp_path_factory.mktemp("jpegs")
    items = make_images(24, seed=2, size=(48, 40), formats=("jpg",))
    write_folder(root / "images", items)
    rows = [{"path": folder_id(it), "label": it["cls"]} for it in items]
    train_csv = write_manifest(root / "images" / "train.csv", rows[:16])
    val_jsonl = write_manifest(root / "images" / "val.jsonl", rows[16:])
    train_tar = write_shards(root / "shards", items[:16], per_shard=6, prefix="train")
    val_tar = write_shards(root / "shards", items[16:], per_shard=4, prefix="val")
    ids = [s for spec in (train_csv, val_jsonl, train_tar, val_tar) for s in source_ids(spec)]
    write_store(root / "store", ids)
    specs = {"train_csv": train_csv, "val_jsonl": val_jsonl, "train_tar": train_tar, "val_tar": val_tar}
    return {**specs, "store": root / "store"}


def test_train_from_a_jpeg_manifest(jpegs, tmp_path, capsys):
    from cefam_lightning.cli.train import main
    from cefam_lightning.methods.cefam.module import CEFAMModule

    overrides = _train_overrides(tmp_path, jpegs["train_csv"], jpegs["val_jsonl"], jpegs["store"], "manifest")
    metrics = main(overrides)
    out = capsys.readouterr().out
    assert "shapes-world steps (concept-presence figures, evaluation on masks) are skipped" in out
    assert "CE-FAM on images: test data" in out and "concept-presence AUROC" not in out
    run = tmp_path / "out" / "manifest"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "metrics.json").is_file()
    assert np.isfinite(metrics["test"]["test/cosine"]) and metrics["evaluation"] is None and metrics["figures"] == []
    assert not (run / "figures").exists()
    module = CEFAMModule.from_checkpoint(metrics["best_checkpoint"])
    assert module.hparams.class_names == CLASSES
    assert module(torch.rand(2, 3, 32, 32))["embedding"].shape == (2, DIM)


def test_train_py_from_tar_shards_on_two_ddp_processes(jpegs, tmp_path):
    """The entry point as a user runs it, streaming tar shards to 2 DDP ranks (CPU). Rank 0 reads 10 training
    images, rank 1 six: rank 1 must repeat 4 of its own so that both take the same number of steps (else DDP
    hangs)."""
    import os
    import subprocess
    import sys

    overrides = _train_overrides(tmp_path, jpegs["train_tar"], jpegs["val_tar"], jpegs["store"], "shards")
    overrides = [o for o in overrides if not o.startswith("trainer.limit_")]  # whole epochs
    args = [
        sys.executable,
        "train.py",
        *overrides,
        f"data.class_names=[{','.join(CLASSES)}]",
        "data.num_workers=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "CEFAM_RUN_NAME"} | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "webdataset" in proc.stdout and proc.stdout.count("CE-FAM on images") == 1
    run = tmp_path / "out" / "shards"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["test/cosine"]) and metrics["epochs_trained"] == 2
    # 3 training steps per epoch on each rank (10 images in batches of 4).
    steps = [line.split(",") for line in (run / "logs" / "metrics.csv").read_text().splitlines()]
    header = steps[0]
    col = header.index("train/loss_step")
    assert sum(1 for row in steps[1:] if row[col]) == 6


def test_train_py_stops_on_a_truncated_shard_with_one_line(jpegs, tmp_path, capsys):
    from cefam_lightning.cli.train import main
    from tests.test_image_sources import truncate_shard

    shards = tmp_path / "shards"
    shutil.copytree(Path(jpegs["train_tar"]).parent, shards)
    truncate_shard(shards / "train-001.tar", tmp_path / "cut.tar", "between_samples").replace(shards / "train-001.tar")
    train = str(shards / Path(jpegs["train_tar"]).name)
    overrides = _train_overrides(tmp_path, train, jpegs["val_tar"], jpegs["store"], "cut")
    line = cli_error(main, [*overrides, f"data.class_names=[{','.join(CLASSES)}]"], capsys)
    assert line.startswith(f"{shards / 'train-001.tar'}: truncated or damaged tar shard"), line


def test_train_with_images_needs_weights_or_an_explicit_random_init(jpegs, tmp_path, capsys):
    from cefam_lightning.cli.train import main
    from cefam_lightning.training.config import ConfigError, load_config

    overrides = _train_overrides(tmp_path, jpegs["train_csv"], jpegs["val_jsonl"], jpegs["store"], "noweights")
    line = cli_error(main, [o for o in overrides if not o.startswith("classifier.allow_random_init")], capsys)
    assert re.search(r"classifier.weights is required for 'resnet18'.*allow_random_init=true", line)
    with pytest.raises(ConfigError, match=r"classifier.weights is required for 'resnet18'"):  # --debug: the error
        main(["--debug", *[o for o in overrides if not o.startswith("classifier.allow_random_init")]])
    with pytest.raises(ConfigError, match=r"data.source=images needs data.train, data.store"):
        load_config(None, ["data.source=images", "data.val=x"])
    with pytest.raises(ConfigError, match=r"data.source must be one of \('shapes', 'images'\), got 'pictures'"):
        load_config(None, ["data.source=pictures"])
    example = load_config(ROOT / "configs" / "experiment" / "images.yaml")
    assert example.data.source == "images" and example.data.train.endswith(".tar") and example.classifier.weights


def test_data_pipeline_benchmark_runs_and_prints_the_ratio():
    import subprocess
    import sys

    args = [sys.executable, "benchmarks/data_pipeline.py", "--images", "12", "--shards", "2", "--batch", "4"]
    args += ["--workers", "1", "--epochs", "1", "--steps", "1", "--device", "cpu"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 12 JPEGs" in proc.stdout and "streaming loader, pass 1, 1 workers" in proc.stdout
    ratio = float(proc.stdout.split("ratio loader / training step: ")[1].split("x")[0])
    assert ratio > 0


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_image_data_serve_cached_features(data, kind, tmp_path):
    ids = make_dm(data[kind], store=data["store"]).sample_ids("train")
    cache = PooledFeatureCache(tmp_path, ids, 5, {"kind": kind}).open_or_create()
    z = torch.randn(len(ids), 5)
    cache.write(cache.rows(ids[:-1]), z[:-1])  # every sample but the last
    dm = make_dm(data[kind], store=data["store"], feature_caches={"train": cache})
    batches = list(dm.train_dataloader())
    assert sorted(i for b in batches for i in b["id"]) == sorted(ids)
    if kind == "manifest":  # map-style: cached samples come without their image
        for b in batches:
            cached = [b["id"][i] for i in b["pooled_index"].tolist()]
            torch.testing.assert_close(b["pooled"], z[cache.rows(cached)])
            with_image = [b["id"][i] for i in b["image_index"].tolist()] if "image" in b else []
            assert ids[-1] not in cached and set(with_image) <= {ids[-1]}
    else:  # streamed: images always come; the module skips the classifier (next test)
        assert all("image" in b and "pooled" not in b for b in batches)


class _FinalState(L.Callback):
    """The module's weights and the last validation loss when training ends."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.val_loss = float(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_a_run_resumed_after_one_epoch_equals_an_uninterrupted_one(jpegs, tmp_path, kind):
    """Batch order is a function of (seed, epoch): a run stopped after epoch 1 and resumed with ckpt_path=last
    sees the batches an uninterrupted run sees, so its final weights and validation loss are bit-identical
    (shards: read by 2 persistent DataLoader workers)."""
    from cefam_lightning.training.config import load_config
    from cefam_lightning.training.run import run

    if kind == "manifest":
        train, val, extra = jpegs["train_csv"], jpegs["val_jsonl"], []
    else:
        train, val = jpegs["train_tar"], jpegs["val_tar"]
        extra = [f"data.class_names=[{','.join(CLASSES)}]", "data.num_workers=2"]

    def train_run(name: str, *more: str) -> _FinalState:
        overrides = _train_overrides(tmp_path, train, val, jpegs["store"], name)
        whole = [o for o in overrides if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))]
        final = _FinalState()
        run(load_config(None, [*whole, *extra, *more]), extra_callbacks=[final])
        return final

    straight = train_run("straight", "trainer.max_epochs=2")
    train_run("split", "trainer.max_epochs=1")
    resumed = train_run("split", "trainer.max_epochs=2", "ckpt_path=last")
    assert straight.weights.keys() == resumed.weights.keys()
    for key, value in straight.weights.items():
        assert torch.equal(value, resumed.weights[key]), key
    assert resumed.val_loss == straight.val_loss
