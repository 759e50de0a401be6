"""Block decoding: the one primitive every engine decodes through.

``state.sample_block(rows, spec, generator) -> Block`` extends each listed row by up to
``spec.budget[k]`` tokens drawn from a proposal the backend can run itself,

    q(v | y_<t) ∝ p(v | y_<t)^{1/τ_k} · 1[v ∈ allowed]      (τ_k > 0 per row; greedy: argmax p),

stopping a row at the first stop id (EOS), and returns for every drawn token both
``log p(y_t | y_<t)`` under the base LM and ``log q(y_t | y_<t)`` under the proposal.
Engines weigh at block boundaries from these two numbers (float64 sums): for
``q ∝ p^{a}`` the per-token weight ``a·log p − log q = log Σ_u p(u|y_<t)^a`` is exact.

A drawn stop token is recorded in the block but never fed to the state; a row that
reaches its budget with ``spec.feed_last[k]`` (or a plain ``spec.feed_last``) false keeps
its last token unfed too (a completion cut at ``max_new_tokens``, whose caller finishes it;
a token the caller feeds itself once weighed).  Every other drawn token is appended to the
row, exactly as ``state.step`` / ``state.extend`` would.

Two optional fields make the same loop serve proposals that need the full vocabulary and
the replay of given suffixes (MH reverse moves), on backends with ``full_vocabulary``:

* ``spec.propose(k, log_p) -> (log_q, log_inc)``: at each position, for the rows ``k`` of the
  block still drawing (indices into ``rows``; a one-token block shows every listed row) and
  their ``(m, V)`` ``log p``, the proposal's normalised ``(m, V)`` ``log q`` (then restricted
  by ``allowed`` / ``allow_stop`` and renormalised; ``temperature`` and ``greedy`` are not
  used) and optionally the target's ``(m, V)`` token-level increment ``log_inc``
  (``log γ_t(y_≤t) − log γ_{t−1}(y_<t)`` for each next token), which the block records at the
  drawn token (``Block.log_inc``).  Tokens are drawn by ``spec.sample(log_q, generator)``
  (default :func:`sample_inverse_cdf`).
* ``spec.forced`` ``(n, W)`` long: where ``>= 0`` the token at that position is the given one
  instead of a draw; its ``log p``, ``log q`` and ``log_inc`` are recorded all the same
  (``log q(y'|y)`` of a reverse move).  Give forced rows a ``budget`` equal to their suffix.

Masks, normalisers and delimiters (every backend, :func:`sample_tokenwise` and vLLM's native path):

* **Masks.**  ``spec.allowed`` is a static ``(V,)`` or per-row ``(n, V)`` bool mask;
  ``spec.mask_fn(k, tokens) -> (m, V) bool`` (or ``(V,)``, broadcast) is called at each position
  for the rows ``k`` of the block still drawing (``(m,)`` long indices into ``rows``) with
  ``tokens[i]`` the completion of row ``k[i]`` so far: the state's tokens of the row (its prompt
  excluded) followed by the tokens drawn in this block before this position.  The mask at
  position ``j`` of row ``k`` is ``M_j = allowed ∧ mask_fn`` (without the stop ids when
  ``allow_stop`` is false) and the proposal is ``q_j(v) ∝ p(v | y_<j)^{1/τ_k} · M_j(v)``,
  renormalised: ``log q`` recorded is that of the masked, renormalised ``q`` (a greedy row takes
  the mode of ``p · M_j``).  A row whose mask leaves no token raises ``ValueError``.
* **Normalisers.**  With ``spec.norm_exponent`` ``(n,)`` float64 (``a_k >= 0`` per row) the block
  records, per drawn token, ``Block.log_norm[k, j] = log Σ_v p(v | y_<j)^{a_k} · M_j(v)`` (float64
  sums on HF / llama.cpp / toy LMs; float32 ``logsumexp``, float64 difference on vLLM): the
  one-token look-ahead twist of segment steps and the per-token statistic of adaptive bridging.
  With ``a_k = 1/τ_k`` it is ``a_k·log p(y_j) − log q(y_j)`` of the drawn token (the exact weight
  of ``q ∝ p^a``).  ``spec.norm_next`` also asks for ``Block.log_norm_next[k]``, the same
  normaliser at the position right after the row's last fed token (``M`` from ``allowed`` and
  ``mask_fn`` on the whole completion), for rows that drew at least one token, drew no stop id
  and fed their last token (NaN for the others).  :func:`sample_tokenwise` has those log-probs
  without another forward (the state holds them); vLLM computes them with one more engine step
  of the block (see :mod:`llmppl.models.vllm`).
* **Top candidates.**  ``spec.top_k = K > 0`` asks for the ``K`` most likely next tokens at the
  block's first position (the position right after the row's last fed token, where its first token
  is drawn): ``Block.top_ids`` ``(n, K)`` long, by decreasing ``p(v | y) · M_0(v)``, and
  ``Block.top_log_p`` ``(n, K)`` float64 their ``log p`` (``−inf`` for tokens the mask excludes;
  rows with budget 0 get ids ``-1``).  With ``norm_exponent`` (``a = 1/τ``) and a one-token block of
  ``feed_last=False`` this is everything a proposal that reweights the top candidates of ``p^a``
  needs at that position, next to a native draw from ``q_0 ∝ p^a · M_0`` (its ``log q`` and
  ``log_norm``): :class:`~llmppl.inference.lookahead.Lookahead`'s native path.
  :func:`sample_tokenwise` takes them from the log-probs it holds; vLLM's recorder from the masked
  logits of the request's first step (``topk`` minus the raw ``logsumexp``): no ``(rows, V)``
  tensor leaves the engine.
* **Delimiters.**  ``spec.end_ids``: ids that end a row's block once drawn, like a stop id, but
  the token is fed and the row continues at the next block (``Block.ended`` stays false;
  ``Block.delimited[k]`` is true).  A token that is both a stop id and an end id is a stop id.
  Delimiters of several tokens are the caller's: draw, find the match on the host, ``truncate``.

:func:`sample_tokenwise` is the reference implementation over ``last_logprobs`` /
``step`` (the device fast path of every ``LMState``); backends that decode natively
(vLLM) override ``LMState.sample_block`` and never materialise ``(rows, V)`` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .streams import RowStreams, torch_generator

#: ``log q`` below this counts as probability 0 when sampling (see :func:`sample_inverse_cdf`)
LOG_Q_FLOOR = -80.0
#: ``log₂ e``: the samplers exponentiate in base 2 (``e^x = 2^{x log₂ e}``; float32 ``exp2`` is
#: several times faster than ``exp`` on CPUs, far more so on ``−inf`` / very negative inputs)
LOG2_E = 1.0 / math.log(2.0)
#: tokens per block of the two-level inverse-CDF sampler (see :func:`invert_weights`)
SAMPLE_BLOCK = 1024


#: ``propose(k, log_p) -> (log_q, log_inc or None)``: a full-vocabulary proposal (module docstring)
Propose = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
#: ``sample(log_q, generator) -> (m,)``: one token per row of ``log_q``
Sampler = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
#: ``mask_fn(k, tokens) -> (m, V) bool``: the allowed next tokens of the rows ``k`` given their completions
MaskFn = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]


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
    without them; ``allowed`` ``(V,)`` bool: a static token mask, or ``(n, V)``: one per row
    (``None``: every token);
    ``feed_last`` ``(n,)`` bool, or one bool for every row: feed a row's token at its budget end
    (default: all; ``False`` is known on the host, so the loop makes no forward for the last
    position, whose tokens are all unfed);
    ``propose``, ``sample``, ``forced``: a full-vocabulary proposal hook, its sampler and given
    tokens (see the module docstring; only backends with ``full_vocabulary`` take them);
    ``mask_fn``: a callable mask per row and position; ``norm_exponent`` ``(n,)`` float64: record
    ``Block.log_norm`` with this exponent per row; ``norm_next``: also ``Block.log_norm_next``;
    ``end_ids``: delimiters that end a row's block and are fed; ``top_k``: record the ``top_k``
    most likely tokens at the block's first position (module docstring).
    """

    budget: torch.Tensor
    width: int
    temperature: torch.Tensor
    stop_ids: tuple[int, ...]
    allow_stop: bool = True
    allowed: torch.Tensor | None = None
    greedy: bool = False
    feed_last: torch.Tensor | bool | None = None
    propose: Propose | None = None
    sample: Sampler | None = None
    forced: torch.Tensor | None = None
    mask_fn: MaskFn | None = None
    norm_exponent: torch.Tensor | None = None
    norm_next: bool = False
    end_ids: tuple[int, ...] = ()
    top_k: int = 0

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
    stop token included); ``ended[k]``: the row drew a stop id.  ``log_inc``: the increments
    ``spec.propose`` returned, at the drawn tokens (None when it returned none).
    ``log_norm`` ``(n, W)``: ``log Σ_v p(v | y_<j)^a · M_j(v)`` at each drawn position and
    ``log_norm_next`` ``(n,)``: the same after the row's last fed token (NaN where undefined), when
    the spec asked (``norm_exponent``, ``norm_next``; else None); ``delimited`` ``(n,)`` bool: the
    row's block ended at one of ``spec.end_ids`` (None without end ids); ``top_ids`` /
    ``top_log_p`` ``(n, K)``: the ``spec.top_k`` most likely tokens at the block's first position and
    their ``log p`` (None unless asked).  See the module docstring.
    """

    tokens: torch.Tensor   # (n, W) long
    log_p: torch.Tensor    # (n, W) float64
    log_q: torch.Tensor    # (n, W) float64
    ended: torch.Tensor    # (n,) bool
    length: torch.Tensor   # (n,) long
    log_inc: torch.Tensor | None = None   # (n, W) float64
    log_norm: torch.Tensor | None = None        # (n, W) float64
    log_norm_next: torch.Tensor | None = None   # (n,) float64
    delimited: torch.Tensor | None = None       # (n,) bool
    top_ids: torch.Tensor | None = None         # (n, K) long
    top_log_p: torch.Tensor | None = None       # (n, K) float64

    def total(self, name: str) -> torch.Tensor:
        """``(n,)`` float64 sum over the drawn positions of ``log_p``, ``log_q`` or ``log_inc``."""
        x = getattr(self, name)
        return torch.where(self.tokens >= 0, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)


def _bcast(mask: torch.Tensor) -> torch.Tensor:
    """A ``(V,)`` mask as ``(1, V)``; an ``(m, V)`` one as it is."""
    return mask[None, :] if mask.dim() == 1 else mask


def proposal_logprobs(log_p: torch.Tensor, temperature: torch.Tensor, stop_ids: torch.Tensor,
                      allow_stop: bool = True, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``log q = log_softmax(log p / τ + log 1[allowed])`` per row (``τ`` ``(n,)``; ``allowed``
    ``(V,)`` or one mask per row ``(n, V)``), in the
    dtype of ``log_p``; without the stop ids when ``allow_stop`` is false.  Tokens with
    ``p = 0`` stay at ``−inf`` (no ``0 · ∞``)."""
    return torch.log_softmax(_tempered_scores(log_p, temperature, stop_ids, allow_stop, allowed), dim=-1)


