"""``explain.py`` on a folder under ``torchrun`` (2 CPU processes, gloo): each rank explains its part of the images,
rank 0 writes ``summary.json`` of all of them, and the folder is a one-process run's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cefam_lightning.cli.explain import main
from tests.cli import REPO, flat, run_ok

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _assert_same_json(a: dict, b: dict, where: str) -> None:
    a, b = flat(a), flat(b)
    assert b.keys() == a.keys(), where
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), (where, key)


def test_explain_on_two_processes_writes_the_folder_one_process_writes(tiny_checkpoint, tiny_world, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, image in enumerate(np.array(tiny_world.split("test").images[:5])):
        Image.fromarray(image).save(images / ("sub" if i % 2 else ".") / f"img{i}.png")
    (images / "sub" / "broken.png").write_bytes(b"not an image")  # unreadable: listed in summary.json
    args = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--batch-size", "2", str(images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): the same float32 sums
    try:
        one = main([*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    log = run_ok([*TORCHRUN, str(REPO / "explain.py"), *args, "--out", str(tmp_path / "two")])
    assert log.count("explained 5 image(s)") == 1  # rank 0 reports all of them

    a, b = tmp_path / "one", tmp_path / "two"
    assert _files(b) == _files(a) and len(_files(a)) == 1 + 5 * 3  # summary.json; report, regions, figure each
    summary = json.loads((b / "summary.json").read_text())
    assert summary["settings"].pop("processes") == 2
    # the same images in the same order, the unreadable one included, in the other folder
    summary = json.loads(json.dumps(summary).replace(str(b), str(a)))
    _assert_same_json(one, summary, "summary.json")
    assert [Path(e["image"]).name for e in summary["explained"]] == [f"img{i}.png" for i in (0, 2, 4, 1, 3)]
    assert [Path(e["image"]).name for e in summary["failed"]] == ["broken.png"]
    for name in sorted(_files(a) - {"summary.json"}):
        if name.endswith("report.json"):
            _assert_same_json(json.loads((a / name).read_text()), json.loads((b / name).read_text()), name)
        elif name.endswith("regions.npz"):
            with np.load(a / name) as x, np.load(b / name) as y:
                assert sorted(x) == sorted(y), name
                for key in x:
                    np.testing.assert_allclose(y[key], x[key], atol=2e-3, err_msg=f"{name}:{key}")
        else:  # figure.png: the same picture size (its pixels follow the numbers above)
            assert Image.open(b / name).size == Image.open(a / name).size, name
