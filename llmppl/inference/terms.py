"""Weight terms: the pieces of SMC's incremental log-weight beyond the drawn tokens.

Step ``t`` of SMC targets ``γ_t(y_≤t) = p(y_≤t)^{a_t} · Π_k φ_k^next(y_≤t) · ψ_t(y_≤t)``.  The
draw (:mod:`~llmppl.inference.draw`) weighs the tokens it drew,
``Σ_j [a_t log p(y_j|y_<j) + log φ^next(y_j) − log q(y_j|y_<j)]``; everything else is a
*weight term*, a function ``(plan, state, drawn) -> (R,)`` float64 log-increment that a part of
the run supplies:

=====================  ==================================================  =====================
term                   log-increment                                       supplied by
=====================  ==================================================  =====================
:class:`Bridge`        ``(a_t − a_{t−1}) log p(y_<t)`` (live rows)          a schedule that moves
:class:`Promotion`     ``(α − a_t) log p(y) + log φ_complete(y)`` (ended)   the target / bridging
:class:`TargetTwist`   ``log ψ_t(y_≤t) − log ψ_{t−1}(y_<t)``; ``−log ψ``     a target with twists
                       when a particle ends
:class:`LengthTwist`   the one-token look-ahead mass of segment steps      ``pp.steps.Until``
=====================  ==================================================  =====================

A twist must cancel: every term that adds ``log ψ`` to a live particle removes it when the
particle ends, so only ``γ_T`` (``p^α · Π φ``) defines the target and ``Ẑ`` stays unbiased
for ``Z``, provided each ``ψ_t`` is chosen before step ``t`` draws (predictable).

A term holds configuration only.  Per-row values it carries (a twist) live in the run's
particles (``particles.extra[name]``: they follow resampling), any other per-run data in
``state.term_data[name]``; ``start(plan, state)`` puts them there.  A new term is a subclass
defined anywhere (a step's, schedule's or potential's ``terms()`` returns it): the engine
never changes for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..targets.base import scaled
from .particles import RowPrefixes

if TYPE_CHECKING:   # the engine's types, for annotations only (no import cycle)
    from .draw import Drawn
    from .smc import SMCPlan, SMCState

#: the cause code of a particle cut at ``max_new_tokens`` under ``Target(truncation="zero")``
CUT_CAUSE = 4


class WeightTerm:
    """A factor of SMC's incremental weight (see the module docstring)."""

    #: the key of the term's per-row values (``particles.extra``) and run data (``state.term_data``)
    name: str = "term"

    def start(self, plan: "SMCPlan", state: "SMCState") -> None:
        """Put this term's per-run values into ``state`` before the first step (default: none)."""

    def increment(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor:
        """``(R,)`` float64: this term's log-increment for every row at this step."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bridge(WeightTerm):
    """``(a_t − a_{t−1}) · log p(y_<t)`` for the rows live when the step began: the prefix's
    density moves from ``p^{a_{t−1}}`` to ``p^{a_t}`` (exponent bridging, α-ramping)."""

    name = "bridge"

    def increment(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor:
        da = (drawn.a - drawn.a_prev).repeat_interleave(plan.N)
        return torch.where(drawn.active, scaled(da, drawn.log_p_before), torch.zeros_like(drawn.log_p_before))


class Promotion(WeightTerm):
    """A particle that ended at this step (EOS, or cut at ``max_new_tokens``) jumps to the
    final target: ``+ (α − a_t) log p(y) + log φ_complete(y)`` (``φ_complete``: rewards and
    constraints on finished sequences).  A completion that ``φ_complete`` rejects dies here,
    with its cause recorded.  With twists it also records ``steps["untwist"]``:
    ``log φ_complete − log ψ`` of the particles that ended."""

    name = "promotion"

    def increment(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor:
        P, target = state.particles, state.target
        ended = drawn.ended & ~P.dead
        zero = torch.zeros_like(P.log_p)
        inc = (torch.where(ended, scaled(plan.alpha - drawn.a_rows, P.log_p), zero)
               if plan.bridging else zero)
        lc_rows = zero
        if target.has_complete:
            rows = ended.nonzero().flatten()
            state.trace.syncs += 1
            if len(rows):
                batch = RowPrefixes(target.lm, state.prompts, P, state.decoding, rows, None,
                                    P.finished[rows].tolist(), P.truncated[rows].tolist())
                lc = target.log_complete(batch).to(device=P.device, dtype=torch.float64)
                lc_rows = zero.index_copy(0, rows, lc)
                rejected = ~torch.isfinite(lc) & (P.cause[rows] == 0)
                zero_cut = getattr(target, "truncation", "keep") == "zero"
                code = torch.where(P.truncated[rows] & zero_cut, CUT_CAUSE, 2).to(P.cause.dtype)
                P.cause[rows] = torch.where(rejected, code, P.cause[rows])
        if target.has_twist:
            drawn.records["untwist"] = torch.where(ended, lc_rows - P.log_twist, zero).view(plan.G, plan.N)
        return inc + lc_rows


class TargetTwist(WeightTerm):
    """``log ψ_t(y_≤t) − log ψ_{t−1}(y_<t)`` for live particles (``ψ`` = the target's
    ``log_prefix``: process rewards, heuristics), ``−log ψ_{t−1}`` for a particle that ended.
    The current ``log ψ`` of every row is ``particles.log_twist`` (rejuvenation moves keep it);
    recorded as ``steps["twist"]``."""

    name = "twist"

    def increment(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor:
        P, target = state.particles, state.target
        zero = torch.zeros_like(P.log_p)
        prev = P.log_twist
        new = torch.where(drawn.ended, zero, prev)
        rows = (~P.done).nonzero().flatten()
        state.trace.syncs += 1
        if len(rows):
            n = len(rows)
            batch = RowPrefixes(target.lm, state.prompts, P, state.decoding, rows, None, [False] * n, [False] * n)
            tw = target.log_twist(batch).to(device=P.device, dtype=torch.float64)
            new = new.index_copy(0, rows, tw)
            bad = ~torch.isfinite(tw) & (P.cause[rows] == 0)
            P.cause[rows] = torch.where(bad, torch.full_like(P.cause[rows], 3), P.cause[rows])
        P.log_twist = new
        drawn.records["twist"] = new.view(plan.G, plan.N).clone()
        return torch.where(drawn.active, new - prev, zero)


@dataclass
class _SlopeHistory:
    """The per-prompt history behind ``Until(slope=True)``'s ``c_t``: summed drawn
    log-increments and tokens of steps ``1..t−1``, and ``c_t`` (their ratio, 0 before any)."""

    c: torch.Tensor
    inc: torch.Tensor
    tokens: torch.Tensor


@dataclass
class LengthTwist(WeightTerm):
    """Segment steps: for live particles

        log ψ_t(y) = log Σ_v p(v | y)^{a_t} · M(v)  [+ c_t · (T − len(y) − 1)  with ``slope``],

    (``M`` the target's masks on native blocks, from ``Block.log_norm_next``; on the token path
    ``M = 1``) the exact one-token look-ahead mass of the next position (what a token step's next
    incremental weight would be under ``q ∝ p^{a_t}``), plus optionally ``c_t`` per token for
    the rest of the horizon; removed when a particle ends.

    ``p(y_≤t)^a`` compares prefixes of different lengths, and resampling on it alone copies
    prefixes whose next token is costly (they lose their weight at the next step).  **Predictable.**
    ``ψ_t`` is fixed before step ``t`` draws: the mass is a function of the prefix and of ``a_t``
    (chosen from the past), and ``c_t`` is the prompt's mean log-increment per token over the
    tokens drawn at steps ``1..t−1`` (``F_{t−1}``-measurable), so ``Ẑ`` stays unbiased.
    """

    slope: bool = False
    name: str = field(default="length_twist", init=False)

    def start(self, plan: "SMCPlan", state: "SMCState") -> None:
        P = state.particles
        P.extra[self.name] = torch.zeros(P.R, dtype=torch.float64, device=P.device)
        if self.slope:
            zero = torch.zeros(P.G, dtype=torch.float64, device=P.device)
            state.term_data[self.name] = _SlopeHistory(zero, zero.clone(), zero.clone())

    def increment(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor:
        P = state.particles
        live = ~P.done
        prev = P.extra[self.name]
        if drawn.log_norm_next is not None:     # native blocks: the backend's normaliser after the segment
            new = drawn.log_norm_next
        else:                                   # log p(· | y) of the new prefixes
            lp = state.decoding.last_logprobs().double().to(P.device)
            new = torch.logsumexp(scaled(drawn.a_rows[:, None], lp), -1)
        if self.slope:
            h: _SlopeHistory = state.term_data[self.name]
            new = new + h.c.repeat_interleave(P.N) * (plan.max_new_tokens - P.length - 1).double().clamp_min(0.0)
            seg = torch.where(torch.isfinite(drawn.inc) & (drawn.tokens > 0), drawn.inc, torch.zeros_like(drawn.inc))
            h.inc = h.inc + seg.view(P.G, P.N).sum(1)
            h.tokens = h.tokens + drawn.tokens.double().view(P.G, P.N).sum(1)
            h.c = torch.where(h.tokens > 0, h.inc / h.tokens.clamp_min(1.0), h.c)
        new = torch.where(live & torch.isfinite(new), new, torch.zeros_like(new))
        P.extra[self.name] = new
        return torch.where(drawn.active, new - prev, torch.zeros_like(new))

    def __repr__(self) -> str:
        return f"LengthTwist(slope={self.slope})"


def target_terms(target: Any, bridging: bool) -> tuple[WeightTerm, ...]:
    """The terms a target implies: promotion when a particle's end changes its weight (a moving
    exponent or ``φ_complete``), and its twists."""
    out: list[WeightTerm] = []
    if bridging or target.has_complete or target.has_twist:
        out.append(Promotion())
    if target.has_twist:
        out.append(TargetTwist())
    return tuple(out)


__all__ = ["WeightTerm", "Bridge", "Promotion", "TargetTwist", "LengthTwist", "target_terms", "CUT_CAUSE"]
