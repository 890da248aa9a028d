"""``python interop.py import``: the CE-FAM authors' published translator file as a checkpoint of this framework.

Usage::

    python interop.py import best_converter_ckpt.pth --classifier resnet50 --weights resnet50.pth \\
        --store STORE --out model.ckpt [--class-names FILE] [--layers layer1 layer2 layer3 layer4]

The file is read without running anything from it (README: Start from the authors' weights); its layer widths,
embedding size and scoring kind are checked against the classifier and the store, and its scoring constants are
kept. ``explain.py`` and ``evaluate.py`` then run on ``model.ckpt`` as on a trained checkpoint. Exit status 0 on
success, 2 on a bad argument or a file that does not fit (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cefam_lightning.cli.options import add_debug_option
from cefam_lightning.errors import CefamError, cli_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="turn the authors' translator file into a checkpoint")
    imp.add_argument("file", help="the authors' file (best_converter_ckpt.pth) or a translator state dict")
    imp.add_argument("--classifier", required=True, help="classifier name (resnet50, resnet18, vit_b_16, timm:...)")
    imp.add_argument("--weights", default=None, metavar="FILE", help="the classifier's state-dict file")
    imp.add_argument("--store", required=True, metavar="DIR", help="embedding store (concepts, text embeddings, VLM)")
    imp.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    imp.add_argument("--class-names", default=None, metavar="FILE", help="the classifier's classes, one a line")
    imp.add_argument("--num-classes", type=int, default=1000, help="classes without --class-names (default 1000)")
    imp.add_argument("--layers", nargs="+", default=None, help="the classifier's layers (default: its own)")
    imp.add_argument("--image-size", type=int, default=None, help="the crop the classifier sees (default: preset)")
    add_debug_option(imp)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with cli_errors(args.debug):
        from cefam_lightning.training.authors import authors_checkpoint, write_authors_checkpoint

        names = None
        if args.class_names:
            path = Path(args.class_names).expanduser()
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not names:
                raise CefamError(f"--class-names {path}: no class names in it")
        module, imported = authors_checkpoint(
            args.file,
            args.classifier,
            args.store,
            weights=args.weights,
            class_names=names,
            num_classes=args.num_classes,
            layers=args.layers,
            image_size=args.image_size,
        )
        out = write_authors_checkpoint(module, args.out)
        print(f"{imported.summary()}\nwrote {out}", flush=True)
        return out


if __name__ == "__main__":
    main()
