"""Tables and images to experiment loggers: W&B (``log_table``, ``log_image``) and TensorBoard (a Markdown table
through ``add_text``, ``add_image``). The one place that knows how each logger takes them; the training callbacks
(with a file fallback) and the ``report`` command both send through here. wandb and tensorboard are imported only
by the loggers that use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from cefam_lightning.reporting.tables import markdown_table


def send_images(
    loggers: Sequence[Any],
    key: str,
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    step: int | None = None,
) -> list[str]:
    """Log ``H x W x 3`` uint8 ``images`` to every image-capable logger; returns ``"wandb:<key>"`` and
    ``"tensorboard:<key>/<i>"`` entries for what was sent (empty: no such logger)."""
    sent: list[str] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            kwargs = {"caption": list(captions)} if captions is not None else {}
            logger.log_image(key=key, images=list(images), step=step, **kwargs)
            sent.append(f"wandb:{key}")
        elif isinstance(logger, TensorBoardLogger):
            for i, img in enumerate(images):
                logger.experiment.add_image(f"{key}/{i}", img, global_step=step, dataformats="HWC")
                if captions is not None:
                    logger.experiment.add_text(f"{key}/{i}/caption", captions[i], global_step=step)
                sent.append(f"tensorboard:{key}/{i}")
    return sent


def send_table(
    loggers: Sequence[Any], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
) -> list[str]:
    """Log a table to every table-capable logger; returns ``"wandb:<key>"`` / ``"tensorboard:<key>"`` entries."""
    rows = [list(r) for r in rows]
    bad = [i for i, r in enumerate(rows) if len(r) != len(columns)]
    if bad:
        raise ValueError(f"row {bad[0]} of table {key!r} has {len(rows[bad[0]])} cells for {len(columns)} columns")
    sent: list[str] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=rows, step=step)
            sent.append(f"wandb:{key}")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
            sent.append(f"tensorboard:{key}")
    return sent
