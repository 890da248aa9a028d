"""The dataset report (docs/report.md): its statistics on hand-made evidence, its files from every method, its data
sources, its error handling and its loggers."""

from __future__ import annotations

import json
import math
import re
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from cefam_lightning.data.report_data import ReportBatch, ReportDataError, image_source_data
from cefam_lightning.methods.base import Evidence
from cefam_lightning.reporting.concept_report import (
    ConceptTally,
    ReportError,
    ReportSettings,
    add_missing,
    error_pairs,
    findings,
)

CLASSES = ["cat", "dog"]
CONCEPTS = ["fur", "whiskers", "collar"]


def _batch(labels, present=None):
    n = len(labels)
    return ReportBatch(
        list(range(n)),
        [f"im{i}" for i in range(n)],
        torch.zeros(n, 3, 4, 4),
        torch.tensor(labels),
        None if present is None else torch.tensor(present),
    )


def _evidence(pred, concepts, contributions, num_classes=2):
    logits = torch.full((len(pred), num_classes), -1.0)
    logits[torch.arange(len(pred)), torch.tensor(pred)] = 1.0
    return Evidence(
        logits=logits,
        target=torch.tensor(pred),
        concepts=torch.tensor(concepts),
        contributions=torch.tensor(contributions, dtype=torch.float32),
    )


def test_tally_means_intervals_shares_counts_and_typical_images():
    # Three images predicted "cat"; concept 0 explained in all, 1 in two, 2 in one (image 2 lists 0 twice).
    present = [[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 0]]  # data columns: fur, whiskers, collar, other
    tally = ConceptTally(CLASSES, CONCEPTS, ["fur", "whiskers", "collar", "other"], typical=2)
    batch = _batch([0, 0, 0], present)
    ev = _evidence([0, 0, 0], [[0, 1], [0, 2], [0, 0]], [[0.3, 0.1], [0.5, -0.2], [0.1, 0.9]])
    tally.update(batch, ev)
    row = tally.class_rows(0, top=5)
    assert row["images"] == 3 and row["labeled"] == 3 and row["accuracy"] == 1.0
    fur = next(c for c in row["positive"] if c["concept"] == "fur")
    values = np.array([0.3, 0.5, 0.1])  # the repeated slot of image 2 counts once
    assert fur["mean"] == pytest.approx(values.mean())
    se = values.std(ddof=1) / math.sqrt(3)
    assert fur["ci95"] == pytest.approx([values.mean() - 1.959964 * se, values.mean() + 1.959964 * se], rel=1e-5)
    assert fur["explained"] == 3 and fur["present_rate"] == pytest.approx(1.0)
    assert fur["share_of_positive"] == pytest.approx(0.9 / (0.9 + 0.1))
    whiskers = next(c for c in row["positive"] if c["concept"] == "whiskers")
    per_image = np.array([0.1, 0.0, 0.0])  # not explained counts 0
    assert whiskers["mean"] == pytest.approx(per_image.mean())
    assert whiskers["explained"] == 1 and whiskers["mean_when_explained"] == pytest.approx(0.1)
    assert whiskers["present_rate"] == pytest.approx(2 / 3)
    assert [t["id"] for t in fur["typical"]] == ["im1", "im0"]  # the two largest, largest first
    collar = row["negative"][0]
    assert collar["concept"] == "collar" and collar["mean"] == pytest.approx(-0.2 / 3)
    assert [c["concept"] for c in row["positive"]] == ["fur", "whiskers"]  # ranked by mean per image
    assert tally.class_rows(1, top=5)["images"] == 0
    m = tally.matrix()
    assert m.shape == (3, 2) and math.isnan(m[0, 1]) and m[0, 0] == pytest.approx(0.3)


