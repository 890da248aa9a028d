"""SIAM on the shapes world (docs/method.md#siam-evaluation): are its attributes, outputs and contributions right?

:func:`evaluate_siam_on_world` runs a trained :class:`~cefam_lightning.methods.siam.module.SIAMModule` whose attributes
are the world's concepts over one split and measures:

- attribute presence: macro AUROC of the presence probabilities against the concepts present;
- accuracy of SIAM's class prediction, beside the frozen classifier's on the same images (and how often the
  two agree);
- contributions: on the images SIAM classifies correctly, the share whose largest per-attribute contribution to
  the predicted class is a concept of the key object (:func:`~cefam_lightning.data.shapes_world.key_object_concepts`:
  its color, shape or texture), the ground truth of what must drive the class;
- where: each present concept's attribute map against its mask (:class:`~cefam_lightning.metrics.RegionMetrics`:
  EPG, NRA, hit rate per concept type), and the class map's NRA against the key object's pixels
  (:func:`~cefam_lightning.data.shapes_world.key_object_pixels`, the one ground truth of every class map).

:func:`evaluate_siam_on_data` (``evaluate --data``) runs it on any image data with an attribute table joined by id
(:mod:`cefam_lightning.data.attributes`): the attribute-presence AUROC (per attribute and macro, over the
attributes that are both present and absent in the data), and the target metric: class accuracy beside the frozen
classifier's against the data's labels, or the MSE against a target table's columns.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torchmetrics.classification import MultilabelAUROC

from cefam_lightning.data.attributes import IdTable, TableError, read_table
from cefam_lightning.data.mask_datasets import collate_masks
from cefam_lightning.data.shapes_world import ShapesWorld, key_object_concepts, key_object_pixels
from cefam_lightning.distributed import part_range, sum_over_ranks
from cefam_lightning.metrics import RegionMetrics
from cefam_lightning.metrics.functional.region import nra
from cefam_lightning.reporting.tables import markdown_table


@torch.no_grad()
def evaluate_siam_on_world(
    module: Any,
    world: ShapesWorld,
    split: str = "test",
    batch_size: int = 64,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Evaluate a SIAM module trained on ``world`` on one of its splits.

    With ``world_size > 1`` every rank of a process group calls this with its ``rank``: each scores its part of the
    images (:func:`~cefam_lightning.distributed.part_range`), the metrics are summed over the ranks, and every rank
    returns the numbers one process would.

    Args:
        module: a classification :class:`~cefam_lightning.methods.siam.module.SIAMModule` whose attributes are the
            world's concepts, in the world's order.
        world: the shapes world.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: images per forward pass.
        max_images: evaluate only the first this many images (``None``: all).
        rank, world_size: this process's part of the images, of how many.

    Returns:
        ``n_images``; ``attr_auroc`` (macro); ``siam_acc``, ``classifier_acc``, ``agreement``; ``n_correct`` and
        ``top_attr_is_key`` (share of SIAM-correct images whose top contribution is a key-object concept);
        ``class_map_nra`` (mean over images, vs the key object's pixels); ``regions``: RegionMetrics of the
        attribute maps vs the masks of present concepts (floats).
    """
    concepts = world.concepts
    names = [c.name for c in concepts]
    if module.hparams.task != "classification":
        raise ValueError("evaluate_siam_on_world needs a classification SIAM (task='classification')")
    if list(module.hparams.attribute_names) != names:
        raise ValueError(
            f"the module's attributes {list(module.hparams.attribute_names)} are not the world's concepts {names}"
        )
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = world.split(split)
    n = len(data) if max_images is None else min(int(max_images), len(data))
    if n <= 0:
        raise ValueError(f"no images to evaluate (split {split!r} has {len(data)}, max_images={max_images})")
    device = module.device
    was_training = module.training
    module.eval()
    sync = world_size > 1
    auroc = MultilabelAUROC(len(names), average="macro", sync_on_compute=sync).to(device)
    regions = RegionMetrics([c.type for c in concepts], sync_on_compute=sync).to(device)
    counts = dict.fromkeys(("siam_correct", "classifier_correct", "agree", "key_first"), 0)
    class_map_nra = torch.zeros(2, dtype=torch.float64, device=device)  # the sum of the non-NaN NRAs, their count
    for images, masks, labels in data.batches(batch_size, n, device, images=part_range(n, rank, world_size)):
        presence = masks.flatten(2).any(2)
        logits, features = module.backbone(images)
        ex = module.explain_features(features, image_size=tuple(images.shape[-2:]))
        pred, classifier_pred = ex.target, logits.argmax(1)
        auroc.update(ex.presence_probs, presence.long())
        correct = pred == labels
        counts["siam_correct"] += int(correct.sum())
        counts["classifier_correct"] += int((classifier_pred == labels).sum())
        counts["agree"] += int((classifier_pred == pred).sum())
        key = key_object_concepts(world.spec, masks, labels)  # (B, C)
        top = ex.contributions.argmax(1)
        rows = torch.arange(len(labels), device=device)
        counts["key_first"] += int((key[rows, top] & correct).sum())
        image_index, concept_ids = presence.nonzero(as_tuple=True)
        regions.update(ex.maps[image_index, concept_ids], masks[image_index, concept_ids], concept_ids)
        values = nra(ex.class_map, key_object_pixels(world.spec, masks, labels))
        class_map_nra += torch.stack([values.nansum().double(), values.isfinite().sum().double()])
    module.train(was_training)
    totals = sum_over_ranks(torch.tensor(list(counts.values()), device=device), world_size)
    counts = dict(zip(counts, totals.tolist(), strict=True))
    nra_sum, nra_count = sum_over_ranks(class_map_nra, world_size).tolist()
    return {
        "split": split,
        "n_images": n,
        "attr_auroc": float(auroc.compute()),
        "siam_acc": counts["siam_correct"] / n,
        "classifier_acc": counts["classifier_correct"] / n,
        "agreement": counts["agree"] / n,
        "n_correct": counts["siam_correct"],
        "top_attr_is_key": counts["key_first"] / max(counts["siam_correct"], 1),
        "class_map_nra": nra_sum / nra_count if nra_count else float("nan"),
        "regions": {k: float(v) for k, v in regions.compute().items()},
    }


