"""Block decoding: the one primitive every engine decodes through.

``state.sample_block(rows, spec, generator) -> Block`` extends each listed row by up to
``spec.budget[k]`` tokens drawn from a proposal the backend can run itself,

    q(v | y_<t) ∝ p(v | y_<t)^{1/τ_k} · 1[v ∈ allowed]      (τ_k > 0 per row; greedy: argmax p),

stopping a row at the first stop id (EOS), and returns for every drawn token both
``log p(y_t | y_<t)`` under the base LM and ``log q(y_t | y_<t)`` under the proposal.
Engines weigh at block boundaries from these two numbers (float64 sums): for
``q ∝ p^{a}`` the per-token weight ``a·log p − log q = log Σ_u p(u|y_<t)^a`` is exact.

A drawn stop token is recorded in the block but never fed to the state; a row that
reaches its budget with ``spec.feed_last[k]`` false keeps its last token unfed too
(a completion cut at ``max_new_tokens``: the caller finishes it).  Every other drawn
token is appended to the row, exactly as ``state.step`` / ``state.extend`` would.

:func:`sample_tokenwise` is the reference implementation over ``last_logprobs`` /
``step`` (the device fast path of every ``LMState``); backends that decode natively
(vLLM) override ``LMState.sample_block`` and never materialise ``(rows, V)`` tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: ``log q`` below this counts as probability 0 when sampling (see :func:`sample_inverse_cdf`)
LOG_Q_FLOOR = -80.0
#: tokens per block of the two-level inverse-CDF sampler
SAMPLE_BLOCK = 1024


class NotNative(ValueError):
    """A backend was asked for something it cannot compute natively (e.g. full-vocabulary
    log-probabilities on vLLM)."""


@dataclass
class BlockSpec:
    """What to draw for ``n`` rows (see module docstring).

    ``budget`` ``(n,)`` long: at most this many tokens per row (stop token included);
    ``width``: ``max(budget)`` as a host int (so the loop needs no sync to size itself);
    ``temperature`` ``(n,)`` float64 ``τ`` per row (ignored when ``greedy``);
    ``stop_ids``: ids that end a row; ``allow_stop``: when false ``q`` is renormalised
    without them; ``allowed`` ``(V,)`` bool: a static token mask (``None``: every token);
    ``feed_last`` ``(n,)`` bool: feed a row's token at its budget end (default: all).
    """

    budget: torch.Tensor
    width: int
    temperature: torch.Tensor
    stop_ids: tuple[int, ...]
    allow_stop: bool = True
    allowed: torch.Tensor | None = None
    greedy: bool = False
    feed_last: torch.Tensor | None = None

    @classmethod
    def make(cls, n: int, max_tokens: int | torch.Tensor, temperature: float | torch.Tensor,
             stop_ids: tuple[int, ...], device: torch.device | str = "cpu", **kw) -> "BlockSpec":
        """A spec with scalars broadcast to ``n`` rows on ``device``."""
        budget = torch.as_tensor(max_tokens, dtype=torch.long, device=device).expand(n).clone()
        width = int(max_tokens) if not isinstance(max_tokens, torch.Tensor) else int(budget.max()) if n else 0
        tau = torch.as_tensor(temperature, dtype=torch.float64, device=device).reshape(-1).expand(n).clone()
        return cls(budget, width, tau, tuple(stop_ids), **kw)


@dataclass
class Block:
    """What :meth:`LMState.sample_block` drew for ``n`` rows, ``W`` positions.

    Column ``j`` is the ``j``-th token drawn for the row in this call; unused cells hold
    ``token = -1`` and ``-inf`` log values.  ``length[k]`` counts the drawn tokens (the
    stop token included); ``ended[k]``: the row drew a stop id.
    """

    tokens: torch.Tensor   # (n, W) long
    log_p: torch.Tensor    # (n, W) float64
    log_q: torch.Tensor    # (n, W) float64
    ended: torch.Tensor    # (n,) bool
    length: torch.Tensor   # (n,) long

    def total(self, name: str) -> torch.Tensor:
        """``(n,)`` float64 sum over the drawn positions of ``log_p`` or ``log_q``."""
        x = getattr(self, name)
        return torch.where(self.tokens >= 0, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)


def proposal_logprobs(log_p: torch.Tensor, temperature: torch.Tensor, stop_ids: torch.Tensor,
                      allow_stop: bool = True, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``log q = log_softmax(log p / τ + log 1[allowed])`` per row (``τ`` ``(n,)``), in the
    dtype of ``log_p``; without the stop ids when ``allow_stop`` is false.  Tokens with
    ``p = 0`` stay at ``−inf`` (no ``0 · ∞``)."""
    scaled = log_p / temperature.to(log_p)[:, None]
    if allowed is not None:
        scaled = scaled.masked_fill(~allowed.to(scaled.device)[None, :], -math.inf)
    if not allow_stop:
        scaled = scaled.index_fill(1, stop_ids.to(scaled.device), -math.inf)
    return torch.log_softmax(scaled, dim=-1)


