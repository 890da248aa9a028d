"""Write a small image dataset in every layout the framework reads, to try the real-data path without real data.

``python -m cefam_lightning.data.toy_data OUT`` renders shapes-world scenes (docs/method.md#the-shapes-world) as
JPEG files and writes::

    OUT/images/<class>/<split>_<n>.jpg     an image folder (class per sub-folder)
    OUT/train.csv, OUT/val.csv             manifests: id, path (relative to OUT), label (class name)
    OUT/shards/train-000.tar ...           WebDataset shards of the same images (key = the manifests' id, jpg, and
                                           cls = the class's index in sorted class-name order, as the manifests'
                                           names are numbered)
    OUT/shards/val-000.tar ...
    OUT/concepts.csv                       the world's concepts as name,type (for precompute --concepts)
    OUT/attributes.csv                     an attribute table for SIAM: id + one column per concept, 1 where the
                                           concept is in the image, else 0 (train and val images)
    OUT/targets.csv                        a target table for SIAM's regression: id, coverage (the share of the
                                           image the objects cover)
    OUT/masks/                             the val images in the folder mask format (for evaluate --data): every
                                           present concept's mask, and the key object's as a mask named after the
                                           image's class (a class mask; concept type "class")
    OUT/broden/                            scenes with masks in Broden's released layout (for evaluate --data)

Ids are shared by the manifests, the shards and the tables, so one embedding store computed from the manifests
serves training from either. The README's "Your own data, end to end" recipe runs on this folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from pathlib import Path

from PIL import Image

from cefam_lightning.data.shapes_world import WorldSpec, key_object_pixels, render_image
from cefam_lightning.io_utils import atomic_dir

SPLIT_SEED = {"train": 101, "val": 102}


def write_toy_data(
    root: str | os.PathLike,
    n_train: int = 240,
    n_val: int = 60,
    image_size: int = 64,
    per_shard: int = 64,
    n_broden: int = 60,
    seed: int = 0,
) -> Path:
    """Write the toy dataset to ``root`` (atomically: replaced as a whole, never half-written). Returns ``root``."""
    import webdataset as wds

    from cefam_lightning.data.mask_datasets import write_shapes_broden

    if min(n_train, n_val, per_shard, n_broden) < 1:
        raise ValueError("n_train, n_val, per_shard and n_broden must be >= 1")
    spec = WorldSpec(image_size=image_size, seed=seed)
    class_index = {name: i for i, name in enumerate(sorted(spec.classes))}
    names = [c.name for c in spec.concepts]
    root = Path(root)
    with atomic_dir(root) as tmp:
        attributes, targets = [], []
        for split, n in (("train", n_train), ("val", n_val)):
            rows = []
            for i in range(n):
                image, masks, label = render_image(spec, (seed, SPLIT_SEED[split], i))
                cls = spec.classes[label]
                sample_id = f"{split}/{i:06d}"
                rel = Path("images") / cls.replace(" ", "_") / f"{split}_{i:06d}.jpg"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=95)
                (tmp / rel).write_bytes(buf.getvalue())
                rows.append({"id": sample_id, "path": rel.as_posix(), "label": cls})
                attributes.append([sample_id, *(int(m.any()) for m in masks)])
                targets.append([sample_id, f"{masks.any(axis=0).mean():.4f}"])
                if split == "val":
                    _write_masks(tmp / "masks", spec, f"{split}_{i:06d}", buf.getvalue(), masks, label)
            with open(tmp / f"{split}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["id", "path", "label"])
                writer.writeheader()
                writer.writerows(rows)
            (tmp / "shards").mkdir(exist_ok=True)
            for s in range(math.ceil(n / per_shard)):
                with wds.TarWriter(str(tmp / "shards" / f"{split}-{s:03d}.tar")) as sink:
                    for row in rows[s * per_shard : (s + 1) * per_shard]:
                        jpg = (tmp / row["path"]).read_bytes()
                        sink.write({"__key__": row["id"], "jpg": jpg, "cls": str(class_index[row["label"]])})
        with open(tmp / "concepts.csv", "w", newline="") as f:
            csv.writer(f).writerows((c.name, c.type) for c in spec.concepts)
        with open(tmp / "attributes.csv", "w", newline="") as f:
            csv.writer(f).writerows([["id", *names], *attributes])
        with open(tmp / "targets.csv", "w", newline="") as f:
            csv.writer(f).writerows([["id", "coverage"], *targets])
        with open(tmp / "masks" / "concepts.csv", "w", newline="") as f:
            kinds = [(c.name, c.type) for c in spec.concepts] + [(c, "class") for c in spec.classes]
            csv.writer(f).writerows([["name", "type"], *kinds])
        with open(tmp / "masks" / "images.csv", "w", newline="") as f:
            labels = [[r["id"].replace("/", "_"), r["label"]] for r in rows]  # the val split's rows
            csv.writer(f).writerows([["id", "label"], *labels])
        write_shapes_broden(tmp / "broden", spec=WorldSpec(image_size=image_size), n_val=n_broden, n_train=n_broden)
    return root


def _write_masks(root: Path, spec: WorldSpec, image_id: str, jpg: bytes, masks, label: int) -> None:
    """One image of the folder mask format: the JPEG, every present concept's mask, and the key object's pixels
    as the mask of the image's class."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{image_id}.jpg").write_bytes(jpg)
    folder = root / "masks" / image_id
    folder.mkdir(parents=True, exist_ok=True)
    key = key_object_pixels(spec, masks[None], [label])[0].numpy()
    named = [(c.name, m) for c, m in zip(spec.concepts, masks, strict=True) if m.any()]
    for name, mask in [*named, (spec.classes[label], key)]:
        Image.fromarray(mask.astype("uint8") * 255).save(folder / f"{name}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write (replaced if it exists)")
    p.add_argument("--train", type=int, default=240, help="training images")
    p.add_argument("--val", type=int, default=60, help="validation images")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=64, help="images per tar shard")
    p.add_argument("--broden", type=int, default=60, help="images per split of the Broden-layout folder")
    args = p.parse_args(argv)
    out = write_toy_data(args.out, args.train, args.val, args.image_size, args.per_shard, args.broden)
    n_shards = sorted(p.name for p in (out / "shards").iterdir())
    print(
        f"wrote {args.train}/{args.val} JPEGs to {out}: images/, train.csv, val.csv, shards/ ({', '.join(n_shards)}),"
    )
    print(
        f"concepts.csv, attributes.csv, targets.csv, masks/ ({args.val} val images with concept and class masks), "
        f"broden/ ({args.broden} val + {args.broden} train scenes with masks)"
    )


if __name__ == "__main__":
    main()
