"""Twist diagnostics of a twisted SMC run (PRM-guided SMC, ``RewardTilt(..., process_reward=V)``).

* :func:`twist_trace`: the per-step twist values ``log ψ_t`` of every particle
  (``Result.steps["twist"]``), optionally followed back along the final particles'
  ancestries (:func:`lineages`).
* :func:`untwist_shift`: how much the final untwist moved the weights.  A particle
  that ends swaps its last twist ``ψ`` for the terminal potential ``φ``, an increment
  ``u_i = log φ_complete(y_i) − log ψ_removed(y_i)`` (``Result.steps["untwist"]``).
  At each step, ``TV(W^ψ, W) = ½ Σ_i |W^ψ_i − W_i|`` between the normalised weights with
  (``W``) and without (``W^ψ ∝ W e^{−u}``) those increments, combined over steps as
  ``1 − Π_t (1 − TV_t)``.  0 means
  the twists predicted the terminal values perfectly (up to a constant); near 1 means
  the final reweighting overturned what the twists had selected.
* :func:`untwist_increments`: ``u_i`` of the final particles, summed along their
  ancestries, or recomputed from the target for token-level steps (a particle ending
  at step ``t`` had its twist evaluated on ``y`` without EOS, or without the cut token).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _require(result: Any, key: str) -> list:
    if key not in result.steps:
        raise ValueError(f"the result has no steps[{key!r}] trace (method {result.method!r}); "
                         "twist diagnostics need a twisted SMC run")
    return result.steps[key]


def lineages(result: Any) -> np.ndarray:
    """``(T, N)`` ints: row of final particle ``i``'s ancestor at step ``t`` (before that step's resampling)."""
    anc = np.asarray(_require(result, "ancestors"), dtype=np.int64)
    T, N = anc.shape
    out = np.empty((T, N), dtype=np.int64)
    row = np.arange(N)
    for t in range(T - 1, -1, -1):
        row = anc[t][row]
        out[t] = row
    return out


def twist_trace(result: Any, along_lineages: bool = False) -> np.ndarray:
    """``(T, N)`` float64 twist values ``log ψ_t`` per step and particle (0 once a particle ended).

    ``along_lineages``: column ``i`` follows the ancestors of final particle ``i``.
    """
    tw = np.asarray(_require(result, "twist"), dtype=np.float64)
    if not along_lineages:
        return tw
    lin = lineages(result)
    return np.take_along_axis(tw, lin[: len(tw)], axis=1)


def untwist_increments(result: Any, target: Any = None) -> np.ndarray:
    """``(N,)`` ``u_i = log φ_complete(y_i) − log ψ_removed(y_i)`` of the final particles.

    From ``steps["untwist"]`` when recorded, else recomputed with ``target`` (token steps only).
    """
    if "untwist" in result.steps:
        un = np.asarray(result.steps["untwist"], dtype=np.float64)
        lin = lineages(result)
        return np.take_along_axis(un, lin[: len(un)], axis=1).sum(axis=0)
    if target is None:
        raise ValueError("the result has no steps['untwist'] trace: pass the target to recompute it")
    if "Until" in str(result.config.get("step", "")):
        raise ValueError("untwist cannot be recomputed for segment steps: the engine must record "
                         "steps['untwist']")
    prompt = list(result.prompt_ids)
    samples = [list(s) for s in result.samples]
    fin, trunc = list(result.finished), list(result.truncated)
    done = target.batch(prompt, samples, None, fin, trunc)
    # the twist removed at promotion was evaluated on the prefix before the last draw
    before = [s if f else s[:-1] for s, f in zip(samples, fin)]
    prefixes = target.batch(prompt, before, None, [False] * len(before), [False] * len(before))
    twist = target.log_twist(prefixes).numpy()
    twist[[len(b) == 0 for b in before]] = 0.0   # no twist before the first step
    return target.log_complete(done).numpy() - twist


def _normalise(lw: np.ndarray) -> np.ndarray:
    if not np.isfinite(lw).any():
        raise ValueError("no particle has positive weight")
    w = np.exp(lw - lw[np.isfinite(lw)].max())
    return w / w.sum()


def untwist_shifts(result: Any) -> list[float]:
    """Per step, ``TV(W^ψ_t, W_t)``: the weight moved by the untwists of the particles that ended then.

    ``W_t`` are the step's normalised weights (before resampling), ``W^ψ_t ∝ W_t · e^{−u_t}``
    those with the ended particles' last twist kept; 0 at steps where nobody ended.
    """
    un = np.asarray(_require(result, "untwist"), dtype=np.float64)
    lw = np.asarray(_require(result, "log_weights"), dtype=np.float64)
    out = []
    for L, u in zip(lw, un):
        if not np.any(u != 0):
            out.append(0.0)
            continue
        before = np.where(np.isfinite(L), L - np.where(np.isfinite(u), u, 0.0), -np.inf)
        out.append(float(0.5 * np.abs(_normalise(before) - _normalise(L)).sum()))
    return out


def untwist_shift(result: Any) -> float:
    """The fraction of weight the final untwist moved: ``1 − Π_t (1 − TV(W^ψ_t, W_t))`` (see
    :func:`untwist_shifts`), in [0, 1]; when every particle ends at the same step it is ``TV(W^ψ, W)``.
    """
    return float(1.0 - np.prod([1.0 - x for x in untwist_shifts(result)]))


def plot_twists(result: Any, ax: Any = None) -> Any:
    """Twist values along the final particles' ancestries, one line per distinct final particle."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    tw = twist_trace(result, along_lineages=True)
    seen: set[tuple[int, ...]] = set()
    for i, s in enumerate(result.samples):
        if tuple(s) in seen:
            continue
        seen.add(tuple(s))
        ax.plot(np.arange(1, len(tw) + 1), tw[:, i], lw=1, alpha=0.7)
    ax.set_xlabel("SMC step")
    ax.set_ylabel("log ψ_t (twist)")
    ax.set_title("twists along the final particles' ancestries")
    return ax


__all__ = ["lineages", "twist_trace", "untwist_increments", "untwist_shifts", "untwist_shift", "plot_twists"]
