"""Image sources: folder, CSV/JSONL manifests and WebDataset shards give the same images; bad input errors clearly.

The helpers here (``make_images``, ``write_folder``, ``write_manifest``, ``write_shards``) also build the data of
``tests/test_image_datamodule.py``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cefam_lightning.data.image_sources import (
    ImageFolderSource,
    ImageRecord,
    ImageSourceError,
    ManifestSource,
    TruncatedShardError,
    WebDataSource,
    expand_shards,
    iter_shard_samples,
    open_image,
    open_source,
    shard_keys,
)

CLASSES = ["cat", "dog", "owl"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def make_images(
    n: int, seed: int = 0, size: tuple[int, int] = (20, 16), formats: tuple[str, ...] = tuple(FORMATS)
) -> list[dict]:
    """``n`` small random images: ``{"name", "cls", "ext", "bytes"}``, classes and ``formats`` cycling."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ext = formats[i % len(formats)]
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=FORMATS[ext])
        out.append({"name": f"img{i:03d}", "cls": CLASSES[i % len(CLASSES)], "ext": ext, "bytes": buf.getvalue()})
    return out


def folder_id(item: dict) -> str:
    return f"{item['cls']}/{item['name']}.{item['ext']}"


def write_folder(root: Path, items: list[dict]) -> Path:
    for it in items:
        path = root / folder_id(it)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(it["bytes"])
    return root