def format_siam_table(results: dict[str, Any]) -> str:
    """A Markdown summary of :func:`evaluate_siam_on_world`'s results."""
    r = results
    regions = r["regions"]
    types = [k.split("/", 1)[1] for k in regions if k.startswith("nra/") and k != "nra/mean"]

    def pct(share: float) -> str:
        return f"{100 * share:.1f} %"

    summary = markdown_table(
        ["metric", "value"],
        [
            ["attribute-presence AUROC (macro)", f"{r['attr_auroc']:.3f}"],
            ["SIAM class accuracy", pct(r["siam_acc"])],
            ["frozen classifier accuracy (same images)", pct(r["classifier_acc"])],
            ["SIAM agrees with the classifier", pct(r["agreement"])],
            [f"top contribution is a key-object concept ({r['n_correct']} correct images)", pct(r["top_attr_is_key"])],
            ["class map NRA vs the key object", f"{r['class_map_nra']:.3f}"],
        ],
        title=f"SIAM on the shapes world ({r['split']} split, {r['n_images']} images)",
    )
    maps = markdown_table(
        ["concept type", *types, "mean"],
        [
            [title, *(f"{regions[f'{metric}/{t}']:.3f}" for t in [*types, "mean"])]
            for metric, title in (("nra", "NRA"), ("hit_rate", "hit rate"), ("epg", "EPG"))
        ],
        title="Attribute maps vs concept masks (present concepts)",
    )
    return f"{summary}\n\n{maps}\n"


