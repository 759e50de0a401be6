"""A self-contained HTML report of one run: summary, figure (inline PNG), particles, stats.

``write_report(result, path)`` is what ``llmppl sample --report out.html`` calls.  The
file has no external resources (the figure is a base64 ``data:`` URI), so it can be
mailed or attached to a CI run as is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arviz_io import to_arviz
from .genealogy import coalescence_time, distinct_ancestors
from .plots import plot

if TYPE_CHECKING:  # type hints only: the Result imports this package, not the other way round
    from ..inference.result import Result

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1180px; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.summary { font-family: monospace; background: #f4f4f4; padding: 8px; white-space: pre-wrap; }
img.figure { width: 100%; max-width: 1150px; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-family: monospace; }
td.text { white-space: pre-wrap; font-family: monospace; max-width: 760px; }
tr.best { background: #fff4d6; }
.bar { display: inline-block; height: 9px; background: #1f77b4; }
"""


def figure_png(result: Result, dpi: int = 100) -> bytes:
    """``Result.plot()`` rendered to PNG bytes."""

    buf = io.BytesIO()
    plot(result).savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (dict, list)):
        return json.dumps(x, default=repr)
    return str(x)


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in d.items())
    return f"<table>{rows}</table>"


def _particles_table(result: Result) -> str:
    w = result.weights
    best = result.best_index()
    order = np.argsort(-w, kind="stable")
    head = ("<tr><th>#</th><th>weight</th><th>log w</th><th>log p</th><th>tokens</th>"
            "<th>end</th><th>text</th></tr>")
    rows = []
    for i in order:
        text = result.texts[i] if result.texts and result.texts[i] is not None else json.dumps(result.samples[i])
        end = "truncated" if result.truncated and result.truncated[i] else (
            "EOS" if result.finished and result.finished[i] else "")
        log_p = f"{result.log_p[i]:.3f}" if result.log_p else ""
        cls = " class='best'" if i == best else ""
        rows.append(
            f"<tr{cls}><td class='num'>{i}</td>"
            f"<td class='num'>{w[i]:.4f} <span class='bar' style='width:{int(60 * w[i] / w.max())}px'></span></td>"
            f"<td class='num'>{result.log_weights[i]:.3f}</td><td class='num'>{log_p}</td>"
            f"<td class='num'>{len(result.samples[i])}</td><td>{end}</td>"
            f"<td class='text'>{html.escape(text)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _diagnostics(result: Result) -> dict[str, Any]:
    """Genealogy (SMC) or arviz convergence numbers (MH) for the report."""
    out: dict[str, Any] = {"final ESS": result.final_ess}
    if result.log_evidence is not None:
        out["log Ẑ"] = result.log_evidence
    if result.steps.get("ancestors"):
        out["steps"] = len(result.steps["ancestors"])
        out["resampling events"] = int(sum(bool(r) for r in result.steps.get("resampled", [])))
        out["distinct ancestors at step 0"] = distinct_ancestors(result)[0]
        out["coalescence time (steps back to the MRCA)"] = coalescence_time(result)
    if result.chains:
        import arviz as az

        summ = az.summary(to_arviz(result), kind="diagnostics")
        for var, row in summ.iterrows():
            for col in ("ess_bulk", "r_hat"):
                if col in row and np.isfinite(row[col]):
                    out[f"{var} {col}"] = float(row[col])
    return out


def render_report(result: Result, title: str | None = None) -> str:
    """The report as an HTML string."""
    png = base64.b64encode(figure_png(result)).decode("ascii")
    title = title or f"llmppl report: {result.method}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="summary">{html.escape(result.summary())}</div>
<h2>Diagnostics</h2>
<img class="figure" alt="diagnostic figure" src="data:image/png;base64,{png}">
{_kv_table(_diagnostics(result))}
<h2>Particles (sorted by weight; the selected one highlighted)</h2>
{_particles_table(result)}
<h2>Statistics</h2>
{_kv_table(result.stats)}
<h2>Configuration</h2>
{_kv_table({**result.config, "seed": result.seed, "select": result.select, "prompt tokens": len(result.prompt_ids)})}
</body></html>
"""


def write_report(result: Result, path: str | Path, title: str | None = None) -> Path:
    """Write the self-contained HTML report of ``result`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_report(result, title), encoding="utf-8")
    return path
