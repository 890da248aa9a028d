"""L-CAM and SIAM on real image sources: train.py with data.source=images and evaluate.py --data on the toy data
(cefam_lightning.data.toy_data), the attribute table's errors, and the two-data-set setting."""

from __future__ import annotations

import json

import pytest
import torch

from cefam_lightning.cli import evaluate, train
from cefam_lightning.data import toy_data
from cefam_lightning.data.attributes import TableError, read_table
from cefam_lightning.data.image_datamodule import ATTRIBUTE_BATCH, TARGET_BATCH, ImageDataModule
from cefam_lightning.data.transforms import InputSpec
from tests.cli import cli_error

COMMON = [
    "data.source=images",
    "data.batch_size=8",
    "classifier.name=resnet18",
    "classifier.allow_random_init=true",
    "classifier.image_size=32",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "callbacks.region_maps.enabled=false",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_data.write_toy_data(
        tmp_path_factory.mktemp("toy") / "toy", n_train=16, n_val=8, image_size=32, per_shard=8, n_broden=4
    )


def _train(tmp_path, toy, name, *overrides):
    return train.main(
        [
            *COMMON,
            f"data.train={toy / 'train.csv'}",
            f"data.val={toy / 'val.csv'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}",
            f"run_name={name}",
            *overrides,
        ]
    )


def _evaluate(ckpt, out, *args):
    results = evaluate.main(["--checkpoint", ckpt, "--out", str(out), *args])
    assert json.loads((out / "evaluation.json").read_text())["method"] == results["method"]
    return results


def test_toy_data_writes_the_attribute_table_targets_and_class_masks(toy):
    table = read_table(toy / "attributes.csv")
    assert table.names == ["red", "green", "blue", "yellow", "circle", "square", "triangle", "plain", "striped"]
    assert len(table.ids) == 24 and set(table.values.ravel().tolist()) <= {0.0, 1.0}
    targets = read_table(toy / "targets.csv", "target")
    assert targets.names == ["coverage"] and (targets.values > 0).all() and (targets.values < 1).all()
    concepts = (toy / "masks" / "concepts.csv").read_text().splitlines()
    assert "red circle,class" in concepts
    label = (toy / "masks" / "images.csv").read_text().splitlines()[1].split(",")[1]
    assert (toy / "masks" / "masks" / "val_000000" / f"{label}.png").is_file()


def test_lcam_trains_on_a_manifest_without_a_store_and_evaluates_on_class_masks_and_any_source(tmp_path, toy, capsys):
    run = _train(tmp_path, toy, "lcam", "method=lcam_img")
    assert run["method"] == "lcam_img" and run["epochs_trained"] == 1 and "test/masked_acc" in run["test"]
    ckpt = run["best_checkpoint"]

    masks = _evaluate(ckpt, tmp_path / "ev_masks", "--data", str(toy / "masks"))
    assert masks["images"] == 8 and masks["class_masks"] == 8  # one class mask per val image
    for method in ("lcam_img", "gradcam", "random"):
        row = masks["methods"][method]
        assert 0 <= row["nra"] <= 1 and {"ad/100%", "ad/50%", "ad/15%", "ic/15%"} <= row.keys()

    plain = _evaluate(ckpt, tmp_path / "ev_plain", "--data", str(toy / "val.csv"))
    assert plain["class_masks"] == 0 and "nra" not in plain["methods"]["lcam_img"]
    assert plain["methods"]["lcam_img"]["ad/50%"] >= 0
    assert "no class masks: faithfulness only" in (tmp_path / "ev_plain" / "evaluation.md").read_text()

    # shards: integer labels, the same images
    shards = _evaluate(ckpt, tmp_path / "ev_shards", "--data", str(toy / "shards" / "val-000.tar"))
    assert shards["images"] == 8

    # an option of another method is refused, naming the method
    assert "--attributes: not an option of L-CAM-Img" in cli_error(
        evaluate.main,
        ["--checkpoint", ckpt, "--data", str(toy / "val.csv"), "--attributes", str(toy / "x.csv")],
        capsys,
    )


def test_siam_trains_with_an_attribute_table_and_evaluates_attribute_auroc_and_accuracy(tmp_path, toy, capsys):
    run = _train(tmp_path, toy, "siam", "method=siam", f"data.attributes={toy / 'attributes.csv'}")
    assert {"test/acc", "test/attr_auroc"} <= run["test"].keys()
    ckpt = run["best_checkpoint"]
    results = _evaluate(
        ckpt, tmp_path / "ev", "--data", str(toy / "val.csv"), "--attributes", str(toy / "attributes.csv")
    )
    assert results["n_images"] == 8 and results["n_labeled"] == 8 and 0 <= results["siam_acc"] <= 1
    assert 0 <= results["attr_auroc"] <= 1 and results["attributes_scored"] >= 1
    assert results["table_rows_unmatched"] == {"attributes": 16}  # the train rows, counted
    assert "table rows matching no image: attributes 16" in (tmp_path / "ev" / "evaluation.md").read_text()
    # without the table: one line naming the option
    assert "--attributes" in cli_error(evaluate.main, ["--checkpoint", ckpt, "--data", str(toy / "val.csv")], capsys)


def test_siam_two_data_sets_regression(tmp_path, toy):
    """The authors' setting: attributes from one source, the (regression) target from another, paired batches."""
    run = _train(
        tmp_path,
        toy,
        "siam2",
        "method=siam",
        "siam.task=regression",
        f"data.train={toy / 'shards' / 'train-{000..001}.tar'}",
        f"data.val={toy / 'shards' / 'val-000.tar'}",
        "classifier.num_classes=6",
        f"data.attribute_train={toy / 'train.csv'}",
        f"data.attribute_val={toy / 'val.csv'}",
        f"data.attributes={toy / 'attributes.csv'}",
        f"data.targets={toy / 'targets.csv'}",
    )
    assert {"test/mse", "test/attr_auroc", "test/loss_task", "test/loss_attr"} <= run["test"].keys()
    results = _evaluate(
        run["best_checkpoint"],
        tmp_path / "ev",
        "--data",
        str(toy / "val.csv"),
        "--attributes",
        str(toy / "attributes.csv"),
        "--targets",
        str(toy / "targets.csv"),
    )
    assert results["task"] == "regression" and results["mse"] >= 0 and "coverage" in results["mse_per_target"]


def test_two_data_sets_pair_one_batch_of_each(toy):
    dm = ImageDataModule(
        toy / "train.csv",
        toy / "val.csv",
        store=None,
        input_spec=InputSpec(crop=32, resize=32),
        attributes=toy / "attributes.csv",
        targets=toy / "targets.csv",
        attribute_train=toy / "val.csv",  # 8 images against the target's 16: cycled in training
        attribute_val=toy / "val.csv",
        batch_size=8,
    )
    dm.setup("fit")
    batches = list(iter(dm.train_dataloader()))
    assert len(batches) == 2
    for batch, _, _ in batches:
        target, attributes = batch[TARGET_BATCH], batch[ATTRIBUTE_BATCH]
        assert "target" in target and "attributes" not in target  # the target source carries no attributes
        assert attributes["attributes"].shape == (8, 9) and "target" not in attributes
    assert dm.unmatched == {"attributes": 16, "target": 0}  # the train rows no attribute split reads, counted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,red\na,1\n", r"attributes.csv:1: no 'id' column in the header \['name', 'red'\]"),
        ("id,red,blue\na,1,0\nb,0.5,1.5\n", r"attributes.csv:3 \(id 'b'\), column 'blue': 1.5 is not in \[0, 1\]"),
        ("id,red\na,yes\n", r"attributes.csv:2 \(id 'a'\), column 'red': 'yes' is not a number"),
        ("id,red\na,1\na,0\n", r"attributes.csv:3: id 'a' repeated \(first on line 2\)"),
    ],
)
def test_a_bad_attribute_table_is_one_line_naming_file_row_column_and_value(tmp_path, text, message):
    path = tmp_path / "attributes.csv"
    path.write_text(text)
    with pytest.raises(TableError, match=message):
        read_table(path)


