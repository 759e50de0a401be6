"""The reweighting step of SMC as a pure function of ``(G, N)`` log-weights (one row per prompt).

With the weights carried since the last resampling ``W_{t−1}`` (scaled so that
``LSE_i log W_{t−1}^i − log N = log Ẑ_{t−1}``) and the step's incremental weights ``w_t``,

    log W_t^i = log W_{t−1}^i + log w_t^i,
    log Ẑ_t  = log Ẑ_{t−1} + LSE_i log W_t^i − LSE_i log W_{t−1}^i    (= log Σ_i W̄_{t−1}^i w_t^i),
    ESS_t    = (Σ_i W_t^i)² / Σ_i (W_t^i)².

A group whose new weights are all zero *fails*: its ``log Ẑ`` becomes −∞ and stays there, its
evidence increments and ESS are 0 from then on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .resampling import log_ess


@dataclass(frozen=True)
class Reweighted:
    """What :func:`reweight` returns (every field a tensor on the weights' device)."""

    log_w: torch.Tensor         # (G, N) float64   log W_t
    log_Z: torch.Tensor         # (G,)  float64    log Ẑ_t
    increment: torch.Tensor     # (G,)  float64    log Ẑ_t − log Ẑ_{t−1} (0 once failed)
    ess: torch.Tensor           # (G,)  float64    (0 once failed)
    newly_failed: torch.Tensor  # (G,)  bool
    lse_old: torch.Tensor       # (G,)  LSE log W_{t−1}
    lse_new: torch.Tensor       # (G,)  LSE log W_t
    ok: torch.Tensor            # (G,)  bool: the group has not failed


def reweight(log_w: torch.Tensor, inc: torch.Tensor, log_Z: torch.Tensor, failed: torch.Tensor) -> Reweighted:
    """One reweighting step (see the module docstring) of ``(G, N)`` log-weights ``log_w`` by
    the incremental log-weights ``inc``, for groups with evidence ``log_Z`` of which ``failed``
    have failed already.  Pure: no input is written."""
    new = log_w + inc
    lse_new = torch.logsumexp(new, 1)
    lse_old = torch.logsumexp(log_w, 1)
    newly_failed = ~torch.isfinite(lse_new) & ~failed
    ok = ~(failed | newly_failed)
    zero = torch.zeros_like(lse_new)
    increment = torch.where(ok, lse_new - lse_old, zero)
    log_Z = torch.where(newly_failed, torch.full_like(log_Z, -math.inf), log_Z + increment)
    ess = torch.where(ok, torch.exp(log_ess(new, lse_new)), zero)
    return Reweighted(new, log_Z, increment, ess, newly_failed, lse_old, lse_new, ok)


__all__ = ["Reweighted", "reweight"]
