"""The ``explain`` command: reports, region maps and figures for image files, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cefam_lightning.cli.explain import main
from cefam_lightning.data.concepts import make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.methods.base import load_explainer as load_checkpoint
from cefam_lightning.methods.cefam.concept_sets import read_concepts
from cefam_lightning.reporting.explanations import ExplainError, explain_images, output_names

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "image",
    "checkpoint",
    "method",
    "predicted_class",
    "predicted_probability",
    "explained_class",
    "explained_probability",
    "layers",
    "settings",
    "concepts",
}
CONCEPT_KEYS = {
    "name",
    "type",
    "score",
    "probability",
    "layer",
    "relevance",
    "selected_relevance",
    "contribution",
    "region",
    "contribution_layer",
}


@pytest.fixture(scope="module")
def module(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def test_images(tiny_world) -> np.ndarray:
    return np.array(tiny_world.split("test").images[:4])


def _save(images: np.ndarray, folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for img, name in zip(images, names, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def _as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_folder_reports_match_explain_batch(module, test_images, tiny_checkpoint, tmp_path):
    # a/x.png and b/x.png share a stem: each must get its own output folder.
    paths = _save(test_images[:3], tmp_path / "in", ["a/x.png", "b/x.png", "c.png"])
    out = tmp_path / "out"
    summary = explain_images(tiny_checkpoint, [tmp_path / "in"], top_n=3, k=5, out_dir=out, device="cpu")

    assert summary["failed"] == [] and summary["checkpoint"] == str(tiny_checkpoint)
    assert [e["image"] for e in summary["explained"]] == [str(p) for p in paths]  # sorted, recursive
    folders = [Path(e["folder"]) for e in summary["explained"]]
    assert len(set(folders)) == 3 and {f.parent for f in folders} == {out}
    assert json.loads((out / "summary.json").read_text()) == summary

    ref = module.explain(_as_batch(test_images[:3]), top_n=3, k=5)  # the checkpoint's rules
    classes = module.hparams["class_names"]
    names = module.hparams["concept_names"]
    for i, folder in enumerate(folders):
        report = json.loads((folder / "report.json").read_text())
        assert set(report) == REPORT_KEYS
        assert report["image"] == str(paths[i])
        assert report["settings"] == {
            **module.explain_rules(),  # the checkpoint's rules, but for the options given
            "top_n": 3,
            "k": 5,
            "select_layers": ["layer1", "layer2", "layer3"],  # auto: layer4 feeds global pooling
            "concept_set": "checkpoint",
        }
        assert report["layers"] == ref.layers
        assert report["predicted_class"] == classes[int(ref.logits[i].argmax())]
        assert report["explained_class"] == report["predicted_class"]
        assert report["predicted_probability"] == pytest.approx(float(ref.class_prob[i]), abs=1e-5)
        concepts = report["concepts"]
        assert len(concepts) == 3
        scores = [c["score"] for c in concepts]
        assert scores == sorted(scores, reverse=True)
        regions = np.load(folder / "regions.npz")
        assert len(regions.files) == 3
        for j, c in enumerate(concepts):
            assert set(c) == CONCEPT_KEYS
            idx = int(ref.concepts[i, j])
            assert c["name"] == names[idx] and c["type"] == module.hparams["concept_types"][idx]
            assert c["score"] == pytest.approx(float(ref.scores[i, idx]), abs=1e-5)
            assert c["probability"] == pytest.approx(float(ref.concept_probs[i, idx]), abs=1e-5)
            assert c["contribution"] == pytest.approx(float(ref.contributions[i, j]), abs=1e-5)
            assert c["layer"] == ref.layers[int(ref.layer_index[i, j])]
            assert list(c["relevance"]) == ref.layers
            # (map relevance runs other batches of masked images through the classifier: float32 rounding differs)
            assert c["relevance"] == pytest.approx(
                dict(zip(ref.layers, ref.relevance[i, j].tolist(), strict=True)), rel=1e-4, abs=1e-4
            )
            assert c["selected_relevance"] == c["relevance"][c["layer"]]
            file, key = c["region"].split(":")
            assert file == "regions.npz"
            region = regions[key]
            assert region.dtype == np.float16 and region.shape == test_images.shape[1:3]
            np.testing.assert_allclose(region, ref.regions[i, j].numpy(), rtol=2e-3, atol=1e-4)
        png = (folder / "figure.png").read_bytes()
        assert png.startswith(b"\x89PNG")


def test_corrupt_image_is_reported_and_the_rest_explained(module, tiny_checkpoint, test_images, tmp_path, caplog):
    good = _save(test_images[:2], tmp_path / "in", ["g1.png", "g2.png"])
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with caplog.at_level("WARNING", logger="cefam_lightning"):
        summary = explain_images(module, [tmp_path / "in"], top_n=2, k=3, out_dir=tmp_path / "out", figures=False)
    assert [e["image"] for e in summary["explained"]] == [str(p) for p in good]
    assert len(summary["failed"]) == 1 and summary["failed"][0]["image"] == str(bad)
    assert summary["failed"][0]["error"]
    assert str(bad) in caplog.text
    assert not (tmp_path / "out" / "broken").exists()

    # Nothing readable: the command exits with status 1, after writing the summary.
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out2"), str(bad)])
    assert exc.value.code == 1
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["failed"][0]["image"] == str(bad)


def test_a_16_bit_png_is_explained_like_its_8_bit_twin(module, test_images, tmp_path):
    """explain reads a 16-bit PNG by its full range (it used to clip it to white): an image whose 16-bit values
    are an 8-bit image's times 257 gets that image's report."""
    grey = test_images[0].mean(axis=2).round().astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(grey).save(tmp_path / "in" / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "in" / "g16.png")
    summary = explain_images(module, [tmp_path / "in"], top_n=3, k=5, out_dir=tmp_path / "out", figures=False)
    assert summary["failed"] == [] and len(summary["explained"]) == 2
    reports = {}
    for entry in summary["explained"]:
        reports[Path(entry["image"]).stem] = json.loads((Path(entry["folder"]) / "report.json").read_text())
    for key in ("predicted_class", "predicted_probability", "concepts"):
        assert reports["g16"][key] == reports["g8"][key], key


def test_unknown_concept_needs_a_store(module, test_images, tmp_path):
    img = _save(test_images[:1], tmp_path, ["one.png"])
    with pytest.raises(ExplainError, match="crimson") as exc:
        explain_images(module, img, concepts="red,crimson", out_dir=tmp_path / "out")
    msg = str(exc.value)
    assert "red, green" in msg and "--store" in msg and "text encoder" in msg
    assert not (tmp_path / "out").exists()


def test_new_concept_from_a_store_and_a_concept_file(module, tiny_checkpoint, tiny_world, test_images, tmp_path):
    img = _save(test_images[:2], tmp_path, ["one.png", "two.png"])
    base = tiny_world.store
    red = base.text_embeddings[base.concept_names.index("red")]
    store = EmbeddingStore.write(
        tmp_path / "store",
        sample_ids=[],
        image_embeddings=np.zeros((0, base.embed_dim), np.float32),
        text_embeddings=red[None],  # "crimson" is red under another name: it must score as red does
        concepts=make_concepts([("crimson", "color")]),
        vlm=base.vlm,
    )
    summary = explain_images(
        module, img, concepts="crimson,red,circle", store=store.path, top_n=3, k=3, out_dir=tmp_path / "o1"
    )
    checkpoint_set = explain_images(module, img, top_n=9, k=3, out_dir=tmp_path / "o2", figures=False)
    for mine, full in zip(summary["explained"], checkpoint_set["explained"], strict=True):
        report = json.loads((Path(mine["folder"]) / "report.json").read_text())
        by_name = {c["name"]: c for c in report["concepts"]}
        assert set(by_name) == {"crimson", "red", "circle"} and report["settings"]["concept_set"] == "given"
        assert by_name["crimson"]["type"] == "color"
        assert by_name["crimson"]["score"] == pytest.approx(by_name["red"]["score"], abs=1e-5)
        # Scores do not depend on the concept set (probabilities do: a softmax over the given set).
        full_scores = {
            c["name"]: c["score"] for c in json.loads((Path(full["folder"]) / "report.json").read_text())["concepts"]
        }
        assert by_name["circle"]["score"] == pytest.approx(full_scores["circle"], abs=1e-5)
        assert sum(c["probability"] for c in report["concepts"]) == pytest.approx(1.0, abs=1e-5)

    # A concept file: "name,type" and "name<TAB>type" lines, comments and blank lines.
    cfile = tmp_path / "concepts.txt"
    cfile.write_text("# my concepts\ncrimson,colour\n\nsquare\tshape  # a comment\nblue\n")
    assert read_concepts(str(cfile)) == [("crimson", "colour"), ("square", "shape"), ("blue", None)]
    summary = main(
        ["--checkpoint", tiny_checkpoint, "--concepts", str(cfile), "--store", str(store.path), "--k", "3"]
        + ["--no-figures", "--out", str(tmp_path / "o3"), str(img[0])]
    )
    report = json.loads((Path(summary["explained"][0]["folder"]) / "report.json").read_text())
    assert {(c["name"], c["type"]) for c in report["concepts"]} == {
        ("crimson", "colour"),
        ("square", "shape"),
        ("blue", "color"),
    }


def test_store_of_another_embedding_size_is_rejected(module, tiny_world, test_images, tmp_path):
    img = _save(test_images[:1], tmp_path, ["one.png"])
    d = tiny_world.store.embed_dim + 3
    store = EmbeddingStore.write(
        tmp_path / "wide",
        sample_ids=[],
        image_embeddings=np.zeros((0, d), np.float32),
        text_embeddings=np.ones((1, d), np.float32),
        concepts=make_concepts([("crimson", "color")]),
        vlm=tiny_world.store.vlm,
    )
    with pytest.raises(ExplainError, match=f"{store.path}.*{d}.*{d - 3}"):
        explain_images(module, img, concepts="crimson", store=store.path, out_dir=tmp_path / "out")


def test_bad_checkpoints_give_clear_errors(test_images, tmp_path, capsys):
    img = _save(test_images[:1], tmp_path, ["one.png"])
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ExplainError, match=f"checkpoint not found: {missing}"):
        explain_images(missing, img, out_dir=tmp_path / "out")
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    lightning = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}, "pytorch-lightning_version": "2.2.0"}, lightning)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint at all\n")
    for bad in (plain, lightning, garbage):
        with pytest.raises(ExplainError, match="not an explainer checkpoint") as exc:
            explain_images(bad, img, out_dir=tmp_path / "out")
        assert str(bad) in str(exc.value)
        with pytest.raises(SystemExit) as sysexit:
            main(["--checkpoint", str(bad), "--out", str(tmp_path / "out"), str(img[0])])
        assert sysexit.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]


def test_cli_bad_input_exits_2_without_traceback(tiny_checkpoint, tmp_path):
    missing = tmp_path / "missing.png"
    args = [sys.executable, "explain.py", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), str(missing)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: input not found: {missing}"


def test_target_explains_the_given_class(module, test_images, tmp_path):
    img = _save(test_images[:2], tmp_path, ["one.png", "two.png"])
    classes = module.hparams["class_names"]
    logits = module(_as_batch(test_images[:2]))["logits"]
    other = next(c for i, c in enumerate(classes) if i != int(logits[0].argmax()))
    summary = explain_images(module, img, target=other, top_n=2, k=3, out_dir=tmp_path / "out", figures=False)
    for e, row in zip(summary["explained"], logits, strict=True):
        report = json.loads((Path(e["folder"]) / "report.json").read_text())
        assert report["explained_class"] == other
        assert report["predicted_class"] == classes[int(row.argmax())]
        p = float(row.softmax(0)[classes.index(other)])
        assert report["explained_probability"] == pytest.approx(p, abs=1e-5)
    with pytest.raises(ExplainError, match="unknown class 'purple hexagon'.*red circle"):
        explain_images(module, img, target="purple hexagon", out_dir=tmp_path / "out")


def test_concept_list_parsing_and_output_names(tmp_path):
    assert read_concepts("red, circle ,") == [("red", None), ("circle", None)]
    with pytest.raises(ExplainError, match="duplicate.*'red'"):
        read_concepts("red,blue,red")
    with pytest.raises(ExplainError, match="concept file not found"):
        read_concepts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("red,color,extra\n")
    with pytest.raises(ExplainError, match=r"bad.txt:1"):
        read_concepts(bad)
    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/X.jpg"), Path("x-2.png"), Path(".hidden.png")]
    assert output_names(paths) == ["x", "x-2", "X-3", "x-2-2", "hidden"]