def test_errors_list_both_sides_and_what_the_true_class_lacked():
    tally = ConceptTally(CLASSES, CONCEPTS, error_concepts=2)
    batch = _batch([0, 1])  # image 1 is a dog predicted as cat
    ev = _evidence([0, 0], [[0, 1], [2, 1]], [[0.4, 0.2], [0.5, -0.1]])
    true_ev = _evidence([1], [[2, 1]], [[-0.3, 0.25]])
    tally.update(batch, ev, true_ev)
    (error,) = tally.errors
    assert (error["true"], error["predicted"], error["id"]) == ("dog", "cat", "im1")
    assert error["toward_predicted"] == [{"concept": "collar", "contribution": pytest.approx(0.5)}]
    assert error["toward_true"] == [{"concept": "whiskers", "contribution": pytest.approx(0.25)}]
    classes = [{"class": "dog", "positive": [{"concept": "fur"}, {"concept": "whiskers"}]}]
    add_missing(tally.errors, classes)
    assert error["missing_for_true"] == ["fur"]
    (pair,) = error_pairs(tally.errors)
    assert pair["count"] == 1 and pair["concepts"][0] == {"concept": "collar", "errors": 1, "share": 1.0}


def test_findings_name_a_leading_concept_outside_the_class_definition():
    entry = {"concept": "striped", "share_of_positive": 0.38, "specificity": 0.3}
    weak = {"concept": "plain", "share_of_positive": 0.2, "specificity": 0.05}
    report = {
        "classes": [
            {
                "class": "red circle",
                "positive": [{"concept": "red", "share_of_positive": 0.4, "specificity": 0.3}, entry, weak],
                "defining": [{"concept": "red", "specificity": 0.3}, {"concept": "circle", "specificity": 0.1}],
            },
            {"class": "blue square", "positive": [{"concept": "blue", "share_of_positive": 0.5}]},
        ],
        "errors": {
            "pairs": [
                {
                    "true": "blue square",
                    "predicted": "red circle",
                    "count": 4,
                    "concepts": [{"concept": "striped", "errors": 3, "share": 0.75}],
                }
            ]
        },
    }
    lines = findings(report, {"red circle": ["red", "circle"], "blue square": ["blue", "square"]})
    assert any(
        "class red circle: 'striped' contributes 38 %" in line and "any class definition" in line for line in lines
    )
    assert any("rank 2; 30 points more of it than in the other classes" in line for line in lines)
    # 'plain' sets red circle apart less than 'circle', part of its definition, does: no finding.
    assert not any("'red' contributes" in line or "'plain'" in line for line in lines)
    assert (
        "4 images of blue square were predicted as red circle; among the top concepts pushing toward red circle: "
        "'striped' (75 %)"
    ) in lines
    plain = findings(report, None)
    assert plain[0].startswith("class red circle: the concepts carrying most of its positive contribution: 'red'")


def test_settings_are_checked():
    with pytest.raises(ReportError, match="top-n must be a whole number >= 1, got 0"):
        ReportSettings(top_n=0).check()


# ---------------------------------------------------------------------------------------------- end to end
def _report_cli(args):
    from cefam_lightning.cli.report import main

    return main([*args, "--no-progress"])


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_report_command_on_a_cefam_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "rep"
    report = _report_cli(["--checkpoint", tiny_checkpoint, "--max-images", "24", "--out", str(out), "--top-n", "4"])
    written = json.loads((out / "report.json").read_text())
    assert written["images"] == 24 and written["method"] == "cefam" and written["presence"] == "ground truth"
    assert written["labeled"] == 24 and 0.0 <= written["accuracy"] <= 1.0
    assert sum(c["images"] for c in written["classes"]) == 24
    assert len(written["errors"]["items"]) == written["errors"]["count"] == round(24 * (1 - written["accuracy"]))
    for e in written["errors"]["items"]:
        assert "toward_predicted" in e and "toward_true" in e and "missing_for_true" in e
    listed = [c for row in written["classes"] for c in row["positive"]]
    assert listed and all(c["mean"] > 0 and c["ci95"][0] <= c["mean"] <= c["ci95"][1] for c in listed)
    assert report["classes"] == written["classes"]
    figures = {p.name for p in (out / "figures").iterdir()}
    assert "heatmap.png" in figures and any(f.startswith("class_") for f in figures)
    for name in figures:
        assert f"figures/{name}" in (out / "report.md").read_text() or name == "errors.png"
        Image.open(out / "figures" / name).verify()
    _assert_self_contained((out / "report.html").read_text())
    assert not list(tmp_path.glob(".rep*"))  # no temporary folder left


