"""Figures of explanations: one overlay renderer, bar charts and panel grids, drawn without pyplot state.

Every figure here is a standalone matplotlib ``Figure`` on an Agg canvas (no display, no global state), so the
CLIs and the training callbacks draw the same way in any process. :func:`overlay` is the one way a map is drawn
on an image: ``jet`` at half opacity, each map normalized to its own maximum (negative values shown as 0), the
ground-truth mask outlined in white where one is given.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def new_figure(panels: int, per_row: int = 5, panel_size: tuple[float, float] = (2.8, 2.9)) -> tuple[Any, Any]:
    """A standalone Agg figure with ``panels`` axes, at most ``per_row`` per row, rows as even as they can be."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(panels / per_row)
    ncols = math.ceil(panels / nrows)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


def _bare(ax: Any, title: str, fontsize: float) -> None:
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def image_panel(ax: Any, img: np.ndarray, title: str, fontsize: float = 8) -> None:
    """The image itself (``H x W x 3`` in ``[0, 1]``), titled."""
    ax.imshow(np.clip(img, 0.0, 1.0))
    _bare(ax, title, fontsize)


def overlay(
    ax: Any,
    img: np.ndarray,
    region: np.ndarray,
    title: str,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    fontsize: float = 8,
) -> None:
    """``region`` (``H x W``) over the image in ``jet``, normalized to its own maximum (negative values as 0), with
    ``mask``'s outline in white when it is neither empty nor full."""
    region = np.clip(np.asarray(region, dtype=np.float32), 0.0, None)
    peak = float(region.max()) if region.size else 0.0
    ax.imshow(np.clip(img, 0.0, 1.0))
    ax.imshow(region / peak if peak > 0 else region, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.0)
    _bare(ax, title, fontsize)


def bars(ax: Any, labels: Sequence[str], values: Sequence[float | None], title: str, fmt: str = "%.3g") -> None:
    """Horizontal bars, top to bottom, negative ones in red beside a zero line (``None`` drawn as 0)."""
    from matplotlib.ticker import MaxNLocator

    values = [v if v is not None else 0.0 for v in values]
    ypos = np.arange(len(values))
    drawn = ax.barh(ypos, values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.bar_label(drawn, fmt=fmt, fontsize=6, padding=2)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ypos, list(labels), fontsize=7)
    ax.invert_yaxis()
    lo, hi = min(0.0, *values), max(0.0, *values)
    pad = 0.25 * (hi - lo) if hi > lo else 0.05  # room for the value labels
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8)


def to_png(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


def to_array(fig: Any) -> np.ndarray:
    """The figure rendered to an ``H x W x 3`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def tensor_image(image: Any) -> np.ndarray:
    """A ``(3, H, W)`` tensor in ``[0, 1]`` as an ``H x W x 3`` array."""
    return image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()


def render_region_maps(
    image: np.ndarray,
    regions: np.ndarray,
    titles: Sequence[str],
    masks: np.ndarray | None = None,
    heading: str = "",
    panel_size: int = 160,
    dpi: int = 100,
) -> np.ndarray:
    """One row of panels, as an ``H x W x 3`` uint8 array: the image, then one :func:`overlay` per map.

    Args:
        image: ``H x W x 3`` float in ``[0, 1]``.
        regions: ``N x H x W`` maps.
        titles: one title per map.
        masks: ``N x H x W`` bool masks outlined on their maps; ``None``: none.
        heading: the image panel's title.
        panel_size: pixels per panel (the figure is ``(N + 1) * panel_size`` wide, ``1.25 * panel_size`` high).
        dpi: resolution of the rendering.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = regions.shape[0]
    fig = Figure(figsize=((n + 1) * panel_size / dpi, 1.25 * panel_size / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    image_panel(axes[0], image, heading, fontsize=6)
    for j in range(n):
        overlay(axes[j + 1], image, regions[j], titles[j], None if masks is None else masks[j], fontsize=6)
    return to_array(fig)
