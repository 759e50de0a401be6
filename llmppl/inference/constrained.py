"""Greedy constrained decoding as a baseline: what vLLM's structured outputs, outlines or
xgrammar sample.

``Constrained(n, tau)`` draws ``n`` completions token by token from

    q(v | y_<t) = p(v | y_<t)^{1/τ} · m(y_<t, v) / Σ_u p(u | y_<t)^{1/τ} · m(y_<t, u),

where ``m`` is the support of the target's token-level factors (a grammar constraint's mask,
``Constraint(mask=...)``): mask and renormalise, no weights.  Its law is
``Π_t q(y_t | y_<t)``, the *locally* renormalised one.  It is not ``p(y | y ∈ L)``: a token
whose continuations inside ``L`` are unlikely under ``p`` keeps all the mass it had before
masking.  SMC with the same masked proposal (``LocallyOptimal``, the default on such targets)
adds the weight ``log Σ_{u allowed} p(u | y_<t)^{a_t}`` at each step and so targets
``p^α · 1[y ∈ L]`` exactly; comparing the two on one target shows the distortion.

The decoding runs through the baselines' :class:`~llmppl.inference.baselines.Decoder` (one
``advance`` over ``G`` prompts × ``n`` rows, the token path with full-vocabulary
log-probabilities; a backend without them — vLLM's native blocks — refuses by name with
``NotNative``).  ``stats["log_target"]`` holds ``log γ(y)`` of each sample, ``stats["log_q"]``
its ``log q``.
"""

from __future__ import annotations

import math

import torch

from ..targets.base import scaled
from .decoder import BatchMixin, Decoder, _check_n
from .proposal import Proposal, ProposalContext


class Masked(Proposal):
    """``q ∝ p^{1/τ} · m``: the base LM at temperature ``τ`` restricted to the support ``m`` of the
    target's non-``Power`` token-level factors (``target.log_next_other`` finite), renormalised.

    On a target without token-level factors it is ``q ∝ p^{1/τ}``, which backends draw natively.
    A row where ``m`` allows nothing gets a uniform ``q`` (its draw then has target density 0).
    """

    vectorised = True

    def __init__(self, tau: float = 1.0) -> None:
        if not (float(tau) > 0 and math.isfinite(float(tau))):
            raise ValueError(f"tau must be finite and > 0, got {tau!r}")
        self.tau = float(tau)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        lp = ctx.batch.base_logprobs
        logits = scaled(1.0 / self.tau, lp)
        other = ctx.target.log_next_other(ctx.batch)
        if other is not None:
            logits = torch.where(torch.isfinite(other), logits, torch.full_like(logits, -math.inf))
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        uniform = torch.full_like(logits, -math.log(logits.shape[-1]))
        return torch.where(torch.isfinite(norm), logits - norm, uniform)

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor:
        """``q ∝ p^{1/τ}`` where the target has no token-level factor (the caller checks that)."""
        return torch.full_like(exponent, self.tau)

    def __repr__(self) -> str:
        return f"Masked(tau={self.tau:g})"


class Constrained(BatchMixin):
    """``n`` samples of greedy constrained decoding: ``y_t ~ p(·|y_<t)^{1/τ}`` masked by the target's
    token-level factors and renormalised, no weights (see the module docstring for its law)."""

    def __init__(self, n: int = 1, tau: float = 1.0) -> None:
        self.n = _check_n(n)
        self.proposal = Masked(tau)
        self.tau = self.proposal.tau

    def _decoder(self) -> Decoder:
        return Decoder("constrained", self.proposal, self.n, {"tau": self.tau})

    def __repr__(self) -> str:
        return f"Constrained(n={self.n}, tau={self.tau:g})"


__all__ = ["Constrained", "Masked"]
