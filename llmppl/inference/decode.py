"""Ancestral decoding from a proposal, one ``state.sample_block`` call.

Shared by MH (blocks and suffix proposals), the baselines and ``ScalablePower``.
:func:`advance` extends rows of an :class:`LMState` until EOS or a per-row length,
drawing ``y_t ~ q(· | y_<t)`` (or replaying given tokens), and records per position

    log q(y_t | y_<t),   log p(y_t | y_<t),   log γ-increment = target.log_next(·, a)[y_t].

A native proposal (``q ∝ p^{1/τ}`` on a target without token-level factors) is a plain
block spec, and the increment is ``a · log p``; any other proposal, and the replay of given
suffixes, runs through the spec's full-vocabulary hook (``proposal.log_probs`` and
``target.log_next`` at each position, :mod:`llmppl.models.block`), on backends with
``full_vocabulary`` (others refuse with ``NotNative``).  Given suffixes (MH's reverse moves) are
forced tokens of the same block: a native backend records their ``log q`` under the native
proposal as it does for drawn tokens.

EOS is never appended to the state: a row that draws EOS is ``ended`` and stops.
Lengths count the EOS token, as in ``llmppl.exact`` (a completion has at most
``max_new_tokens`` tokens including its EOS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.block import BlockSpec, Propose
from ..targets.target import Target
from .common import eos_ids
from .native import NATIVE_HINT, block_masks, block_temperature, require_full_vocabulary
from .proposal import Proposal, ProposalContext, own_sampler


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
    proposal_run: Any = None,
    max_new_tokens: int | None = None,
) -> Decoded:
    """Extend ``state`` rows ``rows`` to ``stop`` tokens (EOS included) or until EOS.

    ``forced[k]`` (optional) replays a given suffix for row ``rows[k]`` instead of
    sampling (its ``log q`` is still recorded: reverse-move probabilities).
    ``allow_eos=False`` draws from ``q`` renormalised without EOS.  ``exponent`` is ``a``
    for every row or a ``(len(rows),)`` tensor, one per row.  ``feed_last=False``: a row that
    reaches ``stop`` without EOS keeps its last token unfed (it will never be extended).
    ``proposal_run``: the run's state of the proposal (what its ``start`` returned);
    ``max_new_tokens``: the run's budget, which proposals that decode ahead never look past.
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
    tau = block_temperature(proposal, target, a_rows)
    native = tau is not None and bool(torch.isfinite(tau).all()) and not (forced is not None and proposal.greedy)
    if not native:
        require_full_vocabulary(state, f"decoding with the proposal {proposal!r}", NATIVE_HINT)
    spec = BlockSpec(budget=(stop_t - start).clamp(min=0), width=W,
                     temperature=tau if native else torch.ones(R, dtype=torch.float64),
                     stop_ids=eos_ids(target.lm), allow_stop=allow_eos and proposal.allow_stop,
                     greedy=native and proposal.greedy,
                     feed_last=None if feed_last else False,
                     forced=_forced_tokens(forced, R, W),
                     **(block_masks(target, state, rows) if native else {}))
    if not native:
        spec.propose = _proposal_hook(target, state, rows, proposal, exponent, a_rows, generator,
                                      proposal_run, max_new_tokens)
        spec.sample = own_sampler(proposal)
    blk = state.sample_block(rows, spec, generator)
    tokens, log_p = blk.tokens.cpu(), blk.log_p.cpu()
    unused = torch.full_like(log_p, -math.inf)
    if native:      # no token-level factor (block_temperature checked that): the increment is a · log p
        log_inc = torch.where(tokens >= 0, a_rows[:, None] * log_p, unused)
    else:           # the hook's target.log_next at the tokens (None: nothing was drawn)
        log_inc = unused if blk.log_inc is None else blk.log_inc.cpu()
    return Decoded(tokens, blk.log_q.cpu(), log_p, log_inc, blk.ended.cpu(), start + blk.length.cpu())


def _proposal_hook(target: Target, state, rows: torch.Tensor, proposal: Proposal, exponent: float | torch.Tensor,
                   a_rows: torch.Tensor, generator: torch.Generator, proposal_run: Any = None,
                   max_new_tokens: int | None = None) -> Propose:
    """The ``spec.propose`` of :func:`advance`'s token path: for the rows ``k`` (indices into
    ``rows``) still drawing, with log p ``lp``,

        log q = proposal.log_probs(ctx),    log_inc = target.log_next(·, a)   (both (m, V)),

    where ``ctx`` holds the rows' prefixes (``target.batch``), the state, the state rows and
    the exponent ``a`` (a float, or ``(m, 1)`` with one per row)."""
    per_row = per_row_exponent(exponent)
    a_host = a_rows if per_row else float(exponent)

    def propose(k: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = k.cpu()
        srows = rows[k]
        rl = srows.tolist()
        batch = target.batch([state.prompt_of(r) for r in rl], [state.tokens[r] for r in rl], lp)
        a = a_host[k][:, None] if per_row else a_host
        ctx = ProposalContext(target, batch, state, srows, a, generator, max_new_tokens, run=proposal_run)
        log_q = proposal.log_probs(ctx)
        return log_q, target.log_next(batch, exponent=a.to(lp.device) if per_row else a)

    return propose


def _forced_tokens(forced: Sequence[Sequence[int] | None] | None, R: int, W: int) -> torch.Tensor | None:
    """``(R, W)`` long: row ``k``'s given suffix ``forced[k]`` (``-1`` past it, and for rows drawn)."""
    if forced is None:
        return None
    out = torch.full((R, W), -1, dtype=torch.long)
    for k, f in enumerate(forced):
        if f is not None and len(f):
            out[k, :len(f)] = torch.as_tensor(list(f), dtype=torch.long)
    return out


def per_row_exponent(exponent: float | torch.Tensor) -> bool:
    return isinstance(exponent, torch.Tensor) and exponent.numel() > 1


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
