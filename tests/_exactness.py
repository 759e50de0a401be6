"""Shared checks of the exactness tests: weighted particles against ``llmppl.exact``.

Every check also computes the total-variation distance to the target of *impostors* —
what a wrong sampler would produce: the target's mode (a point mass), plain
low-temperature decoding at ``τ = 1/α``, the base LM — and asserts that each is
farther than ``IMPOSTOR_MARGIN × threshold``, so that the check is one that can fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import llmppl as pp
from llmppl.exact import ExactDistribution, enumerate_target, tv_distance

#: a target must be worth at least this many equally likely sequences (1/Σπ²)
MIN_SUPPORT = 10.0
#: an impostor must be at least this many thresholds away from the target
IMPOSTOR_MARGIN = 1.5


def impostors(lm, prompt: Sequence[int], T: int, alpha: float, truncation: str = "keep",
              base: bool = True, low: bool = True) -> dict[str, dict]:
    """The exact laws of plain low-temperature decoding (``τ = 1/α``) and of the base LM.

    Both are skipped at ``α = 1`` (they *are* ``p`` there).  ``truncation`` is the one of
    the target, so that the impostor lives on the same sequence space.
    """
    out: dict[str, dict] = {}
    if alpha != 1.0 and low:
        out[f"low temperature 1/{alpha:g}"] = enumerate_target(
            pp.Target(lm, pp.Tempered(1.0 / alpha), truncation=truncation), prompt, T).as_dict()
    if alpha != 1.0 and base:
        out["base LM"] = enumerate_target(pp.Target(lm, truncation=truncation), prompt, T).as_dict()
    return out


def pooled(run: Callable[[int], pp.Result], seeds: Iterable[int]) -> tuple[list, list]:
    """Samples and normalised weights of ``run(seed)`` for every seed, each run weighing the same."""
    seeds = list(seeds)
    samples, weights = [], []
    for s in seeds:
        res = run(s)
        samples += res.samples
        weights += list(res.weights / len(seeds))
    return samples, weights


def check(exact: ExactDistribution, samples: Sequence, weights: Sequence[float] | None,
          threshold: float, others: dict[str, dict] | None = None, label: str = "",
          min_support: float = MIN_SUPPORT) -> float:
    """``TV(particles, π) < threshold``, with ``π`` not degenerate and every impostor
    (the mode, plus ``others``) farther than ``IMPOSTOR_MARGIN · threshold`` from ``π``."""
    target = exact.as_dict()
    away = {"mode": 1.0 - float(exact.probs.max())}
    away.update({name: tv_distance(target, d) for name, d in (others or {}).items()})
    tv = exact.tv(samples, weights)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in away.items())
    print(f"{label}: TV = {tv:.4f} (threshold {threshold}); support {exact.effective_support:.1f}; "
          f"impostors: {shown}")
    assert exact.effective_support >= min_support, (label, exact.effective_support)
    for name, v in away.items():
        assert v > IMPOSTOR_MARGIN * threshold, f"{label}: the impostor '{name}' is only {v:.3f} away"
    assert tv < threshold, (label, tv)
    return tv