def test_bad_attribute_input_through_train_is_an_error_line_and_exit_2(tmp_path, toy, capsys):
    bad = tmp_path / "attributes.csv"
    bad.write_text("id,red\ntrain/000000,2\n")
    line = cli_error(train.main, [*COMMON, "method=siam", f"data.train={toy / 'train.csv'}",
                                  f"data.val={toy / 'val.csv'}", f"data.attributes={bad}",
                                  f"output_dir={tmp_path / 'runs'}"], capsys)  # fmt: skip
    assert "attributes.csv:2 (id 'train/000000'), column 'red': 2 is not in [0, 1]" in line
    # ids that do not match the images: counted and named
    bad.write_text("id,red\nelsewhere/1,1\n")
    line = cli_error(train.main, [*COMMON, "method=siam", f"data.train={toy / 'train.csv'}",
                                  f"data.val={toy / 'val.csv'}", f"data.attributes={bad}",
                                  f"output_dir={tmp_path / 'runs'}"], capsys)  # fmt: skip
    assert "no row for 16 of 16 images of the train data" in line and "'train/000000'" in line
    # SIAM on images without a table, and a table for a method that reads none
    assert "method=siam data.source=images needs data.attributes (the attribute table)" in cli_error(
        train.main, [*COMMON, "method=siam", f"data.train={toy / 'train.csv'}", f"data.val={toy / 'val.csv'}"], capsys
    )
    assert "data.attributes: not read by method=lcam_img" in cli_error(
        train.main,
        [*COMMON, "method=lcam_img", f"data.train={toy / 'train.csv'}", f"data.val={toy / 'val.csv'}"]
        + [f"data.attributes={toy / 'attributes.csv'}"],
        capsys,
    )


def test_cefam_refuses_data_without_masks(tmp_path, toy):
    """CE-FAM's --data evaluation needs concept masks; a plain image source is refused in one line."""
    from cefam_lightning.data.evaluation_data import ImageSourceDataset
    from cefam_lightning.methods.base import EvaluationSettings, UnsupportedError

    dataset = ImageSourceDataset(toy / "val.csv", InputSpec(crop=32, resize=32))
    assert len(dataset) == 8 and dataset[0]["masks"].shape == (0, 32, 32) and dataset[0]["label"] is not None
    from cefam_lightning.methods.cefam.module import CEFAMModule

    with pytest.raises(UnsupportedError, match="CE-FAM is evaluated against concept masks"):
        CEFAMModule.evaluate_on_data(object.__new__(CEFAMModule), dataset, EvaluationSettings())
    assert torch.is_tensor(dataset[0]["image"])
