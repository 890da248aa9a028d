"""The pooled-feature cache: later epochs skip the classifier and train exactly as without the cache; a damaged
cache is discarded and rebuilt, never served."""

import logging
import os
import pickle
import re

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import CachePooledFeatures
from cefam_lightning.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCacheError,
    PooledFeatureCache,
    collate_cached,
    pooled_identity,
)
from cefam_lightning.data.shapes_datamodule import ShapesWorldDataModule
from cefam_lightning.methods.checkpoints import read_checkpoint
from cefam_lightning.models.classifier import build_classifier
from tests.test_cefam_module import _module, _trainer

CACHE_LOG = "cefam_lightning.data.feature_cache"


def _caches(root, classifier, tiny_world, dim):
    return {
        split: PooledFeatureCache(
            root, tiny_world.split(split).ids, dim, pooled_identity(classifier, "shapes-world", split=split)
        )
        for split in ("train", "val")
    }


class _CountImages:
    """Counts the images the frozen classifier sees (a forward hook)."""

    def __init__(self, module):
        self.images = 0
        module.classifier.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.images += args[0].shape[0]


def test_cached_training_skips_the_classifier_and_matches_uncached(
    tiny_world, tiny_spec, cache_dir, tiny_classifier_weights, tmp_path
):
    epochs, n_train, n_val = 3, tiny_spec.n_train, tiny_spec.n_val
    results = {}
    for cached in (False, True):
        L.seed_everything(0, verbose=False)
        module = _module(tiny_world, tiny_classifier_weights)
        counter = _CountImages(module)
        dim = module.translator.in_dim
        caches = _caches(tmp_path / "features", module.classifier, tiny_world, dim) if cached else {}
        dm = ShapesWorldDataModule(tiny_spec, cache_dir, batch_size=16, feature_caches=caches)
        callbacks = [CachePooledFeatures(caches)] if cached else []
        _trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=callbacks).fit(module, datamodule=dm)
        results[cached] = (counter.images, module.translator.state_dict())
        if cached:
            assert all(c.num_filled == len(c.ids) for c in caches.values())
            # the cached z is the classifier's own
            images = torch.stack([dm.datasets["train"][i]["image"] for i in range(4)])
            _, z = module.pooled(images)
            torch.testing.assert_close(caches["train"].read(np.arange(4)), z, rtol=0, atol=0)
    uncached_images, uncached_state = results[False]
    cached_images, cached_state = results[True]
    assert uncached_images == epochs * (n_train + n_val)
    assert cached_images == n_train + n_val  # the first epoch only
    for k, v in uncached_state.items():
        torch.testing.assert_close(cached_state[k], v, rtol=0, atol=0, msg=k)


def test_a_new_classifier_layers_or_transform_get_a_new_cache(tiny_world, tiny_classifier_weights, tmp_path):
    ids = tiny_world.split("train").ids
    base = build_classifier("shapes_cnn", len(tiny_world.class_names), weights=tiny_classifier_weights)
    other_layers = build_classifier(
        "shapes_cnn", len(tiny_world.class_names), ["layer3", "layer4"], weights=tiny_classifier_weights
    )
    retrained = build_classifier("shapes_cnn", len(tiny_world.class_names))  # same name, other weights

    def key(classifier, transform="a"):
        return PooledFeatureCache(tmp_path, ids, 8, pooled_identity(classifier, transform)).key

    keys = {key(base), key(other_layers), key(retrained), key(base, "b")}
    assert len(keys) == 4
    same = build_classifier("shapes_cnn", len(tiny_world.class_names), weights=tiny_classifier_weights)
    assert key(base) == key(same)


