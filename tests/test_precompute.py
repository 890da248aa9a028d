"""``precompute``: images and a concept file -> an embedding store, batched, resumable, with a tiny random model."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cefam_lightning.models.precompute as pc
from cefam_lightning.cli.precompute import main
from cefam_lightning.data.concepts import make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.data.image_sources import open_image, open_source
from cefam_lightning.models.precompute import PrecomputeError, load_concepts, partial_path, precompute
from cefam_lightning.models.vlm import OpenCLIPVLM
from tests.test_vlm import TINY_CLIP, TINY_SIGMOID, write_tiny_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    return write_tiny_configs(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def vlm(configs) -> OpenCLIPVLM:
    return OpenCLIPVLM(TINY_CLIP, seed=0, device="cpu")


def make_folder(root: Path, n: int, bad: int = 0, seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: ``n`` small random JPEGs of varied sizes in two classes, plus ``bad`` broken ones."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    for i in range(bad):
        (root / "cat" / f"broken{i}.jpg").write_bytes(b"this is not a jpeg")
    return root


def concept_file(path: Path) -> Path:
    path.write_text("# name,type\nred,color\nstriped\ttexture\nwood,material\ndog,object\nbeach,scene\ntail\n")
    return path


def direct_embeddings(vlm: OpenCLIPVLM, source) -> tuple[list[str], torch.Tensor]:
    """Encode a source's readable images in one batch, without precompute."""
    ids, xs = [], []
    for rec in open_source(source):
        try:
            xs.append(vlm.preprocess(open_image(rec)))
        except ValueError:
            continue
        ids.append(rec.id)
    return ids, vlm.encode_images(torch.stack(xs))


def cli(configs: Path, concepts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--concepts",
        str(concepts),
        "--model",
        TINY_CLIP,
        "--model-config",
        str(configs),
        "--random-init",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert np.array_equal(sa.sample_ids, sb.sample_ids)
    assert sa.image_embeddings.dtype == sb.image_embeddings.dtype
    assert np.array_equal(sa.image_embeddings, sb.image_embeddings)
    assert np.array_equal(sa.text_embeddings, sb.text_embeddings)
    assert (a / "meta.json").read_text() == (b / "meta.json").read_text()


def test_folder_store_matches_direct_encoding_and_lists_unreadable_images(vlm, tmp_path):
    images = make_folder(tmp_path / "imgs", 23, bad=2)
    concepts = load_concepts(concept_file(tmp_path / "concepts.txt"))
    result = precompute(vlm, tmp_path / "store", concepts, [images], batch_size=4, chunk_size=7)
    store = EmbeddingStore.open(tmp_path / "store")
    assert (result.num_images, result.num_skipped, result.chunks_total, result.chunks_reused) == (25, 2, 4, 0)

    ids, expected = direct_embeddings(vlm, images)
    assert store.sample_ids.tolist() == ids  # the source's order, unreadable images left out
    assert store.image_embeddings.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(store.image_embeddings)), expected)
    np.testing.assert_array_equal(store.text_embeddings, vlm.encode_texts([c.prompt for c in concepts]).numpy())

    assert [(c.name, c.type, c.prompt) for c in store.concepts] == [
        ("red", "color", "a photo of a red object"),
        ("striped", "texture", "a photo of a striped object"),
        ("wood", "material", "a photo of an object made of wood"),
        ("dog", "object", "a photo of a dog"),
        ("beach", "scene", "a photo of an object on beach"),
        ("tail", "object", "a photo of a tail"),  # no type given: --default-type (object)
    ]
    assert store.vlm == vlm.info
    extra = store.extra
    assert extra["num_skipped"] == 2 and extra["num_images"] == 25
    assert [s["id"] for s in extra["skipped"]] == ["cat/broken0.jpg", "cat/broken1.jpg"]
    assert all("broken" in s["error"] and "cannot decode" in s["error"] for s in extra["skipped"])
    assert extra["sources"] == [{"spec": str(images.resolve()), "description": open_source(images).describe()}]
    assert extra["preprocessing"]["open_clip"] == vlm.preprocess_config
    assert extra["settings"] == {"batch_size": 4, "chunk_size": 7, "device": "cpu", "random_init_seed": 0}
    assert not partial_path(tmp_path / "store").exists()