def test_an_interrupted_report_leaves_the_earlier_one(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    _report_cli(["--checkpoint", tiny_checkpoint, "--max-images", "8", "--out", str(out), "--top-n", "2"])
    before = (out / "report.json").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cefam_lightning.reporting.report_pages.report_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _report_cli(["--checkpoint", tiny_checkpoint, "--max-images", "16", "--out", str(out), "--top-n", "2"])
    assert (out / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize("method", ["siam", "lcam_img"])
def test_report_command_on_other_methods(tiny_method_run, tmp_path, method):
    ckpt = tiny_method_run(method)["best_checkpoint"]
    out = tmp_path / method
    report = _report_cli(["--checkpoint", ckpt, "--max-images", "16", "--out", str(out)])
    assert report["images"] == 16
    if method == "siam":  # every attribute, its exact contribution and the method's own presence call
        listed = [c for row in report["classes"] for c in row["positive"] + row["negative"]]
        assert listed and all(c["detected_rate"] is not None and c["explained_rate"] == 1.0 for c in listed)
    else:  # a class-map method: no concepts, the class maps of its errors
        assert report["concepts"] is None and all(not row["positive"] for row in report["classes"])
        assert all("toward_predicted" not in e for e in report["errors"]["items"])
        if report["errors"]["count"]:
            assert (out / "figures" / "errors.png").is_file()
    _assert_self_contained((out / "report.html").read_text())


def test_report_on_an_image_folder_counts_unreadable_images(tiny_checkpoint, tiny_world, tmp_path):
    from cefam_lightning.methods.base import load_explainer

    module = load_explainer(tiny_checkpoint)
    split = tiny_world.split("test")
    root = tmp_path / "images"
    for i in range(6):
        folder = root / module.class_names[int(split.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(split.images[i])).save(folder / f"{i}.png")
    (root / module.class_names[0] / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rep"
    report = _report_cli(["--checkpoint", tiny_checkpoint, "--data", str(root), "--out", str(out), "--top-n", "2"])
    assert report["images"] == 6 and report["labeled"] == 6 and report["presence"] is None
    assert report["skipped"]["count"] == 1 and "broken.png" in report["skipped"]["images"][0]["error"]
    (root / "not a class").mkdir()
    Image.fromarray(np.asarray(split.images[0])).save(root / "not a class" / "x.png")
    with pytest.raises(ReportDataError, match="not a class"):
        list(image_source_data(root, module.classifier.input_spec, module.class_names).batches(4, None))


def test_report_command_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _report_cli(["--checkpoint", tiny_checkpoint, "--split", "nope"])
    assert e.value.code == 2 and "--split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _report_cli(
            ["--checkpoint", tiny_checkpoint, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_log_report_sends_tables_and_figures_to_wandb_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from cefam_lightning.reporting.report_pages import log_report

    tally = ConceptTally(CLASSES, CONCEPTS)
    tally.update(_batch([0, 1]), _evidence([0, 0], [[0, 1], [2, 1]], [[0.4, 0.2], [0.5, -0.1]]))
    classes = [tally.class_rows(k, 3) for k in range(2)]
    report = {"classes": classes, "errors": {"items": tally.errors}, "findings": ["a finding"]}
    png = Image.new("RGB", (8, 6), "white")
    import io

    buf = io.BytesIO()
    png.save(buf, format="PNG")
    wandb = mock.create_autospec(WandbLogger, instance=True)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    sent = log_report([wandb, tensorboard], report, {"heatmap.png": buf.getvalue()})
    assert "wandb:report/classes" in sent and "tensorboard:report/classes" in sent
    assert "wandb:report/errors" in sent and "wandb:report/heatmap" in sent and "tensorboard:report/heatmap/0" in sent
    table = next(c for c in wandb.log_table.call_args_list if c.kwargs["key"] == "report/classes")
    assert table.kwargs["data"][0][:3] == ["cat", "positive", 1]
    image = wandb.log_image.call_args.kwargs["images"][0]
    assert image.shape == (6, 8, 3)
    tensorboard.experiment.flush()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_rank_by_specificity_sets_apart_what_drives_one_class_more_than_the_others():
    # "fur" drives both classes alike (the larger mean in cat), "whiskers" drives cat only.
    tally = ConceptTally(CLASSES, CONCEPTS)
    ev = _evidence([0, 0, 1, 1], [[0, 1], [0, 1], [0, 2], [0, 2]], [[0.5, 0.3], [0.5, 0.3], [0.5, 0.3], [0.5, 0.3]])
    tally.update(_batch([0, 0, 1, 1]), ev)
    by_mean = [c["concept"] for c in tally.class_rows(0, 3, "mean")["positive"]]
    by_specificity = tally.class_rows(0, 3, "specific")["positive"]
    assert by_mean == ["fur", "whiskers"]
    assert [c["concept"] for c in by_specificity] == ["whiskers", "fur"]
    share_fur = 0.5 / 0.8  # the same in both classes
    assert by_specificity[1]["specificity"] == pytest.approx(share_fur - share_fur)
    assert by_specificity[0]["specificity"] == pytest.approx(0.3 / 0.8 - 0.0)
    with pytest.raises(ReportError, match="rank must be one of"):
        tally.class_rows(0, 3, "loudest")


def test_report_command_logs_to_tensorboard(tiny_checkpoint, tmp_path):
    out = tmp_path / "rep"
    report = _report_cli(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--max-images",
            "8",
            "--out",
            str(out),
            "--top-n",
            "2",
            "--logger",
            "tensorboard",
        ]
    )
    assert "tensorboard:report/classes" in report["logged"] and "tensorboard:report/heatmap/0" in report["logged"]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "report.html").is_file()


def test_report_on_tar_shards_and_on_a_mask_dataset(tiny_checkpoint, tiny_world, tmp_path):
    import io

    import webdataset as wds

    from cefam_lightning.data.mask_datasets import write_shapes_broden
    from cefam_lightning.data.shapes_world import WorldSpec

    split = tiny_world.split("test")
    classes = tiny_world.class_names
    with wds.TarWriter(str(tmp_path / "part-000.tar")) as sink:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(split.images[i])).save(buf, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buf.getvalue(), "cls": classes[int(split.labels[i])]})
    shards = _report_cli(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            str(tmp_path / "part-000.tar"),
            "--top-n",
            "2",
            "--out",
            str(tmp_path / "r1"),
        ]
    )
    assert shards["images"] == 5 and shards["labeled"] == 5 and shards["presence"] is None
    broden = write_shapes_broden(tmp_path / "broden", WorldSpec(image_size=32), n_val=6, n_train=2, seed=1)
    masks = _report_cli(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            str(broden),
            "--split",
            "val",
            "--top-n",
            "3",
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert masks["images"] == 6 and masks["labeled"] == 0 and masks["presence"] == "ground truth"
    assert masks["errors"]["count"] == 0 and masks["accuracy"] is None
    rates = [c["present_rate"] for row in masks["classes"] for c in row["positive"] + row["negative"]]
    assert rates and any(r is not None for r in rates)


def test_report_takes_the_methods_explanation_options(tiny_checkpoint, tiny_method_run, tmp_path, capsys):
    from cefam_lightning.methods.base import load_explainer

    args = ["--checkpoint", tiny_checkpoint, "--max-images", "8", "--top-n", "2", "--out", str(tmp_path / "a")]
    report = _report_cli([*args, "--contribution-layer", "layer1", "--k", "3"])
    assert report["settings"]["options"] == {"contribution_layer": "layer1", "k": 3}
    # The same numbers as the module's own explanation with those rules.
    module = load_explainer(tiny_checkpoint)
    ev = module.evidence(torch.zeros(1, 3, 32, 32), top_n=2, contribution_layer="layer1", k=3)
    expl = module.explain(torch.zeros(1, 3, 32, 32), top_n=2, contribution_layer="layer1", k=3)
    assert torch.equal(ev.contributions, expl.contributions)
    siam = tiny_method_run("siam")["best_checkpoint"]
    with pytest.raises(SystemExit) as e:
        _report_cli(["--checkpoint", siam, "--k", "3", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--k" in capsys.readouterr().err
