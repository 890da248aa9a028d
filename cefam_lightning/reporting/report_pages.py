"""A dataset report's files (docs/report.md): ``report.json``, ``report.md``, PNG figures and one self-contained
``report.html`` (its figures inlined as data URIs, no script, no file or address outside it), written atomically
as one folder; and the same tables and figures sent to W&B or TensorBoard loggers.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cefam_lightning.io_utils import atomic_dir, atomic_write_json
from cefam_lightning.reporting.figures import new_figure, overlay, to_png
from cefam_lightning.reporting.tables import markdown_table

MAX_HEATMAP = 40  # concepts and classes drawn in the heat map at most (the strongest concepts, the largest classes)

CLASS_COLUMNS = [
    "rank",
    "concept",
    "mean",
    "95 % interval",
    "share of +",
    "specificity",
    "explained",
    "present",
    "detected",
]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f} %"


def class_table_rows(entry: dict[str, Any], sign: str) -> list[list[Any]]:
    """The rows of one class's ``positive`` or ``negative`` concept table."""
    return [
        [
            i,
            c["concept"],
            f"{c['mean']:.4g}",
            f"[{c['ci95'][0]:.3g}, {c['ci95'][1]:.3g}]",
            _pct(c["share_of_positive"]) if sign == "positive" else "",
            "" if c.get("specificity") is None else f"{100 * c['specificity']:+.0f} pts",
            f"{c['explained']} ({_pct(c['explained_rate'])})",
            _pct(c["present_rate"]),
            _pct(c["detected_rate"]),
        ]
        for i, c in enumerate(entry[sign], start=1)
    ]


def error_rows(errors: Sequence[dict[str, Any]]) -> list[list[Any]]:
    def names(items: Sequence[dict[str, Any]] | None) -> str:
        return ", ".join(f"{c['concept']} ({c['contribution']:.3g})" for c in items or [])

    return [
        [
            e["id"],
            e["true"],
            e["predicted"],
            names(e.get("toward_predicted")),
            names(e.get("toward_true")),
            ", ".join(e.get("missing_for_true", [])),
        ]
        for e in errors
    ]


PAIR_COLUMNS = ["true", "predicted", "images", "concepts pushing toward predicted"]


