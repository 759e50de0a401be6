"""The proposal protocol: ``q_t(v | y_<t)`` for SMC, MH and the baselines.

* ``log_probs(ctx) -> (B, V)``: normalised ``log q(v | y_<t)`` for the rows in ``ctx``;
  a token with ``q = 0`` is never drawn, and engines correct by ``−log q`` in the
  weights, so any ``q`` whose support covers the target's is exact.
* ``sample(log_q, generator) -> (B,)``: one draw per row.
* stateful proposals (another LM, caches) override ``start`` / ``on_extend`` /
  ``on_reorder`` / ``on_finish`` to follow the engine's particles.
* ``vectorised = True`` promises that ``log_probs`` is a row-wise function of
  ``ctx.batch.base_logprobs``, the target and the exponent (no LM state, no Python per
  row): the SMC engine then evaluates it on every row at once without a host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..targets.base import Prefixes

#: ``log q`` below this counts as probability 0 when sampling (see ``Proposal.sample``)
LOG_Q_FLOOR = -80.0
#: tokens per block of the two-level inverse-CDF sampler (``Proposal.sample``)
SAMPLE_BLOCK = 1024


@dataclass
class ProposalContext:
    """Everything a proposal may look at for one batched step."""

    target: Any
    batch: Prefixes
    state: Any = None
    rows: torch.Tensor | None = None
    exponent: float | torch.Tensor = 1.0   # a_t: a float, or a (B, 1) tensor (one per row)
    generator: torch.Generator | None = None
    #: the run's token budget (completions have at most this many tokens, EOS included), so
    #: that proposals which decode ahead (``Lookahead``) never look past it; None: unknown
    max_new_tokens: int | None = None


class Proposal:
    """Base class: ``q(v | y_<t)``; stateless unless the hooks are overridden."""

    #: ``log_probs`` is row-wise on ``base_logprobs`` (see module docstring)
    vectorised: bool = False

    @property
    def stateful(self) -> bool:
        """True when the proposal has its own decoding state that follows the particles
        through the ``on_*`` hooks (another LM, a cache): it overrides ``on_extend``.  Engines
        then call the hooks (SMC: a host sync per token), and MH and rejuvenation refuse it
        (they truncate particles behind its back).  A wrapper that only forwards the hooks
        (``TopK``, ``TopP``) is stateful exactly when its inner proposal is.  This property is
        the one definition every engine uses (``proposals.is_stateful``)."""
        return type(self).on_extend is not Proposal.on_extend

    #: the prefix of this proposal's own LM work in ``Result.stats``
    #: (``<name>_tokens_decoded``, ``<name>_forward_passes``); None: it does none
    work_name: str | None = None

    def work(self) -> tuple[int, dict[int, int]]:
        """The LM work this proposal did since ``start`` on top of the engine's own decoding
        state: ``(forward passes, {prompt index: tokens decoded})``.  Engines add it to
        ``Result.stats`` (``forward_passes``, ``tokens_decoded``) so stats count all LM work."""
        return 0, {}

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        raise NotImplementedError

    def start(self, target: Any, prompt_ids: list[int], n: int) -> None:
        """Called once per run, before the first step, with the number of particles."""

    def on_extend(self, tokens: Sequence[Sequence[int]], rows: torch.Tensor) -> None:
        """Rows ``rows`` were extended by ``tokens``."""

    def on_reorder(self, indices: torch.Tensor) -> None:
        """Row j became a copy of row ``indices[j]``."""

    def on_finish(self, rows: torch.Tensor) -> None:
        """Rows will not be extended any more."""

    def sample(self, log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw per row from ``q = exp(log_q)`` by inversion, in two levels.

        With ``U ~ U[0, 1)`` from ``generator``, the vocabulary cut into blocks of
        ``SAMPLE_BLOCK`` tokens, ``S_b`` their float64 sums and ``C`` the running sums:
        block ``b = min{b : C_b > U·C_last}``, then inside it the token
        ``v = min{v : c_v > U·C_last − C_{b−1}}`` with ``c`` the float64 cumulative sums
        of the block.  This is ``v = min{v : C_v > U·C_V}`` over the whole vocabulary,
        with one float64 cumulative sum of a block per row instead of the full row.

        Tokens with ``log q < −80`` (``q < 1.8e−35``, at most ~1e−30 of the mass for any
        vocabulary) count as probability 0: their float32 ``exp`` would be denormal, which is
        an order of magnitude slower on CPUs, and below the resolution of the float64 sums.
        (Inversion is ~6× faster than ``torch.multinomial`` on a CPU for a 49k vocabulary.)
        """
        B, V = log_q.shape
        p = log_q.masked_fill(log_q < LOG_Q_FLOOR, -math.inf).exp_()
        K = SAMPLE_BLOCK
        full, tail = divmod(V, K)
        sums = p[:, :full * K].reshape(B, full, K).sum(-1, dtype=torch.float64)
        if tail:
            sums = torch.cat([sums, p[:, full * K:].sum(-1, dtype=torch.float64, keepdim=True)], 1)
        cum = sums.cumsum(-1)
        dev = generator.device if generator is not None else log_q.device
        u = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=dev).to(cum.device)
        u = u * cum[:, -1:]
        block = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[1] - 1)
        before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))
        cols = block * K + torch.arange(K, device=log_q.device)
        inside = p.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0.0).double().cumsum(-1)
        # rounding can put U·C_last − C_{b−1} at or past the block's own total: take its last token with mass
        rest = torch.minimum(u - before, inside[:, -1:] * (1.0 - 1e-12))
        return (cols.gather(1, torch.searchsorted(inside, rest, right=True))).squeeze(1)


def exponent_of(ctx: ProposalContext) -> float | torch.Tensor:
    """``a_t`` as a float or a ``(B, 1)`` tensor on the log-probs' device.

    The rule every engine follows: ``a_t ≥ 0`` and finite.  ``a_t = 0`` is the exponent of a
    target without a ``Power`` factor that replaces ``p`` (``Target(lm, Tempered(τ))``); a
    float is checked here, a per-row tensor (SMC's, built from the schedule) is not, to
    avoid a host sync per token.
    """
    a = ctx.exponent
    if isinstance(a, torch.Tensor):
        return a.reshape(-1, 1).to(ctx.batch.base_logprobs)
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(f"the proposal needs a finite exponent a_t >= 0, got {a}")
    return float(a)