def test_rows_flagged_only_when_written_and_partial_fill_batches_mix(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    cache = PooledFeatureCache(tmp_path, ids, 3, {"x": 1}).open_or_create()
    z = torch.arange(18, dtype=torch.float32).view(6, 3)
    cache.write(cache.rows(["s1", "s4"]), z[[1, 4]])
    assert cache.is_filled(np.arange(6)).tolist() == [False, True, False, False, True, False]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def item_without_image(self, i):
            return {"id": ids[i], "embedding": torch.zeros(2)}

        def __getitem__(self, i):
            return {**self.item_without_image(i), "image": torch.full((3, 2, 2), float(i))}

    data = CachedFeatureDataset(Items(), cache, ids)
    batch = collate_cached([data[i] for i in range(6)])
    assert batch["pooled_index"].tolist() == [1, 4] and batch["image_index"].tolist() == [0, 2, 3, 5]
    torch.testing.assert_close(batch["pooled"], z[[1, 4]])
    assert batch["image"][:, 0, 0, 0].tolist() == [0, 2, 3, 5]
    assert batch["id"] == ids

    # a worker gets a pickled cache: it maps the same files again, and sees later writes
    clone = pickle.loads(pickle.dumps(cache))
    cache.write(cache.rows(["s0"]), z[[0]])
    assert clone.is_filled(cache.rows(["s0"])).all()


def test_a_damaged_cache_or_unknown_id_is_a_clear_error(tmp_path):
    cache = PooledFeatureCache(tmp_path, ["a", "b"], 2, {"x": 1}).open_or_create()
    with pytest.raises(FeatureCacheError, match="'c' is not among the 2 cached ids"):
        cache.rows(["a", "c"])
    (cache.path / "meta.json").write_text('{"x": 2}')
    with pytest.raises(FeatureCacheError, match="does not hash to the folder name"):
        PooledFeatureCache(tmp_path, ["a", "b"], 2, {"x": 1}).open()
    with pytest.raises(FeatureCacheError, match="unique"):
        PooledFeatureCache(tmp_path, ["a", "a"], 2, {"x": 1})


def test_flip_augmentation_and_a_cache_do_not_mix(tiny_spec, cache_dir, tmp_path):
    cache = PooledFeatureCache(tmp_path, ["a"], 2, {})
    with pytest.raises(ValueError, match="flip"):
        ShapesWorldDataModule(tiny_spec, cache_dir, flip=True, feature_caches={"train": cache})


def test_module_reads_a_streamed_batch_from_the_cache(tiny_world, tiny_classifier_weights, tmp_path):
    module = _module(tiny_world, tiny_classifier_weights)
    counter = _CountImages(module)
    split = tiny_world.split("train")
    ids = split.ids[:4]
    cache = PooledFeatureCache(tmp_path, ids, module.translator.in_dim, {}).open_or_create()
    module.feature_caches = {"train": cache}
    images = torch.from_numpy(np.array(split.images[:4])).permute(0, 3, 1, 2).float() / 255
    batch = {"image": images, "id": ids, "embedding": torch.zeros(4, 2)}
    logits, z = module.batch_pooled(batch, "train")  # first pass: computed and written
    assert counter.images == 4 and logits is not None and cache.num_filled == 4
    logits_again, z_again = module.batch_pooled(batch, "train")  # now from the cache alone
    assert counter.images == 4 and logits_again is None
    torch.testing.assert_close(z_again, z, rtol=0, atol=0)
    assert module.batch_pooled(batch, "test")[0] is not None  # no cache for testing: the classifier runs


def test_feature_cache_benchmark_runs_and_prints_the_ratio():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "benchmarks/feature_cache.py", "--images", "6", "--batch", "3", "--epochs", "2"]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("speed-up:")[1].split("x")[0]) > 1  # the cached epoch is the faster one


# ---------------------------------------------------------------------------------------------------- damage
def _filled_cache(root, n=6, dim=5, written=None):
    """A cache of ``n`` rows of which ``written`` (default all) hold values, flushed to disk, and those values."""
    ids = [f"s{i}" for i in range(n)]
    cache = PooledFeatureCache(root, ids, dim, {"x": 1}).open_or_create()
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    rows = np.arange(n if written is None else written)
    cache.write(rows, z[rows])
    cache.flush()
    return cache, z


def _data_offset(path, nbytes):
    """Where an .npy file's data start (its data are its last ``nbytes`` bytes)."""
    return path.stat().st_size - nbytes


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _truncate(cache):
    path = cache.path / "pooled.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2 * cache.dim * 4)  # the last two rows lost


def _flip_pooled(cache):
    path = cache.path / "pooled.npy"
    _flip_byte(path, _data_offset(path, len(cache.ids) * cache.dim * 4) + 3 * cache.dim * 4 + 2)  # row 3


def _flip_crc(cache):
    path = cache.path / "crc32.npy"
    _flip_byte(path, _data_offset(path, len(cache.ids) * 4) + 4 * 1)  # row 1's checksum


def _flag_unwritten(cache):
    # a flag on disk without its row (as after a crash that kept the flag's page but not the row's)
    path = cache.path / "filled.npy"
    with open(path, "r+b") as f:
        f.seek(_data_offset(path, len(cache.ids)) + len(cache.ids) - 1)
        f.write(b"\x01")


def _drop_crc(cache):
    (cache.path / "crc32.npy").unlink()  # as a cache written before checksums were kept


def _bad_meta(cache):
    (cache.path / "meta.json").write_text("{not json")


