"""SMC's one draw path: every step extends the live particles through ``state.sample_block``.

A token step is a block of one; ``Tokens(k)`` a block of ``k``; a segment step (``Until``) or a
proposal with its own decoding state draws one token per call with host work in between.
Whatever the step, each call is :func:`draw_block`, and it alone keeps the rows' bookkeeping
(lengths, EOS, the cut at ``max_new_tokens``, dead rows, token counts, the proposal's hooks).
For every drawn token ``y_j`` the particle's log-weight gains

    a_t log p(y_j | y_<j) + log φ^next(y_j | y_<j) − log q(y_j | y_<j),

from the block's records (``Block.log_p``, ``log_inc``, ``log_q``).  With a native proposal
(``q ∝ p^{1/τ}`` on a target without token-level factors, :func:`~llmppl.inference.native.needs`)
the backend draws the block itself; otherwise the block's ``propose`` hook evaluates the
proposal and the target's token-level factors on the ``(rows, V)`` log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..models.block import BlockSpec
from ..targets.base import scaled
from .native import block_masks
from .particles import RowPrefixes, completions
from .proposal import ProposalContext, own_sampler

if TYPE_CHECKING:
    from .smc import SMCPlan, SMCState

#: a draw computes on the live rows only once at most this share of the rows is live
COMPACT_BELOW = 0.5


@dataclass
class Drawn:
    """What one SMC step drew, ``(R,)`` per row (``(G,)`` for the exponents)."""

    active: torch.Tensor        # bool: live when the step began
    inc: torch.Tensor           # float64: Σ_j a_t log p + log φ^next − log q over the step's tokens
    ended: torch.Tensor         # bool: ended during the step (EOS, cut at max_new_tokens, weight zero)
    tokens: torch.Tensor        # long: tokens the step added to the completion (EOS excluded)
    log_p_before: torch.Tensor  # float64: log p(y_<t) when the step began
    a: torch.Tensor             # (G,) a_t
    a_prev: torch.Tensor        # (G,) a_{t−1}
    a_rows: torch.Tensor        # (R,) a_t per row
    bad: torch.Tensor           # bool: the LM gave NaN / +inf log-probabilities
    #: native segment steps: ``log Σ_v p(v | y)^{a_t} · M(v)`` after each row's segment (NaN where
    #: undefined), from the block (``Block.log_norm_next``); None on the token path
    log_norm_next: torch.Tensor | None = None
    #: (G, N) or (G,) tensors recorded in ``Result.steps`` by name (terms add theirs)
    records: dict[str, torch.Tensor] = field(default_factory=dict)


def draw_step(plan: "SMCPlan", state: "SMCState", a: torch.Tensor, a_prev: torch.Tensor) -> Drawn:
    """Extend every live particle by one step of ``plan.step`` (a token, a block, a segment)."""
    P = state.particles
    a_rows = plan.exponent_rows(a)
    active = ~P.done
    start, log_p_before = P.length, P.log_p
    zero = torch.zeros_like(P.log_p)
    inc, ended, bad = zero, torch.zeros_like(active), torch.zeros_like(active)
    norm_next = torch.full_like(zero, math.nan) if plan.native and plan.segments else None
    rows_on = active
    step_width = min(plan.step.width, plan.max_new_tokens)
    width = 1 if plan.tokenwise else step_width
    while True:
        cap = step_width - (P.length - start)      # the step's tokens left per row
        d = draw_block(plan, state, a_rows, rows_on, width, cap)
        inc, ended, bad = inc + d.inc, ended | d.stopped, bad | d.bad
        if norm_next is not None:
            norm_next = torch.where(rows_on, d.norm_next, norm_next)
        if not plan.tokenwise and not (plan.segments and plan.native and not plan.certain_ends):
            break
        rows_on = rows_on & ~P.done & (P.length - start < plan.step.width)
        if plan.native:         # only rows that stopped at a candidate end may go on
            rows_on = rows_on & d.delimited
        if plan.segments:       # the step's own end, checked on the host
            rows = rows_on.nonzero().flatten()
            state.trace.syncs += 1
            segs = completions(state.decoding, P.unfed, rows)
            starts = start[rows].tolist()
            over = torch.tensor([plan.step.ends(s[k:], plan.lm) for s, k in zip(segs, starts)],
                                dtype=torch.bool, device=rows.device)
            rows_on = rows_on.clone()
            rows_on[rows[over]] = False
        state.trace.syncs += 1
        if not bool(rows_on.any()):
            break
    grown = P.length - start
    drawn = Drawn(active, inc, ended, grown, log_p_before, a, a_prev, a_rows, bad, norm_next)
    if plan.segments:
        drawn.records["segment_length"] = grown.view(plan.G, plan.N).amax(1)
    return drawn


def rows_to_draw(plan: "SMCPlan", state: "SMCState", active: torch.Tensor) -> torch.Tensor | None:
    """The rows a draw computes on: ``None`` (all ``R``) while most rows are live, else a
    superset of the ``active`` rows of size ``state.live`` (counted on the host at the last
    sync, so no extra sync).  Proposals that are not row-wise get exactly the active rows."""
    if not plan.needs.row_wise:
        state.trace.syncs += 1
        return active.nonzero().flatten()
    if state.live is None or state.live > COMPACT_BELOW * plan.R:
        return None
    # stable sort: the active rows first, in order; state.live >= their number
    return torch.argsort((~active).to(torch.uint8), stable=True)[:state.live]


class BlockDraw(NamedTuple):
    """What :func:`draw_block` returns, ``(R,)`` each."""

    inc: torch.Tensor          # Σ_j a_t log p + log φ^next − log q of the drawn tokens
    stopped: torch.Tensor      # the row ended (EOS, cut at max_new_tokens, weight zero)
    bad: torch.Tensor          # the LM's log-probabilities were NaN / +inf
    delimited: torch.Tensor    # the row stopped at one of the step's end ids (native segments)
    norm_next: torch.Tensor    # log Σ_v p(v | y)^{a_t} · M(v) after the row's block (native segments; else NaN)


def draw_block(plan: "SMCPlan", state: "SMCState", a_rows: torch.Tensor, active: torch.Tensor,
               width: int, cap: torch.Tensor | None = None) -> BlockDraw:
    """Up to ``width`` tokens (and ``cap`` per row, when given) for each ``active`` row in one
    ``state.sample_block`` call, and the rows' bookkeeping (see :class:`BlockDraw`).  A native
    segment step stops a row at the step's end ids (``plan.end_ids``) and asks the block for the
    look-ahead normaliser after it (``norm_next``, exponent ``a_t``).

    A row's last token at ``max_new_tokens`` is kept in ``particles.unfed`` (never fed); a stop
    token is never fed; every other drawn token is appended to the decoding state."""
    P, target, proposal = state.particles, state.target, plan.proposal
    rows = rows_to_draw(plan, state, active)        # None: every row (no gathers, no scatters)

    def sub(x: torch.Tensor) -> torch.Tensor:
        return x if rows is None else x.index_select(0, rows)

    def full(x: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return x
        return torch.zeros(plan.R, dtype=x.dtype, device=P.device).index_copy_(0, rows, x)

    remaining, act, a_sel = plan.max_new_tokens - sub(P.length), sub(active), sub(a_rows)
    n_rows = len(act)
    budget = torch.where(act, remaining.clamp(max=width), 0)
    if cap is not None:
        budget = torch.minimum(budget, sub(cap).clamp_min(0))
    hook_bad = torch.zeros(n_rows, dtype=torch.bool, device=P.device)
    segment = plan.native and plan.segments
    if plan.drafted:        # the proposal draws the block natively (its own LM, or Lookahead; masks applied there)
        spec = BlockSpec(budget=budget, width=width, stop_ids=plan.stop_ids, temperature=torch.ones_like(a_sel),
                         allow_stop=proposal.allow_stop, feed_last=budget < remaining,
                         **block_masks(target, state.decoding, rows))
    elif plan.native:
        extra = {"end_ids": plan.end_ids, "norm_exponent": a_sel, "norm_next": True} if segment else {}
        spec = BlockSpec(budget=budget, width=width, stop_ids=plan.stop_ids,
                         temperature=proposal.block_temperature(a_sel), greedy=proposal.greedy,
                         allow_stop=proposal.allow_stop, feed_last=budget < remaining,
                         **block_masks(target, state.decoding, rows), **extra)
    else:
        spec = BlockSpec(budget=budget, width=width, stop_ids=plan.stop_ids,
                         temperature=torch.ones_like(a_sel), feed_last=budget < remaining,
                         propose=_proposal_hook(plan, state, rows, a_sel, width, hook_bad),
                         sample=own_sampler(proposal))
    if n_rows:
        if plan.drafted:
            blk = proposal.draft_block(state.proposal_run, rows, spec, state.generator, decoding=state.decoding,
                                       exponent=a_sel, max_new_tokens=plan.max_new_tokens)
            if not proposal.draws_from_engine:      # (Lookahead fed the engine's state and has log p)
                blk.log_p = _score(state, rows, blk, ~spec.feed_last)
        else:
            blk = state.decoding.sample_block(rows, spec, state.generator)
        lp, lq = blk.total("log_p").to(P.device), blk.total("log_q").to(P.device)
        other = blk.total("log_inc").to(P.device) if blk.log_inc is not None else None
        eos, n = blk.ended.to(P.device), blk.length.to(P.device)
        last = (blk.tokens[:, 0] if blk.tokens.shape[1] == 1 else
                blk.tokens.gather(1, (n - 1).clamp_min(0)[:, None]).squeeze(1)).to(P.device)
        delim = blk.delimited.to(P.device) if blk.delimited is not None else torch.zeros_like(eos)
        nxt = (blk.log_norm_next.to(P.device, torch.float64) if blk.log_norm_next is not None
               else torch.full_like(lp, math.nan))
    else:
        lp = lq = nxt = torch.zeros(0, dtype=torch.float64, device=P.device)
        other, eos = None, torch.zeros(0, dtype=torch.bool, device=P.device)
        delim = eos
        n = last = torch.zeros(0, dtype=torch.long, device=P.device)
    # rows with budget 0 drew nothing: totals 0, length 0, not ended (the Block contract)
    drawn = scaled(a_sel, lp) - lq if other is None else scaled(a_sel, lp) + other - lq
    # NaN / +inf log p is the LM's fault (refused); a NaN log q with a sane log p is a row whose
    # mask leaves no token of positive probability: the target gives every continuation zero
    lm_bad = torch.isnan(lp) | torch.isposinf(lp)
    drawn = torch.where(torch.isnan(drawn) & ~lm_bad, -math.inf, drawn)
    grown = n - eos.long()                              # tokens that extend the completion
    cut = act & ~eos & (grown >= remaining)
    dead = act & ~torch.isfinite(drawn)
    bad = act & (lm_bad if plan.native or plan.drafted else hook_bad)
    eos, cut, dead, n, grown, drawn, bad = (full(x) for x in (eos, cut, dead, n, grown, drawn, bad))
    P.log_p = P.log_p + full(lp)
    P.log_q = P.log_q + full(lq)
    if other is not None:
        P.log_other = P.log_other + full(other)
    state.trace.count("tokens_sampled", n)
    state.trace.count("tokens_decoded", grown - cut.long())
    P.unfed = torch.where(cut & ~dead, full(last), P.unfed)   # the cut token is not fed
    P.length = P.length + grown
    P.cause = torch.where(dead & (P.cause == 0), torch.ones_like(P.cause), P.cause)
    P.finished = P.finished | eos
    P.truncated = P.truncated | cut
    P.dead = P.dead | dead
    stopped = eos | cut | dead
    P.done = P.done | stopped
    state.decoding.finish(stopped)
    if plan.drafted:                # the draft fed itself; its rows that ended are finished
        proposal.on_finish(state.proposal_run, (active & stopped).nonzero().flatten().cpu())
    elif plan.needs.own_state:      # the proposal's own decoding state follows (one token a call)
        state.trace.syncs += 1
        fed = active & ~stopped
        proposal.on_extend(state.proposal_run, [[int(x)] for x in full(last)[fed].tolist()],
                           fed.nonzero().flatten().cpu())
        proposal.on_finish(state.proposal_run, (active & stopped).nonzero().flatten().cpu())
    return BlockDraw(drawn, stopped, bad, full(delim), full(nxt))


def _score(state: "SMCState", rows: torch.Tensor, blk, unfed_last: torch.Tensor) -> torch.Tensor:
    """The target's ``(n, W)`` ``log p`` of a drafted block's tokens, from one ``extend`` of the
    target's decoding state (one forward scores the whole block).  A stop token and a last token
    at the budget that is not fed (the cut at ``max_new_tokens``) are scored the same way and then
    cut back off the state (``truncate``), so the state holds what a native block would leave."""
    dec = state.decoding
    toks = blk.tokens.cpu()
    rows_l = rows.cpu().tolist()
    blocks = [[t for t in row if t >= 0] for row in toks.tolist()]
    state.trace.syncs += 1
    scored = dec.extend(blocks, rows_l)
    log_p = torch.full(toks.shape, -math.inf, dtype=torch.float64)
    if scored.shape[1]:
        log_p[:, :scored.shape[1]] = scored[:, :toks.shape[1]]
    unfed = (blk.ended.cpu() | (unfed_last.cpu() & (blk.length.cpu() > 0)))
    back = [(r, len(dec.tokens[r]) - 1) for r, u, b in zip(rows_l, unfed.tolist(), blocks) if u and b]
    if back:
        dec.truncate([r for r, _ in back], [k for _, k in back])
    return log_p.to(blk.log_q.device)


def _proposal_hook(plan: "SMCPlan", state: "SMCState", rows: torch.Tensor | None, a_sel: torch.Tensor,
                   width: int, bad: torch.Tensor):
    """The block's ``propose(k, log_p)`` for a proposal that is not native: at each position, for
    the rows ``k`` still drawing, ``(log q, log φ^next)`` from ``proposal.log_probs`` and the
    target's non-``Power`` token factors; it flags rows whose log-probabilities are bad."""
    P, target, proposal = state.particles, state.target, plan.proposal
    row_wise = plan.needs.row_wise
    all_rows = torch.arange(plan.R, device=P.device) if rows is None else rows

    def propose(k: torch.Tensor, sub_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = k.to(P.device)
        bad[k] |= (torch.isnan(sub_lp).any(1) | torch.isposinf(sub_lp).any(1)).to(P.device)
        every = width == 1          # a one-token block shows every listed row
        srows = rows if every else all_rows.index_select(0, k)
        a_k = a_sel if every else a_sel.index_select(0, k)
        if row_wise:
            exponent: float | torch.Tensor = a_k[:, None]
            ctx_rows = srows
        else:   # a float when every row shares it (proposals that are not row-wise may need one)
            exponent = float(a_k[0]) if len(a_k) and bool((a_k == a_k[0]).all()) else a_k[:, None]
            ctx_rows = (all_rows if srows is None else srows).cpu()
        batch = RowPrefixes(target.lm, state.prompts, P, state.decoding, srows, sub_lp)
        ctx = ProposalContext(target, batch, state.decoding, ctx_rows, exponent, state.generator,
                              plan.max_new_tokens, run=state.proposal_run)
        return proposal.log_probs(ctx), target.log_next_other(batch)

    return propose


__all__ = ["Drawn", "draw_step", "draw_block", "rows_to_draw", "COMPACT_BELOW"]
