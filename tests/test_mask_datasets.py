"""Mask datasets (the folder format, Broden's and ImageNet-S's layouts) and ``evaluate --data`` on them."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cefam_lightning.cli.evaluate import main
from cefam_lightning.data.concepts import make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.data.mask_datasets import (
    MaskBatch,
    MaskDatasetError,
    collate_masks,
    detect_format,
    imagenet_class_names,
    open_mask_dataset,
    write_shapes_broden,
)
from cefam_lightning.data.mask_datasets import (
    main as mask_datasets_main,
)
from cefam_lightning.data.mask_datasets import open_evaluation_splits as open_evaluation_data
from cefam_lightning.data.shapes_world import WorldSpec
from cefam_lightning.data.transforms import InputSpec
from cefam_lightning.methods.base import load_explainer as load_checkpoint
from cefam_lightning.methods.cefam.evaluation import ExplanationEvaluation, evaluate_on_masks, resolve_dataset_concepts

ROOT = Path(__file__).resolve().parents[1]
RED, GRAY = (255, 0, 0), (128, 128, 128)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _label_png(path: Path, labels: np.ndarray) -> Path:
    """A segmentation PNG whose pixel label is R + 256 * G (Broden, ImageNet-S)."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1)
    return _save(path, rgb)


# ---------------------------------------------------------------------- the folder format


def make_folder(root: Path) -> Path:
    """Image ``a``: 40 wide x 20 high, a red block at rows 2-9, columns 12-19, a sky strip at columns 0-5 (outside
    the center crop). Image ``sub/b``: 30 x 30, a red block and its circle mask on rows 10-19, columns 10-19."""
    _write_csv(root / "concepts.csv", ["name", "type"], [["red", "color"], ["circle", "shape"], ["sky", "object"]])
    a = np.full((20, 40, 3), GRAY, dtype=np.uint8)
    a[2:10, 12:20] = RED
    _save(root / "images" / "a.png", a)
    red = np.zeros((20, 40), dtype=np.uint8)
    red[2:10, 12:20] = 255
    _save(root / "masks" / "a" / "red.png", red)
    sky = np.zeros((20, 40), dtype=np.uint8)
    sky[:, 0:6] = 1
    _save(root / "masks" / "a" / "sky.png", sky)
    b = np.full((30, 30, 3), GRAY, dtype=np.uint8)
    b[10:20, 10:20] = RED
    _save(root / "images" / "sub" / "b.png", b)
    circle = np.zeros((30, 30, 4), dtype=np.uint8)  # RGBA: the alpha channel is not part of the mask
    circle[..., 3] = 255
    circle[10:20, 10:20, :3] = 255
    _save(root / "masks" / "sub" / "b" / "circle.png", circle)
    _write_csv(root / "images.csv", ["id", "split", "label"], [["a", "val", "cat"], ["sub/b", "train", "dog"]])
    return root