def write_manifest(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """A ``.csv`` (header from ``columns`` or the first row's keys) or ``.jsonl`` manifest of ``rows``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        columns = columns or list(rows[0])
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_shards(folder: Path, items: list[dict], per_shard: int, label: str = "cls", prefix: str = "shard") -> str:
    """Tar shards of ``items`` (keys ``<cls>/<name>``); ``label``: ``cls`` (index), ``json`` (name) or ``none``.

    Returns the brace pattern naming them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = (len(items) + per_shard - 1) // per_shard
    for s in range(n):
        with wds.TarWriter(str(folder / f"{prefix}-{s:03d}.tar")) as w:
            for it in items[s * per_shard : (s + 1) * per_shard]:
                sample = {"__key__": f"{it['cls']}/{it['name']}", it["ext"]: it["bytes"]}
                if label == "cls":
                    sample["cls"] = str(CLASSES.index(it["cls"])).encode()
                elif label == "json":
                    sample["json"] = json.dumps({"label": it["cls"], "extra": 1}).encode()
                w.write(sample)
    return str(folder / f"{prefix}-{{000..{n - 1:03d}}}.tar")


def pixels(record: ImageRecord) -> np.ndarray:
    return np.asarray(open_image(record))


def by_name(source) -> dict[str, tuple[int | None, np.ndarray]]:
    """``{image name: (label, pixels)}`` of a source, the name being the id's last component without extension."""
    return {r.id.rsplit("/", 1)[-1].split(".")[0]: (r.label, pixels(r)) for r in source}


@pytest.fixture(scope="module")
def items():
    return make_images(9)


def test_all_source_kinds_yield_the_same_ids_labels_and_pixels(tmp_path, items):
    root = write_folder(tmp_path / "data", items)
    rows = [{"path": folder_id(it), "label": it["cls"]} for it in items]
    csv_file = write_manifest(root / "train.csv", rows)  # beside the class folders: paths as written = folder ids
    jsonl_file = write_manifest(root / "train.jsonl", [{**r, "label": CLASSES.index(r["label"])} for r in rows])
    shards = write_shards(tmp_path / "shards", items, per_shard=4)
    json_shards = write_shards(tmp_path / "shards", items, per_shard=4, label="json", prefix="named")

    folder = open_source(root)
    csv_src, jsonl_src = open_source(csv_file), open_source(jsonl_file, class_names=CLASSES)
    tar_src, named_src = open_source(shards), open_source(json_shards, class_names=CLASSES)
    assert isinstance(folder, ImageFolderSource) and isinstance(csv_src, ManifestSource)
    assert isinstance(jsonl_src, ManifestSource) and isinstance(tar_src, WebDataSource)
    assert folder.class_names == csv_src.class_names == jsonl_src.class_names == CLASSES

    # The folder lists class by class (sorted), a manifest and shards in their own order.
    expected_ids = sorted(folder_id(it) for it in items)
    assert [r.id for r in folder] == expected_ids
    assert [r.id for r in csv_src] == [r.id for r in jsonl_src] == [folder_id(it) for it in items]
    assert [r.id for r in tar_src] == [r.id for r in named_src] == [f"{it['cls']}/{it['name']}" for it in items]
    assert tar_src.keys_by_shard() == [[f"{it['cls']}/{it['name']}" for it in items[i : i + 4]] for i in (0, 4, 8)]

    decoded = {it["name"]: np.asarray(Image.open(io.BytesIO(it["bytes"])).convert("RGB")) for it in items}
    truth = {it["name"]: (CLASSES.index(it["cls"]), decoded[it["name"]]) for it in items}
    for src in (folder, csv_src, jsonl_src, tar_src, named_src):
        got = by_name(src)
        assert got.keys() == truth.keys(), src.describe()
        for name, (label, px) in truth.items():
            assert got[name][0] == label, (src.describe(), name)
            np.testing.assert_array_equal(got[name][1], px)

    # Map-style sources also index; records hold a path (files) or bytes (shards), never both.
    assert len(folder) == len(csv_src) == 9 and folder[0].id == expected_ids[0]
    assert all(r.path is not None and r.data is None for r in csv_src)
    assert all(r.data is not None and r.path is None for r in tar_src)
    assert next(iter(csv_src)).origin == "train.csv:2"
    assert "3 shards" in tar_src.describe() and "9 images, 3 classes" in folder.describe()


def test_manifest_ids_paths_and_labels(tmp_path, items):
    root = write_folder(tmp_path, items[:3])
    absolute = str((root / folder_id(items[2])).resolve())
    rows = [
        {"path": folder_id(items[0]), "label": "1", "id": "first"},
        {"path": f"./{folder_id(items[1])}", "label": "", "id": ""},
        {"path": absolute, "label": "0", "id": "third"},
    ]
    src = ManifestSource(write_manifest(tmp_path / "sub" / ".." / "m.csv", rows))
    assert [r.id for r in src] == ["first", f"./{folder_id(items[1])}", "third"]  # no id: the path as written
    assert [r.label for r in src] == [1, None, 0]
    assert src.class_names is None  # integer labels without class names stay unnamed
    assert src[2].path == Path(absolute)
    # Class-name labels without given names: numbered in sorted order.
    named_rows = [{"path": folder_id(it), "label": it["cls"]} for it in items[:3]]
    named = ManifestSource(write_manifest(tmp_path / "n.jsonl", named_rows))
    assert named.class_names == ["cat", "dog", "owl"] and [r.label for r in named] == [0, 1, 2]
    # With given class names, digit strings that are class names are names; others are indices.
    digit_rows = [{"path": folder_id(items[0]), "label": "7"}, {"path": folder_id(items[1]), "label": "1"}]
    digits = ManifestSource(write_manifest(tmp_path / "d.csv", digit_rows), class_names=["x", "y", "z", "7"])
    assert [r.label for r in digits] == [3, 1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nopath.csv", "file,label\na.png,0\n", "nopath.csv:1: no 'path' column"),
        ("nopath.jsonl", '{"path": "a.png"}\n{"file": "a.png"}\n', "nopath.jsonl:2: no 'path' key"),
        ("badjson.jsonl", '{"path": "a.png"}\n{"path": \n', "badjson.jsonl:2: not valid JSON"),
        ("notobj.jsonl", '["a.png"]\n', "notobj.jsonl:1: expected a JSON object"),
        ("empty.csv", "", "empty CSV"),
        ("header_only.csv", "path,label\n", "lists no images"),
        (
            "neg.csv",
            "path,label\na.png,0\na2.png,-1\n",
            r"neg.csv:3: bad label .-1. \(class indices are integers >= 0\)",
        ),
        ("float.jsonl", '{"path": "a.png", "label": 2.5}\n', "float.jsonl:1: bad label 2.5"),
        ("bool.jsonl", '{"path": "a.png", "label": true}\n', "bool.jsonl:1: bad label True"),
        (
            "mixed.csv",
            "path,label\na.png,0\na2.png,dog\n",
            r"mix class indices \(.*mixed.csv:2: 0\) and class names \(.*mixed.csv:3: .dog.\)",
        ),
        ("extra.csv", "path,label\na.png,0,zzz\n", "extra.csv:2: more values than header columns"),
        ("emptypath.csv", "path,label\n,0\n", "emptypath.csv:2: empty or non-string 'path'"),
        ("dup.csv", "path,id\na.png,x\na2.png,x\n", r"duplicate sample id .x. \(.*dup.csv:2 and .*dup.csv:3\)"),
        (
            "missing.csv",
            "path\na.png\ngone.png\nalso_gone.png\n",
            "2 of 3 listed image files do not exist .*missing.csv:3",
        ),
    ],
)
def test_bad_manifests_name_the_file_and_line(tmp_path, items, name, content, message):
    (tmp_path / "a.png").write_bytes(items[0]["bytes"])
    (tmp_path / "a2.png").write_bytes(items[1]["bytes"])
    (tmp_path / name).write_text(content)
    with pytest.raises(ImageSourceError, match=message):
        open_source(tmp_path / name)


