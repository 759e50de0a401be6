"""Particle ancestry of an SMC run.

Levels ``t = 0..T-1`` are the particles after step ``t``'s extension and
reweighting; level ``T`` holds the returned (final) particles.  ``steps["ancestors"][t][j]``
is the parent at level ``t`` of particle ``j`` at level ``t + 1`` (the identity when
step ``t`` did not resample).  Path degeneracy: tracing the final particles back,
the number of distinct ancestors per level falls towards 1; the coalescence time is
the number of levels back to their most recent common ancestor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

if TYPE_CHECKING:  # type hints only: the Result imports this package, not the other way round
    from ..inference.result import Result


def _ancestors(result: Result) -> np.ndarray:
    """``(T, N)`` array of ancestor indices; ValueError if the run recorded none."""
    anc = result.steps.get("ancestors")
    if not anc:
        raise ValueError(f"{result.method} result has no steps['ancestors']: no genealogy to build")
    arr = np.asarray(anc, dtype=np.int64)
    if arr.ndim != 2 or (arr < 0).any() or (arr >= arr.shape[1]).any():
        raise ValueError(f"steps['ancestors'] must be T lists of N indices in [0, N), got shape {arr.shape}")
    return arr


def genealogy(result: Result) -> nx.DiGraph:
    """``DiGraph`` with nodes ``(t, i)`` and edges ``(t, ancestors[t][j]) → (t+1, j)``.

    Node attributes: ``log_weight`` (``steps["log_weights"][t][i]`` before resampling;
    the final log-weight at level ``T``), ``resampled`` (whether step ``t`` resampled)
    and ``survives`` (an ancestor of some final particle).
    """
    anc = _ancestors(result)
    T, N = anc.shape
    log_w = result.steps.get("log_weights") or [[np.nan] * N] * T
    resampled = result.steps.get("resampled") or [bool((a != np.arange(N)).any()) for a in anc]
    lineage = _lineages(anc)
    g = nx.DiGraph(method=result.method, n_particles=N, n_steps=T)
    for t in range(T):
        alive = set(lineage[t].tolist())
        g.add_nodes_from(((t, i), {"log_weight": float(log_w[t][i]), "resampled": bool(resampled[t]),
                                   "survives": i in alive}) for i in range(N))
    final_w = result.log_weights if len(result.log_weights) == N else [np.nan] * N
    g.add_nodes_from(((T, i), {"log_weight": float(final_w[i]), "resampled": False, "survives": True})
                     for i in range(N))
    g.add_edges_from(((t, int(anc[t, j])), (t + 1, j)) for t in range(T) for j in range(N))
    return g


def _lineages(anc: np.ndarray) -> np.ndarray:
    """``(T+1, N)``: row ``t`` = the level-``t`` ancestor of each final particle (row T = identity)."""
    T, N = anc.shape
    out = np.empty((T + 1, N), dtype=np.int64)
    out[T] = np.arange(N)
    for t in range(T - 1, -1, -1):
        out[t] = anc[t, out[t + 1]]
    return out


def distinct_ancestors(result: Result) -> list[int]:
    """Number of distinct level-``t`` ancestors of the final particles, ``t = 0..T`` (path degeneracy)."""
    return [len(np.unique(row)) for row in _lineages(_ancestors(result))]


def coalescence_time(result: Result) -> int | None:
    """Levels back from the final particles to their most recent common ancestor; None if none exists."""
    counts = distinct_ancestors(result)
    T = len(counts) - 1
    single = [t for t, c in enumerate(counts) if c == 1]
    return T - max(single) if single else None