def test_workers_and_progress_bar_do_not_change_the_store(vlm, tmp_path, capsys):
    images = make_folder(tmp_path / "imgs", 12, bad=1)
    concepts = make_concepts([("red", "color")])
    precompute(vlm, tmp_path / "a", concepts, [images], batch_size=4, chunk_size=5)
    assert "precompute" not in capsys.readouterr().err  # no bar unless asked
    precompute(vlm, tmp_path / "b", concepts, [images], batch_size=4, chunk_size=5, num_workers=2, progress=True)
    bar = capsys.readouterr().err
    assert "precompute: 100%" in bar and "13/13" in bar
    assert_same_store(tmp_path / "a", tmp_path / "b")


def test_manifest_and_shards_with_float16(vlm, tmp_path):
    import webdataset as wds

    images = make_folder(tmp_path / "imgs", 9)
    files = sorted(images.rglob("*.jpg"))
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id"])
        for i, p in enumerate(files):
            w.writerow([p.relative_to(tmp_path).as_posix(), f"m{i}"])
    concepts = make_concepts([("red", "color")])
    f32 = precompute(vlm, tmp_path / "f32", concepts, [manifest], batch_size=3, chunk_size=4).store
    f16 = precompute(vlm, tmp_path / "f16", concepts, [manifest], batch_size=3, chunk_size=4, dtype="float16").store
    assert f32.sample_ids.tolist() == [f"m{i}" for i in range(9)]
    assert f16.image_embeddings.dtype == np.float16 and f16.text_embeddings.dtype == np.float32
    np.testing.assert_array_equal(f16.image_embeddings, np.asarray(f32.image_embeddings).astype(np.float16))
    ids, expected = direct_embeddings(vlm, manifest)
    torch.testing.assert_close(torch.from_numpy(np.array(f32.image_embeddings)), expected)

    shard = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, p in enumerate(files[:5]):
            # class-name labels, which training needs the class list for: precompute reads no labels
            sink.write({"__key__": f"s{i:03d}", "jpg": p.read_bytes(), "cls": b"tabby cat"})
    tar_store = precompute(vlm, tmp_path / "tar", concepts, [shard], batch_size=3, chunk_size=4).store
    assert tar_store.sample_ids.tolist() == [f"s{i:03d}" for i in range(5)]
    np.testing.assert_allclose(tar_store.image_embeddings, np.asarray(f32.image_embeddings)[:5], rtol=1e-5, atol=1e-6)