@torch.no_grad()
def evaluate_siam_on_data(
    module: Any,
    dataset: Any,
    attributes: str | IdTable,
    targets: str | IdTable | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Evaluate a SIAM module on image data (``evaluate --data``) with an attribute table joined by id.

    With ``world_size > 1`` every rank of a process group calls this with its ``rank`` and scores its part of the
    images; the sums are gathered, and every rank returns the numbers one process would.

    Args:
        module: a SIAM module; the table's columns must be its attributes (any order).
        dataset: a mask dataset or an image source dataset (:mod:`cefam_lightning.data.evaluation_data`).
        attributes: the attribute table (a CSV path or read).
        targets: the target table of a regression SIAM (its columns: the module's outputs).
        batch_size, max_images, num_workers: as ``evaluate``'s.
        rank, world_size: this process's part of the images, of how many.

    Returns:
        ``task``, ``n_images``; ``attr_auroc`` (macro over the scored attributes), ``attr_auroc_per_attribute``
        (``None`` where the data show an attribute always or never), ``attributes_scored``; classification:
        ``siam_acc``, ``classifier_acc``, ``agreement`` and ``n_labeled`` (images whose label is one of the
        module's classes; the others are counted in ``n_unlabeled``); regression: ``mse`` and
        ``mse_per_target``; ``table_rows_unmatched`` per table (rows that match no image).

    Raises:
        TableError: a malformed table, images without a row, or columns that are not the module's.
    """
    from torch.utils.data import DataLoader, Subset

    t0 = time.time()
    names = [str(a) for a in module.hparams.attribute_names]
    task = module.hparams.task
    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    if n <= 0:
        raise ValueError(f"no images to evaluate in {dataset.describe()['root']}")
    ids = dataset.ids[:n]
    where = f"the data {dataset.describe()['root']}"
    table = attributes if isinstance(attributes, IdTable) else read_table(attributes, "attribute")
    attr_rows = _columns(table, names, "attributes")[table.rows_for(ids, where)]
    unmatched = {"attributes": len(table.unmatched(dataset.ids))}
    target_rows = None
    if task == "regression":
        if targets is None:
            raise TableError("a SIAM regression checkpoint is evaluated against a target table (--targets)")
        ttable = targets if isinstance(targets, IdTable) else read_table(targets, "target")
        target_rows = _columns(ttable, list(module.class_names), "targets")[ttable.rows_for(ids, where)]
        unmatched["targets"] = len(ttable.unmatched(dataset.ids))
    elif targets is not None:
        raise TableError("--targets: a SIAM classification checkpoint's target is the data's class labels")
    device = module.device
    was_training = module.training
    module.eval()
    mine = part_range(n, rank, world_size)
    data = dataset if mine == range(len(dataset)) else Subset(dataset, mine)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_masks, num_workers=num_workers)
    class_of = {c: i for i, c in enumerate(module.class_names)}
    truth = torch.as_tensor(attr_rows, device=device) >= 0.5  # every evaluated image's, on every rank
    scored = truth.any(0) & ~truth.all(0)  # an attribute always or never present has no AUROC
    auroc = None
    if scored.any():
        auroc = MultilabelAUROC(int(scored.sum()), average="none", sync_on_compute=world_size > 1).to(device)
    # Sums over the images: classification: labeled, SIAM right, classifier right (both among the labeled), SIAM
    # agrees with the classifier; regression: the squared error per output.
    sums = torch.zeros(4 if task == "classification" else len(module.class_names), dtype=torch.float64, device=device)
    start = mine.start
    for batch in loader:
        logits, features = module.backbone(batch.images.to(device))
        out = module.forward_features(features)
        rows = slice(start, start + len(batch.ids))
        start += len(batch.ids)
        if auroc is not None:
            auroc.update(out.presence.float()[:, scored], truth[rows][:, scored].long())
        if task == "classification":
            label = torch.tensor([class_of.get(label, -1) for label in batch.labels], device=device)
            known = label >= 0
            pred, clf = out.outputs.argmax(1), logits.argmax(1)
            sums += torch.stack(
                [known.sum(), (pred == label)[known].sum(), (clf == label)[known].sum(), (pred == clf).sum()]
            ).double()
        else:
            target = torch.as_tensor(target_rows[rows], device=device)
            sums += (out.outputs.double() - target.double()).pow(2).sum(0)
    module.train(was_training)
    per_attribute: list[float | None] = [None] * len(names)
    if auroc is not None:
        values = auroc.compute().tolist()
        for a, v in zip(scored.nonzero().flatten().tolist(), values, strict=True):
            per_attribute[a] = float(v)
    kept = [v for v in per_attribute if v is not None]
    results: dict[str, Any] = {
        "task": task,
        "data": dataset.describe(),
        "n_images": n,
        "attr_auroc": sum(kept) / len(kept) if kept else None,
        "attr_auroc_per_attribute": dict(zip(names, per_attribute, strict=True)),
        "attributes_scored": len(kept),
        "table_rows_unmatched": unmatched,
    }
    sums = sum_over_ranks(sums, world_size).tolist()  # every rank's part
    if task == "classification":
        n_known, siam_right, classifier_right, agree = sums
        n_known = int(n_known)
        results.update(
            n_labeled=n_known,
            n_unlabeled=n - n_known,
            siam_acc=siam_right / n_known if n_known else None,
            classifier_acc=classifier_right / n_known if n_known else None,
            agreement=agree / n,
        )
    else:
        per_target = {name: err / n for name, err in zip(module.class_names, sums, strict=True)}
        results.update(mse=sum(sums) / (n * len(sums)), mse_per_target=per_target)
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _columns(table: IdTable, wanted: list[str], what: str) -> Any:
    """The table's values in the order of ``wanted`` (the module's attributes or outputs)."""
    missing = [w for w in wanted if w not in table.names]
    if missing:
        raise TableError(f"{table.path}: no column for the checkpoint's {what} {missing} (the table has {table.names})")
    return table.values[:, [table.names.index(w) for w in wanted]]


def format_siam_data_table(results: dict[str, Any]) -> str:
    """A Markdown summary of :func:`evaluate_siam_on_data`'s results."""
    r = results

    def num(v: float | None, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    rows = [[f"attribute-presence AUROC (macro, {r['attributes_scored']} attributes scored)", num(r["attr_auroc"])]]
    if r["task"] == "classification":
        rows += [
            [f"SIAM class accuracy ({r['n_labeled']} labeled images)", num(r["siam_acc"])],
            ["frozen classifier accuracy (same images)", num(r["classifier_acc"])],
            ["SIAM agrees with the classifier", num(r["agreement"])],
        ]
    else:
        rows += [["SIAM regression MSE", num(r["mse"], ".4f")]]
    unmatched = ", ".join(f"{k} {v}" for k, v in r["table_rows_unmatched"].items())
    title = f"SIAM on {r['data']['root']} ({r['n_images']} images; table rows matching no image: {unmatched})"
    return markdown_table(["metric", "value"], rows, title=title) + "\n"