def sample_inverse_cdf(log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``q = exp(log_q)`` by inversion, in two levels.

    With ``U ~ U[0, 1)`` from ``generator``, the vocabulary cut into blocks of
    ``SAMPLE_BLOCK`` tokens, ``S_b`` their float64 sums and ``C`` the running sums:
    block ``b = min{b : C_b > U·C_last}``, then inside it the token
    ``v = min{v : c_v > U·C_last − C_{b−1}}`` with ``c`` the float64 cumulative sums
    of the block.  This is ``v = min{v : C_v > U·C_V}`` over the whole vocabulary,
    with one float64 cumulative sum of a block per row instead of the full row (a
    vocabulary of at most one block is inverted in one level).

    Tokens with ``log q < −80`` (``q < 1.8e−35``, at most ~1e−30 of the mass for any
    vocabulary) count as probability 0: their float32 ``exp`` would be denormal, which is
    an order of magnitude slower on CPUs, and below the resolution of the float64 sums.
    (Inversion is ~6× faster than ``torch.multinomial`` on a CPU for a 49k vocabulary.)
    """
    B, V = log_q.shape
    p = torch.nn.functional.threshold(log_q, LOG_Q_FLOOR, -math.inf).exp_()   # (also NaN → 0)
    dev = generator.device if generator is not None else log_q.device
    K = SAMPLE_BLOCK
    if V <= K:             # one level: the float64 cumulative sums of the row itself
        cum = p.cumsum(-1, dtype=torch.float64)
        u = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=dev).to(cum.device)
        rest = torch.minimum(u * cum[:, -1:], cum[:, -1:] * (1.0 - 1e-12))
        return torch.searchsorted(cum, rest, right=True).squeeze(1).clamp_(max=V - 1)
    full, tail = divmod(V, K)
    sums = p[:, :full * K].reshape(B, full, K).sum(-1, dtype=torch.float64)
    if tail:
        sums = torch.cat([sums, p[:, full * K:].sum(-1, dtype=torch.float64, keepdim=True)], 1)
    cum = sums.cumsum(-1)
    u = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=dev).to(cum.device)
    u = u * cum[:, -1:]
    block = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[1] - 1)
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    cols = block * K + torch.arange(K, device=log_q.device)
    inside = p.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0.0).double().cumsum(-1)
    # rounding can put U·C_last − C_{b−1} at or past the block's own total: take its last token with mass
    rest = torch.minimum(u - before, inside[:, -1:] * (1.0 - 1e-12))
    return cols.gather(1, torch.searchsorted(inside, rest, right=True).clamp_(max=K - 1)).squeeze(1).clamp_(max=V - 1)


def _draw_token(lp: torch.Tensor, tau: torch.Tensor, stop: torch.Tensor, spec: BlockSpec,
                allowed: torch.Tensor | None, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``lp`` ``(n, V)`` and its float64 ``log q`` (0 for greedy)."""
    if spec.greedy:
        masked = lp if allowed is None else lp.masked_fill(~allowed[None], -math.inf)
        if not spec.allow_stop:
            masked = masked.index_fill(1, stop, -math.inf)
        tok = masked.argmax(-1)
        return tok, torch.zeros(len(tok), dtype=torch.float64, device=tok.device)
    lq = proposal_logprobs(lp, tau, stop, spec.allow_stop, allowed)
    tok = sample_inverse_cdf(lq, generator).to(lp.device)
    return tok, lq.gather(1, tok[:, None]).squeeze(1).double()


def sample_tokenwise(state, rows: torch.Tensor | None, spec: BlockSpec, generator: torch.Generator | None) -> Block:
    """The reference :meth:`LMState.sample_block`: one batched forward per position.

    When ``rows`` covers every row of the state, or the block is one token, it runs on the
    device fast path (``last_logprobs`` / ``step``: no host sync for one token, one per
    position otherwise, to stop once every row is done).  For a subset of the rows it uses
    ``logprobs(rows)`` / ``extend`` on the rows still drawing, so the forward covers only them.
    """
    dev, R, W = state.lm.device, state.n, spec.width
    every = rows is None                  # all rows, in order: no gathers / scatters
    if not every:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).to(dev)
    n = R if every else len(rows)
    budget = spec.budget.to(dev)
    feed_last = None if spec.feed_last is None else spec.feed_last.to(dev)
    stop = torch.tensor(spec.stop_ids, dtype=torch.long, device=dev)
    tau = spec.temperature.to(dev)
    allowed = None if spec.allowed is None else spec.allowed.to(dev)
    ended = torch.zeros(n, dtype=torch.bool, device=dev)
    if n == R or W == 1:      # the device path: one column per position, every row of the block
        columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for j in range(W):
            live = budget > j if j == 0 else ~ended & (budget > j)
            if j and not bool(live.any()):
                break
            lp = state.last_logprobs() if every else state.last_logprobs().index_select(0, rows)
            tok, lq_tok = _draw_token(lp, tau, stop, spec, allowed, generator)
            lp_tok = lp.gather(1, tok[:, None]).squeeze(1).double()
            columns.append((torch.where(live, tok, -1), torch.where(live, lp_tok, -math.inf),
                            torch.where(live, lq_tok, -math.inf)))
            is_stop = live & torch.isin(tok, stop)
            ended = ended | is_stop
            feed = live & ~is_stop
            if feed_last is not None:
                feed = feed & ((budget > j + 1) | feed_last)
            fed = torch.where(feed, tok, 0)
            if every:
                state.step(fed, feed)
            else:
                state.step(torch.zeros(R, dtype=torch.long, device=dev).index_copy_(0, rows, fed),
                           torch.zeros(R, dtype=torch.bool, device=dev).index_copy_(0, rows, feed))
        tokens, log_p, log_q = (torch.stack(c, 1) for c in zip(*columns)) if columns else (
            torch.empty((n, 0), dtype=torch.long, device=dev),
            *(torch.empty((n, 0), dtype=torch.float64, device=dev),) * 2)
        if tokens.shape[1] < W:        # every row stopped early: pad to the block's width
            pad = W - tokens.shape[1]
            tokens = torch.cat([tokens, tokens.new_full((n, pad), -1)], 1)
            log_p = torch.cat([log_p, log_p.new_full((n, pad), -math.inf)], 1)
            log_q = torch.cat([log_q, log_q.new_full((n, pad), -math.inf)], 1)
    else:                     # a subset of the rows: the forward covers only the rows still drawing
        tokens = torch.full((n, W), -1, dtype=torch.long, device=dev)
        log_p = torch.full((n, W), -math.inf, dtype=torch.float64, device=dev)
        log_q = log_p.clone()
        for j in range(W):
            sub = (~ended & (budget > j)).nonzero().flatten()
            if len(sub) == 0:
                break
            lp = state.logprobs(rows[sub].cpu()).to(dev)
            tok, lq_tok = _draw_token(lp, tau[sub], stop, spec, allowed, generator)
            tokens[sub, j] = tok
            log_p[sub, j] = lp.gather(1, tok[:, None]).squeeze(1).double()
            log_q[sub, j] = lq_tok
            is_stop = torch.isin(tok, stop)
            ended[sub] |= is_stop
            feed = ~is_stop
            if feed_last is not None:
                feed = feed & ((budget[sub] > j + 1) | feed_last[sub])
            if bool(feed.any()):
                state.extend(tok[feed].cpu(), rows[sub][feed].cpu())
    length = (tokens >= 0).sum(1)
    return Block(tokens, log_p, log_q, ended, length)


__all__ = ["Block", "BlockSpec", "NotNative", "proposal_logprobs", "sample_inverse_cdf", "sample_tokenwise",
           "LOG_Q_FLOOR", "SAMPLE_BLOCK"]
