"""The HTML report opens in headless Chromium and its figure renders (non-blank screenshot).

Needs Debian's ``chromium`` (``make install`` installs it when run as root); skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmppl.diagnostics import write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium; "
    "`make install` does it when run as root)")


def screenshot(html: Path, out: Path) -> np.ndarray:
    """Render ``html`` in headless Chromium at 1200x1600 and return the RGB screenshot in [0, 1]."""
    import matplotlib.image as mpimg

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={out.parent / 'chromium-profile'}",
           f"--screenshot={out}", "--window-size=1200,1600", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.exists(), f"chromium wrote no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return mpimg.imread(out)[..., :3]


def colourful_fraction(img: np.ndarray) -> float:
    """Fraction of saturated pixels (max−min channel > 0.25): the figure's lines and bands; text is grey."""
    return float(((img.max(-1) - img.min(-1)) > 0.25).mean())


def test_report_renders_in_chromium(tmp_path):
    from test_diagnostics import synthetic_smc

    report = write_report(synthetic_smc(T=20, N=8), tmp_path / "report.html")
    img = screenshot(report, tmp_path / "shot.png")
    assert img.shape[:2] == (1600, 1200)
    non_white = float((img.min(-1) < 0.95).mean())
    assert non_white > 0.05, f"page almost blank: {non_white:.3f} non-white"
    assert img.std() > 0.05
    with_figure = colourful_fraction(img)
    assert with_figure > 0.01, f"figure not rendered: {with_figure:.4f} coloured pixels"

    # control: the same page with the image removed has (almost) no coloured pixels
    text = report.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', text))
    without = colourful_fraction(screenshot(broken, tmp_path / "broken.png"))
    print(f"coloured fraction: {with_figure:.4f} with the figure, {without:.4f} without")
    assert without < with_figure / 5, (without, with_figure)
