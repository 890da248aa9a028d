"""Command-line options that several tools take, each written once so that its flag, default and help agree.

``--debug`` (every tool), ``--device`` (the tools that load a model), ``--devices``/``--num-nodes`` (the tools that
split their work across processes) and CE-FAM's explanation rules ``--k``,
``--fill``, ``--select-layers``, ``--gradient``, ``--region-weights``, ``--relevance``, ``--contribution-layer`` and
``--preset`` (explain.py and evaluate.py, where left out they are the checkpoint's own: its run's ``cefam:`` section;
:mod:`~cefam_lightning.methods.cefam.rules`; :func:`~cefam_lightning.methods.cefam.relevance.parse_select_layers`
reads ``--select-layers``).
"""

from __future__ import annotations

import argparse
from typing import Any

from cefam_lightning.errors import DEBUG_ENV
from cefam_lightning.methods.cefam.regions import GRADIENTS, REGION_WEIGHTS
from cefam_lightning.methods.cefam.relevance import RELEVANCES, parse_select_layers
from cefam_lightning.methods.cefam.rules import PRESETS, RULE_KEYS


def add_debug_option(p: argparse.ArgumentParser) -> None:
    """``--debug``: the traceback instead of :func:`~cefam_lightning.errors.cli_errors`' one ``error:`` line."""
    p.add_argument(
        "--debug", action="store_true", help=f"show a traceback instead of a one-line error (also {DEBUG_ENV}=1)"
    )


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (``auto``: CUDA where there is one)."""
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (default), cpu or cuda")


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """``--devices``/``--num-nodes``: processes per node and nodes (Lightning Fabric); left out under ``torchrun``."""
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="split the work across N processes per node (one per GPU; under srun: the tasks per node); "
        "not needed under torchrun",
    )
    p.add_argument("--num-nodes", type=int, default=None, metavar="M", help="... on M nodes (srun; default 1)")


def add_channel_options(p: argparse.ArgumentParser) -> None:
    """CE-FAM's explanation rules (``--k``, ``--fill``, ``--select-layers``, ``--gradient``, ``--region-weights``,
    ``--relevance``, ``--contribution-layer``) and ``--preset``; ``None`` where left out (the checkpoint's own)."""
    p.add_argument(
        "--k", type=int, default=None, help="CE-FAM: channels deleted/masked at most (default: the checkpoint's)"
    )
    p.add_argument(
        "--fill", default=None, help="CE-FAM: masked-channel fill, spatial_mean or zero (default: the checkpoint's)"
    )
    p.add_argument(
        "--select-layers",
        default=None,
        metavar="auto|all|L1,L2",
        help="CE-FAM: layers a concept's layer is chosen from: auto (not a layer read only through global pooling, "
        "where every contribution is 0), all, or comma-separated names (default: the checkpoint's)",
    )
    p.add_argument(
        "--gradient",
        default=None,
        choices=GRADIENTS,
        help="CE-FAM: channel weights by the derivative through each layer's own pooled activations (direct) or "
        "through the whole rest of the classifier, as the authors' code (full) (default: the checkpoint's)",
    )
    p.add_argument(
        "--region-weights",
        default=None,
        choices=REGION_WEIGHTS,
        help="CE-FAM: which channel weights draw a region: all (signed, the authors') or the positive ones only "
        "(default: the checkpoint's)",
    )
    p.add_argument(
        "--relevance",
        default=None,
        choices=RELEVANCES,
        help="CE-FAM: how a concept's layer is chosen: the deletion curve of its probability (paper) or how well the "
        "layer's map keeps its score (map) (default: the checkpoint's)",
    )
    p.add_argument(
        "--contribution-layer",
        default=None,
        help="CE-FAM: where contributions are measured: the concept's region deleted from the image (image), its "
        "channels masked at its selected layer (selected, the authors'), at the last explained layer (last) or at a "
        "layer name (default: the checkpoint's)",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=tuple(PRESETS),
        help="CE-FAM: a named set of the rules above (paper: the authors' rules); a rule given as well wins",
    )


def channel_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The rule options and ``--preset`` as given (``None`` where left out), ``--select-layers`` parsed: the keyword
    arguments of :class:`~cefam_lightning.methods.base.ExplainSettings` / ``EvaluationSettings`` they fill."""
    values = {key: getattr(args, key) for key in (*RULE_KEYS, "preset")}
    values["select_layers"] = parse_select_layers(values["select_layers"])
    return values