def test_folder_format_aligns_masks_with_the_resized_center_crop(tmp_path):
    root = make_folder(tmp_path / "data")
    assert detect_format(root) == "folder"
    ds = open_mask_dataset(root, InputSpec(crop=20, resize=20))
    assert [(c.name, c.type) for c in ds.concepts] == [("red", "color"), ("circle", "shape"), ("sky", "object")]
    assert ds.ids == ["a", "sub/b"] and ds.splits == ["train", "val"] and len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.float32
    assert item["id"] == "a" and item["label"] == "cat"
    # The crop keeps columns 10-29: the red block lands on rows 2-9, columns 2-9; the sky strip is cut away.
    assert item["concepts"].tolist() == [0]
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[2:10, 2:10] = True
    assert torch.equal(item["masks"][0], expected)
    torch.testing.assert_close(item["image"][:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(item["image"][:, 15, 15], torch.full((3,), 128 / 255))
    b = ds[1]
    assert b["concepts"].tolist() == [1] and int(b["masks"][0].sum()) > 0 and b["label"] == "dog"

    # Downscaled by 2 (10 x 20, crop columns 5-14): nearest neighbour at pixel centres keeps rows 1-4, cols 1-4.
    small = open_mask_dataset(root, InputSpec(crop=10, resize=10), split="val")
    assert small.ids == ["a"]
    mask = small[0]["masks"][0]
    assert mask.shape == (10, 10) and int(mask.sum()) == 16 and bool(mask[1:5, 1:5].all())
    # The mask sits where the (antialiased) image is mostly red: the geometry of both is the same.
    image = small[0]["image"]
    assert torch.equal(image[0] - image[1] > 0.5, mask)
    # Downscaled by 3: pixel centres 3i + 1 (not 3i) are sampled, i.e. rows/columns 3-6, where the image is red.
    third = open_mask_dataset(root, InputSpec(crop=10, resize=10), split="train")[0]
    want = torch.zeros(10, 10, dtype=torch.bool)
    want[3:7, 3:7] = True
    assert torch.equal(third["masks"][0], want)
    assert torch.equal(third["image"][0] - third["image"][1] > 0.3, want)


def test_folder_format_splits_and_collate(tmp_path):
    root = make_folder(tmp_path / "data")
    spec = InputSpec(crop=20, resize=20)
    assert open_mask_dataset(root, spec, split="train").ids == ["sub/b"]
    with pytest.raises(MaskDatasetError, match="no split 'test'; the splits are train, val"):
        open_mask_dataset(root, spec, split="test")
    batch = next(iter(DataLoader(open_mask_dataset(root, spec), batch_size=2, collate_fn=collate_masks)))
    assert isinstance(batch, MaskBatch)
    assert batch.images.shape == (2, 3, 20, 20) and batch.masks.shape == (2, 20, 20)
    assert batch.image_index.tolist() == [0, 1] and batch.concepts.tolist() == [0, 1]
    assert batch.ids == ["a", "sub/b"] and batch.labels == ["cat", "dog"]


def test_evaluation_data_defaults_to_val_and_fits_the_baseline_on_train(tmp_path):
    root = make_folder(tmp_path / "data")
    spec = InputSpec(crop=20, resize=20)
    dataset, fit = open_evaluation_data(root, spec)
    assert dataset.split == "val" and fit is not None and fit.split == "train" and fit.ids == ["sub/b"]
    dataset, fit = open_evaluation_data(root, spec, split="train")
    assert dataset.ids == ["sub/b"] and fit is None  # no other training split
    (root / "images.csv").unlink()
    dataset, fit = open_evaluation_data(root, spec)
    assert dataset.split is None and len(dataset) == 2 and dataset.splits == [] and fit is None


def _unknown_concept(root):
    _save(root / "masks" / "a" / "purple.png", np.zeros((20, 40), dtype=np.uint8))
    return "purple.png", "unknown concept 'purple'"


def _bad_concepts_line(root):
    (root / "concepts.csv").write_text("name,type\nred,color\ncircle,\nsky,object\n")
    return "concepts.csv:3", "needs a name and a type"


def _repeated_concept(root):
    (root / "concepts.csv").write_text("name,type\nred,color\ncircle,shape\nsky,object\nred,color\n")
    return "concepts.csv:5", "repeated"


def _unknown_image_id(root):
    _write_csv(root / "images.csv", ["id", "split"], [["a", "val"], ["nope", "val"], ["sub/b", "train"]])
    return "images.csv:3", "no image with id 'nope'"


def _unlisted_image(root):
    _write_csv(root / "images.csv", ["id", "split"], [["a", "val"]])
    return "images.csv", "b.png"


def _no_images(root):
    for path in (root / "images", root / "masks", root / "images.csv"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (root / "images").mkdir()
    return f"{root}: no images", ""


def _mask_without_image(root):
    _save(root / "masks" / "ghost" / "red.png", np.zeros((4, 4), dtype=np.uint8))
    return "ghost", "no image 'ghost'"


@pytest.mark.parametrize(
    "breakage",
    [
        _unknown_concept,
        _bad_concepts_line,
        _repeated_concept,
        _unknown_image_id,
        _unlisted_image,
        _mask_without_image,
        _no_images,
    ],
)
def test_folder_format_names_the_bad_file_when_opened(tmp_path, breakage):
    root = make_folder(tmp_path / "data")
    where, what = breakage(root)
    with pytest.raises(MaskDatasetError) as info:
        open_mask_dataset(root, InputSpec(crop=20, resize=20))
    assert where in str(info.value) and what in str(info.value)


def test_folder_format_names_bad_files_when_read(tmp_path):
    root = make_folder(tmp_path / "data")
    _save(root / "masks" / "a" / "red.png", np.zeros((10, 10), dtype=np.uint8))  # not the image's size
    ds = open_mask_dataset(root, InputSpec(crop=20, resize=20))
    with pytest.raises(MaskDatasetError, match=r"red\.png: mask is 10x10 pixels but its image .*a\.png is 40x20"):
        ds[0]
    (root / "images" / "sub" / "b.png").write_bytes(b"not a png")
    with pytest.raises(MaskDatasetError, match=r"b\.png: cannot read the image"):
        ds[1]


# ---------------------------------------------------------------------- Broden


def make_broden(root: Path) -> Path:
    """A two-image Broden release: ``ade20k`` (val) with color/object/part PNGs at half resolution (20 x 20 for a
    40 x 40 image) and a scene number, ``dtd`` (train) with only a texture number."""
    _write_csv(
        root / "label.csv",
        ["number", "name", "category", "frequency", "coverage", "syns"],
        [
            [1, "red-c", "color(2)", 2, 0.1, ""],
            [2, "blue-c", "color(1)", 1, 0.1, ""],
            [5, "circle", "object(2);part(1)", 2, 0.1, ""],
            [300, "living_room-s", "scene(1)", 1, 1.0, ""],
            [301, "striped", "texture(1)", 1, 1.0, ""],
            [302, "wheel", "part(1)", 1, 0.1, ""],
        ],
    )
    _write_csv(
        root / "category.csv",
        ["name", "first", "last", "count", "frequency"],
        [[c, 1, 1, 1, 1] for c in ("color", "object", "part", "material", "scene", "texture")],
    )
    _write_csv(root / "c_color.csv", ["code", "number", "name", "frequency", "coverage"], [[1, 1, "red-c", 1, 1]])
    header = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture"]
    _write_csv(
        root / "index.csv",
        header,
        [
            ["ade20k/ADE_val_001.jpg", "val", 40, 40, 20, 20, "ade20k/ADE_val_001_color.png",
             "ade20k/ADE_val_001_object.png", "ade20k/ADE_val_001_part_1.png", "", "300", ""],
            ["dtd/striped_0001.jpg", "train", 40, 40, 20, 20, "", "", "", "", "", "301"],
        ],
    )  # fmt: skip
    _save(root / "images" / "ade20k" / "ADE_val_001.jpg", np.full((40, 40, 3), GRAY, dtype=np.uint8))
    _save(root / "images" / "dtd" / "striped_0001.jpg", np.full((40, 40, 3), GRAY, dtype=np.uint8))
    color = np.zeros((20, 20), dtype=np.int64)
    color[0:5, 0:10] = 1
    color[10:20, 10:20] = 2
    _label_png(root / "images" / "ade20k" / "ADE_val_001_color.png", color)
    obj = np.zeros((20, 20), dtype=np.int64)
    obj[5:10, 5:10] = 5
    _label_png(root / "images" / "ade20k" / "ADE_val_001_object.png", obj)
    part = np.zeros((20, 20), dtype=np.int64)
    part[15:20, 0:5] = 302  # R = 46, G = 1
    _label_png(root / "images" / "ade20k" / "ADE_val_001_part_1.png", part)
    return root


def test_broden_layout_loads_labels_masks_names_and_types(tmp_path):
    root = make_broden(tmp_path / "broden1_test")
    assert detect_format(root) == "broden"
    ds = open_mask_dataset(root, InputSpec(crop=40, resize=40), split="val")
    names = [c.name for c in ds.concepts]
    assert names == ["red", "blue", "circle", "living room", "striped", "wheel"]
    assert [c.type for c in ds.concepts] == ["color", "color", "object", "scene", "texture", "part"]
    assert ds.splits == ["train", "val"] and ds.ids == ["ade20k/ADE_val_001.jpg"] and ds[0]["label"] is None
    item = ds[0]
    got = dict(zip([names[c] for c in item["concepts"].tolist()], item["masks"], strict=True))
    assert set(got) == {"red", "blue", "circle", "living room", "wheel"}
    # Segmentations are 20 x 20 for a 40 x 40 image: each label pixel covers 2 x 2 image pixels.
    expected = {"red": (0, 10, 0, 20), "blue": (20, 40, 20, 40), "circle": (10, 20, 10, 20), "wheel": (30, 40, 0, 10)}
    for name, (r0, r1, c0, c1) in expected.items():
        want = torch.zeros(40, 40, dtype=torch.bool)
        want[r0:r1, c0:c1] = True
        assert torch.equal(got[name], want), name
    assert bool(got["living room"].all())  # a scene number labels the whole image
    train = open_mask_dataset(root, InputSpec(crop=40, resize=40), split="train")
    assert [train.concepts[c].name for c in train[0]["concepts"].tolist()] == ["striped"]
    assert len(open_mask_dataset(root, InputSpec(crop=40, resize=40))) == 2  # no split: every row
    raw = open_mask_dataset(root, InputSpec(crop=40, resize=40), strip_suffixes=False)
    assert [c.name for c in raw.concepts][:4] == ["red-c", "blue-c", "circle", "living_room-s"]


def test_broden_layout_names_bad_files(tmp_path):
    root = make_broden(tmp_path / "broden1_test")
    spec = InputSpec(crop=40, resize=40)
    _label_png(root / "images" / "ade20k" / "ADE_val_001_object.png", np.full((20, 20), 7))  # 7: no such label
    with pytest.raises(MaskDatasetError, match=r"ADE_val_001_object\.png: label number\(s\) 7 are not in label.csv"):
        open_mask_dataset(root, spec, split="val")[0]
    _label_png(root / "images" / "ade20k" / "ADE_val_001_object.png", np.zeros((10, 10)))
    with pytest.raises(MaskDatasetError, match=r"ADE_val_001_object\.png: segmentation is 10x10 .* sw=20, sh=20"):
        open_mask_dataset(root, spec, split="val")[0]
    with pytest.raises(MaskDatasetError, match="no split 'test'"):
        open_mask_dataset(root, spec, split="test")
    text = (root / "index.csv").read_text().replace(",301\n", ",999\n")
    (root / "index.csv").write_text(text)
    with pytest.raises(MaskDatasetError, match=r"index\.csv:3: label number 999 \(column texture\)"):
        open_mask_dataset(root, spec)
    (root / "label.csv").unlink()
    with pytest.raises(MaskDatasetError, match="cannot tell the dataset layout"):
        open_mask_dataset(root, spec)
    with pytest.raises(MaskDatasetError, match=r"label\.csv: file not found"):
        open_mask_dataset(root, spec, format="broden")


# ---------------------------------------------------------------------- ImageNet-S


def make_imagenet_s(parent: Path, n: int = 50, all_folders: bool = True) -> tuple[Path, list[str]]:
    """``ImageNetS{n}`` with two annotated validation images: one of class 2 (with an ignored band), one of 1."""
    wnids = sorted(imagenet_class_names())[:n]
    root = parent / f"ImageNetS{n}"
    for w in wnids if all_folders else wnids[:2]:
        (root / "validation" / w).mkdir(parents=True, exist_ok=True)
    _save(root / "validation" / wnids[1] / "ILSVRC2012_val_00000001.JPEG", np.full((16, 24, 3), GRAY))
    seg = np.zeros((16, 24), dtype=np.int64)
    seg[0:8, 12:24] = 2
    seg[8:10, :] = 1000
    _label_png(root / "validation-segmentation" / wnids[1] / "ILSVRC2012_val_00000001.png", seg)
    _save(root / "validation" / wnids[0] / "ILSVRC2012_val_00000002.JPEG", np.full((16, 16, 3), GRAY))
    seg = np.zeros((16, 16), dtype=np.int64)
    seg[4:12, 4:12] = 1
    _label_png(root / "validation-segmentation" / wnids[0] / "ILSVRC2012_val_00000002.png", seg)
    return root, wnids


def test_imagenet_s_layout_loads_class_masks(tmp_path):
    root, wnids = make_imagenet_s(tmp_path / "imagenet-s")
    spec = InputSpec(crop=16, resize=16)
    ds = open_mask_dataset(tmp_path / "imagenet-s", spec)  # the folder holding ImageNetS50 works too
    assert ds.format == "imagenet-s" and ds.root == root and ds.split == "validation"
    assert len(ds.concepts) == 50 and {c.type for c in ds.concepts} == {"object"}
    assert [c.name for c in ds.concepts[:2]] == ["tench", "goldfish"]
    assert ds.ids == [f"{wnids[0]}/ILSVRC2012_val_00000002", f"{wnids[1]}/ILSVRC2012_val_00000001"]
    tench, goldfish = ds[0], ds[1]
    assert tench["label"] == "tench" and tench["concepts"].tolist() == [0]
    assert goldfish["label"] == "goldfish" and goldfish["concepts"].tolist() == [1]
    # 24 x 16 -> crop columns 4-19: class 2 fills rows 0-7, crop columns 8-15; ignored pixels are in no mask.
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[0:8, 8:16] = True
    assert torch.equal(goldfish["masks"][0], want)
    # The annotated training images (train-semi) are the split the single-channel baseline is fitted on.
    _save(root / "train-semi" / wnids[3] / "n_1.JPEG", np.full((16, 16, 3), GRAY))
    _label_png(root / "train-semi-segmentation" / wnids[3] / "n_1.png", np.full((16, 16), 4))
    dataset, fit = open_evaluation_data(root, spec)
    assert dataset.split == "validation" and len(dataset) == 2 and fit.split == "train-semi"
    assert fit.ids == [f"{wnids[3]}/n_1"] and fit[0]["concepts"].tolist() == [3]


def test_imagenet_s_class_lists_and_errors(tmp_path):
    spec = InputSpec(crop=16, resize=16)
    root, wnids = make_imagenet_s(tmp_path / "a", all_folders=False)
    with pytest.raises(MaskDatasetError, match=r"2 classes, but ImageNetS50 has 50.*ImageNetS_categories_im50\.txt"):
        open_mask_dataset(root, spec)
    categories = tmp_path / "ImageNetS_categories_im50.txt"
    categories.write_text("\n".join(reversed(wnids)) + "\n")  # the release's list is not sorted
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("".join(f"{w} class{i}, synonym\n" for i, w in enumerate(wnids)))
    ds = open_mask_dataset(root, spec, categories=categories, class_names=names)
    assert [c.name for c in ds.concepts[:2]] == ["class0", "class1"] and ds[1]["concepts"].tolist() == [1]
    with pytest.raises(MaskDatasetError, match="no annotated split 'train-semi'.*annotated splits here: validation"):
        open_mask_dataset(root, spec, split="train-semi", categories=categories)
    with pytest.raises(MaskDatasetError, match="do not apply to the imagenet-s format"):
        open_mask_dataset(root, spec, strip_suffixes=False)
    _label_png(next((root / "validation-segmentation").rglob("*.png")), np.full((16, 16), 77))
    with pytest.raises(MaskDatasetError, match=r"\.png: class id\(s\) 77 are neither 1\.\.50"):
        open_mask_dataset(root, spec, categories=categories)[0]

    # Without N in the folder name the class folders are the list; a name two classes share gets the wnid.
    other = tmp_path / "b" / "mydata"
    for w in ("n02012849", "n03126707"):
        (other / "validation" / w).mkdir(parents=True)
    _save(other / "validation" / "n03126707" / "x.JPEG", np.full((8, 8, 3), GRAY))
    _label_png(other / "validation-segmentation" / "n03126707" / "x.png", np.full((8, 8), 2))
    ds = open_mask_dataset(other, InputSpec(crop=8, resize=8), format="imagenet-s")
    assert [c.name for c in ds.concepts] == ["crane bird", "crane"]  # torchvision's names tell them apart
    assert ds[0]["label"] == "crane" and ds[0]["concepts"].tolist() == [1] and bool(ds[0]["masks"][0].all())
    (tmp_path / "names.txt").write_text("n02012849 crane\nn03126707 crane, derrick\n")
    ds = open_mask_dataset(other, InputSpec(crop=8, resize=8), class_names=tmp_path / "names.txt")
    assert [c.name for c in ds.concepts] == ["crane (n02012849)", "crane (n03126707)"]


# ---------------------------------------------------------------------- evaluate on a Broden-layout folder


@pytest.fixture(scope="module")
def broden_shapes(tmp_path_factory) -> Path:
    """Shapes-world scenes (the tiny checkpoint's concepts, drawn at 64 px) in Broden's layout."""
    root = tmp_path_factory.mktemp("broden") / "broden_shapes"
    return write_shapes_broden(root, WorldSpec(image_size=64), n_val=10, n_train=12, seed=11)


@pytest.fixture(scope="module")
def module(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def _evaluated_pairs(module, root: Path, split: str) -> int:
    ds = open_mask_dataset(root, module.classifier.input_spec, split=split)
    known = set(module.hparams["concept_names"])
    return sum(sum(ds.concepts[c].name in known for c in ds[i]["concepts"].tolist()) for i in range(len(ds)))


def test_evaluate_command_on_a_broden_layout(tiny_checkpoint, module, broden_shapes, tmp_path):
    out = tmp_path / "ev"
    args = ["--checkpoint", tiny_checkpoint, "--data", str(broden_shapes), "--out", str(out), "--batch-size", "4"]
    proc = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| CE-FAM |" in proc.stdout and "Note: " in proc.stdout
    results = json.loads((out / "evaluation.json").read_text())
    assert results["split"] == "val" and results["images"] == 10 and results["dataset"]["format"] == "broden"
    assert set(results["regions"]) == {"cefam", "gradcam", "single_channel", "random"}
    assert results["single_channel_fit"] == {"split": "train", "images": 12, "concepts_present": 9}
    for method, per_setting in results["regions"].items():
        for setting, values in per_setting.items():
            for metric in ("epg/mean", "nra/mean", "hit_rate/mean", "epg/color", "nra/object"):
                assert isinstance(values[metric], float) and math.isfinite(values[metric]), (method, setting, metric)
    # Every scored pair is counted once; whole-image texture masks have no NRA and are counted as skipped_empty.
    top1 = results["regions"]["cefam"]["top1"]
    counted = sum(v for k, v in top1.items() if k.startswith("count/")) + top1["skipped_empty"]
    assert counted == _evaluated_pairs(module, broden_shapes, "val")
    assert top1["count/texture"] == 0 and top1["skipped_empty"] >= 10
    skipped = results["concepts"]["skipped"]
    assert (
        skipped["count"] == 2
        and skipped["pairs_by_concept"] == {"background": 10, "studio": 10}
        and skipped["pairs"] == 20
    )
    assert results["concepts"]["evaluated"] == 9 and results["contribution"] == {}
    notes = " ".join(results["notes"])
    assert "contribution accuracy left out" in notes and "2 of the dataset's 11 concepts skipped" in notes
    assert "background" in notes and "studio" in notes and "fitted on split 'train'" in notes
    assert (out / "evaluation.md").read_text().startswith("Rules: gradient=")


def test_store_supplies_unknown_concepts_and_no_train_split_drops_the_single_channel(module, broden_shapes, tmp_path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore.write(
        tmp_path / "store",
        sample_ids=["x"],
        image_embeddings=np.zeros((1, module.translator.out_dim), dtype=np.float32),
        text_embeddings=rng.normal(size=(1, module.translator.out_dim)).astype(np.float32),
        concepts=make_concepts([("background", "object")]),
        vlm=VLMInfo(name="test", kind=module.scorer.kind, logit_scale=module.scorer.logit_scale),
    )
    spec = module.classifier.input_spec
    dataset, fit = open_evaluation_data(broden_shapes, spec, fit_split="none")
    assert dataset.split == "val" and fit is None
    cset, mapping, skipped = resolve_dataset_concepts(module, dataset.concepts, store)
    names = [c.name for c in dataset.concepts]
    assert skipped == ["studio"] and "background" in cset.names and mapping[names.index("studio")] == -1
    background = cset.text[cset.names.index("background")]
    torch.testing.assert_close(background, torch.from_numpy(np.array(store.text_embeddings[0])))
    results = evaluate_on_masks(module, dataset, store=store, batch_size=5, max_images=6)
    assert results["images"] == 6 and set(results["regions"]) == {"cefam", "gradcam", "random"}
    assert results["concepts"]["from_store"] == 1 and results["concepts"]["skipped"]["pairs_by_concept"] == {
        "studio": 6
    }
    assert results["regions"]["cefam"]["top1"]["count/object"] > 0
    assert any("single-channel baseline left out" in n for n in results["notes"])


def test_sparse_pairs_score_exactly_like_dense_masks(module, tiny_world):
    split = tiny_world.split("test")
    images = torch.from_numpy(np.array(split.images[:12])).permute(0, 3, 1, 2).float().div(255)
    masks = torch.from_numpy(np.array(split.masks[:12]))
    types = list(module.hparams["concept_types"])
    dense = ExplanationEvaluation(module.classifier.layers, types, sync_on_compute=False, contributions=False)
    sparse = ExplanationEvaluation(module.classifier.layers, types, sync_on_compute=False, contributions=False)
    dense.update(module, images, masks, torch.from_numpy(split.labels[:12]))
    image_index, concept_ids = masks.flatten(2).any(dim=2).nonzero(as_tuple=True)
    shuffle = torch.randperm(len(image_index), generator=torch.Generator().manual_seed(0))  # any pair order
    image_index, concept_ids = image_index[shuffle], concept_ids[shuffle]
    sparse.update_pairs(module, images, image_index, concept_ids, masks[image_index, concept_ids])
    a, b = dense.compute(), sparse.compute()
    assert a["contribution"] == {} and a["layer_selection"] == b["layer_selection"]
    for name in ("cefam", "gradcam"):
        for setting, values in a["regions"][name].items():
            assert values == pytest.approx(b["regions"][name][setting], nan_ok=True), (name, setting)
    with pytest.raises(ValueError, match="more than once"):
        sparse.update_pairs(module, images, torch.tensor([0, 0]), torch.tensor([1, 1]), masks[0, [1, 1]])


def test_evaluate_command_errors_name_the_problem(tiny_checkpoint, broden_shapes, tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint", tiny_checkpoint, *args])
        return info.value.code, capsys.readouterr().err

    code, err = run("--data", str(tmp_path / "missing"))
    assert code == 2 and "dataset folder not found" in err and str(tmp_path / "missing") in err
    code, err = run("--store", str(tmp_path))
    assert code == 2 and "--store only apply with --data" in err
    code, err = run("--data", str(broden_shapes), "--per-layer-contributions")
    assert code == 2 and "--per-layer-contributions applies to the shapes world only" in err
    code, err = run("--data", str(broden_shapes), "--max-fit-images", "0")
    assert code == 2 and "--max-fit-images must be >= 1" in err
    code, err = run("--data", str(broden_shapes), "--split", "test")
    assert code == 2 and "no split 'test'; the splits are train, val" in err
    bad = make_broden(tmp_path / "bad")
    _label_png(bad / "images" / "ade20k" / "ADE_val_001_object.png", np.full((20, 20), 7))
    code, err = run("--data", str(bad), "--out", str(tmp_path / "o"), "--num-workers", "1")
    assert code == 2 and "ADE_val_001_object.png: label number(s) 7 are not in label.csv" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_mask_datasets_command_writes_and_checks_a_broden_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    mask_datasets_main(["shapes-broden", str(out), "--image-size", "32", "--n-val", "2", "--n-train", "3"])
    assert "wrote 2 val + 3 train images" in capsys.readouterr().out
    mask_datasets_main(["check", str(out), "--split", "val", "--size", "32"])
    printed = capsys.readouterr().out
    assert "broden dataset at" in printed and "2 images in split 'val' (splits: ['train', 'val'])" in printed
    assert "11 concepts: color 4, object 4, texture 2, scene 1" in printed
    ds = open_mask_dataset(out, InputSpec(crop=32, resize=32), split="val")
    names = {c.name for c in ds.concepts}
    item = ds[0]
    present = [ds.concepts[c].name for c in item["concepts"].tolist()]
    assert {"background", "studio"} <= set(present) <= names
    with pytest.raises(SystemExit) as info:
        mask_datasets_main(["check", str(tmp_path / "nothing")])
    assert info.value.code == 2 and "dataset folder not found" in capsys.readouterr().err