def test_labels_are_checked_against_given_class_names(tmp_path, items):
    (tmp_path / "a.png").write_bytes(items[0]["bytes"])
    write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "bird"}])
    with pytest.raises(ImageSourceError, match=r"m.csv:2: label 'bird' is not one of the 3 class names"):
        open_source(tmp_path / "m.csv", class_names=CLASSES)
    write_manifest(tmp_path / "r.jsonl", [{"path": "a.png", "label": 3}])
    with pytest.raises(ImageSourceError, match=r"r.jsonl:1: label 3 is out of range with 3 classes"):
        open_source(tmp_path / "r.jsonl", class_names=CLASSES)


def test_folder_errors_and_given_class_names(tmp_path, items):
    root = write_folder(tmp_path / "f", items[:4])
    (root / "empty_class").mkdir()
    with pytest.raises(ImageSourceError, match=r"Found no valid file for the classes empty_class"):
        open_source(root)
    # With given class names a class may have no folder (or an empty one), but every folder must be a class.
    src = open_source(root, class_names=["owl", "dog", "cat", "empty_class", "eel"])
    assert {r.label for r in src if r.id.startswith("cat/")} == {2}
    with pytest.raises(ImageSourceError, match=r"sub-folder\(s\) 'empty_class' are not among the given class names"):
        open_source(root, class_names=CLASSES)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(items[0]["bytes"])
    with pytest.raises(ImageSourceError, match=r"flat: no class sub-folders"):
        open_source(tmp_path / "flat")


def test_source_specs_that_name_nothing_usable(tmp_path):
    with pytest.raises(ImageSourceError, match=r"nowhere: no such folder, manifest or tar shard"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageSourceError, match=r"notes.txt: not an image source"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(ImageSourceError, match=r"no such manifest file"):
        open_source(tmp_path / "absent.csv")


def test_shard_specs_braces_globs_and_errors(tmp_path, items):
    pattern = write_shards(tmp_path / "s", items, per_shard=3)
    names = [p.name for p in expand_shards(pattern)]
    assert names == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert [p.name for p in expand_shards(tmp_path / "s" / "shard-*.tar")] == names
    assert [p.name for p in expand_shards(tmp_path / "s" / "shard-001.tar")] == ["shard-001.tar"]
    with pytest.raises(ImageSourceError, match=r"1 of 4 shards do not exist .*shard-003.tar"):
        expand_shards(str(tmp_path / "s" / "shard-{000..003}.tar"))
    with pytest.raises(ImageSourceError, match=r"wildcards are allowed in the file name only"):
        open_source(str(tmp_path / "*" / "shard-000.tar"))
    with pytest.raises(ImageSourceError, match=r"no files match"):
        open_source(str(tmp_path / "s" / "other-*.tar"))
    # The same key in two shards is a duplicate id.
    write_shards(tmp_path / "d", items[:2], per_shard=2, prefix="a")
    write_shards(tmp_path / "d", items[1:3], per_shard=2, prefix="b")
    with pytest.raises(ImageSourceError, match=r"duplicate sample id 'dog/img001'"):
        open_source(tmp_path / "d" / "*.tar").keys_by_shard()


def test_shard_samples_without_an_image_or_with_a_bad_label(tmp_path, items):
    with wds.TarWriter(str(tmp_path / "noimg.tar")) as w:
        w.write({"__key__": "a", "png": items[0]["bytes"], "cls": b"0"})
        w.write({"__key__": "b", "txt": b"hello", "cls": b"1"})
    with pytest.raises(ImageSourceError, match=r"noimg.tar: sample 'b' has no image member \(has \['cls', 'txt'\]"):
        shard_keys(tmp_path / "noimg.tar")
    with pytest.raises(ImageSourceError, match=r"noimg.tar: sample 'b' has no image member"):  # checked first
        list(open_source(tmp_path / "noimg.tar"))
    with wds.TarWriter(str(tmp_path / "named.tar")) as w:
        w.write({"__key__": "a", "jpg": items[1]["bytes"], "cls": b"dog"})
    with pytest.raises(ImageSourceError, match=r"named.tar: sample 'a': label 'dog' is a class name; give the class"):
        list(open_source(tmp_path / "named.tar"))
    assert [r.label for r in open_source(tmp_path / "named.tar", class_names=CLASSES)] == [1]
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 10)
    with pytest.raises(ImageSourceError, match=r"broken.tar: not a readable tar file"):
        shard_keys(tmp_path / "broken.tar")


