"""The HTML report opens in headless Chromium and its figure renders (non-blank screenshot).

Needs Debian's ``chromium`` (``make install`` installs it when run as root); skipped otherwise.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from llmppl.diagnostics import write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium; "
    "`make install` does it when run as root)")


def screenshot(html: Path, out: Path) -> np.ndarray:
    """Render ``html`` in headless Chromium at 1200x1600 and return the RGB screenshot in [0, 1]."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={out.parent / 'chromium-profile'}",
           f"--screenshot={out}", "--window-size=1200,1600", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.exists(), f"chromium wrote no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return mpimg.imread(out)[..., :3]


def colourful_fraction(img: np.ndarray) -> float:
    """Fraction of saturated pixels (max−min channel > 0.25) in the top 55% of the page, where the
    figure sits: its lines and bands are coloured, text is grey (the weight bars come further down)."""
    top = img[: int(0.55 * img.shape[0])]
    return float(((top.max(-1) - top.min(-1)) > 0.25).mean())


def test_report_renders_in_chromium(tmp_path):
    import llmppl as pp

    lm = pp.models.NGramLM(vocab_size=4, order=2, seed=4, concentration=1.0, eos_boost=0.5)
    smc = pp.SMC(n_particles=16, schedule=pp.schedules.Linear(alpha_from=1.0, steps=4))
    res = smc.run(pp.Target(lm, pp.Power(4.0)), [0], max_new_tokens=8, seed=11)
    report = write_report(res, tmp_path / "report.html")
    img = screenshot(report, tmp_path / "shot.png")
    assert img.shape[:2] == (1600, 1200)
    non_white = float((img.min(-1) < 0.95).mean())
    assert non_white > 0.05, f"page almost blank: {non_white:.3f} non-white"
    assert img.std() > 0.05
    with_figure = colourful_fraction(img)
    assert with_figure > 0.01, f"figure not rendered: {with_figure:.4f} coloured pixels"

    # control: the same page with a blank (white) figure of the same size has far fewer coloured pixels
    text = report.read_text()
    png = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    blank = io.BytesIO()
    mpimg.imsave(blank, np.ones_like(mpimg.imread(io.BytesIO(base64.b64decode(png)))), format="png")
    broken = tmp_path / "blank.html"
    broken.write_text(text.replace(png, base64.b64encode(blank.getvalue()).decode()))
    without = colourful_fraction(screenshot(broken, tmp_path / "blank.png"))
    print(f"coloured fraction: {with_figure:.4f} with the figure, {without:.4f} with a blank one")
    assert without < with_figure / 5, (without, with_figure)
