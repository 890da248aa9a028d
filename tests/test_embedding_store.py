import json

import numpy as np
import pytest

import cefam_lightning.embedding_store as es
from cefam_lightning.concepts import make_concepts, make_prompt
from cefam_lightning.embedding_store import EmbeddingStore, EmbeddingStoreError, VLMInfo


def _write(path, n=5, d=8, **kw):
    rng = np.random.default_rng(0)
    args = {
        "sample_ids": [f"img{i}" for i in range(n)],
        "image_embeddings": rng.normal(size=(n, d)).astype(np.float32),
        "text_embeddings": rng.normal(size=(3, d)).astype(np.float32),
        "concepts": make_concepts([("red", "color"), ("wood", "material"), ("sky", "scene")]),
        "vlm": VLMInfo(name="ViT-B-16", kind="siglip", logit_scale=10.0, logit_bias=-10.0, pretrained="webli"),
    }
    args.update(kw)
    return EmbeddingStore.write(path, **args)


def test_round_trip_is_memory_mapped_and_keeps_metadata(tmp_path):
    written = _write(tmp_path / "store", dtype="float16")
    store = EmbeddingStore.open(tmp_path / "store")
    assert isinstance(store.image_embeddings, np.memmap)
    assert store.image_embeddings.dtype == np.float16
    np.testing.assert_allclose(store.image_embeddings, written.image_embeddings)
    assert store.vlm == VLMInfo("ViT-B-16", "siglip", 10.0, -10.0, "webli")
    assert store.concept_names == ["red", "wood", "sky"]
    assert store.concepts[1].prompt == "a photo of an object made of wood"
    assert store.concepts[2].prompt == make_prompt("sky", "scene")
    np.testing.assert_array_equal(store.rows_for(["img3", "img0"]), [3, 0])


def test_missing_ids_are_counted_and_named(tmp_path):
    store = _write(tmp_path / "store")
    with pytest.raises(KeyError, match=r"2 of 3 sample ids.*nope"):
        store.rows_for(["img1", "nope", "nope2"])


def test_failed_write_leaves_no_store_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "store"
    _write(path, n=5)
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*a, **k)

    monkeypatch.setattr(es.np, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        _write(path, n=7)
    monkeypatch.undo()
    assert EmbeddingStore.open(path).num_samples == 5  # the old store, intact
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temporary leftovers


def test_write_rejects_inconsistent_arrays(tmp_path):
    with pytest.raises(EmbeddingStoreError, match="text_embeddings"):
        _write(tmp_path / "s", text_embeddings=np.zeros((2, 8), np.float32))
    with pytest.raises(EmbeddingStoreError, match="duplicates"):
        _write(tmp_path / "s", sample_ids=["a", "a", "b", "c", "d"])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("corrupt", "file", "message"),
    [
        (lambda p: np.save(p / "image_embeddings.npy", np.zeros((5, 7), np.float32)), "image_embeddings.npy", "shape"),
        (lambda p: np.save(p / "image_embeddings.npy", np.zeros((5, 8), np.float64)), "image_embeddings.npy", "dtype"),
        (lambda p: np.save(p / "sample_ids.npy", np.array(["a", "a", "b", "c", "d"])), "sample_ids.npy", "unique"),
        (
            lambda p: np.save(p / "text_embeddings.npy", np.zeros((2, 8), np.float32)),
            "text_embeddings.npy",
            "3 concepts",
        ),
        (lambda p: (p / "text_embeddings.npy").write_bytes(b"garbage"), "text_embeddings.npy", "not a readable"),
        (lambda p: (p / "meta.json").write_text("{not json"), "meta.json", "not valid JSON"),
        (lambda p: (p / "meta.json").unlink(), "meta.json", "missing"),
        (lambda p: (p / "sample_ids.npy").unlink(), "sample_ids.npy", "missing"),
    ],
)
def test_malformed_store_gives_an_error_naming_the_file(tmp_path, corrupt, file, message):
    path = tmp_path / "store"
    _write(path)
    corrupt(path)
    with pytest.raises(EmbeddingStoreError, match=message) as err:
        EmbeddingStore.open(path)
    assert str(path / file) in str(err.value)


def test_bad_metadata_values_are_named(tmp_path):
    path = tmp_path / "store"
    _write(path)
    meta = json.loads((path / "meta.json").read_text())
    meta["vlm"]["kind"] = "blip"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EmbeddingStoreError, match=r"meta.json.*'vlm'.*blip"):
        EmbeddingStore.open(path)


def test_not_a_store_folder(tmp_path):
    with pytest.raises(EmbeddingStoreError, match="no such folder"):
        EmbeddingStore.open(tmp_path / "nothing")