DAMAGE = {
    "truncated": (_truncate, "pooled.npy: .* bytes, expected"),
    "flipped row byte": (_flip_pooled, "pooled.npy: 1 of 6 filled rows do not match their CRC-32 .*row 3, sample 's3'"),
    "flipped checksum": (_flip_crc, "1 of 6 filled rows .*row 1"),
    "flag without row": (_flag_unwritten, "1 of 6 filled rows .*row 5"),
    "no checksums": (_drop_crc, "crc32.npy: missing"),
    "bad meta.json": (_bad_meta, "meta.json: not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_discarded_with_one_warning_and_rebuilt(damage, tmp_path, caplog):
    damage_fn, what = DAMAGE[damage]
    written = 5 if damage == "flag without row" else None
    cache, _ = _filled_cache(tmp_path / "a", written=written)
    fresh = PooledFeatureCache(tmp_path / "fresh", cache.ids, cache.dim, {"x": 1}).open_or_create()
    damage_fn(cache)
    del cache  # the previous run's process is gone

    again = PooledFeatureCache(tmp_path / "a", fresh.ids, fresh.dim, {"x": 1})
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        again.open_or_create()
    warnings = [r for r in caplog.records if r.name == CACHE_LOG]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    line = warnings[0].getMessage()
    assert "\n" not in line and str(again.path) in line and "damaged" in line
    assert re.search(what, line), line
    # rebuilt empty: nothing of the damaged folder is served, and no file was padded or left behind
    assert again.num_filled == 0 and again.check() is None
    for name in ("pooled.npy", "crc32.npy", "filled.npy", "meta.json"):
        assert (again.path / name).stat().st_size == (fresh.path / name).stat().st_size, name
    assert sorted(p.name for p in again.path.parent.iterdir()) == [again.key]


def test_a_truncated_cache_is_never_opened_writable_and_is_not_padded(tmp_path):
    cache, _ = _filled_cache(tmp_path)
    _truncate(cache)
    path = cache.path / "pooled.npy"
    size = path.stat().st_size
    # what a rank that does not create the cache sees: an error naming the file, and the file left as it was
    with pytest.raises(FeatureCacheError, match=r"pooled\.npy: \d+ bytes, expected \d+"):
        PooledFeatureCache(tmp_path, cache.ids, cache.dim, {"x": 1}).open()
    assert path.stat().st_size == size


def test_a_flipped_byte_in_a_filled_row_is_caught_by_its_checksum(tmp_path, caplog):
    cache, z = _filled_cache(tmp_path, written=4)
    # a sound cache is reused as it is, rows and all, without a warning
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        again = PooledFeatureCache(tmp_path, cache.ids, cache.dim, {"x": 1}).open_or_create()
    assert again.check() is None and not caplog.records and again.num_filled == 4
    torch.testing.assert_close(again.read(np.arange(4)), z[:4], rtol=0, atol=0)
    # a byte flipped in an unfilled row is no damage (the row is computed anyway) ...
    path = cache.path / "pooled.npy"
    start = _data_offset(path, len(cache.ids) * cache.dim * 4)
    _flip_byte(path, start + 5 * cache.dim * 4)
    assert again.check() is None
    # ... one in a filled row is
    _flip_byte(path, start + 2 * cache.dim * 4 + 7)
    assert "row 2, sample 's2'" in again.check()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        rebuilt = PooledFeatureCache(tmp_path, cache.ids, cache.dim, {"x": 1}).open_or_create()
    assert len(caplog.records) == 1 and rebuilt.num_filled == 0


def test_a_truncated_cache_is_rebuilt_and_serves_what_the_classifier_computes(
    tiny_world, tiny_classifier_weights, tmp_path, caplog
):
    module = _module(tiny_world, tiny_classifier_weights)
    counter = _CountImages(module)
    split = tiny_world.split("train")
    ids = split.ids[:8]
    images = torch.from_numpy(np.array(split.images[:8])).permute(0, 3, 1, 2).float() / 255
    batch = {"image": images, "id": ids, "embedding": torch.zeros(8, 2)}
    dim = module.translator.in_dim
    module.feature_caches = {"train": PooledFeatureCache(tmp_path, ids, dim, {}).open_or_create()}
    module.batch_pooled(batch, "train")  # the first run fills the cache
    module.feature_caches["train"].flush()
    _truncate(module.feature_caches["train"])

    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):  # the next run
        module.feature_caches = {"train": PooledFeatureCache(tmp_path, ids, dim, {}).open_or_create()}
    assert len(caplog.records) == 1
    seen = counter.images
    _, z = module.batch_pooled(batch, "train")
    assert counter.images == seen + 8  # nothing came from the damaged cache: the classifier ran on every image
    _, reference = module.pooled(images)  # a cache-free computation
    torch.testing.assert_close(z, reference, rtol=0, atol=0)
    _, z_cached = module.batch_pooled(batch, "train")  # and the rebuilt cache now serves the same values
    torch.testing.assert_close(z_cached, reference, rtol=0, atol=0)


def test_training_with_a_truncated_cache_equals_a_cache_free_run(cache_dir, tmp_path, caplog):
    from cefam_lightning.cli.train import main
    from tests.conftest import tiny_overrides

    features = tmp_path / "features"

    def run(name, *extra):
        args = [*tiny_overrides(cache_dir, tmp_path / "runs", name), "evaluation.enabled=false", "demo.num_figures=0"]
        return main([*args, f"data.feature_cache_dir={features}", *extra])

    reference = run("no_cache", "data.feature_cache=false", "trainer.max_epochs=2")
    run("fill")  # one epoch fills the train and val caches
    folders = [p for p in features.iterdir() if '"split": "train"' in (p / "meta.json").read_text()]
    assert len(folders) == 1
    path = folders[0] / "pooled.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        again = run("truncated", "trainer.max_epochs=2")
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING].count(CACHE_LOG) == 1
    assert again["test"] == reference["test"]
    state = read_checkpoint(again["best_checkpoint"])["state_dict"]
    ref_state = read_checkpoint(reference["best_checkpoint"])["state_dict"]
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------------- cache keys
def _replace_in_place(path, data):
    """Overwrite ``path`` with ``data`` and make sure its mtime moves on (as it does, but for file systems whose
    timestamps are coarser than this test is fast)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before, before + 1_000_000_000))


def _image_cache_keys(spec, root, classifier):
    """The train and val cache keys ``train.py`` uses for data ``spec`` (opened afresh, as by the next run)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from cefam_lightning.data.image_sources import WebDataSource, open_source
    from cefam_lightning.methods.cefam.method import feature_caches as _feature_caches

    source = open_source(spec)
    ids = [k for ks in source.keys_by_shard() for k in ks] if isinstance(source, WebDataSource) else source.ids
    dm = SimpleNamespace(sources={"train": source, "val": source}, sample_ids=lambda split: ids)
    cfg = OmegaConf.create(
        {"cache_dir": str(root), "data": {"feature_cache_dir": str(root), "train": spec, "val": spec}}
    )
    return tuple(c.key for c in _feature_caches(cfg, dm, classifier, images=True).values())


