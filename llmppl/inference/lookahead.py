"""Look-ahead proposal of Scalable Power Sampling (arXiv 2601.21590).

The next-token conditional of ``p^α`` is ``π_α(v | y_<t) ∝ p(v|y_<t)^α · ζ(y_<t, v)`` with
``ζ(y_<t, v) = E_{f ~ p(·|y_<t v)}[p(f)^{α−1}]`` (``f`` the rest of the completion).
For the ``top_k`` most likely ``v``, ``ζ`` is estimated by ``rollouts`` futures of at
most ``horizon`` tokens drawn from ``p`` (all candidates × rollouts decoded in one
batched fork of the engine's state, by one ``sample_block`` call at temperature 1):

    log ζ̂(v) = logsumexp_j[(α−1) · log p(f_j)] − log M,      ζ(EOS) = 1 exactly,

and ``q(v) ∝ exp(target.log_next(v)) · ζ̂(v)`` (``= p(v)^α ζ̂(v)`` for a ``Power`` target).
Tokens outside the top-k keep their ``p^α`` mass times the smallest candidate ``ζ̂``,
so ``q`` covers the target's support and SMC weights (``− log q``) stay exact.

``floor = ε`` mixes in the locally optimal proposal, ``q = (1−ε)·q_ζ̂ + ε·q_0`` with
``q_0 ∝ exp(target.log_next)`` (``∝ p^α``): a defensive mixture that bounds the SMC
weights by ``1/ε`` times Power-SMC's, since ``ζ̂`` (a mean of ``p(f)^{α−1}``) is
heavy-tailed and a few rollouts can underrate a good token by orders of magnitude.

``jackknife=True`` replaces the plug-in ``q̂ = g(ζ̂)`` (biased: a ratio of estimates)
by ``M·g(ζ̂) − (M−1)/M · Σ_j g(ζ̂_{−j})`` where ``ζ̂_{−j}`` leaves rollout ``j`` out for
every candidate; this cancels the ``O(1/M)`` bias of ``E[q̂]``.  It is clipped below at
``JACKKNIFE_FLOOR · q̂`` and renormalised (support kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.block import BlockSpec
from ..models.streams import RowStreams
from .capabilities import Needs
from .common import eos_ids
from .proposal import Proposal, ProposalContext, exponent_of

#: the jackknife estimate is clipped below at this fraction of the plug-in q
JACKKNIFE_FLOOR = 1e-3


def _check(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass
class LookaheadRun:
    """One run's rollout work: forward passes of its forks and rollout tokens fed per prompt."""

    forward_passes: int = 0
    tokens_by_prompt: dict[int, int] = field(default_factory=dict)

    @property
    def tokens_decoded(self) -> int:
        return sum(self.tokens_by_prompt.values())

    def count(self, groups: torch.Tensor, fed: torch.Tensor) -> None:
        """Rollout row ``r`` (of prompt ``groups[r]``) was fed ``fed[r]`` tokens."""
        fed = fed.long()
        for g in groups.unique().tolist():
            self.tokens_by_prompt[g] = self.tokens_by_prompt.get(g, 0) + int(fed[groups == g].sum())


