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

Native path (every backend, vLLM included; no ``(rows, V)`` tensor).  Write ``e^S = Σ_v p(v)^α``,
``Z = Σ_c p(c)^α (ζ̂_c − ζ̂_min) + ζ̂_min e^S`` (the normaliser of ``p^α ζ̂``) and ``q_0 = p^α / e^S``.
Because every token outside the candidates carries ``ζ̂_min``, the smallest ``ζ̂``,

    q = α_0 · q_0 + Σ_c β_c · δ_c,    α_0 = (1−ε) ζ̂_min e^S / Z + ε,    β_c = (1−ε) p(c)^α (ζ̂_c − ζ̂_min) / Z ≥ 0,

a mixture of ``q_0`` and point masses on the candidates (``α_0 + Σ_c β_c = 1``).  So one native
one-token block at ``τ = 1/α`` (``feed_last=False``, ``BlockSpec.top_k = K``, ``norm_exponent = α``)
gives everything: a draw ``y_0 ~ q_0`` with its exact ``log q_0``, ``S`` (``Block.log_norm``) and the
top-``K`` candidates with their ``log p`` (``Block.top_ids`` / ``top_log_p``).  The rollouts run on
a fork after each candidate (native blocks at ``τ = 1``); then each row keeps ``y_0`` with
probability ``α_0``, else takes candidate ``c`` with probability ``β_c`` (its own uniform,
:class:`~llmppl.models.streams.RowStreams`), and ``log q(y) = log(α_0 q_0(y) + β_y)`` from these
scalars (``β_y = 0`` off the candidates, where ``q_0(y)`` is the block's own ``log q``).  The law is
exactly that of :meth:`Lookahead.log_probs` (the same ``ζ̂``, the same ``q``).  SMC plugs it in as a
drafting proposal (:meth:`Lookahead.draft_block`: the engine's own state draws, the target scores
the token with one ``extend``), ``ScalablePower`` through :meth:`Lookahead.draw_next`; the
full-vocabulary :meth:`Lookahead.log_probs` stays for what the native path cannot do: a target with
token-level factors other than masks (``Tempered``), segment steps and the jackknife (whose ``q``
may weigh a candidate below the rest), on backends with ``full_vocabulary``.

``jackknife=True`` replaces the plug-in ``q̂ = g(ζ̂)`` (biased: a ratio of estimates)
by ``M·g(ζ̂) − (M−1)/M · Σ_j g(ζ̂_{−j})`` where ``ζ̂_{−j}`` leaves rollout ``j`` out for
every candidate; this cancels the ``O(1/M)`` bias of ``E[q̂]``.  It is clipped below at
``JACKKNIFE_FLOOR · q̂`` and renormalised (support kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..models.block import Block, BlockSpec, row_uniforms
from ..models.streams import RowStreams, torch_generator
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


class NextTokens(NamedTuple):
    """One token per row from :meth:`Lookahead.draw_next`, ``(n,)`` each: the token, its ``log p``
    under the base LM and its float64 ``log q`` under the look-ahead proposal."""

    tokens: torch.Tensor
    log_p: torch.Tensor
    log_q: torch.Tensor


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

    #: :meth:`draft_block` draws from the engine's own state, feeds it and records ``log p``
    draws_from_engine = True

    @property
    def drafts(self) -> bool:  # type: ignore[override]
        """Drawn natively (:meth:`draft_block`) unless the jackknife is on (module docstring)."""
        return not self.jackknife

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
        ``ctx.max_new_tokens``).  The fork is fed each candidate (on vLLM appended: its first
        block computes it), then draws every future in one ``sample_block`` (``q = p``, stop at EOS,
        the last token of a future never fed); ``log p(f)`` is the block's ``log p`` total."""
        rows = torch.as_tensor(ctx.rows, dtype=torch.long).reshape(-1)
        lengths = torch.tensor([len(t) for t in ctx.batch.tokens])
        return self._rollouts(ctx.state, rows, lengths, cand, possible, ctx.max_new_tokens, ctx.generator, ctx.run,
                              eos_ids(ctx.target.lm), share=False)

    def _rollouts(self, state: Any, rows: torch.Tensor, lengths: torch.Tensor, cand: torch.Tensor,
                  possible: torch.Tensor | None, budget: int | None, generator: Any, run: Any,
                  stop_ids: tuple[int, ...], share: bool) -> torch.Tensor:
        """:meth:`_future_logp` on the ``state``'s ``rows`` (completions of ``lengths`` tokens so far).

        ``share``: rows with the same prompt, prefix and candidates share their rollouts (one set
        per distinct prefix).  ``ζ̂`` is then a function of the particle system and fresh
        randomness, so each row's draw from ``q_ζ̂`` and its ``log q`` are unchanged in law and SMC's
        weights stay exact (an adapted proposal), at a fraction of the rollouts once particles
        coalesce; but rows that share a prefix get the same ``ζ̂``, so their draws are dependent.
        SMC shares (its weights correct every draw); ``ScalablePower``, whose ``n`` samples are the
        answer, does not."""
        if not share:
            return self._distinct_rollouts(state, rows, lengths, cand, possible, budget, generator, run, stop_ids)
        R = len(rows)
        first: dict[tuple, int] = {}
        prompts = state.prompt_of
        rep = torch.tensor([first.setdefault((tuple(prompts(r)), tuple(state.tokens[r]), tuple(c)), i)
                            for i, (r, c) in enumerate(zip(rows.tolist(), cand.tolist()))], dtype=torch.long)
        if len(first) == R:
            return self._distinct_rollouts(state, rows, lengths, cand, possible, budget, generator, run, stop_ids)
        uniq = torch.tensor(sorted(first.values()), dtype=torch.long)
        at = torch.zeros(R, dtype=torch.long)
        at[uniq] = torch.arange(len(uniq))
        out = self._distinct_rollouts(state, rows[uniq], lengths[uniq], cand[uniq],
                                      None if possible is None else possible[uniq], budget, generator, run, stop_ids)
        return out[at[rep]]

    def _distinct_rollouts(self, state: Any, rows: torch.Tensor, lengths: torch.Tensor, cand: torch.Tensor,
                           possible: torch.Tensor | None, budget: int | None, generator: Any, run: Any,
                           stop_ids: tuple[int, ...]) -> torch.Tensor:
        """:meth:`_rollouts` for rows that share nothing."""
        R, K = cand.shape
        M = self.rollouts
        eos = torch.tensor(stop_ids)
        horizon = torch.full((R,), self.horizon, dtype=torch.long)
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
        fork = state.copy()
        fork.reorder(rows.repeat_interleave(K * M))
        groups = torch.as_tensor(fork.group).cpu()[alive]
        fp0 = fork.forward_passes
        go = alive.nonzero().flatten()
        _feed(fork, [[t] for t in first[go].tolist()], go)
        # the futures: draws from p until EOS or the horizon (whose last token is never fed)
        n = len(go)
        spec = BlockSpec(budget=hor[go], width=int(hor[go].max()), temperature=torch.ones(n, dtype=torch.float64),
                         stop_ids=stop_ids, feed_last=False)
        gen = generator.split(fork.n_rows) if isinstance(generator, RowStreams) else generator
        blk = fork.sample_block(go, spec, gen)
        log_f[go] = blk.total("log_p").cpu()
        # fed: the candidate, then every drawn token but the last (EOS, or the horizon's end)
        if isinstance(run, LookaheadRun):
            run.count(groups, 1 + (blk.length.cpu() - 1).clamp(min=0))
            run.forward_passes += fork.forward_passes - fp0
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

    # ------------------------------------------------------------ native
    def draw_next(self, state: Any, rows: torch.Tensor, exponent: torch.Tensor, generator: Any,
                  run: Any = None, max_new_tokens: int | None = None, allow_stop: bool = True,
                  masks: dict[str, Any] | None = None, share: bool = False) -> NextTokens:
        """One token for each of ``state``'s ``rows`` from the look-ahead proposal, natively (module
        docstring): a one-token block at ``τ = 1/a`` that feeds nothing and records the top-``K``
        and ``S``, the rollouts on a fork, the choice on the host.  Nothing is fed to ``state``.

        ``exponent`` ``(n,)``: ``a`` per row (``> 0``); ``masks``: ``BlockSpec`` mask fields for these
        rows (``allowed`` / ``mask_fn``, :func:`~llmppl.inference.native.block_masks`); ``allow_stop``:
        false draws without the stop ids; ``share``: rows with the same prefix share their rollouts
        (:meth:`_rollouts`)."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        n, V = len(rows), state.lm.vocab_size
        a = torch.as_tensor(exponent, dtype=torch.float64).reshape(-1).expand(n).cpu()
        if n and not bool((a > 0).all() and torch.isfinite(a).all()):
            raise ValueError(f"Lookahead draws natively from p^a at a > 0, got a = {a.min().item():g}")
        stop_ids = eos_ids(state.lm)
        K = min(self.top_k, V)
        dev = state.lm.device
        spec = BlockSpec(budget=torch.ones(n, dtype=torch.long, device=dev), width=1,
                         temperature=(1.0 / a).to(dev), stop_ids=stop_ids, allow_stop=allow_stop, feed_last=False,
                         norm_exponent=a.to(dev), top_k=K, **(masks or {}))
        blk = state.sample_block(rows.to(dev), spec, generator)
        assert blk.top_ids is not None and blk.top_log_p is not None and blk.log_norm is not None
        y0, lp0, lq0 = blk.tokens[:, 0].cpu(), blk.log_p[:, 0].cpu().double(), blk.log_q[:, 0].cpu().double()
        S = blk.log_norm[:, 0].cpu().double()
        cand, top_lp = blk.top_ids.cpu(), blk.top_log_p.cpu().double()
        possible = torch.isfinite(top_lp)
        lengths = torch.tensor([len(state.tokens[r]) for r in rows.tolist()], dtype=torch.long)
        future = self._rollouts(state, rows, lengths, cand, possible, max_new_tokens, generator, run, stop_ids, share)
        M = self.rollouts
        lz = torch.logsumexp((a[:, None, None] - 1.0) * future.double(), -1) - math.log(M)      # log ζ̂ (n, K)
        lz_min = lz.min(1).values
        la = torch.where(possible, a[:, None] * top_lp, -math.inf)                              # log p(c)^a
        diff = lz + torch.log(-torch.expm1(lz_min[:, None] - lz))                              # log(ζ̂_c − ζ̂_min)
        lw = torch.where(possible, la + diff, -math.inf)
        log_z = torch.logaddexp(torch.logsumexp(lw, 1), lz_min + S)
        l_keep = math.log1p(-self.floor) if self.floor < 1.0 else -math.inf
        l_floor = math.log(self.floor) if self.floor > 0.0 else -math.inf
        log_alpha = torch.logaddexp(l_keep + lz_min + S - log_z, torch.full_like(S, l_floor))
        log_beta = l_keep + lw - log_z[:, None]                                                 # (n, K)
        # the choice: y_0 with probability α_0, else candidate c with probability β_c (per-row uniforms)
        w = torch.cat([log_alpha[:, None], log_beta], 1).exp()
        cum = w.cumsum(1)
        u = row_uniforms(generator, rows.to(dev), None, state.n)
        if u is None:
            gen = torch_generator(generator)
            u = torch.rand(n, dtype=torch.float64, generator=gen, device=gen.device if gen is not None else "cpu")
        u = u.cpu().double()[:, None] * cum[:, -1:]
        pick = torch.searchsorted(cum, torch.minimum(u, cum[:, -1:] * (1.0 - 1e-12)), right=True).clamp_(max=K)
        tok = torch.where(pick[:, 0] == 0, y0, cand.gather(1, (pick - 1).clamp(min=0))[:, 0])
        at = cand == tok[:, None]
        hit = at.any(1)
        c = at.long().argmax(1, keepdim=True)
        lq_cand = torch.logaddexp(log_alpha + la.gather(1, c)[:, 0] - S, log_beta.gather(1, c)[:, 0])
        log_q = torch.where(hit, lq_cand, log_alpha + lq0)
        log_p = torch.where(hit, top_lp.gather(1, c)[:, 0], lp0)
        return NextTokens(tok, log_p, log_q)

    def draft_block(self, run: Any, rows: torch.Tensor, spec: Any, generator: Any, *, decoding: Any = None,
                    exponent: torch.Tensor | None = None, max_new_tokens: int | None = None) -> Block:
        """SMC's drafted block (``Proposal.draft_block``; ``draws_from_engine``): up to
        ``spec.budget[k]`` tokens for each of the engine's ``rows``, drawn by :meth:`draw_next` from the
        engine's own ``decoding`` state at the rows' exponents ``exponent`` (the masks of ``spec``
        applied), with their ``log p`` and ``log q``, fed as a native block feeds them (a stop token
        never, a row's last token at its budget only with ``spec.feed_last``): on vLLM by appending
        them to the rows (the next block computes them), elsewhere by ``extend``."""
        if decoding is None or exponent is None:
            raise ValueError("Lookahead.draft_block needs the engine's decoding state and exponents")
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        n, W = len(rows), int(spec.width)
        budget = spec.budget.cpu()
        fl = spec.feed_last
        feed_last = fl.cpu() if isinstance(fl, torch.Tensor) else torch.full((n,), fl is not False)
        a = torch.as_tensor(exponent, dtype=torch.float64).reshape(-1).cpu()
        stop = torch.tensor(spec.stop_ids, dtype=torch.long)
        tokens = torch.full((n, W), -1, dtype=torch.long)
        log_p = torch.full((n, W), -math.inf, dtype=torch.float64)
        log_q = log_p.clone()
        ended = torch.zeros(n, dtype=torch.bool)
        live = budget > 0
        for j in range(W):
            idx = live.nonzero().flatten()
            if len(idx) == 0:
                break
            d = self.draw_next(decoding, rows[idx], a[idx], generator, run, max_new_tokens, spec.allow_stop,
                               _sub_masks(spec, idx), share=True)
            tokens[idx, j], log_p[idx, j], log_q[idx, j] = d.tokens, d.log_p, d.log_q
            is_stop = torch.isin(d.tokens, stop)
            ended[idx] |= is_stop
            more = budget[idx] > j + 1
            live[idx] = ~is_stop & more
            feed = ~is_stop & (more | feed_last[idx])
            if bool(feed.any()):
                _feed(decoding, [[t] for t in d.tokens[feed].tolist()], rows[idx][feed])
        return Block(tokens, log_p, log_q, ended, (tokens >= 0).sum(1))


def _feed(state: Any, blocks: list[list[int]], rows: torch.Tensor) -> None:
    """Feed ``blocks`` to ``state``'s ``rows`` whose ``log p`` the caller has: ``append`` where the
    backend has it (vLLM: host token lists, computed by the rows' next block), else ``extend``."""
    append = getattr(state, "append", None)
    if append is not None:
        append(blocks, rows)
    else:
        state.extend(blocks, rows)


def _sub_masks(spec: BlockSpec, idx: torch.Tensor) -> dict[str, Any]:
    """``spec``'s mask fields for its rows ``idx`` (a per-row ``allowed`` cut to them; ``mask_fn`` with
    the sub-block's row indices mapped back to ``spec``'s)."""
    out: dict[str, Any] = {}
    if spec.allowed is not None:
        out["allowed"] = spec.allowed if spec.allowed.dim() == 1 else spec.allowed[idx.to(spec.allowed.device)]
    if spec.mask_fn is not None:
        fn = spec.mask_fn
        out["mask_fn"] = lambda k, tokens: fn(idx[k.cpu()], tokens)
    return out