def _tempered_scores(log_p: torch.Tensor, temperature: torch.Tensor, stop_ids: torch.Tensor,
                     allow_stop: bool, allowed: torch.Tensor | None) -> torch.Tensor:
    """``log p / τ + log 1[allowed]`` (``−inf`` at the stop ids unless ``allow_stop``): the
    unnormalised ``log q`` of :func:`proposal_logprobs` and :func:`sample_tempered`, a new tensor."""
    scores = log_p / temperature.to(log_p)[:, None]
    if allowed is not None:
        scores.masked_fill_(~_bcast(allowed.to(scores.device)), -math.inf)
    if not allow_stop:
        scores.index_fill_(1, stop_ids.to(scores.device), -math.inf)
    return scores


def sample_inverse_cdf(log_q: torch.Tensor, generator: torch.Generator | None,
                       u: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from ``q = exp(log_q)`` by inversion (:func:`invert_weights` of
    ``exp(log_q)``).

    Tokens with ``log q < −80`` (``q < 1.8e−35``, at most ~1e−30 of the mass for any
    vocabulary) count as probability 0: their float32 ``exp`` would be denormal, which is
    an order of magnitude slower on CPUs, and below the resolution of the float64 sums.
    (Inversion is ~6× faster than ``torch.multinomial`` on a CPU for a 49k vocabulary.)
    """
    p = torch.nn.functional.threshold_(log_q * LOG2_E, LOG_Q_FLOOR * LOG2_E, -math.inf).exp2_()   # (also NaN → 0)
    return invert_weights(p, generator, u)[0]


def _uniform(generator: torch.Generator | None, B: int, like: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """``(B, 1)`` float64 uniforms on ``like``'s device: the given per-row ``u`` (a row's own
    stream, :class:`~llmppl.models.streams.RowStreams`), else drawn from ``generator``."""
    if u is not None:
        return u.reshape(B, 1).to(device=like.device, dtype=torch.float64)
    gen = torch_generator(generator)
    dev = gen.device if gen is not None else like.device
    return torch.rand((B, 1), generator=gen, dtype=torch.float64, device=dev).to(like.device)


def invert_weights(p: torch.Tensor, generator: torch.Generator | None,
                   u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``q_v = p_v / Σ_u p_u`` (``p`` ``(B, V)`` unnormalised, ``>= 0``),
    by inversion in two levels; returns the tokens and the float64 totals ``C = Σ_u p_u``.

    With ``U ~ U[0, 1)`` from ``generator``, the vocabulary cut into blocks of ``K``
    tokens, ``S_b`` their float64 sums and ``C`` the running sums:
    block ``b = min{b : C_b > U·C_last}``, then inside it the token
    ``v = min{v : c_v > U·C_last − C_{b−1}}`` with ``c`` the float64 cumulative sums
    of the block.  This is ``v = min{v : C_v > U·C_V}`` over the whole vocabulary,
    with float64 cumulative sums of ``V/K + K`` numbers per row instead of ``V``
    (``K = SAMPLE_BLOCK``; a vocabulary of at most one block is inverted in one level).
    A row with ``C = 0`` gets token ``V − 1`` (callers see ``C = 0`` and treat the draw as
    impossible).  ``u`` ``(B,)``: the rows' uniforms when given (per-row streams).
    """
    B, V = p.shape
    K = SAMPLE_BLOCK
    if V <= K:             # one level: the float64 cumulative sums of the row itself
        cum = p.double().cumsum(-1)       # (the same sums as cumsum(dtype=float64), ~1.5x faster on CPU)
        u = _uniform(generator, B, cum, u)
        rest = torch.minimum(u * cum[:, -1:], cum[:, -1:] * (1.0 - 1e-12))
        return torch.searchsorted(cum, rest, right=True).squeeze(1).clamp_(max=V - 1), cum[:, -1]
    full, tail = divmod(V, K)
    sums = p[:, :full * K].reshape(B, full, K).sum(-1, dtype=torch.float64)
    if tail:
        sums = torch.cat([sums, p[:, full * K:].sum(-1, dtype=torch.float64, keepdim=True)], 1)
    cum = sums.cumsum(-1)
    u = _uniform(generator, B, cum, u) * cum[:, -1:]
    block = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[1] - 1)
    before = (cum - sums).gather(1, block)              # C_{b−1} (0 for the first block)
    cols = block * K + torch.arange(K, device=p.device)
    if tail:
        inside = p.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0.0).double().cumsum(-1)
    else:
        inside = p.gather(1, cols).double().cumsum(-1)
    # rounding can put U·C_last − C_{b−1} at or past the block's own total: take its last token with mass
    rest = torch.minimum(u - before, inside[:, -1:] * (1.0 - 1e-12))
    token = cols.gather(1, torch.searchsorted(inside, rest, right=True).clamp_(max=K - 1)).squeeze(1).clamp_(max=V - 1)
    return token, cum[:, -1]