class Lookahead(Proposal):
    """``q(v) ∝ p(v)^α ζ̂(v)`` on the top-k tokens, ``ζ̂`` from short rollouts (see module doc).

    Configuration only: each run's rollout counters are its :class:`LookaheadRun` (``start``);
    rollouts never look past the run's ``max_new_tokens`` (``ProposalContext.max_new_tokens``)."""

    #: q is random (it depends on the rollouts): fine for SMC, not for MH reverse moves
    requires = Needs(row_wise=False, random=True)
    work_name = "lookahead"

    def __init__(self, top_k: int = 4, rollouts: int = 2, horizon: int = 8,
                 jackknife: bool = False, floor: float = 0.1) -> None:
        self.top_k = _check("top_k", top_k)
        self.rollouts = _check("rollouts", rollouts)
        self.horizon = _check("horizon", horizon)
        if jackknife and rollouts < 2:
            raise ValueError("the jackknife needs rollouts >= 2")
        self.jackknife = bool(jackknife)
        if not 0.0 <= float(floor) <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor!r}")
        self.floor = float(floor)

    def start(self, target, prompts, n, max_new_tokens) -> LookaheadRun:
        """A new run: its rollout counters start from 0."""
        return LookaheadRun()

    def work(self, run: LookaheadRun) -> tuple[int, dict[int, int]]:
        """Rollout forward passes and rollout tokens fed to the LM per prompt, in this run."""
        return run.forward_passes, dict(run.tokens_by_prompt)

    def __repr__(self) -> str:
        jk = ", jackknife=True" if self.jackknife else ""
        return (f"Lookahead(top_k={self.top_k}, rollouts={self.rollouts}, horizon={self.horizon}, "
                f"floor={self.floor:g}{jk})")

    # ------------------------------------------------------------ rollouts
    def _future_logp(self, ctx: ProposalContext, cand: torch.Tensor,
                     possible: torch.Tensor | None = None) -> torch.Tensor:
        """``(R, K, M)`` float64 ``log p(f)`` of futures after each candidate (0 for EOS, for
        candidates that are not ``possible`` (``(R, K)`` bool: ``p > 0``) and past the budget).

        Each rollout is capped so that the completion stays within the run's budget: after
        ``t`` tokens and the candidate, the future has at most ``T − t − 1`` tokens (``T`` =
        ``ctx.max_new_tokens``).  The fork is fed each candidate,
        then draws every future in one ``sample_block`` (``q = p``, stop at EOS, the last token
        of a future never fed); ``log p(f)`` is the block's ``log p`` total."""
        R, K = cand.shape
        M = self.rollouts
        stop_ids = eos_ids(ctx.target.lm)
        eos = torch.tensor(stop_ids)
        rows = torch.as_tensor(ctx.rows, dtype=torch.long).reshape(-1)
        lengths = torch.tensor([len(t) for t in ctx.batch.tokens])
        horizon = torch.full((R,), self.horizon, dtype=torch.long)
        budget = ctx.max_new_tokens
        if budget is not None:  # the future has at most T − t − 1 tokens
            horizon = torch.clamp(torch.minimum(horizon, budget - lengths - 1), min=0)
        first = cand.cpu().repeat_interleave(M, dim=1).reshape(-1)           # (R·K·M,)
        hor = horizon.repeat_interleave(K * M)
        log_f = torch.zeros(R * K * M, dtype=torch.float64)
        alive = ~torch.isin(first, eos) & (hor > 0)
        if possible is not None:          # no rollouts after an impossible token (its q is 0 anyway)
            alive &= possible.cpu().repeat_interleave(M, dim=1).reshape(-1)
        if not bool(alive.any()):
            return log_f.view(R, K, M)
        fork = ctx.state.copy()
        fork.reorder(rows.repeat_interleave(K * M))
        groups = torch.as_tensor(fork.group).cpu()[alive]
        fp0 = fork.forward_passes
        go = alive.nonzero().flatten()
        fork.extend(first[go], go)
        # the futures: draws from p until EOS or the horizon (whose last token is never fed)
        n = len(go)
        spec = BlockSpec(budget=hor[go], width=int(hor[go].max()), temperature=torch.ones(n, dtype=torch.float64),
                         stop_ids=stop_ids, feed_last=False)
        gen = ctx.generator.split(fork.n_rows) if isinstance(ctx.generator, RowStreams) else ctx.generator
        blk = fork.sample_block(go, spec, gen)
        log_f[go] = blk.total("log_p").cpu()
        # fed: the candidate, then every drawn token but the last (EOS, or the horizon's end)
        if isinstance(ctx.run, LookaheadRun):
            ctx.run.count(groups, 1 + (blk.length.cpu() - 1).clamp(min=0))
            ctx.run.forward_passes += fork.forward_passes - fp0
        return log_f.view(R, K, M)

    # ------------------------------------------------------------- proposal
    @staticmethod
    def _log_q(base: torch.Tensor, cand: torch.Tensor, log_zeta: torch.Tensor) -> torch.Tensor:
        """``log q ∝ base + log ζ`` with ``ζ`` on ``cand`` and ``min ζ`` elsewhere; base (R, V)."""
        out = base + log_zeta.min(dim=1, keepdim=True).values
        out = out.scatter(1, cand, base.gather(1, cand) + log_zeta)
        return torch.log_softmax(out, dim=-1)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        log_q = self._lookahead_log_q(ctx)
        if self.floor == 0.0:
            return log_q
        base = torch.log_softmax(ctx.target.log_next(ctx.batch, exponent=exponent_of(ctx)).double(), -1)
        if self.floor == 1.0:
            return base
        return torch.logaddexp(log_q + math.log1p(-self.floor), base + math.log(self.floor))

    def _lookahead_log_q(self, ctx: ProposalContext) -> torch.Tensor:
        if ctx.state is None or ctx.rows is None:
            raise ValueError("Lookahead needs the engine's LM state and rows in the ProposalContext")
        a = exponent_of(ctx)              # a float, or (R, 1): one exponent per row (run_batch)
        base = ctx.target.log_next(ctx.batch, exponent=a).double()
        lp = ctx.batch.base_logprobs
        K = min(self.top_k, lp.shape[-1])
        top = lp.topk(K, dim=-1)
        cand = top.indices                                                    # (R, K)
        a1 = (a.double().reshape(-1, 1, 1).to(base.device) if isinstance(a, torch.Tensor) else a) - 1.0
        future = self._future_logp(ctx, cand, torch.isfinite(top.values)).to(base.device)
        weighted = a1 * future                                                # (R, K, M)
        M = self.rollouts
        log_q = self._log_q(base, cand, torch.logsumexp(weighted, -1) - math.log(M))
        if not self.jackknife:
            return log_q
        # leave-one-out: logsumexp over the M−1 other rollouts
        loo = torch.stack([torch.logsumexp(torch.cat([weighted[..., :j], weighted[..., j + 1:]], -1), -1)
                           for j in range(M)], 0) - math.log(M - 1)           # (M, R, K)
        q_loo = torch.stack([self._log_q(base, cand, loo[j]).exp() for j in range(M)]).mean(0)
        q = log_q.exp()
        jk = torch.clamp(M * q - (M - 1) * q_loo, min=0.0)
        jk = torch.maximum(jk, JACKKNIFE_FLOOR * q)
        return torch.log(jk / jk.sum(-1, keepdim=True))