def truncate_shard(shard: Path, out: Path, where: str) -> Path:
    """A copy of ``shard`` cut short: ``mid_data`` inside the 4th member's data, ``mid_header`` inside its header,
    ``between_samples`` where the 2nd sample begins (what tar readers take for a shorter, complete shard)."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    cut = {
        "mid_data": members[3].offset_data + 100,
        "mid_header": members[3].offset + 200,
        "between_samples": members[2].offset,  # each sample: a cls and an image member
    }[where]
    out.write_bytes(shard.read_bytes()[:cut])
    return out


@pytest.mark.parametrize("where", ["mid_data", "mid_header", "between_samples"])
def test_a_truncated_shard_is_refused_naming_the_file(tmp_path, items, where):
    shard = Path(write_shards(tmp_path / "s", items[:4], per_shard=4).replace("{000..000}", "000"))
    assert len(shard_keys(shard)) == 4
    cut = truncate_shard(shard, tmp_path / "cut.tar", where)
    with pytest.raises(TruncatedShardError, match=rf"{re.escape(str(cut))}: truncated or damaged tar shard") as e:
        shard_keys(cut)
    assert isinstance(e.value, ImageSourceError)
    with pytest.raises(TruncatedShardError, match=re.escape(str(cut))):  # checked before the first record
        next(iter(open_source(cut)))


def test_tar_ends_cut_in_the_marker_gzip_and_joined_archives(tmp_path, items):
    shard = Path(write_shards(tmp_path / "s", items[:2], per_shard=2).replace("{000..000}", "000"))
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
    marker = last.offset_data + -(-last.size // 512) * 512
    (tmp_path / "in_marker.tar").write_bytes(data[: marker + 100])  # nothing lost: every member is whole
    assert shard_keys(tmp_path / "in_marker.tar") == shard_keys(shard)
    gz = gzip.compress(data)
    (tmp_path / "whole.tar.gz").write_bytes(gz)
    assert shard_keys(tmp_path / "whole.tar.gz") == shard_keys(shard)
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(TruncatedShardError, match=r"cut.tar.gz: truncated or damaged tar shard: EOFError"):
        shard_keys(tmp_path / "cut.tar.gz")
    (tmp_path / "joined.tar").write_bytes(data + data)  # a reader stops at the first marker: the rest is lost
    with pytest.raises(TruncatedShardError, match=r"joined.tar: .*data after the end-of-archive marker"):
        shard_keys(tmp_path / "joined.tar")


def test_reading_a_damaged_shard_while_streaming_names_it(tmp_path, items):
    """A shard damaged after the check (streaming reads it again): the error names it, not a bare tarfile error."""
    shard = Path(write_shards(tmp_path / "s", items[:4], per_shard=4).replace("{000..000}", "000"))
    cut = truncate_shard(shard, tmp_path / "cut.tar", "mid_data")
    with pytest.raises(ImageSourceError, match=rf"{re.escape(str(cut))}: cannot read the tar shard \(ReadError"):
        list(iter_shard_samples([cut]))


def test_undecodable_images_name_the_id_and_the_file_or_shard(tmp_path, items):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(items[1]["bytes"][:40])  # a truncated JPEG
    with pytest.raises(ImageSourceError, match=r"cannot decode image 'x' \(.*bad.jpg\)"):
        open_image(ImageRecord(id="x", label=None, path=bad))
    with pytest.raises(ImageSourceError, match=r"cannot decode image 'k' \(shard /data/s-001.tar\)"):
        open_image(ImageRecord(id="k", label=None, data=b"garbage", origin="/data/s-001.tar"))
    with pytest.raises(ValueError, match="exactly one of path and data"):
        ImageRecord(id="x", label=None)


def test_open_image_gives_rgb_with_exif_orientation_applied(tmp_path):
    gray = Image.fromarray(np.arange(12 * 8, dtype=np.uint8).reshape(8, 12), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    gray.save(path, exif=exif)
    im = open_image(ImageRecord(id="r", label=None, path=path))
    assert im.mode == "RGB" and im.size == (8, 12)
