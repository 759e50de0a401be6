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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arviz_io import to_arviz
from .completions import distinct_completions
from .genealogy import coalescence_time, distinct_ancestors
from .plots import mh_convergence, plot

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


def _completions_table(result: Result, selected: int | None = None) -> str:
    """One row per distinct completion (identical particles merged, their weights summed)."""
    chosen = result.best_index() if selected is None else selected
    comps = distinct_completions(result)
    top = max((c.mass for c in comps), default=1.0) or 1.0
    head = ("<tr><th>mass</th><th>particles</th><th>log p</th><th>tokens</th>"
            "<th>end</th><th>text</th></tr>")
    rows = []
    for c in comps:
        text = c.text if c.text is not None else json.dumps(c.tokens)
        end = "truncated" if c.truncated else ("EOS" if c.finished else "")
        log_p = f"{c.log_p:.3f}" if c.log_p is not None else ""
        cls = " class='best'" if chosen in c.particles else ""
        who = ", ".join(str(i) for i in c.particles[:12]) + (" …" if c.count > 12 else "")
        rows.append(
            f"<tr{cls}><td class='num'>{c.mass:.4f} <span class='bar' style='width:{int(60 * c.mass / top)}px'>"
            f"</span></td><td class='num'>{c.count} ({who})</td><td class='num'>{log_p}</td>"
            f"<td class='num'>{len(c.tokens)}</td><td>{end}</td>"
            f"<td class='text'>{html.escape(text)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _human(key: str, value: Any) -> Any:
    """Byte counts as KiB / MiB / GiB, seconds with their unit."""
    if key.endswith("memory") and isinstance(value, (int, float)) and value >= 0:
        x = float(value)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if x < 1024 or unit == "GiB":
                return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
            x /= 1024
    if key == "wall_time" and isinstance(value, (int, float)):
        return f"{value:.2f} s"
    return value


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
        with warnings.catch_warnings():  # arviz warns on short traces; undefined values are said instead
            warnings.simplefilter("ignore")
            idata = to_arviz(result)
        for var in idata.posterior.data_vars:
            ess, rhat = mh_convergence(idata, var)
            out[f"{var} ess_bulk"] = f"{ess:.1f}" if ess is not None else "undefined (trace too short or constant)"
            out[f"{var} r_hat"] = (f"{rhat:.3f}" if rhat is not None
                                   else "undefined (needs 2+ chains with 4+ varying draws)")
    return out


def render_report(result: Result, title: str | None = None, prompt: str | None = None,
                  selected: int | None = None) -> str:
    """The report as an HTML string.  ``prompt``: the prompt text (default: the prompt's token ids);
    ``selected``: the particle the caller printed (highlighted; default ``result.best_index()``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        png = base64.b64encode(figure_png(result)).decode("ascii")
    title = title or f"llmppl report: {result.method}"
    shown = prompt if prompt is not None else f"(token ids) {result.prompt_ids}"
    stats = {k: _human(k, v) for k, v in result.stats.items()}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Prompt</h2>
<div class="summary">{html.escape(shown)}</div>
<div class="summary">{html.escape(result.summary())}</div>
<h2>Diagnostics</h2>
<img class="figure" alt="diagnostic figure" src="data:image/png;base64,{png}">
{_kv_table(_diagnostics(result))}
<h2>Completions (distinct, by summed weight; the selected one highlighted)</h2>
{_completions_table(result, selected)}
<h2>Statistics</h2>
{_kv_table(stats)}
<h2>Configuration</h2>
{_kv_table({**result.config, "seed": result.seed, "select": result.select, "prompt tokens": len(result.prompt_ids)})}
</body></html>
"""


def write_report(result: Result, path: str | Path, title: str | None = None, prompt: str | None = None,
                 selected: int | None = None) -> Path:
    """Write the self-contained HTML report of ``result`` to ``path``; returns the path (see
    :func:`render_report` for ``prompt`` and ``selected``)."""
    path = Path(path)
    path.write_text(render_report(result, title, prompt, selected), encoding="utf-8")
    return path
