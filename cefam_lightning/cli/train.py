"""``python train.py [--config FILE] [key=value ...]``: train any registered explainer (see ``configs/default.yaml``;
with no arguments, the shapes-world demo). The run itself is :func:`cefam_lightning.training.run.run`.

A bad config, file or setting ends with one ``error: ...`` line and exit status 2 (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from cefam_lightning.cli.options import add_debug_option
from cefam_lightning.errors import cli_errors
from cefam_lightning.training.config import load_config
from cefam_lightning.training.run import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML merged on top of configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    add_debug_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: load the config (default, method section, ``--config``, overrides) and run it."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli_errors(args.debug, extra=(MisconfigurationException,)):
        cfg = load_config(args.config, args.overrides)
        return run(cfg)


if __name__ == "__main__":
    main()
