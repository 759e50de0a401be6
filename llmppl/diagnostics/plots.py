"""One diagnostic figure per Result (matplotlib, Agg canvas, no pyplot state).

SMC: ESS per step with the resampling threshold ``κN`` and the resampling events,
the spread of ``log w_t^i − max_j log w_t^j``, the exponent schedule ``a_t`` and
the genealogy.  MH: ``log p`` traces (``az.plot_trace``) and acceptance per stage.
Other engines: the final weights and ``log p`` of the samples.  Which panels a
Result gets is looked up in ``FIGURES`` (first predicate that matches).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arviz_io import to_arviz
from .genealogy import genealogy

if TYPE_CHECKING:  # type hints only: the Result imports this package, not the other way round
    from ..inference.result import Result
    from matplotlib.figure import Figure


def _new_figure(rows: int, cols: int, title: str) -> tuple[Figure, np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: imported when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols), dtype=object).reshape(rows, cols)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------ SMC panels
def plot_ess(result: Result, ax) -> None:
    """ESS after reweighting, the threshold κN and the steps that resampled."""
    steps = result.steps
    if "ess" not in steps:
        return _empty(ax, "ESS")
    ess = np.asarray(steps["ess"], dtype=float)
    t = np.arange(len(ess))
    n = len(steps["log_weights"][0]) if steps.get("log_weights") else result.n
    ax.plot(t, ess, color="C0", lw=1.5, label="ESS")
    if "conditional_ess" in steps:
        ax.plot(t, np.asarray(steps["conditional_ess"], float), color="C2", lw=1, ls="--", label="conditional ESS")
    kappa = float(result.config.get("ess_threshold", 0.5))
    ax.axhline(kappa * n, color="C3", lw=1, ls=":", label=f"threshold κN = {kappa:g}·{n}")
    res = np.flatnonzero(np.asarray(steps.get("resampled", []), dtype=bool))
    if res.size:
        ax.plot(res, ess[res], "v", color="C3", ms=5, label=f"resampled ({res.size})")
    ax.set(xlabel="step t", ylabel="ESS", ylim=(0, n * 1.05), title="effective sample size")
    ax.legend(fontsize=7, loc="lower left")


def plot_log_weight_spread(result: Result, ax) -> None:
    """Quantiles of ``log w_t^i − max_j log w_t^j`` over particles, per step."""
    if not result.steps.get("log_weights"):
        return _empty(ax, "log-weights")
    lw = np.asarray(result.steps["log_weights"], dtype=float)
    lw = np.where(np.isfinite(lw), lw, np.nan)
    rel = lw - np.nanmax(lw, axis=1, keepdims=True)
    t = np.arange(len(rel))
    lo, q1, med, q3 = (np.nanquantile(rel, q, axis=1) for q in (0.0, 0.25, 0.5, 0.75))
    ax.fill_between(t, lo, 0, color="C1", alpha=0.2, lw=0, label="min–max")
    ax.fill_between(t, q1, q3, color="C1", alpha=0.45, lw=0, label="25–75%")
    ax.plot(t, med, color="C1", lw=1.2, label="median")
    ax.set(xlabel="step t", ylabel="log w − max log w", title="log-weight spread (before resampling)")
    ax.legend(fontsize=7, loc="lower left")


def plot_exponent(result: Result, ax) -> None:
    """The exponent schedule ``a_t`` (the bridge from ``a_0`` to ``α``)."""
    if "exponent" not in result.steps:
        return _empty(ax, "exponent schedule")
    a = np.asarray(result.steps["exponent"], dtype=float)
    ax.step(np.arange(len(a)), a, where="post", color="C4", lw=1.5)
    ax.set(xlabel="step t", ylabel="a_t", title="exponent schedule")
    ax.set_ylim(min(0.0, np.nanmin(a)), 1.08 * np.nanmax(a) + 0.05)


def plot_genealogy(result: Result, ax) -> None:
    """Every parent→child edge of the genealogy (grey) and the lineages of the final particles (blue)."""
    from matplotlib.collections import LineCollection

    try:
        g = genealogy(result)
    except ValueError:
        return _empty(ax, "genealogy")
    T, N = g.graph["n_steps"], g.graph["n_particles"]
    edges = np.asarray(list(g.edges), dtype=float)  # (E, 2 nodes, (t, i))
    alive = np.array([g.nodes[v]["survives"] and g.nodes[u]["survives"] for u, v in g.edges])
    ax.add_collection(LineCollection(edges[~alive], colors="0.8", linewidths=0.6))
    ax.add_collection(LineCollection(edges[alive], colors="C0", linewidths=1.0, alpha=0.8))
    w = result.weights if result.n == N else np.full(N, 1.0 / N)
    ax.scatter(np.full(N, T), np.arange(N), s=12 + 80 * w / w.max(), color="C3", zorder=3)
    roots = sum(1 for i in range(N) if g.nodes[(0, i)]["survives"])
    ax.set(xlim=(-0.5, T + 0.5), ylim=(-0.5, N - 0.5), xlabel="step t", ylabel="particle",
           title=f"genealogy: {roots} surviving root{'s' if roots != 1 else ''}; ● final (size ∝ weight)")


# ------------------------------------------------------------------- MH panels
def plot_mh(result: Result, fig: Figure, axes: np.ndarray) -> None:
    import arviz as az

    idata = to_arviz(result)
    var = "log_p" if "log_p" in idata.posterior else list(idata.posterior.data_vars)[0]
    az.plot_trace(idata, var_names=[var], axes=axes[:1, :], compact=False, show=False)
    ax = axes[1, 0]
    if "acceptance" in idata.sample_stats:
        acc = idata.sample_stats["acceptance"].values
        for c in range(acc.shape[0]):
            ax.plot(np.arange(acc.shape[1]), acc[c], "o-", ms=3, lw=1, label=f"chain {c}")
        ax.set(xlabel="stage k", ylabel="acceptance rate", ylim=(-0.05, 1.05), title="MH acceptance per stage")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "acceptance")
    ax = axes[1, 1]
    ess, rhat = mh_convergence(idata, var)
    with warnings.catch_warnings():   # arviz warns on short or constant traces; the title says it instead
        warnings.simplefilter("ignore")
        az.plot_autocorr(idata, var_names=[var], combined=True, ax=ax, show=False)
    parts = [f"ESS={ess:.1f}" if ess is not None else "ESS: trace too short or constant",
             f"R-hat={rhat:.2f}" if rhat is not None else "R-hat: needs 2 chains with 4+ varying draws"]
    ax.set(xlabel="lag (MH steps)", title=f"autocorrelation of {var}  ({', '.join(parts)})")


def mh_convergence(idata: Any, var: str) -> tuple[float | None, float | None]:
    """Bulk ESS and R-hat of ``var``, or None where they are undefined (fewer than 4 draws, a
    constant trace, one chain for R-hat): arviz would return NaN with shape warnings."""
    import arviz as az

    values = np.asarray(idata.posterior[var].values, dtype=float)
    chains, draws = values.shape[:2]
    if draws < 4 or not np.isfinite(values).all() or np.ptp(values) == 0:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = float(az.ess(idata, var_names=[var])[var].values)
        rhat = float(az.rhat(idata, var_names=[var])[var].values) if chains > 1 else None
    return (ess if np.isfinite(ess) else None), (rhat if rhat is not None and np.isfinite(rhat) else None)


def plot_samples(result: Result, fig: Figure, axes: np.ndarray) -> None:
    ax = axes[0, 0]
    w = result.weights
    ax.bar(np.arange(result.n), w, color="C0")
    ax.set(xlabel="sample", ylabel="normalised weight", title="final weights")
    ax = axes[0, 1]
    if result.log_p:
        ax.hist(np.asarray(result.log_p, float), weights=w, bins=max(3, min(20, result.n)), color="C1", alpha=0.7)
        ax.set(xlabel="log p(y|x)", ylabel="weight", title="log p of the samples (weighted)")
    else:
        _empty(ax, "log p")


def _plot_smc(result: Result, fig: Figure, axes: np.ndarray) -> None:
    for panel, ax in zip((plot_ess, plot_log_weight_spread, plot_exponent, plot_genealogy), axes.flat):
        panel(result, ax)


#: (predicate, (rows, cols), draw) — the first matching entry draws the figure
FIGURES: list[tuple[Callable[[Result], bool], tuple[int, int], Callable[[Result, Figure, np.ndarray], None]]] = [
    (lambda r: bool(r.chains), (2, 2), plot_mh),
    (lambda r: "ess" in r.steps or "ancestors" in r.steps, (2, 2), _plot_smc),
    (lambda r: True, (1, 2), plot_samples),
]


def plot(result: Result, path: str | Path | None = None, dpi: int = 110) -> Figure:
    """The diagnostic figure of ``result``; saved to ``path`` (format from the suffix) when given."""
    for applies, (rows, cols), draw in FIGURES:
        if applies(result):
            fig, axes = _new_figure(rows, cols, result.summary())
            draw(result, fig, axes)
            break
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
