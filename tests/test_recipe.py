"""The README's "your own data, end to end" recipe at a small size: toy JPEGs -> precompute (random open_clip
model) -> train from a manifest and from tar shards -> evaluate on a Broden-layout folder."""

from __future__ import annotations

import json

import numpy as np

from cefam_lightning.cli import evaluate, precompute, train
from cefam_lightning.data import toy_data
from cefam_lightning.data.embedding_store import EmbeddingStore
from tests.test_vlm import TINY_CLIP, write_tiny_configs


def _train(tmp_path, name, data_overrides):
    return train.main(
        [
            *data_overrides,
            "data.source=images",
            f"data.store={tmp_path / 'toy' / 'store'}",
            "data.batch_size=8",
            f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}",
            f"run_name={name}",
            "classifier.name=resnet18",
            "classifier.allow_random_init=true",
            "classifier.image_size=32",
            "cefam.hidden_dims=[32]",
            "trainer.max_epochs=2",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ]
    )


def test_toy_data_precompute_train_manifest_and_shards_then_evaluate_broden(tmp_path, capsys):
    toy = toy_data.write_toy_data(tmp_path / "toy", n_train=24, n_val=8, image_size=32, per_shard=8, n_broden=6)
    assert (toy / "images").is_dir() and len(list((toy / "shards").glob("train-*.tar"))) == 3

    configs = write_tiny_configs(tmp_path / "open_clip_configs")
    precompute.main(
        ["--images", str(toy / "train.csv"), str(toy / "val.csv"), "--concepts", str(toy / "concepts.csv")]
        + ["--model", TINY_CLIP, "--model-config", str(configs), "--random-init", "--no-progress"]
        + ["--device", "cpu", "--out", str(toy / "store")]
    )
    store = EmbeddingStore.open(toy / "store")
    assert store.num_samples == 32 and store.concept_names[:3] == ["red", "green", "blue"]
    assert set(store.sample_ids.tolist()) == {f"train/{i:06d}" for i in range(24)} | {f"val/{i:06d}" for i in range(8)}

    manifest = _train(tmp_path, "manifest", [f"data.train={toy / 'train.csv'}", f"data.val={toy / 'val.csv'}"])
    shards = _train(
        tmp_path,
        "shards",
        [f"data.train={toy / 'shards' / 'train-{000..002}.tar'}", f"data.val={toy / 'shards' / 'val-000.tar'}"]
        + ["classifier.num_classes=6"],
    )
    for run in (manifest, shards):
        assert run["epochs_trained"] == 2 and run["best_checkpoint"]
        assert np.isfinite(run["test"]["test/loss"])

    out = tmp_path / "eval"
    results = evaluate.main(
        ["--checkpoint", manifest["best_checkpoint"], "--data", str(toy / "broden"), "--out", str(out)]
    )
    written = json.loads((out / "evaluation.json").read_text())
    assert written["regions"].keys() == results["regions"].keys() >= {"cefam", "gradcam", "random"}
    nra = written["regions"]["cefam"]["top1"]["nra/mean"]
    assert nra is not None and 0 <= nra <= 1