@pytest.mark.parametrize("kind", ["folder", "manifest", "shards"])
def test_images_replaced_in_place_get_a_new_cache_key(kind, tmp_path):
    from tests.test_image_sources import folder_id, make_images, write_folder, write_manifest, write_shards

    items, other = make_images(4, seed=0), make_images(4, seed=1)
    root = write_folder(tmp_path / "data", items)
    manifest = write_manifest(tmp_path / "data" / "train.csv", [{"path": folder_id(it)} for it in items])
    specs = {"folder": str(root), "manifest": str(manifest), "shards": write_shards(tmp_path / "shards", items, 2)}
    classifier = build_classifier("shapes_cnn", 3)
    features = tmp_path / "features"
    key = _image_cache_keys(specs[kind], features, classifier)
    assert _image_cache_keys(specs[kind], features, classifier) == key  # unchanged data: the cache is reused

    if kind == "shards":  # the first shard written again: the same sample keys, other images
        write_shards(tmp_path / "new", other[:2], 2)
        _replace_in_place(tmp_path / "shards" / "shard-000.tar", (tmp_path / "new" / "shard-000.tar").read_bytes())
    else:  # one image file overwritten: same path, same id, other pixels
        _replace_in_place(root / folder_id(items[1]), other[1]["bytes"])
    new = _image_cache_keys(specs[kind], features, classifier)
    assert new[0] != key[0] and new[1] != key[1]
    assert _image_cache_keys(specs[kind], features, classifier) == new

    if kind == "manifest":  # the manifest itself rewritten (here: same ids and files, a column more)
        write_manifest(manifest, [{"path": folder_id(it), "label": it["cls"]} for it in items])
        assert _image_cache_keys(specs[kind], features, classifier) not in (key, new)


def test_the_source_fingerprint_holds_absolute_paths(tmp_path, monkeypatch):
    from cefam_lightning.data.image_sources import open_source
    from tests.test_image_sources import make_images, write_folder

    write_folder(tmp_path / "a" / "data", make_images(2))
    write_folder(tmp_path / "b" / "data", make_images(2))  # the same files, elsewhere
    monkeypatch.chdir(tmp_path / "a")
    here = open_source("data").fingerprint()
    assert here["root"] == str(tmp_path / "a" / "data") and here["files"] == 2
    monkeypatch.chdir(tmp_path / "b")
    assert open_source("data").fingerprint()["files_digest"] != here["files_digest"]
