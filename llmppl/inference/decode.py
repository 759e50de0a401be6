"""Ancestral decoding from a proposal, one batched forward per position.

Shared by MH (blocks and suffix proposals), the baselines and ``ScalablePower``.
:func:`advance` extends rows of an :class:`LMState` until EOS or a per-row length,
drawing ``y_t ~ q(· | y_<t)`` (or replaying given tokens), and records per position

    log q(y_t | y_<t),   log p(y_t | y_<t),   log γ-increment = target.log_next(·, a)[y_t].

EOS is never appended to the state: a row that draws EOS is ``ended`` and stops.
Lengths count the EOS token, as in ``llmppl.exact`` (a completion has at most
``max_new_tokens`` tokens including its EOS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.block import BlockSpec
from ..targets.target import Target
from .common import eos_ids
from .native import NATIVE_HINT, block_temperature, require_full_vocabulary
from .proposal import Proposal, ProposalContext


@dataclass
class Decoded:
    """Per-position records of :func:`advance` for ``R`` rows, ``W`` positions.

    Column ``j`` is position ``start[r] + j`` of row ``r``; unused cells hold
    ``token = -1`` and ``-inf`` log values.  ``length[r]`` counts the EOS token.
    """

    tokens: torch.Tensor    # (R, W) long
    log_q: torch.Tensor     # (R, W) float64
    log_p: torch.Tensor     # (R, W) float64
    log_inc: torch.Tensor   # (R, W) float64   target.log_next increments
    ended: torch.Tensor     # (R,) bool        drew EOS
    length: torch.Tensor    # (R,) long        final length (EOS included)

    def total(self, name: str) -> torch.Tensor:
        """``(R,)`` sum over the decoded positions of ``log_q``, ``log_p`` or ``log_inc``."""
        x = getattr(self, name)
        return torch.where(self.tokens >= 0, x, torch.zeros((), dtype=x.dtype)).sum(1)


def without_eos(log_q: torch.Tensor, eos: int | torch.Tensor) -> torch.Tensor:
    """``q`` renormalised on the tokens other than EOS (every EOS id)."""
    out = log_q.double().clone()
    out[:, torch.as_tensor(eos, device=out.device)] = -math.inf
    return torch.log_softmax(out, dim=-1)


def advance(
    target,
    state,
    rows: torch.Tensor,
    stop: torch.Tensor | int,
    proposal: Proposal,
    exponent: float | torch.Tensor,
    generator: torch.Generator,
    forced: Sequence[Sequence[int] | None] | None = None,
    allow_eos: bool = True,
    feed_last: bool = True,
) -> Decoded:
    """Extend ``state`` rows ``rows`` to ``stop`` tokens (EOS included) or until EOS.

    ``forced[k]`` (optional) replays a given suffix for row ``rows[k]`` instead of
    sampling (its ``log q`` is still recorded: reverse-move probabilities).
    ``allow_eos=False`` draws from ``q`` renormalised without EOS.  ``exponent`` is ``a``
    for every row or a ``(len(rows),)`` tensor, one per row.  ``feed_last=False``: a row that
    reaches ``stop`` without EOS keeps its last token unfed (it will never be extended).
    """
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    R = len(rows)
    start = torch.tensor([len(state.tokens[r]) for r in rows.tolist()], dtype=torch.long)
    stop_t = torch.as_tensor(stop, dtype=torch.long).expand(R).clone()
    if forced is not None:
        stop_t = torch.where(
            torch.tensor([f is not None for f in forced]),
            start + torch.tensor([len(f) if f is not None else 0 for f in forced]),
            stop_t,
        )
    W = max(int((stop_t - start).max()) if R else 0, 0)
    a_rows = exponent.double().reshape(-1) if per_row_exponent(exponent) else torch.full((R,), float(exponent),
                                                                                          dtype=torch.float64)
    tau = block_temperature(proposal, target, a_rows) if forced is None else None
    if tau is not None and bool(torch.isfinite(tau).all()):
        return _advance_native(target, state, rows, start, stop_t, W, proposal, tau, a_rows, generator, allow_eos,
                               feed_last)
    require_full_vocabulary(state, f"decoding with the proposal {proposal!r}" if forced is None else
                            "replaying given suffixes (MH moves)", NATIVE_HINT)
    tokens = torch.full((R, W), -1, dtype=torch.long)
    log_q = torch.full((R, W), -math.inf, dtype=torch.float64)
    log_p = log_q.clone()
    log_inc = log_q.clone()
    ended = torch.zeros(R, dtype=torch.bool)
    eos = torch.tensor(eos_ids(target.lm))
    per_row = isinstance(exponent, torch.Tensor)
    for j in range(W):
        live = ((start + j < stop_t) & ~ended).nonzero().flatten()
        if len(live) == 0:
            break
        srows = rows[live]
        lp = state.logprobs(srows)
        batch = target.batch([state.prompt_of(r) for r in srows.tolist()],
                             [state.tokens[r] for r in srows.tolist()], lp)
        a = exponent[live][:, None] if per_row else exponent
        ctx = ProposalContext(target, batch, state, srows, a, generator)
        lq = proposal.log_probs(ctx)
        if not allow_eos:
            lq = without_eos(lq, eos)
        tok = proposal.sample(lq, generator).cpu()
        if forced is not None:
            for pos, k in enumerate(live.tolist()):
                if forced[k] is not None:
                    tok[pos] = int(forced[k][j])
        inc = target.log_next(batch, exponent=a.to(lp.device) if per_row else a)
        dev_tok = tok.to(lq.device)[:, None]
        tokens[live, j] = tok
        log_q[live, j] = lq.gather(1, dev_tok).squeeze(1).double().cpu()
        log_p[live, j] = lp.gather(1, tok.to(lp.device)[:, None]).squeeze(1).double().cpu()
        log_inc[live, j] = inc.gather(1, tok.to(inc.device)[:, None]).squeeze(1).double().cpu()
        is_eos = torch.isin(tok, eos)
        ended[live[is_eos]] = True
        go = (~is_eos & (torch.tensor(feed_last) | (start[live] + j + 1 < stop_t[live]))).nonzero().flatten()
        if len(go):
            state.extend(tok[go], srows[go])
    length = start + (tokens >= 0).sum(1)
    return Decoded(tokens, log_q, log_p, log_inc, ended, length)


def per_row_exponent(exponent: float | torch.Tensor) -> bool:
    return isinstance(exponent, torch.Tensor) and exponent.numel() > 1


def _advance_native(target, state, rows: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, W: int,
                    proposal: Proposal, tau: torch.Tensor, a_rows: torch.Tensor, generator: torch.Generator,
                    allow_eos: bool, feed_last: bool) -> Decoded:
    """:func:`advance` as one ``state.sample_block`` call: ``log_inc = a · log p`` (no token-level
    factor: :func:`~llmppl.inference.native.block_temperature` checked that)."""
    spec = BlockSpec(budget=stop - start, width=W, temperature=tau, stop_ids=eos_ids(target.lm),
                     allow_stop=allow_eos and proposal.allow_stop, greedy=proposal.greedy,
                     feed_last=None if feed_last else torch.zeros(len(rows), dtype=torch.bool))
    blk = state.sample_block(rows, spec, generator)
    tokens, log_p, log_q = blk.tokens.cpu(), blk.log_p.cpu(), blk.log_q.cpu()
    log_inc = torch.where(tokens >= 0, a_rows[:, None] * log_p, torch.full_like(log_p, -math.inf))
    return Decoded(tokens, log_q, log_p, log_inc, blk.ended.cpu(), start + blk.length.cpu())


def end_terms(target: Target, prompts: list[list[int]], tokens: list[list[int]], ended: torch.Tensor,
              final: bool) -> torch.Tensor:
    """``log φ_complete`` of finished (and, when ``final``, truncated) rows; ``log ψ`` of the others.
    ``prompts[i]`` is row i's prompt."""
    n = len(tokens)
    out = torch.zeros(n, dtype=torch.float64)
    complete = ended if not final else torch.ones(n, dtype=torch.bool)
    if target.has_complete and bool(complete.any()):
        idx = complete.nonzero().flatten().tolist()
        batch = target.batch([prompts[i] for i in idx], [tokens[i] for i in idx], None,
                             [bool(ended[i]) for i in idx], [not bool(ended[i]) for i in idx])
        out[idx] = target.log_complete(batch)
    if target.has_twist and not bool(complete.all()):
        idx = (~complete).nonzero().flatten().tolist()
        out[idx] = target.log_twist(target.batch([prompts[i] for i in idx], [tokens[i] for i in idx]))
    return out
