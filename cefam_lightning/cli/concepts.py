"""``python -m cefam_lightning.concepts``: a concept file from a dataset's own label files.

Usage::

    python -m cefam_lightning.concepts from-broden ROOT --out FILE [--types color,object,part,material]
                                       [--keep-suffixes] [--overwrite]
    python -m cefam_lightning.concepts from-imagenet-s ROOT --out FILE [--categories FILE] [--class-names FILE]
                                       [--overwrite]

``from-broden`` reads ``ROOT/label.csv`` (``c_<category>.csv`` and the images are not needed); every label is a
concept, named and typed as the evaluation reads Broden (``red-c`` -> ``red``, color; the first category a label
lists is its type). ``from-imagenet-s`` reads the class list (the ``validation/`` class folders, or the release's
``ImageNetS_categories_im{N}.txt`` given as ``--categories``); names are ImageNet's class names (or
``--class-names``, ``<wnid> <name>`` lines), type ``object``. So ``evaluate --data ROOT`` finds every concept of
the file by name. The file (``name,type`` lines, what ``precompute --concepts`` reads) is written atomically; a
name that repeats an earlier one (case and spacing aside) is dropped and counted.

Exit status 0 on success, 2 on a bad argument or a malformed label file (one ``error:`` line naming it).
"""

from __future__ import annotations

import argparse
import sys

from cefam_lightning.cli.options import add_debug_option
from cefam_lightning.data.concepts import ConceptFileError, ConceptFileSummary, write_concept_file
from cefam_lightning.data.mask_datasets import MaskConcept, broden_concepts, imagenet_s_concepts
from cefam_lightning.errors import cli_errors

PROG = "python -m cefam_lightning.concepts"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    broden = sub.add_parser("from-broden", help="concepts from a Broden release's label.csv")
    broden.add_argument("root", metavar="ROOT", help="the Broden folder (with label.csv)")
    broden.add_argument("--types", default=None, help="keep only these comma-separated types, e.g. color,object")
    broden.add_argument("--keep-suffixes", action="store_true", help="keep Broden's names as written (red-c)")
    imagenet_s = sub.add_parser("from-imagenet-s", help="concepts from an ImageNet-S release's class list")
    imagenet_s.add_argument("root", metavar="ROOT", help="an ImageNetS{N} folder or the folder holding one")
    imagenet_s.add_argument("--categories", default=None, metavar="FILE", help="ImageNetS_categories_im{N}.txt")
    imagenet_s.add_argument("--class-names", default=None, metavar="FILE", help="'<wnid> <name>' lines")
    for cmd in (broden, imagenet_s):
        cmd.add_argument("--out", required=True, metavar="FILE", help="the concept file to write")
        cmd.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_debug_option(cmd)
    return p.parse_args(argv)


def read_concepts(args: argparse.Namespace) -> list[MaskConcept]:
    """The dataset's concepts the arguments ask for (a ``--types`` filter that keeps none is an error)."""
    if args.command == "from-imagenet-s":
        return imagenet_s_concepts(args.root, args.categories, args.class_names)
    concepts = broden_concepts(args.root, strip_suffixes=not args.keep_suffixes)
    if args.types is None:
        return concepts
    wanted = [t.strip() for t in args.types.split(",") if t.strip()]
    have = list(dict.fromkeys(c.type for c in concepts))
    unknown = [t for t in wanted if t not in have]
    if unknown or not wanted:
        raise ConceptFileError(
            f"--types {args.types!r}: {', '.join(unknown) or 'no type given'}; the types of {args.root} are "
            f"{', '.join(have)}"
        )
    return [c for c in concepts if c.type in wanted]


def run(args: argparse.Namespace) -> ConceptFileSummary:
    concepts = read_concepts(args)
    header = f"concepts of {args.root} ({args.command.removeprefix('from-')}), written by {PROG}"
    return write_concept_file(args.out, [(c.name, c.type) for c in concepts], args.overwrite, header=header)


def main(argv: list[str] | None = None) -> ConceptFileSummary:
    """Command line; exits 2 on a bad argument or file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with cli_errors(args.debug):
        summary = run(args)
    types = ", ".join(f"{t} {n}" for t, n in summary.type_counts.items())
    line = f"wrote {summary.path}: {len(summary.concepts)} concepts ({types})"
    if summary.dropped:
        shown = ", ".join(summary.dropped[:10]) + (", ..." if len(summary.dropped) > 10 else "")
        line += f"; {len(summary.dropped)} repeated name(s) dropped: {shown}"
    print(line)
    return summary
