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


@dataclass
class ScheduleContext:
    """What a schedule may look at when choosing ``a_t`` (step ``t`` ≥ 1)."""

    step: int
    previous: float                  # a_{t-1}
    final: float                     # α, the target's base exponent
    log_weights: torch.Tensor        # (N,) float64 current log-weights
    predict: Callable[[float], torch.Tensor] | None = None
    """``predict(a) -> (N,)`` predicted incremental log-weights if ``a_t = a`` (0 for done particles)."""


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
    """Base class: ``initial(final) -> a_0`` and ``exponent(ctx) -> a_t``."""

    def initial(self, final: float) -> float:
        return final

    def exponent(self, ctx: ScheduleContext) -> float:
        return ctx.final


class Constant(Schedule):
    """``a_t = α`` for every ``t`` (plain Power-SMC, no bridging)."""

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


def conditional_ess(log_weights: torch.Tensor, log_increments: torch.Tensor) -> float:
    """``N (Σ W_i w_i)² / Σ W_i w_i²`` with ``W`` the normalised current weights (Zhou et al. 2016)."""
    lw = log_weights.double()
    lW = lw - torch.logsumexp(lw, 0)
    inc = torch.where(torch.isfinite(lW), log_increments.double(), torch.zeros_like(lW))
    num = 2 * torch.logsumexp(lW + inc, 0)
    den = torch.logsumexp(lW + 2 * inc, 0)
    if not torch.isfinite(num):
        return 0.0
    return float(len(lw) * torch.exp(num - den))


class AdaptiveESS(Schedule):
    """Choose ``a_t ∈ [a_{t−1}, α]`` by bisection so the conditional ESS of the step's
    predicted incremental weights is ``target_ess · N`` (as blackjax's adaptive tempering).

    The prediction is the locally optimal incremental weight
    ``(a − a_{t−1}) log p(y_<t) + log Σ_v p(v|y_<t)^a · φ^next(v)``.  When even ``a = α``
    keeps the conditional ESS above the target, ``a_t = α``.  The choice is greedy:
    it bridges only when the next step alone would degenerate the weights.
    """

    def __init__(self, target_ess: float = 0.5, alpha_from: float = 1.0, tol: float = 1e-3,
                 max_iter: int = 30) -> None:
        if not 0.0 < float(target_ess) <= 1.0:
            raise ValueError(f"target_ess must be in (0, 1], got {target_ess!r}")
        self.target_ess = float(target_ess)
        self.alpha_from = _check_positive("alpha_from", alpha_from)
        self.tol = float(tol)
        self.max_iter = int(max_iter)

    def initial(self, final: float) -> float:
        return min(self.alpha_from, final) if final > 0 else final

    def exponent(self, ctx: ScheduleContext) -> float:
        lo, hi = ctx.previous, ctx.final
        if ctx.predict is None or hi <= lo:
            return hi
        n = len(ctx.log_weights)
        goal = self.target_ess * n

        def cess(a: float) -> float:
            return conditional_ess(ctx.log_weights, ctx.predict(a))

        if cess(hi) >= goal:
            return hi
        for _ in range(self.max_iter):
            if hi - lo <= self.tol * max(1.0, abs(ctx.final)):
                break
            mid = 0.5 * (lo + hi)
            if cess(mid) >= goal:
                lo = mid
            else:
                hi = mid
        return lo

    def __repr__(self) -> str:
        return f"AdaptiveESS(target_ess={self.target_ess:g})"


def get_schedule(schedule: Schedule | None) -> Schedule:
    """``None`` means :class:`Constant`."""
    if schedule is None:
        return Constant()
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a llmppl schedule (Constant, Linear, ...), got {schedule!r}")
    return schedule


__all__ = ["Schedule", "ScheduleContext", "Constant", "Linear", "Geometric", "AdaptiveESS",
           "conditional_ess", "get_schedule"]
