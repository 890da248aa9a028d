"""``python -m cefam_lightning.concepts``: concept files from Broden's and ImageNet-S's own label files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cefam_lightning.cli.concepts import main
from cefam_lightning.data.concepts import ConceptFileError, read_concept_file, write_concept_file
from cefam_lightning.data.mask_datasets import open_mask_dataset
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.models.precompute import load_concepts
from tests.cli import cli_error
from tests.test_mask_datasets import make_broden, make_imagenet_s

REPO = Path(__file__).resolve().parents[1]
BRODEN = [
    ("red", "color"),
    ("blue", "color"),
    ("circle", "object"),
    ("living room", "scene"),
    ("striped", "texture"),
    ("wheel", "part"),
]


def test_from_broden_writes_every_label_as_the_evaluation_names_it(tmp_path, capsys):
    root = make_broden(tmp_path / "broden1_test")
    out = tmp_path / "concepts.txt"
    summary = main(["from-broden", str(root), "--out", str(out)])
    assert read_concept_file(out) == BRODEN and summary.dropped == []
    printed = capsys.readouterr().out
    assert f"wrote {out}: 6 concepts (color 2, object 1, scene 1, texture 1, part 1)" in printed
    # The names are the ones the mask dataset gives, so evaluate --data finds each concept by name.
    dataset = open_mask_dataset(root, InputSpec(crop=40, resize=40))
    assert [(c.name, c.type) for c in dataset.concepts] == BRODEN
    assert [c.prompt for c in load_concepts(out)][:3] == ["a photo of a red object", "a photo of a blue object",
                                                          "a photo of a circle"]  # fmt: skip

    main(["from-broden", str(root), "--out", str(out), "--types", "color,part", "--keep-suffixes", "--overwrite"])
    assert read_concept_file(out) == [("red-c", "color"), ("blue-c", "color"), ("wheel", "part")]


def test_from_imagenet_s_writes_the_class_names(tmp_path, capsys):
    root, wnids = make_imagenet_s(tmp_path / "imagenet-s")
    out = tmp_path / "imagenet_s.txt"
    main(["from-imagenet-s", str(tmp_path / "imagenet-s"), "--out", str(out)])  # the folder holding ImageNetS50
    concepts = read_concept_file(out)
    assert len(concepts) == 50 and concepts[:2] == [("tench", "object"), ("goldfish", "object")]
    assert "50 concepts (object 50)" in capsys.readouterr().out

    categories = tmp_path / "ImageNetS_categories_im50.txt"
    categories.write_text("\n".join(reversed(wnids)) + "\n")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("".join(f"{w} class{i}, synonym\n" for i, w in enumerate(wnids)))
    argv = ["from-imagenet-s", str(root), "--out", str(out), "--overwrite"]
    main([*argv, "--categories", str(categories), "--class-names", str(names)])
    assert read_concept_file(out)[:3] == [("class0", "object"), ("class1", "object"), ("class2", "object")]


def test_repeated_names_are_dropped_and_awkward_names_round_trip(tmp_path):
    out = tmp_path / "c.txt"
    pairs = [("red", "color"), ("Red ", "color"), ("wood", "material"), ("red", "object"), ("hen, chicken", "object")]
    summary = write_concept_file(out, pairs, header="from somewhere")
    assert summary.dropped == ["Red", "red"] and summary.type_counts == {"color": 1, "material": 1, "object": 1}
    assert read_concept_file(out) == [("red", "color"), ("wood", "material"), ("hen, chicken", "object")]
    assert out.read_text().startswith("# from somewhere\n")
    with pytest.raises(ConceptFileError, match=r"c\.txt: already exists; add --overwrite"):
        write_concept_file(out, pairs)
    for bad in [("C#", "object"), ("x", "co\tlor"), ("x", "co,lor"), ("", "object")]:
        with pytest.raises(ConceptFileError, match="cannot be written to a concept file"):
            write_concept_file(tmp_path / "bad.txt", [bad])
    assert not (tmp_path / "bad.txt").exists()


def test_bad_roots_and_options_are_one_error_line_and_write_nothing(tmp_path, capsys):
    root = make_broden(tmp_path / "broden1_test")
    out = tmp_path / "concepts.txt"
    out.write_text("keep me\n")
    assert "already exists; add --overwrite" in cli_error(main, ["from-broden", str(root), "--out", str(out)], capsys)
    assert out.read_text() == "keep me\n"
    new = tmp_path / "new.txt"
    msg = cli_error(main, ["from-broden", str(root), "--out", str(new), "--types", "color,colour"], capsys)
    assert msg.startswith("--types 'color,colour': colour; the types of") and "color, object, scene" in msg
    (root / "label.csv").write_text("number,name,category\nx,red-c,color(1)\n")
    assert "label.csv:2: label number must be an integer, got 'x'" in cli_error(
        main, ["from-broden", str(root), "--out", str(new)], capsys
    )
    assert "dataset folder not found" in cli_error(
        main, ["from-broden", str(tmp_path / "no"), "--out", str(new)], capsys
    )
    assert "no ImageNet-S layout" in cli_error(main, ["from-imagenet-s", str(root), "--out", str(new)], capsys)
    assert not new.exists()


def test_python_dash_m_entry_point(tmp_path):
    root = make_broden(tmp_path / "broden1_test")
    out = tmp_path / "concepts.txt"
    run = subprocess.run(
        [sys.executable, "-m", "cefam_lightning.concepts", "from-broden", str(root), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "6 concepts" in run.stdout and read_concept_file(out) == BRODEN