def pair_rows(pairs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The rows of the (true, predicted) error-pair table."""
    return [
        [
            p["true"],
            p["predicted"],
            p["count"],
            ", ".join(f"{c['concept']} ({_pct(c['share'])})" for c in p["concepts"]),
        ]
        for p in pairs
    ]


def report_title(report: dict[str, Any]) -> str:
    return f"Concept report: {report['method']} on {report['data']}"


def summary_line(report: dict[str, Any]) -> str:
    """The report's first sentence: images, labels and accuracy, skipped images, what a contribution is."""
    acc = report["accuracy"]
    return (
        f"{report['images']} images"
        + (f", {report['labeled']} labeled, accuracy {100 * acc:.1f} %" if acc is not None else "")
        + (f", {report['skipped']['count']} unreadable images skipped" if report["skipped"]["count"] else "")
        + f". Contributions: {report['contribution']}."
    )


def class_heading(entry: dict[str, Any]) -> str:
    acc = "" if entry["accuracy"] is None else f", accuracy {100 * entry['accuracy']:.1f} %"
    return f"{entry['class']} ({entry['images']} images predicted{acc})"


ERROR_COLUMNS = ["image", "true", "predicted", "pushed toward predicted", "spoke for true", "true class lacked"]


# ---------------------------------------------------------------------------------------------- figures
def heatmap_png(report: dict[str, Any]) -> bytes | None:
    """The concept x class matrix of mean contributions, diverging around 0 (``None``: no concepts)."""
    m = report["matrix"]
    if not m["concepts"]:
        return None
    values = np.array(m["values"], dtype=np.float64)  # (concepts, classes)
    images = np.array([row["images"] for row in report["classes"]])
    classes = np.argsort(-images, kind="stable")[:MAX_HEATMAP]
    classes = np.sort(classes)
    strength = np.nan_to_num(np.abs(values[:, classes])).max(axis=1)
    concepts = np.sort(np.argsort(-strength, kind="stable")[:MAX_HEATMAP])
    v = values[np.ix_(concepts, classes)]
    peak = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
    peak = peak if peak > 0 else 1.0
    fig, axes = new_figure(1, per_row=1, panel_size=(1.6 + 0.42 * len(classes), 1.4 + 0.3 * len(concepts)))
    ax = axes[0]
    im = ax.imshow(np.ma.masked_invalid(v), cmap="RdBu_r", vmin=-peak, vmax=peak, aspect="auto")
    ax.set_xticks(range(len(classes)), [m["classes"][k] for k in classes], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(concepts)), [m["concepts"][c] for c in concepts], fontsize=8)
    if len(classes) * len(concepts) <= 400:
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2g}", ha="center", va="center", fontsize=6)
    ax.set_title("mean contribution to the predicted class, per image", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return to_png(fig)


def examples_png(entry: dict[str, Any], pictures: dict[str, Any], concepts: int) -> bytes | None:
    """One class's example grid: a row per top positive concept, its typical images with its region."""
    rows = [c for c in entry["positive"][:concepts] if c["typical"]]
    if not rows:
        return None
    ncols = max(len(c["typical"]) for c in rows)
    fig, axes = new_figure(len(rows) * ncols, per_row=ncols, panel_size=(1.9, 2.05))
    for r, c in enumerate(rows):
        for j in range(ncols):
            ax = axes[r * ncols + j]
            if j >= len(c["typical"]):
                ax.set_visible(False)
                continue
            t = c["typical"][j]
            image = pictures["images"][t["position"]] / 255.0
            overlay(ax, image, pictures["maps"][(t["position"], c["concept"])].astype(np.float32), "", fontsize=7)
            ax.set_title(f"{c['concept']}: {t['contribution']:.3g}", fontsize=7)
    fig.suptitle(f"class {entry['class']}: images where its top concepts contributed most", fontsize=9)
    return to_png(fig)


def errors_png(pictures: dict[str, Any]) -> bytes | None:
    """Misclassified images: the image, the region of the top concept toward the predicted class and that of the
    top concept for the true class (class maps of both, for a class-map method)."""
    errors = pictures["errors"]
    if not errors:
        return None
    fig, axes = new_figure(3 * len(errors), per_row=3, panel_size=(2.0, 2.15))
    for i, e in enumerate(errors):
        p = e["position"]
        image = pictures["images"][p] / 255.0
        ax = axes[3 * i]
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{e['id']}\ntrue {e['true']}, predicted {e['predicted']}", fontsize=6)
        for j, (side, cls) in enumerate((("toward_predicted", e["predicted"]), ("toward_true", e["true"]))):
            ax = axes[3 * i + 1 + j]
            if side in e or "explained" in e:
                items = e.get(side) or []
                if items and (p, items[0]["concept"]) in pictures["maps"]:
                    m = pictures["maps"][(p, items[0]["concept"])].astype(np.float32)
                    overlay(ax, image, m, f"'{items[0]['concept']}' for {cls}", fontsize=6)
                else:
                    ax.imshow(image)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_title(f"no concept for {cls}", fontsize=6)
            else:
                key = "predicted" if j == 0 else "true"
                overlay(ax, image, pictures["maps"][(p, key)].astype(np.float32), f"class map of {cls}", fontsize=6)
    return to_png(fig)


def report_figures(report: dict[str, Any], pictures: dict[str, Any]) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of every figure of the report."""
    figures: dict[str, bytes] = {}
    heat = heatmap_png(report)
    if heat is not None:
        figures["heatmap.png"] = heat
    concepts = report["settings"]["figure_concepts"]
    for k, entry in enumerate(report["classes"]):
        png = examples_png(entry, pictures, concepts) if concepts else None
        if png is not None:
            figures[f"class_{k:03d}.png"] = png
    errs = errors_png(pictures)
    if errs is not None:
        figures["errors.png"] = errs
    return figures


# ---------------------------------------------------------------------------------------------- pages
def report_markdown(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    lines = [f"# {report_title(report)}", "", summary_line(report), ""]
    if report["findings"]:
        lines += ["## Findings", ""] + [f"- {f}" for f in report["findings"]] + [""]
    if "heatmap.png" in figures:
        lines += ["## Concept x class", "", "![concept x class](figures/heatmap.png)", ""]
    lines += ["## Classes", ""]
    for k, entry in enumerate(report["classes"]):
        lines += [f"### {class_heading(entry)}", ""]
        for sign in ("positive", "negative"):
            if entry[sign]:
                lines += [markdown_table(CLASS_COLUMNS, class_table_rows(entry, sign), title=f"**{sign}**"), ""]
        name = f"class_{k:03d}.png"
        if name in figures:
            lines += [f"![examples of {entry['class']}](figures/{name})", ""]
    errors = report["errors"]
    lines += [f"## Misclassified images ({errors['count']})", ""]
    if errors["pairs"]:
        lines += [markdown_table(PAIR_COLUMNS, pair_rows(errors["pairs"])), ""]
    if errors["items"]:
        lines += [markdown_table(ERROR_COLUMNS, error_rows(errors["items"][:100])), ""]
    if "errors.png" in figures:
        lines += ["![misclassified images](figures/errors.png)", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left}th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
.finding{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.3em 0}
.meta{color:#555}
"""


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def report_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One self-contained page: styles inline, figures as data URIs, nothing fetched."""
    title = report_title(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(summary_line(report))}</p>',
    ]
    if report["findings"]:
        parts.append("<h2>Findings</h2>")
        parts += [f'<div class="finding">{html.escape(f)}</div>' for f in report["findings"]]
    if "heatmap.png" in figures:
        parts += ["<h2>Concept x class</h2>", _img(figures["heatmap.png"], "concept x class heat map")]
    parts.append("<h2>Classes</h2>")
    for k, entry in enumerate(report["classes"]):
        parts.append(f"<h3>{html.escape(class_heading(entry))}</h3>")
        for sign in ("positive", "negative"):
            if entry[sign]:
                parts += [f"<p><b>{sign}</b></p>", _html_table(CLASS_COLUMNS, class_table_rows(entry, sign))]
        name = f"class_{k:03d}.png"
        if name in figures:
            parts.append(_img(figures[name], f"examples of {entry['class']}"))
    errors = report["errors"]
    parts.append(f"<h2>Misclassified images ({errors['count']})</h2>")
    if errors["pairs"]:
        parts.append(_html_table(PAIR_COLUMNS, pair_rows(errors["pairs"])))
    if errors["items"]:
        parts.append(_html_table(ERROR_COLUMNS, error_rows(errors["items"][:100])))
    if "errors.png" in figures:
        parts.append(_img(figures["errors.png"], "misclassified images"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any], pictures: dict[str, Any]) -> dict[str, bytes]:
    """Write the report folder as one step (a folder built aside and moved into place: an interrupted run leaves
    no half-written report and an earlier report at ``out_dir`` untouched); returns the figures written."""
    figures = report_figures(report, pictures)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report, figures), encoding="utf-8")
        (tmp / "report.html").write_text(report_html(report, figures), encoding="utf-8")
        (tmp / "figures").mkdir()
        for name, png in figures.items():
            (tmp / "figures" / name).write_bytes(png)
    return figures


def log_report(
    loggers: Sequence[Any],
    report: dict[str, Any],
    figures: dict[str, bytes],
    key: str = "report",
    step: int | None = None,
) -> list[str]:
    """Send the report's class tables, error table and figures to W&B / TensorBoard ``loggers`` (at ``step``,
    e.g. a training run's last global step; default the logger's own); returns what was sent
    (:func:`~cefam_lightning.reporting.logged.send_table`)."""
    from PIL import Image

    from cefam_lightning.reporting.logged import send_images, send_table

    sent: list[str] = []
    rows = []
    for entry in report["classes"]:
        for sign in ("positive", "negative"):
            for r in class_table_rows(entry, sign):
                rows.append([entry["class"], sign, *r])
    sent += send_table(loggers, f"{key}/classes", ["class", "sign", *CLASS_COLUMNS], rows, step)
    if report["errors"]["items"]:
        sent += send_table(loggers, f"{key}/errors", ERROR_COLUMNS, error_rows(report["errors"]["items"]), step)
    if report["findings"]:
        sent += send_table(loggers, f"{key}/findings", ["finding"], [[f] for f in report["findings"]], step)
    for name, png in figures.items():
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        sent += send_images(loggers, f"{key}/{Path(name).stem}", [image], step=step)
    return sent
