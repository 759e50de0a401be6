"""Exponent schedules ``a_0, a_1, …`` bridging to the target's base exponent ``α``.

SMC step ``t`` targets ``γ_t(y_≤t) = p(y_≤t)^{a_t} · (other factors) · ψ_t``; the
retroactive term ``(a_t − a_{t−1}) log p(y_<t)`` keeps the weights exact, and a
particle that finishes is promoted to ``α`` at once, so a schedule never alters the
final target — it only changes the path (and the variance) on the way there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .capabilities import Needs
from .terms import Bridge, WeightTerm


@dataclass
class BridgeStats:
    """Per-group statistics an adaptive schedule uses, each ``(G,)`` float64.

    ``spread``: the weighted variance over live particles of ``log p(y_<t)``, the
    retroactive term per unit of exponent;  ``token_var``: the weighted mean over live
    particles of ``Var_{v~q}[log p(v | y_<t)]``, the variance one more token adds to it.
    """

    spread: torch.Tensor
    token_var: torch.Tensor


class RealisedTokenVariance(WeightTerm):
    """Observes, adds nothing: after each step, per prompt, the weighted variance per token of
    the log-probabilities the step drew,

        σ̂²_t = Σ_i W_i (Δ_i − k_i μ)² / Σ_i W_i k_i,   μ = Σ_i W_i Δ_i / Σ_i W_i k_i,

    with ``Δ_i = log p(y_i,step)`` the step's total over the ``k_i`` tokens row ``i`` drew and
    ``W`` the weights the rows were drawn under.  For tokens drawn independently given their
    prefixes it estimates the mean of ``Var[log p(v | y_<j)]`` along the particles' paths (the
    spread of the conditional means across particles included), i.e. how fast the variance of
    ``log p`` grows per token: the ``token_var`` of :class:`BridgeStats` on a backend that gives
    no full-vocabulary log-probabilities (``state.term_data["token_var"]``, ``(G,)``; NaN before
    the first step and for a prompt with no live row).  A function of the past only, so the
    exponent it informs keeps SMC exact."""

    name = "token_var"

    def start(self, plan, state) -> None:
        state.term_data[self.name] = torch.full((plan.G,), math.nan, dtype=torch.float64,
                                                device=state.particles.device)

    def increment(self, plan, state, drawn) -> torch.Tensor:
        P = state.particles
        delta = P.log_p - drawn.log_p_before
        k = drawn.tokens.to(torch.float64)
        use = drawn.active & torch.isfinite(delta) & (k > 0)
        W = torch.softmax(torch.where(use.view(plan.G, plan.N), P.log_w, -math.inf), 1).nan_to_num(0.0)
        delta = torch.where(use, delta, torch.zeros_like(delta)).view(plan.G, plan.N)
        k = torch.where(use, k, torch.zeros_like(k)).view(plan.G, plan.N)
        wk = (W * k).sum(1)
        mu = (W * delta).sum(1) / wk
        var = (W * (delta - k * mu[:, None]) ** 2).sum(1) / wk
        state.term_data[self.name] = torch.where(wk > 0, var, torch.full_like(var, math.nan))
        return torch.zeros_like(P.log_p)


@dataclass
class ScheduleContext:
    """What a schedule may look at when choosing ``a_t`` (step ``t`` ≥ 1), per group (prompt)."""

    step: int
    previous: torch.Tensor           # (G,) a_{t-1}
    final: float                     # α, the target's base exponent
    log_weights: torch.Tensor        # (G, N) float64 current log-weights
    horizon: int = 0                 # max_new_tokens: steps left ≤ horizon − t + 1
    stats: Callable[[], BridgeStats] | None = None
    """Lazily computed :class:`BridgeStats` (only adaptive schedules pay for them)."""
    position: torch.Tensor | None = None
    """(G,) tokens already in the live particles' completions (the longest); ``None`` means
    ``step − 1`` (token steps).  Under segment steps a step draws many tokens, so the
    tokens still to come are ``horizon − position``, not ``horizon − step + 1``."""

    def tokens_left(self) -> torch.Tensor | int:
        """Tokens still to come (at least 1): ``horizon − position``."""
        if self.position is None:
            return max(self.horizon - self.step + 1, 1)
        return (self.horizon - self.position.to(torch.float64)).clamp_min(1.0)


def _check_positive(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def _check_steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


class Schedule:
    """Base class: ``initial(final) -> a_0`` and ``exponent(ctx) -> a_t``.

    ``exponent`` returns a float (the same ``a_t`` for every group) or a ``(G,)`` tensor.
    ``requires.full_vocabulary``: ``exponent`` calls ``ctx.stats()``, which reads the
    full-vocabulary next-token log-probabilities (not available on a block-only backend such
    as vLLM).  A schedule whose exponent moves adds the :class:`~llmppl.inference.terms.Bridge`
    term (``terms()``).
    """

    requires: Needs = Needs()

    def terms(self) -> tuple[WeightTerm, ...]:
        """The bridge term ``(a_t − a_{t−1}) log p(y_<t)`` (none for :class:`Constant`)."""
        return (Bridge(),)

    def initial(self, final: float) -> float:
        return final

    def exponent(self, ctx: ScheduleContext) -> float | torch.Tensor:
        return ctx.final


class Constant(Schedule):
    """``a_t = α`` for every ``t`` (plain Power-SMC, no bridging)."""

    def terms(self) -> tuple[WeightTerm, ...]:
        return ()

    def __repr__(self) -> str:
        return "Constant()"


class Linear(Schedule):
    """``a_t = a_0 + (α − a_0) · min(t / steps, 1)`` with ``a_0 = alpha_from``."""

    def __init__(self, alpha_from: float = 1.0, steps: int = 16) -> None:
        self.alpha_from = _check_positive("alpha_from", alpha_from)
        self.steps = _check_steps(steps)

    def initial(self, final: float) -> float:
        return self.alpha_from if final > 0 else final

    def exponent(self, ctx: ScheduleContext) -> float:
        if ctx.final <= 0:
            return ctx.final
        frac = min(ctx.step / self.steps, 1.0)
        return self.alpha_from + (ctx.final - self.alpha_from) * frac

    def __repr__(self) -> str:
        return f"Linear(alpha_from={self.alpha_from:g}, steps={self.steps})"


class Geometric(Linear):
    """``a_t = a_0 · (α / a_0)^{min(t / steps, 1)}``: equal ratios instead of equal steps."""

    def exponent(self, ctx: ScheduleContext) -> float:
        if ctx.final <= 0:
            return ctx.final
        frac = min(ctx.step / self.steps, 1.0)
        return self.alpha_from * (ctx.final / self.alpha_from) ** frac

    def __repr__(self) -> str:
        return f"Geometric(alpha_from={self.alpha_from:g}, steps={self.steps})"


def conditional_ess(log_weights: torch.Tensor, log_increments: torch.Tensor,
                    log_sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | float:
    """``N (Σ W_i w_i)² / Σ W_i w_i²`` with ``W`` the normalised current weights (Zhou et al. 2016),
    along the last dimension (a float for 1-D inputs; 0 where no weight is positive).

    With ``L₀ = LSE(log W̃)`` and ``L₁ = LSE(log W̃ + log w)`` of the unnormalised weights
    ``W̃``, it is ``N exp(2 (L₁ − L₀) − (LSE(log W̃ + 2 log w) − L₀))``; ``log_sums = (L₀, L₁)``
    when the caller has them already (the engine: they are its ``log Ẑ`` increment)."""
    lw = torch.as_tensor(log_weights).to(torch.float64)
    inc = torch.as_tensor(log_increments).to(lw)
    inc = torch.where(torch.isfinite(lw), inc, torch.zeros_like(lw))   # no −inf + inf for zero weights
    if log_sums is None:
        log_sums = (torch.logsumexp(lw, -1), torch.logsumexp(lw + inc, -1))
    lse_old, lse_new = log_sums
    num = 2 * (lse_new - lse_old)
    den = torch.logsumexp(lw + 2 * inc, -1) - lse_old
    out = torch.where(torch.isfinite(num), lw.shape[-1] * torch.exp(num - den), torch.zeros_like(num))
    return float(out) if lw.dim() == 1 else out


class AdaptiveESS(Schedule):
    """Bridge at the pace the predicted weight variance allows, per prompt.

    Raising the exponent by ``δ`` at step ``t`` multiplies a particle's weight by
    ``p(y_<t)^δ`` now and, through the proposal ``q ∝ p^{a_t}``, exposes the rest of its
    completion to the same exponent.  With ``H`` tokens still to come (``horizon − t + 1`` for token steps,
    ``horizon`` minus the tokens drawn so far under segment steps),
    the variance of ``δ · log p`` over the particles is predicted as

        V_t = Var_i[log p(y_<t)] + H · E_i Var_{v~q}[log p(v | y_<t)],

    and for log-normal weights the ESS fraction after the raise is ``exp(−δ² V_t)``.  The
    schedule takes ``δ_t = max(√(−log κ / V_t), (α − a_{t−1}) / H)``, ``a_t = min(α, a_{t−1} + δ_t)``:
    as fast as keeps the predicted ESS fraction at ``κ = target_ess``, never slower than a
    linear bridge that reaches ``α`` by the horizon.  Unlike a greedy rule on the next step's
    conditional ESS (which sees identical particles at ``t = 1`` and jumps to ``α``), the
    variance a completion will accumulate is priced in from the first step.  Particles
    that finish are promoted to ``α``, so the final target is exact whatever ``a_t`` is.

    ``Var_{v~q}[log p(v | y_<t)]`` is read from the next-token distribution where the backend
    gives it (``last_logprobs``: HF, llama.cpp); a backend that decodes natively in blocks (vLLM)
    gives none, and there the schedule uses the variance per token that the previous step
    realised (:class:`RealisedTokenVariance`, a term of this schedule), and the linear pace at
    the first step, before anything was drawn.
    """

    def __init__(self, target_ess: float = 0.5, alpha_from: float = 1.0) -> None:
        if not 0.0 < float(target_ess) < 1.0:
            raise ValueError(f"target_ess must be in (0, 1), got {target_ess!r}")
        self.target_ess = float(target_ess)
        self.alpha_from = _check_positive("alpha_from", alpha_from)

    def initial(self, final: float) -> float:
        return min(self.alpha_from, final) if final > 0 else final

    def terms(self) -> tuple[WeightTerm, ...]:
        """The bridge term, and the observer of the realised variance per token."""
        return (Bridge(), RealisedTokenVariance())

    def exponent(self, ctx: ScheduleContext) -> float | torch.Tensor:
        prev = ctx.previous.to(torch.float64)
        if ctx.final <= 0 or ctx.stats is None or bool((prev >= ctx.final).all()):
            return ctx.final
        st = ctx.stats()
        remaining = ctx.tokens_left()    # tokens, not SMC steps (segment steps draw many per step)
        var = (st.spread + remaining * st.token_var).clamp_min(1e-12)
        linear = (ctx.final - prev) / remaining
        # token_var unknown (NaN: before any draw on a backend without full-vocabulary
        # log-probabilities): the linear pace
        by_ess = torch.where(torch.isfinite(var), torch.sqrt(-math.log(self.target_ess) / var), 0.0)
        return torch.minimum(prev + torch.maximum(by_ess, linear), torch.full_like(prev, ctx.final))

    def __repr__(self) -> str:
        return f"AdaptiveESS(target_ess={self.target_ess:g}, alpha_from={self.alpha_from:g})"


def get_schedule(schedule: Schedule | None) -> Schedule:
    """``None`` means :class:`Constant`."""
    if schedule is None:
        return Constant()
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a llmppl schedule (Constant, Linear, ...), got {schedule!r}")
    return schedule


__all__ = ["Schedule", "ScheduleContext", "BridgeStats", "Constant", "Linear", "Geometric", "AdaptiveESS",
           "RealisedTokenVariance", "conditional_ess", "get_schedule"]
