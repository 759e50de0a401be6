"""Token proposals ``q_t(v | y_<t)`` for SMC and MH.

The protocol (subclass :class:`Proposal`):

* ``log_probs(ctx) -> (B, V)``: normalised ``log q(v | y_<t)`` for the rows in
  ``ctx`` (a :class:`ProposalContext`: the target, the batch of prefixes with the base
  LM's next-token log-probs, the engine's LM state and rows, the current exponent
  ``a_t`` and the run's ``torch.Generator``).  A token with ``q = 0`` is never drawn;
  the engine corrects by ``−log q`` in the weights, so any ``q`` whose support covers
  the target's is exact.
* a proposal with its own decoding state (another LM) returns it from ``start`` and
  follows the engine's particles in the hooks ``on_extend`` / ``on_reorder`` /
  ``on_finish``, which get that run state back (the proposal holds configuration only).

A proposal from another (smaller) LM with the same tokenizer is :class:`FromLM`.
The protocol itself (``Proposal``, ``ProposalContext``) lives in ``proposal.py`` so that
``lookahead.py`` and this module both build on it without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .lookahead import Lookahead  # noqa: F401  (pp.proposals.Lookahead)
from ..targets.base import scaled
from .capabilities import Needs
from .native import needs
from .proposal import Proposal, ProposalContext, Wrapping, exponent_of


class Base(Proposal):
    """``q = p``: the base LM itself."""

    requires = Needs()

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        return ctx.batch.base_logprobs

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(exponent)

    def __repr__(self) -> str:
        return "Base()"


class Temperature(Proposal):
    """``q ∝ p^{1/τ}``; ``τ = None`` means ``τ = 1/a_t`` (the current exponent, per row).

    With ``q ∝ p^{a_t}`` and a pure ``Power`` target the incremental weight is
    ``log Σ_u p(u|y_<t)^{a_t}``, independent of the drawn token (Power-SMC, Thm 1).
    One log-softmax over the vocabulary per call, in the LM's dtype.
    (A proposal; the *potential* ``pp.Tempered(τ)`` is a factor of the target.)
    """

    requires = Needs()

    def __init__(self, tau: float | None = None) -> None:
        if tau is not None and not (float(tau) > 0 and float(tau) < float("inf")):
            raise ValueError(f"tau must be finite and > 0, got {tau!r}")
        self.tau = None if tau is None else float(tau)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        inv = exponent_of(ctx) if self.tau is None else 1.0 / self.tau
        return torch.log_softmax(scaled(inv, ctx.batch.base_logprobs), dim=-1)   # a_t = 0: uniform

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor:
        return torch.full_like(exponent, self.tau) if self.tau is not None else 1.0 / exponent

    def __repr__(self) -> str:
        return f"Temperature({'1/a_t' if self.tau is None else f'{self.tau:g}'})"


class Tempered(Temperature):
    """Deprecated name of :class:`Temperature` (it clashed with the potential ``pp.Tempered``)."""

    def __init__(self, tau: float | None = None) -> None:
        import warnings

        warnings.warn("pp.proposals.Tempered is renamed pp.proposals.Temperature (pp.Tempered is the "
                      "potential); the old name will be removed", DeprecationWarning, stacklevel=2)
        super().__init__(tau)


class LocallyOptimal(Proposal):
    """``q ∝ exp(target.log_next(·, a_t))``: the product of every token-level factor.

    For token-factorising targets this is the locally optimal proposal; the weight
    is then ``log Σ_v exp(log_next(v))``.  Non-factorising factors are ignored here
    and corrected by the weights.  It proposes inside token masks (``Constraint``), so
    no particle is spent on a masked token.  A row where every token has zero target
    mass gets a uniform ``q``; the drawn token then has weight zero and the particle dies.
    """

    requires = Needs()

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        inc = ctx.target.log_next(ctx.batch, exponent=exponent_of(ctx))
        norm = torch.logsumexp(inc, dim=-1, keepdim=True)
        uniform = torch.full_like(inc, -math.log(inc.shape[-1]))
        return torch.where(torch.isfinite(norm), inc - norm, uniform)

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor | None:
        """``q ∝ p^{a_t}`` when the target has no token-level factor (the caller checks that)."""
        return 1.0 / exponent

    def __repr__(self) -> str:
        return "LocallyOptimal()"


def default_proposal(target: Any) -> Proposal:
    """The proposal every engine (SMC, MH) uses when none is given: ``q ∝ p^{a_t}``
    (:class:`Temperature`) for a pure power target; the locally optimal ``q ∝ p^{a_t} · Π φ^next``
    (:class:`LocallyOptimal`) when a token-level factor (a token mask, a ``Tempered`` factor) is
    present or the base exponent is 0 (``Target(lm, Tempered(τ))``), so proposals stay inside
    masks and give impossible tokens ``q = 0``."""
    token_factors = needs(target).full_vocabulary
    return Temperature() if target.base_exponent > 0 and not token_factors else LocallyOptimal()


@dataclass
class FromLMRun:
    """One run of :class:`FromLM`: the proposal LM's decoding state (rows as the engine's), its
    forward passes at ``start`` and the tokens fed to it per prompt."""

    state: Any
    forward_passes_at_start: int
    tokens_by_prompt: dict[int, int] = field(default_factory=dict)


class FromLM(Proposal):
    """Proposals from another LM ``r`` sharing the tokenizer: ``q ∝ r(v | y_<t)^{1/τ}``.

    Each run gets its own decoding state of ``r`` (:class:`FromLMRun`, returned by ``start``)
    that follows the engine's particles through the hooks, so the proposal LM also decodes
    incrementally with its KV cache.

    The two LMs may pad their vocabularies differently (Qwen2.5-0.5B has 151936 output
    rows, Qwen2.5-7B 152064) as long as the tokenizer is shared: the proposal's rows
    past the target's vocabulary are dropped, and target ids past the proposal's
    vocabulary get ``q = 0`` (-inf) -- they are never proposed, which is exact as long
    as the target gives them no mass (padding rows of a trained model carry ~0).
    A real tokenizer mismatch raises ``ValueError``.
    """

    requires = Needs(own_state=True, row_wise=False)
    work_name = "proposal"
    #: with token or block steps the draft LM draws each block natively (its own temperature τ)
    #: and the target scores the block with one ``extend`` (speculative SMC's shape)
    drafts = True

    def __init__(self, lm: Any, tau: float = 1.0) -> None:
        if not float(tau) > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.lm = lm
        self.tau = float(tau)

    def start(self, target: Any, prompts: list[list[int]], n: int, max_new_tokens: int) -> FromLMRun:
        check_shared_tokenizer(target.lm, self.lm)
        state = self.lm.start(prompts[0] if len(prompts) == 1 else prompts, n, max_new_tokens)
        return FromLMRun(state, state.forward_passes)

    def work(self, run: FromLMRun) -> tuple[int, dict[int, int]]:
        """The proposal LM's forward passes and tokens fed per prompt in this run."""
        return run.state.forward_passes - run.forward_passes_at_start, dict(run.tokens_by_prompt)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        if not isinstance(ctx.run, FromLMRun):
            raise RuntimeError("FromLM needs its run state (what FromLM.start returned) in ctx.run")
        base = ctx.batch.base_logprobs
        lp = ctx.run.state.logprobs(ctx.rows).double().to(base.device)
        return torch.log_softmax(fit_vocab(lp, base.shape[-1]) / self.tau, dim=-1)

    def draft_block(self, run: FromLMRun, rows: torch.Tensor, spec: Any, generator: Any, **_: Any) -> Any:
        """The draft's native block at temperature ``τ`` for the engine's ``rows`` (the same rows of
        the draft's own state); counts the tokens it fed per prompt."""
        spec.temperature = torch.full_like(spec.temperature, self.tau)
        blk = run.state.sample_block(rows, spec, generator)
        n, ended = blk.length.cpu(), blk.ended.cpu()
        feed_last = torch.as_tensor(spec.feed_last if isinstance(spec.feed_last, torch.Tensor) else True).cpu()
        fed = n - ended.long() - (~feed_last & ~ended & (n == spec.budget.cpu()) & (n > 0)).long()
        groups = torch.as_tensor(run.state.group).cpu()[rows.cpu()]
        for g, k in zip(groups.tolist(), fed.tolist()):
            run.tokens_by_prompt[g] = run.tokens_by_prompt.get(g, 0) + int(k)
        return blk

    def on_extend(self, run: FromLMRun, tokens: Any, rows: torch.Tensor) -> None:
        groups = torch.as_tensor(run.state.group).cpu()[torch.as_tensor(rows, dtype=torch.long).cpu()]
        if isinstance(tokens, torch.Tensor):
            lens = [1] * tokens.shape[0] if tokens.dim() == 1 else [tokens.shape[1]] * tokens.shape[0]
        else:
            lens = [1 if not hasattr(t, "__len__") or getattr(t, "dim", lambda: 1)() == 0 else len(t)
                    for t in tokens]
        for g, k in zip(groups.tolist(), lens):
            run.tokens_by_prompt[g] = run.tokens_by_prompt.get(g, 0) + k
        run.state.extend(tokens, rows)

    def on_reorder(self, run: FromLMRun, indices: torch.Tensor) -> None:
        run.state.reorder(indices)

    def on_finish(self, run: FromLMRun, rows: torch.Tensor) -> None:
        run.state.finish(rows)

    def __repr__(self) -> str:
        return f"FromLM({self.lm.name}, tau={self.tau:g})"


