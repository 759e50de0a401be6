"""Intervals and tests for accuracy numbers.

* ``wilson(k, n)``: Wilson score interval for a binomial proportion,
  ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``.
* ``bootstrap_ci(x)``: percentile bootstrap interval of a mean over problems.
* ``pass_at_k(n, c, k)``: unbiased ``1 − C(n−c, k)/C(n, k)`` (Chen et al. 2021).
* ``mcnemar_exact(a, b)``: exact McNemar test on paired binary outcomes,
  ``p = min(1, 2·P[Bin(n01+n10, ½) ≤ min(n01, n10)])``.
* ``paired_bootstrap(a, b)``: interval of the mean paired difference ``mean(a − b)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (default 95 %) for ``k`` successes out of ``n``."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)`` (resampling the values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n−c,k)/C(n,k)``."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n−c,k)/C(n,k) = Π_{i=n−c+1}^{n} (1 − k/i), numerically stable
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class McNemar:
    """Discordant pairs ``n01`` (a wrong, b right) and ``n10`` (a right, b wrong); exact p-value."""

    n01: int
    n10: int
    p_value: float


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact (binomial) McNemar test of ``P(a right, b wrong) = P(a wrong, b right)``."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact needs paired outcomes, got {len(a)} and {len(b)}")
    aa, bb = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n01, n10 = int(np.sum(~aa & bb)), int(np.sum(aa & ~bb))
    m = n01 + n10
    if m == 0:
        return McNemar(n01, n10, 1.0)
    tail = sum(math.comb(m, i) for i in range(min(n01, n10) + 1)) / 2.0**m
    return McNemar(n01, n10, min(1.0, 2.0 * tail))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                     n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a − b), lo, hi)``: bootstrap over problems of the paired difference."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs paired values, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, level=level, n_boot=n_boot, seed=seed)
    return (float(d.mean()) if d.size else math.nan, lo, hi)
