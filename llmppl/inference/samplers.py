"""Stand-alone approximate samplers.

``ScalablePower(top_k, rollouts, horizon, n)``: the training-free sampler of Scalable
Power Sampling (arXiv 2601.21590): decode token by token from the
:class:`~llmppl.inference.lookahead.Lookahead` proposal ``q(v) ∝ p(v)^α ζ̂(v)``, with
no weights.  Approximate: ``E[q̂] ≠ π_α(v|y_<t)`` for finitely many rollouts (the
``jackknife`` option removes the ``O(1/M)`` bias) and the horizon truncates the
future; inside ``pp.SMC(proposal=Lookahead(...))`` the weights make it exact.

On a target without token-level factors other than masks (and without the jackknife) each token
is drawn by :meth:`~llmppl.inference.lookahead.Lookahead.draw_next`, natively on every backend
(vLLM included: a one-token block that records the top-k, rollouts on a fork, the choice on the
host); otherwise through the proposal's full-vocabulary ``log_probs`` (backends with
``full_vocabulary``).  Both draw from the same law.
"""

from __future__ import annotations

import math

import torch

from .common import eos_ids
from .decode import Decoded
from .decoder import BatchMixin, DecodeInfo, Decoder, DecoderState, _check_n
from .lookahead import Lookahead, _feed
from .native import block_masks, needs
from .result import Result


class LookaheadDecoder(Decoder):
    """The :class:`Decoder` of ``ScalablePower``: token by token from :meth:`Lookahead.draw_next`
    when the look-ahead is native for the target (``Lookahead.drafts`` and no token-level factor
    but masks), else the decoder's full-vocabulary path."""

    proposal: Lookahead

    def step(self, state: DecoderState) -> tuple[DecoderState, DecodeInfo]:
        la, target = self.proposal, state.target
        if state.done or not (la.drafts and not needs(target).full_vocabulary):
            return super().step(state)
        with torch.inference_mode():
            G, T, dec = len(state.prompts), state.max_new_tokens, state.decoding
            R = G * self.n
            a = float(target.base_exponent)
            stop = torch.tensor(eos_ids(target.lm), dtype=torch.long)
            tokens = torch.full((R, T), -1, dtype=torch.long)
            log_p = torch.full((R, T), -math.inf, dtype=torch.float64)
            log_q = log_p.clone()
            ended = torch.zeros(R, dtype=torch.bool)
            live = torch.ones(R, dtype=torch.bool)
            for j in range(T):
                idx = live.nonzero().flatten()
                if len(idx) == 0:
                    break
                d = la.draw_next(dec, idx, torch.full((len(idx),), a, dtype=torch.float64), state.generator,
                                 state.proposal_run, T, la.allow_stop, block_masks(target, dec, idx))
                tokens[idx, j], log_p[idx, j], log_q[idx, j] = d.tokens, d.log_p, d.log_q
                is_stop = torch.isin(d.tokens, stop)
                ended[idx] |= is_stop
                go = ~is_stop & (j + 1 < T)       # the last token at max_new_tokens is never fed
                live[idx] = go
                if bool(go.any()):
                    _feed(dec, [[t] for t in d.tokens[go].tolist()], idx[go])
            log_inc = torch.where(tokens >= 0, a * log_p, torch.full_like(log_p, -math.inf))
            state.decoded = Decoded(tokens, log_q, log_p, log_inc, ended, (tokens >= 0).sum(1))
        return state, DecodeInfo(step=1, tokens=(tokens >= 0).sum(1).view(G, self.n).sum(1))


class ScalablePower(BatchMixin):
    """``n`` completions drawn from the look-ahead proposal of ``p^α`` (``α`` = the target's exponent).

    Every prompt's rows decode together; the rollouts of all rows share one forked state and
    never look past the run's ``max_new_tokens`` (given to the proposal in its context)."""

    method = "scalable_power"

    def __init__(self, top_k: int = 4, rollouts: int = 2, horizon: int = 8, n: int = 1,
                 jackknife: bool = False, floor: float = 0.0) -> None:
        self.lookahead = Lookahead(top_k=top_k, rollouts=rollouts, horizon=horizon, jackknife=jackknife,
                                   floor=floor)
        self.n = _check_n(n)

    def _decoder(self) -> Decoder:
        la = self.lookahead
        return LookaheadDecoder("scalable_power", la, self.n,
                       {"top_k": la.top_k, "rollouts": la.rollouts, "horizon": la.horizon,
                        "jackknife": la.jackknife, "floor": la.floor})

    def results(self, state: DecoderState, raise_on_failure: bool = False) -> list[Result]:
        """``Result.stats`` counts the rollouts (``tokens_decoded`` includes them; the engine adds
        the proposal's work): ``lookahead_tokens_decoded`` (alias ``rollout_tokens``) are the
        rollout tokens of the prompt's own rows, ``lookahead_forward_passes`` the batch's."""
        out = super().results(state)
        for res in out:
            res.stats["rollout_tokens"] = res.stats.get("lookahead_tokens_decoded", 0)
        return out

    def __repr__(self) -> str:
        return f"ScalablePower({self.lookahead!r}, n={self.n})"