def test_a_16_bit_png_embeds_like_its_8_bit_twin(vlm, tmp_path):
    """precompute reads a 16-bit PNG by its full range (not clipped to white): a 16-bit image whose values are an
    8-bit image's times 257 gets that image's embedding, a blank white image another."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "g16.png")
    Image.fromarray(grey).save(folder / "g8.png")
    Image.fromarray(np.full((24, 24), 255, dtype=np.uint8)).save(folder / "white.png")
    store = precompute(vlm, tmp_path / "store", make_concepts([("red", "color")]), [tmp_path / "imgs"]).store
    emb = dict(zip(store.sample_ids.tolist(), np.asarray(store.image_embeddings), strict=True))
    np.testing.assert_array_equal(emb["a/g16.png"], emb["a/g8.png"])
    assert not np.allclose(emb["a/g16.png"], emb["a/white.png"], atol=1e-3)


def test_killed_run_resumes_to_the_same_store(configs, tmp_path):
    """A real ``precompute`` process killed (SIGKILL) after some chunks, then rerun: identical to one full run."""
    images = make_folder(tmp_path / "imgs", 125, bad=3)
    concepts = concept_file(tmp_path / "concepts.txt")
    args = ["--images", str(images), "--batch-size", "8", "--chunk-size", "8"]
    out = tmp_path / "store"
    work = partial_path(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "precompute.py"), *cli(configs, concepts, out, *args)],  # the launcher
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(work.glob("*/chunk-*.npz")):
            assert proc.poll() is None, f"precompute ended before writing a chunk: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no chunk written within 60 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(work.glob("*/chunk-*.npz")))
    assert 1 <= done < 16  # 128 images in chunks of 8: killed midway
    assert not out.exists()  # never a store before it is complete

    resumed = main(cli(configs, concepts, out, *args))
    assert resumed.chunks_reused >= done and resumed.chunks_total == 16 and resumed.num_skipped == 3
    full = main(cli(configs, concepts, tmp_path / "full", *args))
    assert full.chunks_reused == 0
    assert_same_store(out, tmp_path / "full")
    assert not work.exists()


class _Interrupt(Exception):
    pass


def _interrupted_run(vlm, monkeypatch, out, concepts, sources, after: int, **kw) -> None:
    """Run precompute and stop it (as a crash would) after ``after`` chunks were written."""
    real, calls = pc._write_chunk, []

    def write_then_stop(*a, **k):
        if len(calls) == after:
            raise _Interrupt
        calls.append(1)
        real(*a, **k)

    monkeypatch.setattr(pc, "_write_chunk", write_then_stop)
    with pytest.raises(_Interrupt):
        precompute(vlm, out, concepts, sources, **kw)
    monkeypatch.setattr(pc, "_write_chunk", real)
    assert len(list(partial_path(out).glob("*/chunk-*.npz"))) == after and not Path(out).exists()


def test_changed_settings_or_sources_stop_with_a_clear_error(vlm, tmp_path, monkeypatch):
    images = make_folder(tmp_path / "imgs", 20)
    concepts = make_concepts([("red", "color"), ("dog", "object")])
    out = tmp_path / "store"
    kw = {"batch_size": 2, "chunk_size": 5}
    _interrupted_run(vlm, monkeypatch, out, concepts, [images], after=2, **kw)

    with pytest.raises(PrecomputeError, match=r"different settings \(differing: batch_size\).*--restart"):
        precompute(vlm, out, concepts, [images], batch_size=3, chunk_size=5)
    with pytest.raises(PrecomputeError, match=r"differing: concepts"):
        precompute(vlm, out, make_concepts([("red", "color")]), [images], **kw)
    other = OpenCLIPVLM(TINY_CLIP, seed=1)
    with pytest.raises(PrecomputeError, match=r"differing: seed"):
        precompute(other, out, concepts, [images], **kw)
    assert len(list(partial_path(out).glob("*/chunk-*.npz"))) == 2  # the errors leave the work in place

    # The same settings resume (the storage dtype is not part of them: chunks are float32).
    res = precompute(vlm, out, concepts, [images], dtype="float16", **kw)
    assert (res.chunks_reused, res.chunks_total) == (2, 4)
    full = precompute(vlm, tmp_path / "full", concepts, [images], dtype="float16", **kw)
    assert_same_store(out, full.store.path)

    # Images added to the folder since the interruption: the finished chunks no longer fit.
    out2 = tmp_path / "store2"
    _interrupted_run(vlm, monkeypatch, out2, concepts, [images], after=1, **kw)
    Image.new("RGB", (20, 20)).save(images / "cat" / "00000-new.jpg")
    with pytest.raises(PrecomputeError, match="sources changed.*--restart"):
        precompute(vlm, out2, concepts, [images], **kw)
    res = precompute(vlm, out2, concepts, [images], restart=True, **kw)
    assert res.chunks_reused == 0 and res.num_images == 21 and not partial_path(out2).exists()


def test_existing_output_and_duplicate_ids(vlm, tmp_path):
    images = make_folder(tmp_path / "imgs", 4)
    concepts = make_concepts([("red", "color")])
    precompute(vlm, tmp_path / "store", concepts, [images])
    with pytest.raises(PrecomputeError, match="already exists; add --overwrite"):
        precompute(vlm, tmp_path / "store", concepts, [images])
    res = precompute(vlm, tmp_path / "store", concepts, [images], overwrite=True, batch_size=3)
    assert res.store.num_samples == 4
    with pytest.raises(PrecomputeError, match="sample id 'cat/00001.jpg' occurs twice"):
        precompute(vlm, tmp_path / "dup", concepts, [images, images], chunk_size=2)
    assert not (tmp_path / "dup").exists() and not partial_path(tmp_path / "dup").exists()


def test_cli_concepts_only_with_templates(configs, tmp_path, capsys):
    concepts = concept_file(tmp_path / "concepts.txt")
    templates = tmp_path / "templates.yaml"
    templates.write_text("color: 'a {}-colored thing'\nscene: 'something in a {}'\n")
    out = tmp_path / "vocab"
    argv = cli(configs, concepts, out, "--templates", str(templates), "--template", "scene=a view of a {}")
    argv += ["--default-type", "part"]
    result = main(argv)
    assert "wrote" in capsys.readouterr().out
    store = result.store
    assert store.num_samples == 0 and store.image_embeddings.shape == (0, 16)
    prompts = {c.name: c.prompt for c in store.concepts}
    assert prompts["red"] == "a red-colored thing"  # the template file
    assert prompts["beach"] == "a view of a beach"  # --template overrides the file
    assert prompts["wood"] == "a photo of an object made of wood"  # default for the types not given
    assert [c.type for c in store.concepts][-1] == "part"  # --default-type
    vlm = OpenCLIPVLM(TINY_CLIP, seed=0)
    np.testing.assert_array_equal(store.text_embeddings, vlm.encode_texts([c.prompt for c in store.concepts]))


def test_cli_sigmoid_model_records_siglip_scoring(configs, tmp_path):
    images = make_folder(tmp_path / "imgs", 3)
    argv = cli(configs, concept_file(tmp_path / "c.txt"), tmp_path / "s", "--images", str(images), "--float16")
    argv[argv.index(TINY_CLIP)] = TINY_SIGMOID
    store = main(argv).store
    assert (store.vlm.kind, store.vlm.logit_bias, store.vlm.logit_scale) == ("siglip", -10.0, pytest.approx(10.0))
    assert store.image_embeddings.dtype == np.float16 and store.num_samples == 3


def _cli_error(argv, capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_cli_bad_arguments_exit_2_with_one_error_line(configs, tmp_path, capsys):
    concepts = concept_file(tmp_path / "concepts.txt")
    images = make_folder(tmp_path / "imgs", 2)
    out = tmp_path / "store"
    base = cli(configs, concepts, out, "--images", str(images))

    bad_model = list(base)
    bad_model[bad_model.index(TINY_CLIP)] = "ViT-B-33"
    err = _cli_error(bad_model, capsys)
    assert "unknown open_clip model 'ViT-B-33'; did you mean ViT-B-32" in err
    no_weights = [a for a in base if a != "--random-init"]
    assert "--pretrained TAG|PATH" in _cli_error(no_weights, capsys)
    assert "--random-init excludes --pretrained" in _cli_error(base + ["--pretrained", "openai"], capsys)
    missing = tmp_path / "none.txt"
    assert f"concept file not found: {missing}" in _cli_error(cli(configs, missing, out), capsys)
    bad_line = tmp_path / "bad.txt"
    bad_line.write_text("red,color\nblue,color,extra\n")
    assert f"{bad_line}:2: expected 'name' or 'name,type'" in _cli_error(cli(configs, bad_line, out), capsys)
    assert "--template 'color=plain'" in _cli_error(base + ["--template", "color=plain"], capsys)
    bad_yaml = tmp_path / "t.yaml"
    bad_yaml.write_text("- just a list\n")
    assert f"{bad_yaml}: expected a mapping" in _cli_error(base + ["--templates", str(bad_yaml)], capsys)
    nowhere = tmp_path / "nowhere"
    assert f"image source not found: {nowhere}" in _cli_error(
        cli(configs, concepts, out, "--images", str(nowhere)), capsys
    )
    assert "batch_size and chunk_size must be >= 1" in _cli_error(base + ["--batch-size", "0"], capsys)
    assert not out.exists() and not partial_path(out).exists()
    blocker = tmp_path / "a_file"  # an --out whose parent is a file: not writable, whoever runs the test
    blocker.write_text("not a folder")
    assert str(blocker) in _cli_error(cli(configs, concepts, blocker / "store", "--images", str(images)), capsys)


@pytest.mark.parametrize("where", ["mid_data", "between_samples"])
def test_cli_refuses_a_truncated_shard_on_one_line_naming_it(configs, tmp_path, capsys, where):
    """Cut inside a member (a traceback before) or between two samples (silently fewer samples before): the
    samples after the cut cannot be listed, so the run is refused before any work, naming the shard."""
    from tests.cli import cli_error
    from tests.test_image_sources import make_images, truncate_shard, write_shards

    shards = write_shards(tmp_path / "shards", make_images(8, seed=3), per_shard=4)  # shard-000, shard-001
    cut = truncate_shard(tmp_path / "shards" / "shard-001.tar", tmp_path / "cut.tar", where)
    cut.replace(tmp_path / "shards" / "shard-001.tar")
    out = tmp_path / "store"
    argv = cli(configs, concept_file(tmp_path / "c.txt"), out, "--images", shards)
    line = cli_error(main, argv, capsys)
    assert line.startswith(f"{tmp_path / 'shards' / 'shard-001.tar'}: truncated or damaged tar shard"), line
    assert not out.exists() and not partial_path(out).exists()


def test_cli_no_readable_image_exits_1(configs, tmp_path, capsys):
    images = tmp_path / "imgs"
    (images / "x").mkdir(parents=True)
    (images / "x" / "a.jpg").write_bytes(b"garbage")
    (images / "x" / "b.png").write_bytes(b"garbage")
    err = _cli_error(cli(configs, concept_file(tmp_path / "c.txt"), tmp_path / "s", "--images", str(images)), capsys, 1)
    assert "none of the 2 images could be read" in err
    store = EmbeddingStore.open(tmp_path / "s")  # written, listing both
    assert store.num_samples == 0 and store.extra["num_skipped"] == 2
