import json

import numpy as np
import pytest

import cefam_lightning.data.embedding_store as es
from cefam_lightning.data.concepts import make_concepts, make_prompt
from cefam_lightning.data.embedding_store import EmbeddingStore, EmbeddingStoreError, VLMInfo


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


def _corrupt_rows(path, rows, value):
    """Overwrite ``rows`` of a written store's image embeddings with ``value`` (in place, keeping dtype)."""
    file = path / "image_embeddings.npy"
    emb = np.load(file)
    emb[rows, 1] = value
    np.save(file, emb)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_open_refuses_non_finite_image_embeddings_naming_rows_and_ids(tmp_path, dtype, value):
    path = tmp_path / "store"
    _write(path, n=6, dtype=dtype)
    _corrupt_rows(path, [1, 4], value)
    with pytest.raises(EmbeddingStoreError) as err:
        EmbeddingStore.open(path)
    msg = str(err.value)
    assert str(path / "image_embeddings.npy") in msg
    assert "2 of 6 rows hold NaN or infinite values" in msg
    assert "1 (id 'img1'), 4 (id 'img4')" in msg and "..." not in msg


def test_the_scan_reads_in_chunks_and_shows_the_first_rows_and_the_count(tmp_path, monkeypatch):
    path = tmp_path / "store"
    _write(path, n=50)
    bad = [3, 9, 10, 22, 31, 40, 49]
    _corrupt_rows(path, bad, np.nan)
    chunks = []
    real_isfinite = np.isfinite

    def counting_isfinite(x, *a, **k):
        chunks.append(len(x))
        return real_isfinite(x, *a, **k)

    monkeypatch.setattr(es, "_SCAN_BYTES", 7 * 8 * 4)  # 7 rows of 8 float32 per chunk
    monkeypatch.setattr(es.np, "isfinite", counting_isfinite)
    with pytest.raises(EmbeddingStoreError, match="7 of 50 rows") as err:
        EmbeddingStore.open(path)
    shown = ", ".join(f"{r} (id 'img{r}')" for r in bad[:5])
    assert f"(rows {shown}, ...)" in str(err.value)
    assert [n for n in chunks if n != 3] == [7] * 7 + [1]  # 3: the text embeddings, checked whole


def test_a_store_file_is_scanned_once_per_version(tmp_path, monkeypatch):
    path = tmp_path / "store"
    _write(path)
    calls = []
    real = es.non_finite_rows
    monkeypatch.setattr(es, "non_finite_rows", lambda a, *x: calls.append(a.shape) or real(a, *x))
    EmbeddingStore.open(path)
    EmbeddingStore.open(path)
    assert calls.count((5, 8)) == 0  # scanned when written, not again
    _corrupt_rows(path, [2], np.inf)  # a new version of the file is scanned again
    with pytest.raises(EmbeddingStoreError, match=r"1 of 5 rows.*2 \(id 'img2'\)"):
        EmbeddingStore.open(path)
    assert calls.count((5, 8)) == 1


def test_write_refuses_non_finite_embeddings_and_leaves_nothing(tmp_path):
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    emb[3, 0] = np.nan
    with pytest.raises(EmbeddingStoreError, match=r"image_embeddings for .*/s: 1 of 5 rows.*3 \(id 'img3'\)"):
        _write(tmp_path / "s", image_embeddings=emb)
    big = np.ones((5, 8), np.float32)
    big[0, 0] = 1e6  # finite, but beyond float16's range
    with pytest.raises(EmbeddingStoreError, match=r"as float16: 1 of 5 rows.*0 \(id 'img0'\)"):
        _write(tmp_path / "s", image_embeddings=big, dtype="float16")
    text = np.ones((3, 8), np.float32)
    text[1, 2] = np.inf
    with pytest.raises(EmbeddingStoreError, match=r"text_embeddings for .*: 1 of 3 rows.*1 \(concept 'wood'\)"):
        _write(tmp_path / "s", text_embeddings=text)
    assert not (tmp_path / "s").exists()


def test_open_names_the_concepts_of_non_finite_text_embeddings(tmp_path):
    path = tmp_path / "store"
    _write(path)
    text = np.load(path / "text_embeddings.npy")
    text[2, 0] = np.nan
    np.save(path / "text_embeddings.npy", text)
    with pytest.raises(EmbeddingStoreError, match=r"text_embeddings.npy: 1 of 3 rows.*2 \(concept 'sky'\)"):
        EmbeddingStore.open(path)
