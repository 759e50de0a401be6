"""The contract between SMC and MCMC rejuvenation kernels (resample-move).

After resampling, SMC hands the particles to ``kernel.move(ctx)``; a kernel must
leave the current intermediate target invariant:

    log γ_t(y_≤t) = a_t · log p(y_≤t) + log_other(y_≤t) + log ψ_t(y_≤t)

over *unfinished* prefixes of the current length (a move never emits EOS and never
changes a particle's length).  ``log_other`` is the sum of the token increments of
the non-``Power`` factorising potentials; ``log ψ_t`` the twist.  The kernel updates
``state`` rows and the three per-particle arrays in place and returns the number of
accepted moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class MoveContext:
    target: Any                 # llmppl.Target
    state: Any                  # LMState: rows = particles
    rows: torch.Tensor          # particles to move (alive and unfinished)
    exponent: float             # a_t of the current intermediate target
    log_p: torch.Tensor         # (N,) float64  log p(y_≤t | x)
    log_other: torch.Tensor     # (N,) float64  Σ_s non-Power token increments
    log_twist: torch.Tensor     # (N,) float64  log ψ_t(y_≤t)
    generator: torch.Generator
    step: int = 0               # SMC step index (for diagnostics)


class MoveKernel(Protocol):
    def move(self, ctx: MoveContext) -> int:
        """Apply MCMC moves invariant for γ_t to ``ctx.rows``; return the number accepted."""
        ...
