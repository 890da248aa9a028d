"""The pooled-feature cache: later epochs skip the classifier and train exactly as without the cache."""

import pickle

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import CachePooledFeatures
from cefam_lightning.classifier import build_classifier
from cefam_lightning.datamodule import ShapesWorldDataModule
from cefam_lightning.feature_cache import (
    CachedFeatureDataset,
    FeatureCacheError,
    PooledFeatureCache,
    collate_cached,
    pooled_identity,
)
from tests.test_cefam_module import _module, _trainer


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
