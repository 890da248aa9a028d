"""``precompute`` past one process: a 2-process gloo group under ``torchrun``, a rank killed and rerun, a job array
of 3 shards merged, a merge with a part missing, and the lock that refuses two plain runs on one ``--out``.

Every store is compared with the one a single process writes: the same ids in the same order, the same skipped
images, embeddings equal to 1e-6 (the batches' composition may change the last bits).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cefam_lightning.models.precompute as pc
from cefam_lightning.cli.precompute import main
from cefam_lightning.data.embedding_store import EmbeddingStore
from cefam_lightning.data.toy_data import write_toy_data
from cefam_lightning.models.precompute import partial_path
from tests.cli import cli_error
from tests.test_precompute import cli, concept_file, make_folder
from tests.test_vlm import write_tiny_configs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    return write_tiny_configs(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The toy data's validation manifest and training tar shards, and a folder with two unreadable images."""
    root = tmp_path_factory.mktemp("data")
    toy = write_toy_data(root / "toy", n_train=30, n_val=10, image_size=32, per_shard=8, n_broden=1)
    return {
        "toy": toy,
        "concepts": concept_file(root / "concepts.txt"),
        "folder": make_folder(root / "imgs", 9, bad=2),
    }


def sources(data) -> list[str]:
    # a manifest (ranges of its order), 4 tar shards of 8, 8, 8 and 6 images (whole shards), a folder
    return [str(data["toy"] / "val.csv"), str(data["toy"] / "shards" / "train-{000..003}.tar"), str(data["folder"])]


def argv(configs, data, out: Path, *extra: str) -> list[str]:
    return cli(
        configs, data["concepts"], out, "--images", *sources(data), "--batch-size", "3", "--chunk-size", "4", *extra
    )


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.Popen(
        [*cmd, str(REPO / "precompute.py"), *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.sample_ids.tolist() == sb.sample_ids.tolist()
    np.testing.assert_allclose(sa.image_embeddings, sb.image_embeddings, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sa.text_embeddings, sb.text_embeddings, rtol=0, atol=1e-6)  # other thread counts
    assert sa.extra["skipped"] == sb.extra["skipped"] and sa.extra["num_images"] == sb.extra["num_images"]
    assert sa.concepts == sb.concepts and sa.vlm == sb.vlm


@pytest.fixture(scope="module")
def one_process(configs, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "store"
    result = main(argv(configs, data, out))
    assert result.num_images == 51 and result.num_skipped == 2
    return out


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_children(int(child))]
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank's process in /proc")
def test_a_rank_killed_midway_is_redone_by_the_same_command(configs, data, one_process, tmp_path):
    """Two processes under torchrun; rank 1 is killed (SIGKILL) after its first chunk, and torchrun stops the group.
    The same command again redoes only the unfinished chunks and writes the one-process store."""
    out = tmp_path / "store"
    work = partial_path(out)
    args = argv(configs, data, out, "--chunk-size", "2", "--batch-size", "2")
    proc = torchrun(args)
    try:
        deadline = time.monotonic() + 90
        while not list(work.glob("part-0001-of-0002/chunk-*.npz")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "rank 1 wrote no chunk within 90 s"
            time.sleep(0.005)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    done = len(list(work.glob("part-0001-of-0002/chunk-*.npz")))
    assert 1 <= done < 13 and not (work / "part-0001-of-0002" / "done.json").exists()  # 51 images: 26 for rank 1
    assert not out.exists()

    again = torchrun(args)
    log = again.communicate(timeout=120)[0].decode()
    assert again.returncode == 0, log
    assert_same_store(out, one_process)
    assert log.count(f"wrote {out}: 49 image embeddings") == 1  # rank 0 reports, once
    assert "2 unreadable image(s) skipped" in log and "; resumed " in log and "2 processes" in log
    assert not work.exists()


def test_a_job_array_merged_writes_the_one_process_store(configs, data, one_process, tmp_path, capsys):
    out = tmp_path / "store"
    work = partial_path(out)
    for i in (2, 0):
        result = main(argv(configs, data, out, "--shard-index", str(i), "--num-shards", "3"))
        assert result.store is None and (result.part, result.parts) == (i, 3)
    assert "part 0 of 3 done: " in capsys.readouterr().out
    assert not out.exists()

    # A part missing: one error line naming it, nothing written.
    line = cli_error(main, ["merge", str(work), "--out", str(out)], capsys)
    assert line.startswith(f"{work}: 1 of 3 parts missing: part 1 (not started)"), line
    assert "--shard-index P --num-shards 3" in line and not out.exists()

    # A job of the array with other settings is refused, naming them.
    line = cli_error(
        main, argv(configs, data, out, "--shard-index", "1", "--num-shards", "3", "--batch-size", "2"), capsys
    )
    assert "different settings (differing: batch_size)" in line

    main(argv(configs, data, out, "--shard-index", "1", "--num-shards", "3"))
    merged = main(["merge", str(work), "--out", str(out)])
    assert merged.num_images == 51 and merged.num_skipped == 2
    assert_same_store(out, one_process)
    assert not work.exists()


def test_a_second_plain_run_on_one_out_is_refused(configs, data, tmp_path, monkeypatch, capsys):
    """While one precompute writes a store, a second one on the same --out stops with one error line (the lock of
    its part); the first finishes unharmed."""
    out = tmp_path / "store"
    real, seen = pc._write_chunk, []

    def write_and_start_another(*a, **k):
        if not seen:
            seen.append(cli_error(main, argv(configs, data, out), capsys))
        real(*a, **k)

    monkeypatch.setattr(pc, "_write_chunk", write_and_start_another)
    result = main(argv(configs, data, out))
    assert result.store.num_samples == 49
    assert seen[0].startswith(f"another precompute is writing part 0 of 1 of {out} now"), seen[0]