def fit_vocab(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(B, V')`` log-probs cut or ``-inf``-padded to ``(B, vocab_size)`` columns."""
    V = logprobs.shape[-1]
    if V >= vocab_size:
        return logprobs[..., :vocab_size]
    pad = logprobs.new_full((*logprobs.shape[:-1], vocab_size - V), float("-inf"))
    return torch.cat([logprobs, pad], dim=-1)


def check_shared_tokenizer(target_lm: Any, proposal_lm: Any) -> None:
    """Raise ``ValueError`` unless the two LMs share a tokenizer (padded vocab sizes may differ).

    With tokenizers on both sides their vocabularies (token -> id) must be equal and fit
    in both models' output rows; without, the vocabulary sizes must be equal.
    """
    ta, tb = getattr(target_lm, "tokenizer", None), getattr(proposal_lm, "tokenizer", None)
    Vt, Vp = target_lm.vocab_size, proposal_lm.vocab_size
    if ta is None or tb is None:
        if Vt != Vp:
            raise ValueError(
                f"proposal LM vocabulary ({Vp}) differs from the target's ({Vt}) and a shared "
                "tokenizer cannot be checked (an LM has no tokenizer)")
        return
    if ta is not tb:
        va, vb = ta.get_vocab(), tb.get_vocab()
        if va != vb:
            diff = next((t for t in va if vb.get(t) != va[t]), None)
            if diff is None:
                diff = next(t for t in vb if va.get(t) != vb[t])
            raise ValueError(
                f"the proposal LM's tokenizer differs from the target's ({len(vb)} vs {len(va)} "
                f"tokens; {diff!r} is id {va.get(diff)} in the target, {vb.get(diff)} in the "
                "proposal): FromLM needs a shared tokenizer")
    n_tok = len(ta)
    if n_tok > min(Vt, Vp):
        raise ValueError(
            f"the tokenizer has {n_tok} tokens but an LM has only {min(Vt, Vp)} output rows "
            f"(target {Vt}, proposal {Vp})")


class _Restricted(Wrapping):
    """A restriction of another proposal, mixed with it so the support stays covered:
    ``q = (1 − ε) · restrict(q_inner) + ε · q_inner``.

    SMC corrects by ``−log q``, so with ``ε > 0`` the target is unchanged (exact); with
    ``ε = 0`` tokens outside the restriction are never proposed, which changes the target
    — declare that as a ``Constraint`` instead if it is what you want.
    """

    def __init__(self, inner: Proposal | None = None, epsilon: float = 0.05) -> None:
        if not 0.0 < float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1] so the proposal covers the target, got {epsilon!r}")
        self.inner = inner if inner is not None else Temperature()
        self.epsilon = float(epsilon)
        #: a restriction has no state of its own: it needs what its inner proposal needs
        self.requires = self.inner.requires

    def keep(self, log_q: torch.Tensor) -> torch.Tensor:
        """(B, V) bool: the tokens the restriction keeps."""
        raise NotImplementedError

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        log_q = self.inner.log_probs(ctx)
        kept = torch.where(self.keep(log_q), log_q, torch.full_like(log_q, -math.inf))
        kept = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
        if self.epsilon == 1.0:
            return log_q
        return torch.logaddexp(kept + math.log1p(-self.epsilon), log_q + math.log(self.epsilon))


class TopK(_Restricted):
    """Top-k restriction of ``inner`` (default ``Temperature()``), defensively mixed with weight ε."""

    def __init__(self, k: int, inner: Proposal | None = None, epsilon: float = 0.05) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        super().__init__(inner, epsilon)
        self.k = k

    def keep(self, log_q: torch.Tensor) -> torch.Tensor:
        k = min(self.k, log_q.shape[-1])
        thresh = torch.topk(log_q, k, dim=-1).values[:, -1:]
        return log_q >= thresh

    def __repr__(self) -> str:
        return f"TopK({self.k}, {self.inner!r}, epsilon={self.epsilon:g})"


class TopP(_Restricted):
    """Nucleus (top-p) restriction of ``inner``, defensively mixed with weight ε."""

    def __init__(self, p: float, inner: Proposal | None = None, epsilon: float = 0.05) -> None:
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        super().__init__(inner, epsilon)
        self.p = float(p)

    def keep(self, log_q: torch.Tensor) -> torch.Tensor:
        sorted_lq, order = torch.sort(log_q, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_lq.exp(), dim=-1) - sorted_lq.exp()
        keep_sorted = mass_before < self.p
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    def __repr__(self) -> str:
        return f"TopP({self.p:g}, {self.inner!r}, epsilon={self.epsilon:g})"

