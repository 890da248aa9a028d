"""``report.html`` in a real browser: headless Chromium opens the self-contained page offline and draws its figures
(docs/report.md#checking-the-page-in-a-browser). Skipped where no Chromium is installed."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from cefam_lightning.reporting.concept_report import ConceptTally, ReportSettings, add_missing, error_pairs
from cefam_lightning.reporting.report_pages import write_report
from tests.test_report import CLASSES, CONCEPTS, _batch, _evidence

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _report(figures: bool) -> tuple[dict, dict]:
    tally = ConceptTally(CLASSES, CONCEPTS, typical=2)
    ev = _evidence([0, 0, 1, 1], [[0, 1], [0, 1], [0, 2], [2, 1]], [[0.5, 0.3], [0.4, 0.2], [0.5, 0.3], [0.2, -0.1]])
    tally.update(_batch([0, 0, 1, 0]), ev, _evidence([0], [[2, 1]], [[0.1, 0.2]]))
    settings = ReportSettings(figure_concepts=2 if figures else 0)
    classes = [tally.class_rows(k, 3, settings.rank) for k in range(2)]
    add_missing(tally.errors, classes)
    report = {
        "method": "cefam",
        "data": "hand-made",
        "images": 4,
        "labeled": 4,
        "accuracy": 0.75,
        "skipped": {"count": 0, "images": []},
        "settings": vars(settings),
        "contribution": "mean contribution per image",
        "classes": classes,
        "matrix": {"concepts": CONCEPTS if figures else [], "classes": CLASSES, "values": tally.matrix().tolist()},
        "errors": {"count": 1, "pairs": error_pairs(tally.errors), "items": tally.errors},
        "findings": ["class cat: 'whiskers' leads"],
    }
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    pictures = {
        "examples": [],
        "errors": tally.errors if figures else [],
        "images": {p: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for p in range(4)},
        "maps": {(p, c): np.exp(-((yy - 16) ** 2 + (xx - 8 * p) ** 2) / 40.0) for p in range(4) for c in CONCEPTS},
    }
    return report, pictures


def _colored_pixels(path) -> int:
    """Pixels of strong color (the heat maps' reds and blues, the overlays' jet), which plain text and the page's
    pale backgrounds do not have."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((np.abs(a[..., 0] - a[..., 2]) > 120) & (a.max(axis=2) - a.min(axis=2) > 120)).sum())


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_html_draws_its_figures_in_headless_chromium(tmp_path):
    shots = {}
    for figures in (True, False):
        out = tmp_path / f"report-{figures}"
        write_report(out, *_report(figures))
        shot = tmp_path / f"shot-{figures}.png"
        cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,3000"]
        subprocess.run([*cmd, f"--screenshot={shot}", (out / "report.html").as_uri()], timeout=120, capture_output=True)
        assert shot.is_file(), "Chromium wrote no screenshot"
        shots[figures] = _colored_pixels(shot)
    # The same page without figures has hardly any strongly colored pixel; with them, the heat map and the
    # overlays are drawn (a figure that failed to decode would leave a broken-image icon instead).
    assert shots[True] > 20 * max(shots[False], 100)