def sample_tempered(log_p: torch.Tensor, temperature: torch.Tensor, stop_ids: torch.Tensor,
                    allow_stop: bool, allowed: torch.Tensor | None, generator: torch.Generator | None,
                    u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``q ∝ p^{1/τ} · 1[allowed]`` (without the stop ids unless
    ``allow_stop``) and its float64 ``log q`` at the drawn token, without materialising
    ``log q``:

        s_v = log p_v / τ − max_u log p_u / τ,   w_v = exp(s_v) · 1[s_v ≥ −80]   (as 2^{s_v log₂ e}),
        v ~ w / C  (:func:`invert_weights`, C = Σ_u w_u),   log q(v) = log w_v − log C.

    ``w`` is the law the draw follows exactly (tokens ``e^{80}`` times less likely than the
    mode count as 0, as in :func:`sample_inverse_cdf`).  A row with no allowed mass
    (``C = 0``) gets a NaN ``log q``, as ``log_softmax`` would give it: callers refuse it.
    """
    s = _tempered_scores(log_p, temperature / LOG2_E, stop_ids, allow_stop, allowed)   # s_v log₂ e
    s.sub_(s.amax(-1, keepdim=True))
    w = torch.nn.functional.threshold_(s, LOG_Q_FLOOR * LOG2_E, -math.inf).exp2_()   # (also NaN → 0)
    token, total = invert_weights(w, generator, u)
    return token, w.gather(1, token[:, None]).squeeze(1).double().log_() - total.log()


def _restrict(log_q: torch.Tensor, stop: torch.Tensor, allow_stop: bool,
              allowed: torch.Tensor | None) -> torch.Tensor:
    """``q`` renormalised on the ``allowed`` tokens, without the stop ids when ``allow_stop`` is
    false: ``log q' = log_softmax(log q + log 1[allowed] + log 1[v ∉ stop])`` (float64)."""
    if allow_stop and allowed is None:
        return log_q
    out = log_q.double()
    if allowed is not None:
        out = out.masked_fill(~_bcast(allowed.to(out.device)), -math.inf)
    if not allow_stop:
        out = out.index_fill(1, stop.to(out.device), -math.inf)
    return torch.log_softmax(out, dim=-1)


def _log_q(lp: torch.Tensor, k: torch.Tensor | None, tau: torch.Tensor, stop: torch.Tensor, spec: BlockSpec,
           allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(m, V)`` ``log q`` of the block's rows ``k`` (log p ``lp``) and the hook's ``log_inc``
    (or None).

    With ``spec.propose``: its ``q``, restricted by :func:`_restrict`; greedy: the point mass at
    the mode of ``p`` (masked like ``q``), so ``log q`` of the mode is 0; else
    :func:`proposal_logprobs` at the rows' temperatures."""
    if spec.propose is not None:
        lq, inc = spec.propose(k, lp)
        return _restrict(lq, stop, spec.allow_stop, allowed), inc
    if spec.greedy:
        mode = _restrict(lp, stop, spec.allow_stop, allowed).argmax(-1, keepdim=True)
        return torch.full_like(lp, -math.inf).scatter_(1, mode, 0.0), None
    return proposal_logprobs(lp, tau, stop, spec.allow_stop, allowed), None


def _sample(log_q: torch.Tensor, spec: BlockSpec, generator: torch.Generator | None,
            u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: ``spec.sample`` for a hook's ``q`` (default: inverse CDF with the rows'
    uniforms ``u``), the mode when greedy (no random numbers drawn), else :func:`sample_inverse_cdf`."""
    if spec.propose is not None and spec.sample is not None:
        return spec.sample(log_q, torch_generator(generator))
    if spec.greedy and spec.propose is None:
        return log_q.argmax(-1)
    return sample_inverse_cdf(log_q, generator, u)


def row_uniforms(generator: "torch.Generator | RowStreams | None", rows: torch.Tensor | None,
                 live: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """The next uniform of each listed row (all ``n_rows`` rows of the state when ``rows`` is None)
    from per-row streams, advancing only the ``live`` rows (those that draw); None for a plain
    ``torch.Generator``."""
    if not isinstance(generator, RowStreams):
        return None
    return generator.uniform(rows, live, n_rows)


def _at(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``x[i, tok[i]]`` as float64 on ``tok``'s device."""
    return x.gather(1, tok.to(x.device)[:, None]).squeeze(1).double().to(tok.device)


def _position(lp: torch.Tensor, k: torch.Tensor | None, tau: torch.Tensor, stop: torch.Tensor, spec: BlockSpec,
              allowed: torch.Tensor | None, forced: torch.Tensor | None, generator: torch.Generator | None,
              u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One position of the block's rows ``k`` (log p ``lp`` ``(m, V)``): the token of each row
    (drawn from ``q``, or ``forced`` where that is ``>= 0``) and, at it, float64 ``log q`` and the
    hook's ``log_inc`` (None without one)."""
    if spec.propose is None and not spec.greedy and forced is None:
        tok, lq_tok = sample_tempered(lp, tau, stop, spec.allow_stop, allowed, generator, u)
        return tok, lq_tok, None
    lq, inc = _log_q(lp, k, tau, stop, spec, allowed)
    tok = _sample(lq, spec, generator, u).to(lp.device)
    if forced is not None:
        tok = torch.where(forced >= 0, forced, tok)
    return tok, _at(lq, tok), None if inc is None else _at(inc, tok)


def _fed(feed: torch.Tensor, at_end: torch.Tensor, feed_last: torch.Tensor | bool | None) -> torch.Tensor:
    """The rows fed: ``feed`` (drew a token that is not a stop id), except those at their budget's
    end (``at_end``) whose ``feed_last`` is false."""
    if feed_last is None or feed_last is True:
        return feed
    if feed_last is False:
        return feed & ~at_end
    return feed & (~at_end | feed_last)


def _spec_on(spec: BlockSpec, dev: torch.device | str) -> tuple[torch.Tensor | bool | None, ...]:
    """``spec``'s per-row tensors on ``dev``: ``(budget, feed_last, stop ids, temperature, allowed,
    forced)`` (``feed_last`` stays a bool or None when it is one; absent fields stay None)."""
    feed_last = spec.feed_last.to(dev) if isinstance(spec.feed_last, torch.Tensor) else spec.feed_last
    return (spec.budget.to(dev), feed_last, torch.tensor(spec.stop_ids, dtype=torch.long, device=dev),
            spec.temperature.to(dev), None if spec.allowed is None else spec.allowed.to(dev),
            None if spec.forced is None else spec.forced.to(dev))


def _extras(spec: BlockSpec, dev: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(end ids, norm exponents)`` of ``spec`` on ``dev`` (None when absent)."""
    end = torch.tensor(spec.end_ids, dtype=torch.long, device=dev) if spec.end_ids else None
    a = None if spec.norm_exponent is None else spec.norm_exponent.to(dev, torch.float64).reshape(-1)
    return end, a


def _mask_at(allowed: torch.Tensor | None, sel: torch.Tensor | None, spec: BlockSpec, k: torch.Tensor,
             prefixes: list[list[int]] | None, m: int, V: int, dev: torch.device | str,
             place: torch.Tensor | None = None) -> torch.Tensor | None:
    """``M`` of ``m`` rows at one position, before the stop ids: ``allowed`` (``(V,)``, or its rows
    ``sel`` of an ``(n, V)`` mask; all of it when ``sel`` is None) and ``spec.mask_fn`` on the block
    rows ``k`` (their completions ``prefixes[k]``), which sit at ``place`` among the ``m`` rows
    (default: they are the ``m`` rows; rows not in ``place`` are not restricted by it);
    ``(V,)``, ``(m, V)`` or None."""
    out = allowed if allowed is None or allowed.dim() == 1 or sel is None else allowed[sel]
    if spec.mask_fn is None or len(k) == 0:
        return out
    f = torch.as_tensor(spec.mask_fn(k, [prefixes[i] for i in k.tolist()]), dtype=torch.bool).to(dev)
    if f.dim() == 1 and f.shape[0] == V:
        f = f.expand(len(k), V)
    if tuple(f.shape) != (len(k), V):
        raise ValueError(f"mask_fn must return a ({len(k)}, {V}) or ({V},) bool mask, got {tuple(f.shape)}")
    if place is not None and len(k) != m:
        f = torch.ones((m, V), dtype=torch.bool, device=dev).index_copy_(0, place.to(dev), f)
    return f if out is None else _bcast(out) & f


def _check_mass(mask: torch.Tensor | None, live: torch.Tensor, stop: torch.Tensor, spec: BlockSpec,
                rows: list[int], j: int) -> None:
    """``ValueError`` naming the first live row whose mask (without the stop ids unless
    ``allow_stop``) leaves no token."""
    if mask is None:
        return
    m = _bcast(mask)
    if not spec.allow_stop:
        m = m.index_fill(1, stop.to(m.device), False)
    empty = live & ~m.any(-1) if m.shape[0] == len(live) else live & ~m.any(-1).expand(len(live))
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        raise ValueError(f"the token mask allows no token for row {rows[i]} at block position {j}")


def log_normaliser(log_p: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None, stop_ids: torch.Tensor,
                   allow_stop: bool = True) -> torch.Tensor:
    """``(m,)`` float64 ``log Σ_v p(v)^{a} · M(v)`` per row of ``log_p`` ``(m, V)`` (``a`` ``(m,)``,
    ``M`` = ``mask`` ``(V,)`` / ``(m, V)`` without the stop ids unless ``allow_stop``); tokens
    with ``p = 0`` count 0 at every ``a >= 0`` (no ``0 · ∞``)."""
    lp = log_p.double()
    s = torch.where(torch.isneginf(lp), lp, lp * a.to(lp)[:, None])
    if mask is not None:
        s = s.masked_fill(~_bcast(mask.to(s.device)), -math.inf)
    if not allow_stop:
        s = s.index_fill(1, stop_ids.to(s.device), -math.inf)
    return torch.logsumexp(s, -1)


def _top(lp: torch.Tensor, mask: torch.Tensor | None, stop: torch.Tensor, spec: BlockSpec,
         live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Block.top_ids`` / ``top_log_p`` of the ``m`` rows of ``lp`` ``(m, V)``: the ``spec.top_k`` most
    likely tokens under ``p · M`` (``mask`` without the stop ids unless ``allow_stop``) and their
    float64 ``log p`` (``−inf`` where ``M`` excludes them); ids ``-1`` for rows not ``live``."""
    x = lp.double()
    if mask is not None:
        x = x.masked_fill(~_bcast(mask.to(x.device)), -math.inf)
    if not spec.allow_stop:
        x = x.index_fill(1, stop.to(x.device), -math.inf)
    v, i = x.topk(min(int(spec.top_k), x.shape[-1]), dim=-1)
    live = live.to(i.device)[:, None]
    return torch.where(live, i, -1), torch.where(live, v, -math.inf)


def _norm_next(state, rows: torch.Tensor, spec: BlockSpec, tokens: torch.Tensor, ended: torch.Tensor,
               budget: torch.Tensor, feed_last: torch.Tensor | bool | None, allowed: torch.Tensor | None,
               a: torch.Tensor, stop: torch.Tensor, prefixes: list[list[int]] | None, every: bool
               ) -> torch.Tensor:
    """``Block.log_norm_next`` of :func:`sample_tokenwise`: the normaliser after each row's last fed
    token, from the log-probs the state holds there (no forward), NaN for rows that drew nothing,
    drew a stop id or kept their last token unfed."""
    dev, n, V = tokens.device, len(ended), state.lm.vocab_size
    length = (tokens >= 0).sum(1)
    at_end = length >= budget
    unfed = at_end if feed_last is False else (at_end & ~feed_last if isinstance(feed_last, torch.Tensor)
                                               else torch.zeros_like(at_end))
    ok = (length > 0) & ~ended & ~unfed
    out = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
    sel = ok.nonzero().flatten()
    if len(sel) == 0:
        return out
    lp = state.last_logprobs() if every else state.logprobs(rows[sel].cpu()).to(dev)
    if every:
        lp = lp.index_select(0, sel.to(lp.device)).to(dev)
    mask = _mask_at(allowed, sel, spec, sel.cpu(), prefixes, len(sel), V, dev)
    out[sel] = log_normaliser(lp, a[sel], mask, stop, spec.allow_stop).to(dev)
    return out


def _device_loop(state, rows: torch.Tensor | None, spec: BlockSpec, generator: torch.Generator | None,
                 ) -> dict[str, torch.Tensor | None]:
    """The device fast path of :func:`sample_tokenwise`: every listed row at each position
    (``last_logprobs`` / ``step``; a hook sees them all, ``mask_fn`` the rows still drawing);
    the block's fields by name (``tokens``, ``log_p``, ``log_q``, ``log_inc``, ``log_norm``,
    ``ended``, ``delimited``, ``log_norm_next``; None where the spec did not ask)."""
    dev, R, W, V = state.lm.device, state.n, spec.width, state.lm.vocab_size
    every = rows is None                  # all rows, in order: no gathers / scatters
    n = R if every else len(rows)
    budget, feed_last, stop, tau, allowed, forced = _spec_on(spec, dev)
    end, a = _extras(spec, dev)
    k = None if spec.propose is None else torch.arange(n, device=dev)
    ended = torch.zeros(n, dtype=torch.bool, device=dev)
    delimited = None if end is None else torch.zeros(n, dtype=torch.bool, device=dev)
    fn = spec.mask_fn is not None
    row_ids = list(range(R)) if every else rows.tolist()
    prefixes = [list(state.tokens[r]) for r in row_ids] if fn else None
    check = fn or (allowed is not None and allowed.dim() == 2)
    top: tuple[torch.Tensor, torch.Tensor] | None = None
    names = ["tokens", "log_p", "log_q"] + (["log_inc"] if spec.propose is not None else []) + \
        (["log_norm"] if a is not None else [])
    columns: list[tuple[torch.Tensor, ...]] = []
    for j in range(W):
        done = ended if delimited is None else ended | delimited
        live = budget > j if j == 0 else ~done & (budget > j)
        if j and not bool(live.any()):
            break
        lp = state.last_logprobs() if every else state.last_logprobs().index_select(0, rows)
        mask = allowed
        if fn:
            idx = live.nonzero().flatten().cpu()
            mask = _mask_at(allowed, None, spec, idx, prefixes, n, V, dev, place=idx)
        if check:
            _check_mass(mask, live, stop, spec, row_ids, j)
        if j == 0 and spec.top_k:
            top = _top(lp, mask, stop, spec, live)
        tok, lq_tok, inc_tok = _position(lp, k, tau, stop, spec, mask, None if forced is None else forced[:, j],
                                         generator, row_uniforms(generator, rows, live, R))
        column = [torch.where(live, tok, -1), torch.where(live, _at(lp, tok), -math.inf),
                  torch.where(live, lq_tok, -math.inf)]
        if k is not None:
            column.append(torch.where(live, inc_tok, -math.inf) if inc_tok is not None else None)
        if a is not None:
            column.append(torch.where(live, log_normaliser(lp, a, mask, stop, spec.allow_stop).to(dev), -math.inf))
        columns.append(tuple(column))
        is_stop = live & torch.isin(tok, stop)
        ended = ended | is_stop
        if delimited is not None:
            delimited = delimited | (live & ~is_stop & torch.isin(tok, end))
        if fn:
            for i, (t, l) in enumerate(zip(tok.tolist(), live.tolist())):
                if l:
                    prefixes[i].append(t)
        if j == W - 1 and feed_last is False:
            break                     # no row is fed at its budget's end: no forward for it
        feed = _fed(live & ~is_stop, budget <= j + 1, feed_last)
        fed = torch.where(feed, tok, 0)
        if every:
            state.step(fed, feed)
        else:
            state.step(torch.zeros(R, dtype=torch.long, device=dev).index_copy_(0, rows, fed),
                       torch.zeros(R, dtype=torch.bool, device=dev).index_copy_(0, rows, feed))
    out: dict[str, torch.Tensor | None] = {"ended": ended, "delimited": delimited, "log_inc": None}
    if spec.top_k:
        K = min(int(spec.top_k), V)
        out["top_ids"], out["top_log_p"] = top if top is not None else (
            torch.full((n, K), -1, dtype=torch.long, device=dev),
            torch.full((n, K), -math.inf, dtype=torch.float64, device=dev))
    if not columns:
        out.update(tokens=torch.empty((n, 0), dtype=torch.long, device=dev), log_inc=None,
                   **{x: torch.empty((n, 0), dtype=torch.float64, device=dev) for x in names[1:]})
    else:
        for i, x in enumerate(names):
            if x == "log_inc" and columns[0][i] is None:
                out[x] = None
                continue
            t = torch.stack([c[i] for c in columns], 1)
            if t.shape[1] < W:        # every row stopped early: pad to the block's width
                t = torch.cat([t, t.new_full((n, W - t.shape[1]), -1 if i == 0 else -math.inf)], 1)
            out[x] = t
    if spec.norm_next:
        out["log_norm_next"] = _norm_next(state, rows, spec, out["tokens"], ended, budget, feed_last, allowed, a,
                                          stop, prefixes, every)
    return out


def _subset_loop(state, rows: torch.Tensor, spec: BlockSpec, generator: torch.Generator | None,
                 ) -> dict[str, torch.Tensor | None]:
    """The host path of :func:`sample_tokenwise`: at each position, ``logprobs`` / ``extend`` on
    the rows still drawing only (the hook and ``mask_fn`` see exactly those); the block's fields
    by name, as :func:`_device_loop`."""
    dev, n, W, V = state.lm.device, len(rows), spec.width, state.lm.vocab_size
    budget, feed_last, stop, tau, allowed, forced = _spec_on(spec, dev)
    end, a = _extras(spec, dev)
    ended = torch.zeros(n, dtype=torch.bool, device=dev)
    delimited = None if end is None else torch.zeros(n, dtype=torch.bool, device=dev)
    row_ids = rows.tolist()
    prefixes = [list(state.tokens[r]) for r in row_ids] if spec.mask_fn is not None else None
    tokens = torch.full((n, W), -1, dtype=torch.long, device=dev)
    log_p = torch.full((n, W), -math.inf, dtype=torch.float64, device=dev)
    log_q = log_p.clone()
    log_norm = None if a is None else log_p.clone()
    log_inc = None
    top_ids = top_lp = None
    if spec.top_k:
        K = min(int(spec.top_k), V)
        top_ids = torch.full((n, K), -1, dtype=torch.long, device=dev)
        top_lp = torch.full((n, K), -math.inf, dtype=torch.float64, device=dev)
    for j in range(W):
        done = ended if delimited is None else ended | delimited
        sub = (~done & (budget > j)).nonzero().flatten()
        if len(sub) == 0:
            break
        lp = state.logprobs(rows[sub].cpu()).to(dev)
        mask = _mask_at(allowed, sub, spec, sub.cpu(), prefixes, len(sub), V, dev)
        if spec.mask_fn is not None or (allowed is not None and allowed.dim() == 2):
            _check_mass(mask, torch.ones(len(sub), dtype=torch.bool, device=dev), stop, spec,
                        [row_ids[i] for i in sub.tolist()], j)
        if j == 0 and top_ids is not None and top_lp is not None:
            top_ids[sub], top_lp[sub] = _top(lp, mask, stop, spec, torch.ones(len(sub), dtype=torch.bool))
        tok, lq_tok, inc_tok = _position(lp, sub, tau[sub], stop, spec, mask,
                                         None if forced is None else forced[sub, j], generator,
                                         row_uniforms(generator, rows[sub], None, state.n))
        tokens[sub, j] = tok
        log_p[sub, j] = _at(lp, tok)
        log_q[sub, j] = lq_tok
        if log_norm is not None:
            log_norm[sub, j] = log_normaliser(lp, a[sub], mask, stop, spec.allow_stop).to(dev)
        if inc_tok is not None:
            log_inc = log_p.new_full((n, W), -math.inf) if log_inc is None else log_inc
            log_inc[sub, j] = inc_tok
        is_stop = torch.isin(tok, stop)
        ended[sub] |= is_stop
        if delimited is not None:
            delimited[sub] |= ~is_stop & torch.isin(tok, end)
        if prefixes is not None:
            for i, t in zip(sub.tolist(), tok.tolist()):
                prefixes[i].append(t)
        feed = _fed(~is_stop, budget[sub] <= j + 1,
                    feed_last[sub] if isinstance(feed_last, torch.Tensor) else feed_last)
        if bool(feed.any()):
            state.extend(tok[feed].cpu(), rows[sub][feed].cpu())
    out = dict(tokens=tokens, log_p=log_p, log_q=log_q, log_inc=log_inc, log_norm=log_norm, ended=ended,
               delimited=delimited, top_ids=top_ids, top_log_p=top_lp)
    if spec.norm_next:
        out["log_norm_next"] = _norm_next(state, rows, spec, tokens, ended, budget, feed_last, allowed, a, stop,
                                          prefixes, False)
    return out


def check_extras(spec: BlockSpec, n: int, V: int) -> None:
    """``ValueError`` for a malformed mask, exponent or end id of ``spec`` for ``n`` rows of a
    vocabulary of ``V`` (shared by every backend's ``sample_block``)."""
    if spec.allowed is not None:
        shape = tuple(spec.allowed.shape)
        if shape not in ((V,), (n, V)) or spec.allowed.dtype != torch.bool:
            raise ValueError(f"the allowed-token mask must be ({V},) or ({n}, {V}) bool, got {shape} "
                             f"{spec.allowed.dtype}")
    if spec.mask_fn is not None and not callable(spec.mask_fn):
        raise ValueError(f"mask_fn must be callable, got {spec.mask_fn!r}")
    if spec.norm_exponent is not None:
        a = spec.norm_exponent
        if tuple(a.shape) != (n,) or not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError(f"norm_exponent must be ({n},) finite and >= 0, got shape {tuple(a.shape)}")
    if spec.norm_next and spec.norm_exponent is None:
        raise ValueError("norm_next needs norm_exponent (the exponent a of log Σ p^a · M)")
    if any(not 0 <= int(e) < V for e in spec.end_ids):
        raise ValueError(f"end ids must lie in [0, {V}), got {list(spec.end_ids)}")
    if isinstance(spec.top_k, bool) or not isinstance(spec.top_k, int) or spec.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {spec.top_k!r}")


def sample_tokenwise(state, rows: torch.Tensor | None, spec: BlockSpec, generator: torch.Generator | None) -> Block:
    """The reference :meth:`LMState.sample_block`: one batched forward per position.

    When ``rows`` covers every row of the state, or the block is one token, it runs on the
    device fast path (``last_logprobs`` / ``step``: no host sync for one token, one per
    position otherwise, to stop once every row is done).  For a subset of the rows it uses
    ``logprobs(rows)`` / ``extend`` on the rows still drawing, so the forward covers only them.
    A block of several tokens with a hook or forced tokens always takes that path, so the hook
    sees only the rows still drawing; a one-token block shows the hook every listed row (a row
    with budget 0 too: its draw is discarded), as SMC's token step needs.  ``mask_fn`` sees only
    the rows still drawing on both paths.
    """
    dev, R, W = state.lm.device, state.n, spec.width
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).to(dev)
    n = R if rows is None else len(rows)
    if spec.forced is not None and tuple(spec.forced.shape) != (n, W):
        raise ValueError(f"forced tokens must be ({n}, {W}) (rows, width), got {tuple(spec.forced.shape)}")
    if (spec.allowed is not None and spec.allowed.dim() != 1) or spec.mask_fn is not None or \
            spec.norm_exponent is not None or spec.end_ids or spec.norm_next or spec.top_k:
        check_extras(spec, n, state.lm.vocab_size)
    plain = spec.propose is None and spec.forced is None
    if W == 1 or (n == R and plain):
        out = _device_loop(state, rows, spec, generator)
    else:
        rows = torch.arange(R, device=dev) if rows is None else rows
        out = _subset_loop(state, rows, spec, generator)
    tokens = out["tokens"]
    return Block(tokens, out["log_p"], out["log_q"], out["ended"], (tokens >= 0).sum(1), out["log_inc"],
                 out.get("log_norm"), out.get("log_norm_next"), out.get("delimited"), out.get("top_ids"),
                 out.get("top_log_p"))


__all__ = ["Block", "BlockSpec", "NotNative", "Propose", "Sampler", "MaskFn", "proposal_logprobs",
           "sample_inverse_cdf", "invert_weights", "sample_tempered", "log_normaliser", "check_extras",
           "sample_tokenwise", "LOG_Q_FLOOR", "SAMPLE_BLOCK"]
